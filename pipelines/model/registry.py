"""The model registry: MLflow registered models, one per use case, with aliases.

A use case's models are registered as `<use-case>` with `_` as `-` (bbc_news -> `bbc-news`).
Aliases mark the versions that matter: `candidate` (passed evaluation) and `champion` (approved
for production). Every registered CDL model is an MLflow pyfunc model with one contract, so that
labeling, evaluation and serving can call any of them the same way:

- input, per use-case task: `text` -> a pandas DataFrame with a `text` column (a file's
  content: title line, newline, body); `image` -> a numpy uint8 array (N, height, width[,
  channels]) of decoded images;
- output: one row per input with a `label` (one of the use case's labels) and a `score` (the
  model's confidence, 0..1), as a DataFrame or a dict of columns.

Registration (`register`) turns a finished training run into a version. It takes an MLflow run
id, or an experiment (its MLflow parent run, or its CDL experiment id) which stands for its best
trial: `training_run` is the one place that resolves them. The run must have ended (FINISHED),
carry `cdl.snapshot` (`<use_case>/<snapshot>`) and hold an MLflow model at artifact path `model`
(logged with `log_artifacts(folder, "model")` or `pyfunc.log_model(name="model")`). The version
gets the metadata a person or a program needs to pick a model, as model version tags:

- lineage: `cdl.run`, `cdl.experiment`, `cdl.trial`, `cdl.parent_run` (when resolved from an
  experiment), `cdl.snapshot`, `cdl.data_commits` (the repo@commit refs of the snapshot's train
  files), `cdl.git_sha` and `cdl.git_dirty` with `cdl.git_sha_from` (`run`: the run's
  provenance tags, see provenance.py; `registration`: the CDL checkout that registers it, when
  the run has none);
- what it is: `cdl.use_case`, `cdl.task`, `cdl.labels` (JSON list: the model's own label set);
- how good: `cdl.metric.<name>` for the run's last `val_accuracy`, `val_loss` and `loss`;
- how big and fast: `cdl.parameters` (trainable and frozen weights; read from the run's
  `cdl.parameters` tag or param when the trainer logged one, else counted in the loaded model's
  torch modules or Keras models: `cdl.parameters_from` says which), `cdl.artifact_bytes` (every
  file of the model artifact), and `cdl.latency_ms` / `cdl.latency_p95_ms`: the wall time of one
  `predict` call on one input through the pyfunc model in the registering process (on its CPU,
  after one warm-up call; preprocessing included), median and 95th percentile over
  `LATENCY_ROUNDS` rounds of `LATENCY_INPUTS` inputs (`cdl.latency_inputs`: how many calls):
  for text, files of the snapshot's train split read from the data backend; for images, zeros of
  the model's image shape. It runs with the process's default torch/TensorFlow threads, so it
  is a figure to compare versions registered on the same machine, not a serving benchmark;
- who: `cdl.registered_by` (the registering user).

A run is registered once: registering it again names the version it became.

Evaluation (evaluation.py) adds `cdl.eval.*` tags; approval (approvals.py) moves `champion`.
A version is recorded in lineage as `model_version:<name>/<version>`, produced by its
training run's `run:<run id>` node, which consumed the label snapshot; `model.registered` is
emitted in the same transaction.
"""

from __future__ import annotations

import getpass
import io
import json
import re
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipelines.core import db, events, lineage
from pipelines.core.errors import AlreadyExists, CDLError, Invalid, NotFound, Unavailable
from pipelines.core.stack import Stack
from pipelines.model import tracking

CANDIDATE = "candidate"
CHAMPION = "champion"
CONTRACT = "return a 'label' and a 'score' per input (see pipelines/model/registry.py)"
MODEL_ARTIFACT = tracking.MODEL_ARTIFACT  # where a training run keeps its MLflow model
RUN_METRICS = ("val_accuracy", "val_loss", "loss")  # the run's last values become tags
PARAMETERS_TAG = "cdl.parameters"  # trial runs carry it (tracking.model_tags), or a param
LATENCY_INPUTS = 5
LATENCY_ROUNDS = 3
CHECKOUT = Path(__file__).resolve().parents[2]
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,255}$")


def registered_name(use_case: str) -> str:
    return use_case.replace("_", "-")


def model_inputs(task: str, blobs: list[bytes]) -> Any:
    """Files' bytes as a CDL model's input for a task (`text` or `image`)."""
    if task == "text":
        import pandas as pd

        return pd.DataFrame({"text": [b.decode("utf-8", errors="replace") for b in blobs]})
    import numpy as np
    from PIL import Image

    arrays = [np.asarray(Image.open(io.BytesIO(b))) for b in blobs]
    shapes = sorted({a.shape for a in arrays})
    if len(shapes) > 1:
        raise Invalid(
            f"images of different shapes {shapes} cannot be scored in one batch",
            "validate the images to one shape first (the use case's validate step)",
        )
    return np.stack(arrays).astype(np.uint8)


@dataclass
class RegisteredModel:
    """One loaded model version."""

    name: str
    version: str
    model: Any  # mlflow.pyfunc.PyFuncModel

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"

    def predict(self, task: str, blobs: list[bytes]) -> list[tuple[str, float]]:
        """(label, score) for each file's bytes."""
        import pandas as pd

        if not blobs:
            return []
        try:
            answer = pd.DataFrame(self.model.predict(model_inputs(task, blobs)))
        except CDLError:
            raise
        except Exception as exc:
            raise Invalid(
                f"model {self.ref} failed to predict: {type(exc).__name__}: {exc}", CONTRACT
            ) from exc
        if "label" not in answer.columns or len(answer) != len(blobs):
            raise Invalid(
                f"model {self.ref} answered {len(answer)} row(s) with columns "
                f"{list(answer.columns)} for {len(blobs)} input(s)",
                CONTRACT,
            )
        scores = answer["score"] if "score" in answer.columns else [0.0] * len(answer)
        return [
            (str(label), float(score)) for label, score in zip(answer["label"], scores, strict=True)
        ]


@dataclass(frozen=True)
class VersionInfo:
    """One registered model version as CDL sees it: its tags (the metadata above) and
    aliases."""

    name: str
    version: str
    run_id: str | None
    source: str
    tags: dict[str, str]
    aliases: list[str]
    created_at: datetime

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"

    @property
    def number(self) -> int:
        return int(self.version)

    @property
    def use_case(self) -> str:
        return self.tags.get("cdl.use_case") or self.name.replace("-", "_")

    @property
    def snapshot(self) -> str | None:
        """The snapshot name (without the use case) the version was trained on."""
        value = self.tags.get("cdl.snapshot")
        return value.split("/", 1)[1] if value and "/" in value else value

    @property
    def task(self) -> str | None:
        return self.tags.get("cdl.task")

    @property
    def passed(self) -> bool:
        """Whether its last evaluation passed the gate."""
        return self.tags.get("cdl.eval.passed") == "true"

    def number_tag(self, key: str) -> float | None:
        try:
            return float(self.tags[key])
        except (KeyError, ValueError):
            return None


@dataclass(frozen=True)
class TrainingRun:
    """A finished training run that holds a model: what registration reads."""

    run_id: str
    status: str
    use_case: str
    snapshot: str  # the snapshot's name, without the use case
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    artifact_uri: str
    mlflow_experiment: str
    parent_run: str | None = None  # the experiment's run it was resolved from

    @property
    def experiment(self) -> str | None:
        return self.tags.get("cdl.experiment")

    @property
    def trial(self) -> str | None:
        return self.tags.get("cdl.trial")


@dataclass
class Registration:
    """What `register` did: the new version and what was measured for it."""

    version: VersionInfo
    run: TrainingRun
    seconds: float
    notes: list[str] = field(default_factory=list)


def _mlflow_error(what: str, exc: Exception) -> Unavailable:
    return Unavailable(
        f"MLflow could not {what}: {str(exc).splitlines()[0]}",
        "check the tracking store ('cdl stack status', tracking.uri)",
    )


def _missing(exc: Exception) -> bool:
    return getattr(exc, "error_code", None) in (
        "RESOURCE_DOES_NOT_EXIST",
        "INVALID_PARAMETER_VALUE",
    )


class Registry:
    """The stack's registered models, through MLflow's client. MLflow's errors are translated
    here; callers get CDL errors and `VersionInfo`s."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self.client = tracking.client(stack)

    # -- reading -------------------------------------------------------------------------------

    def version(self, name: str, alias: str):
        """The ModelVersion that carries `alias`, or None when the model or alias is unknown."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(name, alias)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise Unavailable(
                f"MLflow could not look up {name}@{alias}: {str(exc).splitlines()[0]}",
                "check the tracking store ('cdl stack status', tracking.uri)",
            ) from exc

    def load(self, name: str, alias: str) -> RegisteredModel | None:
        """The version that carries `alias`, loaded; None when there is none."""
        found = self.version(name, alias)
        if found is None:
            return None
        return self._load(name, found.version, f" ({name}@{alias})")

    def load_version(self, info: VersionInfo) -> RegisteredModel:
        return self._load(info.name, info.version, "")

    def _load(self, name: str, version: str, how: str) -> RegisteredModel:
        import mlflow

        try:
            model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
        except Exception as exc:
            raise Unavailable(
                f"cannot load model {name}/{version}{how}: {exc}",
                "check the version's artifacts in MLflow, or move the alias to another version",
            ) from exc
        return RegisteredModel(name, version, model)

    def names(self) -> list[str]:
        """Every registered model's name, sorted."""
        try:
            return sorted(m.name for m in self.client.search_registered_models())
        except Exception as exc:
            raise _mlflow_error("list the registered models", exc) from exc

    def versions(self, name: str) -> list[VersionInfo]:
        """A registered model's versions, newest first ([] when the model does not exist)."""
        name = checked_name(name)
        try:
            found = self.client.search_model_versions(f"name = '{name}'")
        except Exception as exc:
            raise _mlflow_error(f"list the versions of {name}", exc) from exc
        # search results may leave aliases out: read them from the registered model
        aliases = self._aliases(name) if found else {}
        infos = [_info(v, aliases.get(str(v.version), [])) for v in found]
        return sorted(infos, key=lambda v: v.number, reverse=True)

    def _aliases(self, name: str) -> dict[str, list[str]]:
        from mlflow.exceptions import MlflowException

        try:
            model = self.client.get_registered_model(name)
        except MlflowException as exc:
            if _missing(exc):
                return {}
            raise _mlflow_error(f"read model {name}", exc) from exc
        out: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            out.setdefault(str(version), []).append(alias)
        return {k: sorted(v) for k, v in out.items()}

    def get(self, ref: str) -> VersionInfo:
        """`NAME/VERSION` or `NAME@ALIAS` (NAME as registered, bbc-news, or as the use case,
        bbc_news): that version, or NotFound saying what exists."""
        from mlflow.exceptions import MlflowException

        name, version, alias = parse_ref(ref)
        if alias is not None:
            found = self.version(name, alias)
            if found is None:
                raise NotFound(
                    f"no version of model {name} carries alias '{alias}'",
                    f"see 'cdl model list {name}'",
                )
            version = str(found.version)
        try:
            found = self.client.get_model_version(name, version)
        except MlflowException as exc:
            if not _missing(exc):
                raise _mlflow_error(f"read {name}/{version}", exc) from exc
            known = [v.version for v in self.versions(name)]
            if not known:
                raise NotFound(
                    f"no registered model {name}",
                    "register one with 'cdl model register EXPERIMENT|RUN' (see 'cdl model list')",
                ) from None
            raise NotFound(
                f"model {name} has no version {version} (versions: "
                f"{', '.join(known[:10])}{', ...' if len(known) > 10 else ''})",
                f"see 'cdl model list {name}'",
            ) from None
        return _info(found, self._aliases(name).get(str(found.version), []))

    def champion(self, name: str) -> VersionInfo | None:
        found = self.version(registered_name(name), CHAMPION)
        return None if found is None else self.get(f"{registered_name(name)}/{found.version}")

    # -- writing -------------------------------------------------------------------------------

    def set_tags(self, info: VersionInfo, tags: dict[str, Any]) -> None:
        try:
            for key, value in tags.items():
                self.client.set_model_version_tag(info.name, info.version, key, str(value))
        except Exception as exc:
            raise _mlflow_error(f"tag {info.ref}", exc) from exc

    def set_alias(self, info: VersionInfo, alias: str) -> None:
        try:
            self.client.set_registered_model_alias(info.name, alias, info.version)
        except Exception as exc:
            raise _mlflow_error(f"move alias {alias} to {info.ref}", exc) from exc

    def delete_alias(self, name: str, alias: str) -> None:
        try:
            self.client.delete_registered_model_alias(name, alias)
        except Exception as exc:
            raise _mlflow_error(f"delete alias {name}@{alias}", exc) from exc


def checked_name(name: str) -> str:
    """A registered model's name from user input (bbc_news or bbc-news -> bbc-news)."""
    if not MODEL_NAME.match(name):
        raise Invalid(
            f"'{name}' is not a registered model name", "e.g. bbc-news (see 'cdl model list')"
        )
    return registered_name(name)


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """'bbc-news/3' -> (bbc-news, 3, None); 'bbc_news@champion' -> (bbc-news, None, champion)."""
    name, slash, version = ref.partition("/")
    if slash:
        if not version.isdigit():
            raise Invalid(f"'{ref}': '{version}' is not a version number", "e.g. bbc-news/3")
        return checked_name(name), str(int(version)), None
    name, at, alias = ref.partition("@")
    if at and alias:
        return checked_name(name), None, alias
    raise Invalid(
        f"'{ref}' names no model version",
        "use NAME/VERSION (bbc-news/3) or NAME@ALIAS (bbc-news@champion)",
    )


def _info(version, aliases: list[str]) -> VersionInfo:
    return VersionInfo(
        name=version.name,
        version=str(version.version),
        run_id=version.run_id or None,
        source=version.source,
        tags=dict(version.tags or {}),
        aliases=sorted(set(aliases) | set(getattr(version, "aliases", None) or [])),
        created_at=datetime.fromtimestamp(version.creation_timestamp / 1000, timezone.utc),
    )


# -- which run: runs, experiments' parent runs, CDL experiment ids ----------------------------


def training_run(client, ref: str) -> TrainingRun:
    """The training run that `ref` names: an MLflow run id (a trial's run), an experiment's
    MLflow parent run (its best trial's run: tag `cdl.best_trial_run`, or `cdl.best_trial`, the
    trial number, among its nested runs), or a CDL experiment id (a number: its parent run,
    tagged `cdl.experiment`, then its best trial). The one place where experiment ids are
    resolved, so that the experiment engine can add its own ways of naming them here."""
    from mlflow.exceptions import MlflowException

    ref = ref.strip()
    if ref.isdigit():
        run = _experiment_parent(client, ref)
    else:
        try:
            run = client.get_run(ref)
        except MlflowException as exc:
            if not _missing(exc):
                raise _mlflow_error(f"read run {ref}", exc) from exc
            raise NotFound(
                f"no MLflow run or CDL experiment '{ref}'",
                "give a run id (32 hex digits, from 'cdl experiment show' or the MLflow UI) or "
                "an experiment id",
            ) from None
    parent = None
    tags = run.data.tags
    is_parent = "mlflow.parentRunId" not in tags and (
        "cdl.best_trial_run" in tags or "cdl.best_trial" in tags or _has_children(client, run)
    )
    if is_parent:
        parent = run.info.run_id
        run = _best_trial(client, run)
    return _training_run(client, run, parent)


def _experiment_parent(client, experiment: str):
    try:
        ids = [e.experiment_id for e in client.search_experiments()]
        found = client.search_runs(
            ids, f"tags.`cdl.experiment` = '{experiment}'", order_by=["attributes.start_time DESC"]
        )
    except Exception as exc:
        raise _mlflow_error(f"find experiment {experiment}'s runs", exc) from exc
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    if not parents:
        raise NotFound(
            f"no MLflow run of CDL experiment {experiment}",
            "see 'cdl experiment list', or give a run id",
        )
    return parents[0]


def _has_children(client, run) -> bool:
    try:
        children = client.search_runs(
            [run.info.experiment_id],
            f"tags.mlflow.parentRunId = '{run.info.run_id}'",
            max_results=1,
        )
    except Exception as exc:
        raise _mlflow_error(f"find the nested runs of {run.info.run_id}", exc) from exc
    return bool(children)


def _best_trial(client, parent):
    from mlflow.exceptions import MlflowException

    tags = parent.data.tags
    name = tags.get("cdl.experiment", parent.info.run_id)
    best_run = tags.get("cdl.best_trial_run")
    if best_run:
        try:
            return client.get_run(best_run)
        except MlflowException as exc:
            if not _missing(exc):
                raise _mlflow_error(f"read run {best_run}", exc) from exc
            raise NotFound(
                f"experiment {name}'s best trial run {best_run} does not exist",
                "give a trial's run id instead",
            ) from None
    best = tags.get("cdl.best_trial")
    if best is None:
        raise Invalid(
            f"experiment {name} (run {parent.info.run_id}) has no best trial yet: it is still "
            "running, or none of its trials completed",
            "wait for it to end ('cdl experiment show'), or give a trial's run id",
        )
    try:
        found = client.search_runs(
            [parent.info.experiment_id],
            f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.`cdl.trial` = '{best}'",
        )
    except Exception as exc:
        raise _mlflow_error(f"find experiment {name}'s trial {best}", exc) from exc
    if not found:
        raise NotFound(
            f"experiment {name}'s best trial {best} has no MLflow run",
            "give a trial's run id instead",
        )
    return found[0]


def _training_run(client, run, parent: str | None) -> TrainingRun:
    run_id, status = run.info.run_id, run.info.status
    tags = run.data.tags
    trial = f"trial {tags['cdl.trial']} " if "cdl.trial" in tags else ""
    if status in ("FAILED", "KILLED"):
        raise Invalid(
            f"run {run_id} ({trial}{status.lower()}) cannot be registered: it did not finish",
            "register a completed or pruned trial's run, or the experiment (its best trial)",
        )
    if status != "FINISHED":
        raise Invalid(
            f"run {run_id} ({trial}{status.lower()}) cannot be registered: it has not ended",
            "wait for it to finish",
        )
    snapshot = tags.get("cdl.snapshot")
    if not snapshot:
        raise Invalid(
            f"run {run_id} has no cdl.snapshot tag: which labels it was trained on is unknown",
            "train through 'cdl experiment', which tags its runs with the label snapshot",
        )
    if "/" in snapshot:
        use_case, snapshot = snapshot.split("/", 1)
    else:
        use_case = tags.get("cdl.use_case") or _experiment_name(client, run).replace("-", "_")
    return TrainingRun(
        run_id=run_id,
        status=status,
        use_case=use_case,
        snapshot=snapshot,
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
        tags=dict(tags),
        artifact_uri=run.info.artifact_uri,
        mlflow_experiment=run.info.experiment_id,
        parent_run=parent,
    )


def _experiment_name(client, run) -> str:
    try:
        return client.get_experiment(run.info.experiment_id).name
    except Exception as exc:
        raise _mlflow_error(f"read run {run.info.run_id}'s experiment", exc) from exc


def model_location(client, run: TrainingRun) -> tuple[str, str | None]:
    """(source URI, MLflow logged-model id or None) of the MLflow model at the run's artifact
    path `model`: a logged model (`pyfunc.log_model(name="model")`, MLflow 3 keeps it apart
    from the run's artifacts), or a folder logged with `log_artifacts(folder, "model")`."""
    try:
        logged = client.search_logged_models(
            experiment_ids=[run.mlflow_experiment],
            filter_string=f"source_run_id = '{run.run_id}'",
        )
        for model in logged:
            if model.name == MODEL_ARTIFACT and str(model.status).endswith("READY"):
                return model.artifact_location, model.model_id
        files = {f.path for f in client.list_artifacts(run.run_id, MODEL_ARTIFACT)}
    except Exception as exc:
        raise _mlflow_error(f"list run {run.run_id}'s artifacts", exc) from exc
    if f"{MODEL_ARTIFACT}/MLmodel" not in files:
        raise NotFound(
            f"run {run.run_id} has no MLflow model at artifact path '{MODEL_ARTIFACT}'",
            "register a completed or pruned trial's run (a failed trial keeps no model)",
        )
    return f"{run.artifact_uri}/{MODEL_ARTIFACT}", None


# -- registration ------------------------------------------------------------------------------


def register(stack: Stack, ref: str) -> Registration:
    """Register the model of the run (or the experiment's best trial) `ref` names as a new
    version of its use case's registered model, with the metadata tags described above."""
    import mlflow

    from pipelines.data.labeling.spec import use_case as load_use_case
    from pipelines.data.labeling.store import LabelStore
    from pipelines.model import provenance

    started = time.perf_counter()
    registry = Registry(stack)
    client = registry.client
    run = training_run(client, ref)
    name = registered_name(run.use_case)
    case = load_use_case(run.use_case)
    train = LabelStore(stack, case).train_rows(run.snapshot)  # NotFound for a lost snapshot
    source, model_id = model_location(client, run)
    notes: list[str] = []

    with (
        stack.connect(autocommit=True) as conn,
        db.advisory_lock(conn, f"cdl.model.register:{run.run_id}"),
    ):
        known = client.search_model_versions(f"run_id = '{run.run_id}'")
        if known:
            done = known[0]
            raise AlreadyExists(
                f"run {run.run_id} is registered already, as {done.name}/{done.version}",
                f"use {done.name}/{done.version} ('cdl model show {done.name}/{done.version}')",
            )
        with tempfile.TemporaryDirectory(prefix="cdl-register-") as scratch:
            try:
                local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=scratch)
                loaded = mlflow.pyfunc.load_model(local)
            except Exception as exc:
                raise Invalid(
                    f"run {run.run_id}'s model cannot be loaded: {db.first_line(exc)}",
                    "log an MLflow pyfunc model at artifact path 'model' (trainer.save_model)",
                ) from exc
            size = sum(p.stat().st_size for p in Path(local).rglob("*") if p.is_file())
            model = RegisteredModel(name, "unregistered", loaded)
            python_model = _python_model(loaded)
            labels = list(getattr(python_model, "labels", None) or case.labels)
            parameters, parameters_from = _parameters(run, python_model)
            if parameters is None:
                notes.append("parameter count unknown: no cdl.parameters on the run, none found")
            blobs = _latency_inputs(stack, case, run, train, python_model)
            latency = measure_latency(model, case.spec.task, blobs)

        git_sha, git_from, git_dirty = _git_sha(run)
        tags = {
            "cdl.use_case": run.use_case,
            "cdl.task": case.spec.task,
            "cdl.run": run.run_id,
            "cdl.snapshot": f"{run.use_case}/{run.snapshot}",
            "cdl.data_commits": ",".join(provenance.data_commits(s for s, _ in train)),
            "cdl.git_sha": git_sha,
            "cdl.git_sha_from": git_from,
            "cdl.git_dirty": git_dirty,
            "cdl.labels": json.dumps(labels),
            "cdl.artifact_bytes": str(size),
            "cdl.latency_ms": f"{latency['p50_ms']:.4g}",
            "cdl.latency_p95_ms": f"{latency['p95_ms']:.4g}",
            "cdl.latency_inputs": str(latency["calls"]),
            "cdl.registered_by": _user(),
        }
        for key in ("cdl.experiment", "cdl.trial"):
            if key in run.tags:
                tags[key] = run.tags[key]
        if run.parent_run:
            tags["cdl.parent_run"] = run.parent_run
        if parameters is not None:
            tags["cdl.parameters"] = str(parameters)
            tags["cdl.parameters_from"] = parameters_from
        for metric in RUN_METRICS:
            if metric in run.metrics:
                tags[f"cdl.metric.{metric}"] = f"{run.metrics[metric]:.6g}"

        version = _create_version(client, name, case, source, run, model_id, tags)
        try:
            with stack.connect() as db_conn, db_conn.transaction():
                _record(db_conn, run, version, tags)
        except BaseException:
            client.delete_model_version(name, version.version)  # nothing half registered
            raise
    info = registry.get(f"{name}/{version.version}")
    return Registration(info, run, time.perf_counter() - started, notes)


def _python_model(loaded) -> Any:
    try:
        return loaded.unwrap_python_model()
    except Exception:  # another flavor than python_function's PythonModel
        return None


def count_parameters(python_model: Any) -> int | None:
    """The weights of the torch modules and Keras models a pyfunc wrapper holds as attributes
    (BBC news: `net`; Fashion-MNIST: `model`); None when it holds none."""
    if python_model is None:
        return None
    total, found = 0, False
    for value in vars(python_model).values():
        if callable(getattr(value, "count_params", None)):  # Keras
            total += int(value.count_params())
            found = True
        elif callable(getattr(value, "parameters", None)) and hasattr(value, "state_dict"):
            total += sum(int(p.numel()) for p in value.parameters())  # torch.nn.Module
            found = True
    return total if found else None


def _parameters(run: TrainingRun, python_model: Any) -> tuple[int | None, str]:
    logged = run.tags.get(PARAMETERS_TAG) or run.params.get(PARAMETERS_TAG)
    if logged and logged.isdigit():
        return int(logged), "run"
    return count_parameters(python_model), "measured"


def _latency_inputs(stack, case, run: TrainingRun, train, python_model) -> list[bytes]:
    """Inputs to time: the snapshot's first train files (text), or zeros of the model's image
    shape (images; a train file when the model does not say its shape)."""
    from pipelines.model.features import read_files

    shape = getattr(python_model, "shape", None)
    if case.spec.task == "image" and shape:
        from PIL import Image

        buffer = io.BytesIO()
        Image.new("L", (int(shape[1]), int(shape[0])), 0).save(buffer, format="PNG")
        return [buffer.getvalue()] * LATENCY_INPUTS
    if not train:
        raise NotFound(
            f"snapshot {run.use_case}/{run.snapshot} has no train rows", "label more files"
        )
    files = read_files(stack, f"{run.use_case}/{run.snapshot}", train[:LATENCY_INPUTS])
    return [f.data for f in files]


def measure_latency(model: RegisteredModel, task: str, blobs: list[bytes]) -> dict[str, float]:
    """Per-sample latency of `model.predict`: each input alone, `LATENCY_ROUNDS` times, after
    one warm-up call on all of them (which also checks the model follows the contract)."""
    model.predict(task, blobs)
    singles = [model_inputs(task, [blob]) for blob in blobs]
    times = []
    for _ in range(LATENCY_ROUNDS):
        for one in singles:
            started = time.perf_counter()
            model.model.predict(one)
            times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {
        "p50_ms": statistics.median(times),
        "p95_ms": times[min(len(times) - 1, round(0.95 * (len(times) - 1)))],
        "calls": len(times),
    }


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for the uid (a container)
        return "unknown"


def _git_sha(run: TrainingRun) -> tuple[str, str, str]:
    """(sha, where it came from, dirty): the run's provenance tags (provenance.py), else the
    checkout of the CDL code that registers it."""
    from pipelines.model import provenance

    for key in ("cdl.git_sha", "mlflow.source.git.commit"):
        found = run.tags.get(key)
        if found and found != provenance.UNKNOWN:
            return found, "run", run.tags.get("cdl.git_dirty", provenance.UNKNOWN)
    code = provenance.code_version(CHECKOUT)
    dirty = provenance.UNKNOWN if code.dirty is None else str(code.dirty).lower()
    return code.commit, "registration", dirty


def _create_version(client, name, case, source, run: TrainingRun, model_id, tags):
    from mlflow.exceptions import MlflowException

    try:
        try:
            client.create_registered_model(
                name,
                tags={"cdl.use_case": case.name, "cdl.task": case.spec.task},
                description=f"CDL use case {case.name} ({case.spec.task}); see "
                "pipelines/model/registry.py for the model contract and the version tags",
            )
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        return client.create_model_version(
            name,
            source,
            run_id=run.run_id,
            tags=tags,
            model_id=model_id,
            description=f"from run {run.run_id}"
            + (f" (experiment {run.experiment}, trial {run.trial})" if run.experiment else ""),
        )
    except MlflowException as exc:
        raise _mlflow_error(f"register run {run.run_id} as a version of {name}", exc) from exc


def _record(conn, run: TrainingRun, version, tags: dict[str, str]) -> None:
    """Lineage (run -> version, snapshot -> run) and the `model.registered` event."""
    ref = f"{version.name}/{version.version}"
    run_node = lineage.record_node(
        conn,
        lineage.Kind.RUN,
        run.run_id,
        experiment=run.experiment,
        trial=run.trial,
        params=run.params,
        mlflow_experiment=run.mlflow_experiment,
    )
    snapshot = lineage.node_id(lineage.Kind.LABEL_SNAPSHOT, f"{run.use_case}/{run.snapshot}")
    if lineage.get_node(conn, snapshot):
        lineage.consumed(conn, run_node, snapshot)
    node = lineage.record_node(
        conn,
        lineage.Kind.MODEL_VERSION,
        ref,
        run=run.run_id,
        snapshot=tags["cdl.snapshot"],
        task=tags["cdl.task"],
        labels=json.loads(tags["cdl.labels"]),
        parameters=int(tags["cdl.parameters"]) if "cdl.parameters" in tags else None,
        git_sha=tags["cdl.git_sha"],
        data_commits=tags["cdl.data_commits"].split(","),
    )
    lineage.produced(conn, run_node, node)
    events.emit(
        conn,
        events.MODEL_REGISTERED,
        ref,
        {
            "model": version.name,
            "version": str(version.version),
            "run": run.run_id,
            "experiment": run.experiment,
            "snapshot": tags["cdl.snapshot"],
            "metrics": {
                k.removeprefix("cdl.metric."): float(v)
                for k, v in tags.items()
                if k.startswith("cdl.metric.")
            },
        },
    )
