"""The plugin table: which class serves each swappable concern on each engine.

Each concern has a port (a small interface documenting its contract) and backends that implement
it. The table maps (concern, engine) to "module:Class"; a backend's module is imported only when
a stack selects it, so optional SDKs (pachyderm-sdk, boto3, mlflow) stay optional. The config's
engine names come from here (`engines`), and one factory per concern picks the backend.

Adding a backend is one class implementing the port, one line here, and the port's contract
test (tests/<package>/test_<concern>_contract.py) passing for it.
"""

from __future__ import annotations

import importlib
from typing import Any

from pipelines.core.errors import NotFound, Unsupported

PLUGINS: dict[str, dict[str, str]] = {
    # Where the platform's Postgres comes from: a cluster under the stack home, or a DSN.
    "postgres": {
        "embedded": "pipelines.core.postgres:EmbeddedPostgres",
        "external": "pipelines.core.postgres:ExternalPostgres",
    },
    # File bytes of data commits, addressed by sha256 (port: core/objects.py ObjectStore).
    "object_store": {
        "local": "pipelines.core.objects:LocalObjectStore",
        "s3": "pipelines.core.objects:S3ObjectStore",
    },
    # Versioned data: repos, branches, commits, files (port: data/backend.py DataBackend).
    "data": {
        "local": "pipelines.data.repos:DataRepos",
        "pachyderm": "pipelines.data.pachyderm:PachydermRepos",
    },
    # Pipelines and their jobs (port: data/backend.py PipelineBackend).
    "pipelines": {
        "local": "pipelines.data.engine:PipelineEngine",
        "pachyderm": "pipelines.data.pachyderm:PachydermPipelines",
    },
    # Hyperparameter searches and their trials (port: model/experiments.py ExperimentEngine).
    "experiments": {
        "local": "pipelines.model.search:LocalExperiments",
        "determined": "pipelines.model.determined:DeterminedExperiments",
    },
    # A use case's model: preprocessing, training, the saved model (port: model/trainer.py
    # Trainer). Keyed by use case, not engine: each use case has its one trainer.
    "trainer": {
        "bbc_news": "pipelines.model.trainers.bbc_news:BBCNewsTrainer",
        "fashion_mnist": "pipelines.model.trainers.fashion_mnist:FashionMNISTTrainer",
    },
}

# The packages that run supervised services: each has `services(stack) -> list[Service]`.
SERVICE_PROVIDERS = ("pipelines.core.events", "pipelines.data.services", "pipelines.model.services")


def engines(concern: str) -> tuple[str, ...]:
    return tuple(PLUGINS[concern])


def target(concern: str, engine: str) -> str | None:
    """The "module:Class" registered for `engine` under `concern`, without importing it."""
    return PLUGINS.get(concern, {}).get(engine)


def backend_class(concern: str, engine: str) -> Any:
    """The class registered for `engine` under `concern`, imported now."""
    try:
        target = PLUGINS[concern][engine]
    except KeyError:
        known = ", ".join(PLUGINS.get(concern, {})) or "none"
        raise Unsupported(
            f"no {concern} backend '{engine}' (known: {known})",
            "pick one of the known engines in cdl.yaml",
        ) from None
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def trainer_class(use_case: str) -> Any:
    """The Trainer class of a use case, imported now (with its framework: torch, keras)."""
    target = PLUGINS["trainer"].get(use_case)
    if target is None:
        raise NotFound(
            f"no trainer for use case '{use_case}' (known: {', '.join(PLUGINS['trainer'])})",
            "add one to the `trainer` table in pipelines/plugins.py",
        )
    return load(target)


def load(path: str) -> Any:
    """An object named "module:attribute"."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)
