"""MLflow for a stack: experiment tracking and the model registry.

By default MLflow keeps its tables in the stack's own Postgres (the `mlflow` database) and its
artifacts under `<home>/artifacts`: clients write there directly, no server needed (`mlflow
server` is only for the UI). `tracking.uri` in the stack config points at an MLflow server
instead, for a team.
"""

from __future__ import annotations

import os

import psycopg

from pipelines.core import db
from pipelines.core.errors import StackError
from pipelines.core.postgres import mask_password
from pipelines.core.stack import Stack

# Two commands touching a fresh database at once would both create MLflow's tables.
SCHEMA_LOCK = "cdl.mlflow.schema"


def _database_dsn(stack: Stack) -> str:
    return stack.dsn(stack.settings.stack.postgres.databases.mlflow)


def tracking_uri(stack: Stack) -> str:
    configured = stack.settings.stack.tracking.uri
    if configured:
        return configured
    return "postgresql+psycopg://" + _database_dsn(stack).split("://", 1)[1]


def client(stack: Stack):
    """An MlflowClient on the stack's tracking store, also made the default of the `mlflow`
    module (for `mlflow.start_run`, `mlflow.pyfunc.load_model("models:/...")`)."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    # MLflow's per-file download bars would fill a command's output; commands show their own.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = tracking_uri(stack)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        if stack.settings.stack.tracking.uri:
            tracker = MlflowClient(uri, uri)
            tracker.search_experiments(max_results=1)
        else:
            with (
                psycopg.connect(_database_dsn(stack), connect_timeout=5) as conn,
                db.advisory_lock(conn, SCHEMA_LOCK),
            ):
                tracker = MlflowClient(uri, uri)
                tracker.search_experiments(max_results=1)  # creates or upgrades the tables
    except (psycopg.OperationalError, MlflowException) as exc:
        raise StackError(
            f"cannot reach MLflow tracking at {mask_password(uri)}: {str(exc).splitlines()[0]}",
            "run 'cdl stack up', or fix tracking.uri in cdl.yaml",
        ) from exc
    return tracker


def experiment_id(stack: Stack, name: str) -> str:
    """The id of experiment `name`, created with its artifacts under the stack's artifact root."""
    tracker = client(stack)
    found = tracker.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    from mlflow.exceptions import MlflowException

    root = stack.settings.stack.tracking.artifacts
    try:
        return tracker.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)
    except MlflowException:
        found = tracker.get_experiment_by_name(name)  # created meanwhile by another command
        if found is None:
            raise
        return found.experiment_id
