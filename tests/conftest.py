"""Fixtures: real embedded Postgres clusters in temporary project folders.

Clusters are created with the same code as `cdl stack up`. Project folders are private (mode 700)
like a clone under /root: when the tests run as root, each cluster lives under /var/lib/cdl, so
every fixture deletes its stacks with `purge` (`cdl stack down --purge`), not just its folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from pipelines.core.config import load_settings
from pipelines.core.stack import Stack

REPO = Path(__file__).resolve().parents[1]


def make_project(config: dict | None = None, name: str = "project") -> Path:
    """A folder with a cdl.yaml, in a private temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="cdl-test-")) / name
    folder.mkdir()
    config = config or {"default_stack": "local", "stacks": {"local": {"home": ".cdl"}}}
    (folder / "cdl.yaml").write_text(yaml.safe_dump(config))
    return folder


def stack_for(folder: Path, environ: dict | None = None, stack: str | None = None) -> Stack:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDL_")}
    env.update(environ or {})
    return Stack(load_settings(folder / "cdl.yaml", stack=stack, environ=env))


def destroy(stack: Stack) -> None:
    try:
        stack.purge()
    finally:
        shutil.rmtree(stack.settings.root.parent, ignore_errors=True)


@pytest.fixture
def project_factory():
    """Make throwaway projects; their stacks are stopped and removed afterwards."""
    made: list[Stack] = []

    def factory(config: dict | None = None, name: str = "project", environ: dict | None = None):
        stack = stack_for(make_project(config, name), environ)
        made.append(stack)
        return stack

    yield factory
    for stack in made:
        destroy(stack)


@pytest.fixture
def project_dir():
    """Make throwaway project folders for tests that drive the CLI; each is stopped and removed
    afterwards."""
    made: list[Path] = []

    def factory(config: dict | None = None) -> Path:
        made.append(make_project(config))
        return made[-1]

    yield factory
    for folder in made:
        if (folder / ".cdl").exists():
            cdl("stack", "down", "--purge", cwd=folder)
        shutil.rmtree(folder.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_stack():
    """One running stack for the tests that only read and write rows."""
    stack = stack_for(make_project())
    stack.up()
    yield stack
    destroy(stack)


@pytest.fixture
def conn(shared_stack):
    with shared_stack.connect(autocommit=True) as connection:
        yield connection


def cdl(*args: str, cwd: Path, env: dict | None = None, timeout: float = 120):
    """Run the real `cdl` command line in a subprocess."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CDL_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli.main", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


MODEL_CODE = REPO / "tests" / "model" / "models"


def register_model(
    stack: Stack,
    name: str,
    code: str,
    *,
    alias: str | None = None,
    artifacts: dict | None = None,
    model_config: dict | None = None,
) -> str:
    """Log the models-from-code file tests/model/models/<code>.py as a new version of registered
    model `name` (the alias moved to it, when given); return the version."""
    import mlflow

    from pipelines.model import tracking

    client = tracking.client(stack)
    with mlflow.start_run(experiment_id=tracking.experiment_id(stack, name)):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE / f"{code}.py"),
            artifacts=artifacts,
            model_config=model_config,
            pip_requirements=["mlflow", "numpy", "pandas"],
            registered_model_name=name,
        )
    version = str(info.registered_model_version)
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return version
