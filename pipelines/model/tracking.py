"""MLflow for a stack: experiment tracking and the model registry.

By default MLflow keeps its tables in the stack's own Postgres (the `mlflow` database) and its
artifacts under `<home>/artifacts`: clients write there directly, no server needed (`mlflow
server` is only for the UI). `tracking.uri` in the stack config points at an MLflow server
instead, for a team.
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import psycopg

from pipelines.core import db
from pipelines.core.errors import StackError
from pipelines.core.postgres import mask_password
from pipelines.core.stack import Stack

# Two commands touching a fresh database at once would both create MLflow's tables.
SCHEMA_LOCK = "cdl.mlflow.schema"
# Where a trial's files go in its run.
MODEL_ARTIFACT = "model"  # the trained model (MLflow pyfunc), as the registry expects it
CHECKPOINT_ARTIFACT = "checkpoint"  # the final checkpoint's files
LEARNING_CURVES = "plots/learning_curves.png"
CONFUSION_MATRIX = "plots/confusion_matrix.png"


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


def start_run(
    tracker, experiment: str, name: str, tags: dict[str, str], params: dict | None = None
) -> str:
    """A new run (nested when `tags` name an `mlflow.parentRunId`) with its params; its id."""
    from mlflow.entities import Param

    run = tracker.create_run(experiment, run_name=name, tags=tags)
    if params:
        tracker.log_batch(
            run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()]
        )
    return run.info.run_id


def log_metrics(tracker, run_id: str, metrics: dict[str, float], step: int) -> None:
    """One epoch's metrics in one call (one `log_batch`, not a call per metric)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    tracker.log_batch(
        run_id, metrics=[Metric(k, float(v), now, step) for k, v in sorted(metrics.items())]
    )


class EpochLog:
    """A trial's per-epoch metrics sent from a thread of its own, one `send(metrics, epoch)` (a
    `log_metrics`) per epoch, in order, so that training does not wait on the database between
    epochs. `close` waits until all are sent and raises the first error (later ones are not
    sent); `put` raises it too once it happened. A process killed outright loses what was not
    sent yet (at most the last epoch's metrics, tens of ms; its trial log keeps them)."""

    def __init__(self, send: Callable[[dict[str, float], int], None]):
        self.send = send
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True, name="epoch-log")
        self._thread.start()

    def put(self, metrics, epoch: int) -> None:
        if self.error is not None:
            raise self.error
        self._queue.put((dict(metrics), epoch))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self.error is None:
                try:
                    self.send(*item)
                except BaseException as exc:
                    self.error = exc

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self.error is not None:
            raise self.error


def log_tags(tracker, run_id: str, tags: dict[str, str]) -> None:
    """Several tags in one call."""
    from mlflow.entities import RunTag

    tracker.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in sorted(tags.items())])


def metric_history(tracker, run_id: str, names: Sequence[str]) -> dict[str, list[tuple]]:
    """{metric: [(step, value), ...]} of a run, the latest value per step (a resumed trial may
    have logged an epoch twice)."""
    found = {}
    for name in names:
        by_step = {}
        for metric in sorted(tracker.get_metric_history(run_id, name), key=lambda m: m.timestamp):
            by_step[metric.step] = metric.value
        if by_step:
            found[name] = sorted(by_step.items())
    return found


def log_training_data(
    tracker, run_id: str, snapshot: str, rows: Sequence[tuple[str, str]], commits: Sequence[str]
) -> None:
    """The training data as MLflow dataset inputs (context `training`), in one call: the label
    snapshot (`use_case/name`) and each data commit (`repo@commit`) it draws from, each a table
    of the train split's (source, label) rows, so that its digest and profile follow the rows.
    File contents are not logged. Runs are then found with `dataset.name = 'bbc_news/first'`."""
    import mlflow.data
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from pipelines.model.dataset_source import DataCommitSource, LabelSnapshotSource

    table = pd.DataFrame(list(rows), columns=["source", "label"])
    parts = [(snapshot, LabelSnapshotSource(snapshot), table)]
    commit_of = table["source"].str.split(":", n=1).str[0]
    parts += [(c, DataCommitSource(c), table[commit_of == c]) for c in commits]
    context = [InputTag(MLFLOW_DATASET_CONTEXT, "training")]
    inputs = [
        DatasetInput(
            mlflow.data.from_pandas(
                frame.reset_index(drop=True), source=source, name=name, targets="label"
            )._to_mlflow_entity(),
            tags=context,
        )
        for name, source, frame in parts
    ]
    tracker.log_inputs(run_id, datasets=inputs)


def log_files(tracker, run_id: str, folder: Path, artifact_path: str) -> list[str]:
    """The files directly in `folder` (not hidden ones: a trainer's half-written checkpoints)
    as artifacts under `artifact_path`; their names."""
    names = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            tracker.log_artifact(run_id, str(path), artifact_path)
            names.append(path.name)
    return names


def log_png(tracker, run_id: str, artifact_file: str, png: bytes) -> None:
    """PNG bytes as the artifact `artifact_file` (e.g. plots/learning_curves.png)."""
    folder, _, name = artifact_file.rpartition("/")
    with tempfile.TemporaryDirectory(prefix="cdl-png-") as scratch:
        path = Path(scratch) / name
        path.write_bytes(png)
        tracker.log_artifact(run_id, str(path), folder or None)


def model_tags(model, features) -> dict[str, str]:
    """A trial's tags once its trainer is built: the parameter count (`cdl.parameters`, which
    the registry reads), the features' lineage key and stored size when the transformation
    registry made them (`cdl.features`, `cdl.features.bytes`), their train and validation rows."""
    tags = {
        "cdl.features.train_rows": str(len(features.y_train)),
        "cdl.features.val_rows": str(len(features.y_val)),
    }
    if features.origin:
        tags["cdl.features"] = str(features.origin["key"])
        tags["cdl.features.bytes"] = str(features.origin["bytes"])
    count = model.parameter_count()
    if count is not None:
        tags["cdl.parameters"] = str(int(count))
    return tags


def outcome_logs(
    tracker, run_id: str, model, labels, checkpoints: Path, completed: bool, title: str
) -> list[tuple[str, Callable[[], None]]]:
    """What a trial logs when it ends, as (what, call) pairs to run one by one (each can be
    retried or given up alone): the final checkpoint (CHECKPOINT_ARTIFACT/), the learning curves
    from the run's metric history, and for a completed trial the validation confusion matrix
    (when the trainer gives its `validation_predictions`)."""
    from pipelines.model import plots

    def checkpoint() -> None:
        log_files(tracker, run_id, checkpoints, CHECKPOINT_ARTIFACT)

    def curves() -> None:
        history = metric_history(tracker, run_id, [*plots.LOSSES, plots.ACCURACY])
        log_png(tracker, run_id, LEARNING_CURVES, plots.learning_curves(history, title))

    def confusion() -> None:
        predictions = model.validation_predictions()
        if predictions is not None:  # the trainer cannot tell
            png = plots.confusion_matrix(*predictions, labels, title)
            log_png(tracker, run_id, CONFUSION_MATRIX, png)

    logs = [("its checkpoint", checkpoint), ("its learning curves", curves)]
    if completed:
        logs.append(("its confusion matrix", confusion))
    return logs
