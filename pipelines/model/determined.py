"""The Determined experiment engine (`experiments.engine: determined`): the same spec, sent to a
Determined master with Determined's own client.

`submit` checks the spec as the local engine does, resolves its label snapshot, computes (or
loads) the snapshot's features with the transformation registry (features.py), and builds the
experiment's context directory (`build_context`):

    pipelines/             the platform package (no caches): the trainers and the entrypoint
    <package>/             a trainer's top-level package when it is not in `pipelines`
                           (a spec's data.trainer)
    features/              arrays.npz + meta.json (Features.save): the trial reads these, never
                           the stack
    cdl-experiment.yaml    the config sent (for `det experiment create cdl-experiment.yaml .`)

The config sent is the spec as written (`canonical()`, `entrypoint` included), with
`data.snapshot` resolved, `data.cdl` telling the entrypoint where the features are and which
trainer to build, and the label `cdl`, by which `list` finds CDL's experiments. Determined limits
a context to 95 MiB (`MAX_CONTEXT_SIZE` in its SDK): a bigger one is refused here, before anything
is sent. The trials run `python3 -m pipelines.model.entrypoint` (entrypoint.py) in the
experiment's image, which must carry what `setup/determined-constraints.txt` holds.

The SDK itself runs in the Determined environment (`.cdl/venvs/determined`, made by `make setup`:
`determined` pins `requests<2.32`, below the platform's): every call is one run of
determined_bridge.py there, JSON in and out, and its failures come back as CDL errors with a fix
(an unreachable master, missing or wrong credentials, a config the master refuses). The master's
address is `experiments.determined_master`; credentials are Determined's own, from the
environment (DET_USER + DET_PASS, or DET_USER + DET_USER_TOKEN) or `det user login`.

Entities: an experiment is Determined's (its id, state, best trial); a trial's `number` is
Determined's trial id, its `epochs` the last `epochs` it reported, and a trial that completed
short of the budget (ASHA stopped it) shows as `pruned`. Determined schedules its own trials, so
`worker` is unsupported; MLflow tracking stays with the local engine (Determined keeps the
metrics, checkpoints and, in each completed trial's last checkpoint, the model under `model/`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pipelines.core.config import CHECKOUT
from pipelines.core.errors import CDLError, Invalid, NotFound, Unavailable, Unsupported
from pipelines.model.entrypoint import BUDGET_KEYS, budget_epochs
from pipelines.model.experiments import (
    Experiment,
    ExperimentEngine,
    Progress,
    Submission,
    Trial,
)
from pipelines.model.spec import ExperimentSpec, load_experiment, search_space
from pipelines.model.trainer import Features

if TYPE_CHECKING:
    from pipelines.model.search import Prepared

CONTEXT_LIMIT = 95 * 2**20  # determined.common.constants.MAX_CONTEXT_SIZE in 0.38.1
LABEL = "cdl"
FEATURES_FOLDER = "features"
CONFIG_FILE = "cdl-experiment.yaml"
VENV = "determined"
BRIDGE = "pipelines.model.determined_bridge"
WAIT_POLL_S = 5.0  # each look at the master starts the bridge (about a second)

# Determined's states (bindings' STATE_*) → CDL's.
EXPERIMENT_STATES = {
    "COMPLETED": "completed",
    "CANCELED": "killed",
    "ERROR": "failed",
    "DELETED": "failed",
    "DELETING": "failed",
    "DELETE_FAILED": "failed",
}
TRIAL_STATES = {"COMPLETED": "completed", "CANCELED": "killed", "ERROR": "failed"}


@dataclass(frozen=True)
class Context:
    """A built context directory and the config that goes with it."""

    folder: Path
    config: dict[str, Any]
    files: int
    size: int  # bytes, as Determined counts them (file contents)


def _ignore(folder: str, names: list[str]) -> list[str]:
    return [n for n in names if n == "__pycache__" or n.endswith((".pyc", ".pyo"))]


def _copy_package(name: str, folder: Path) -> None:
    """A trainer's top-level package (or module), so that the trial can import it."""
    if (folder / name).exists():
        return
    found = importlib.util.find_spec(name)
    if found is None or found.origin is None and not found.submodule_search_locations:
        raise Invalid(
            f"the trainer's package {name} cannot be found", "check data.trainer (module:Class)"
        )
    if found.submodule_search_locations:
        shutil.copytree(next(iter(found.submodule_search_locations)), folder / name, ignore=_ignore)
    else:
        shutil.copy2(found.origin, folder / Path(found.origin).name)


def build_context(
    spec: ExperimentSpec,
    spec_path: Path,
    prepared: Prepared,
    features: Features,
    folder: Path,
    limit: int = CONTEXT_LIMIT,
) -> Context:
    """The experiment's context directory in `folder` (empty or missing) and its config; Invalid
    when it is bigger than Determined accepts."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(CHECKOUT / "pipelines", folder / "pipelines", ignore=_ignore)
    _copy_package(prepared.trainer.partition(":")[0].split(".")[0], folder)
    features.save(folder / FEATURES_FOLDER)
    config = spec.canonical()
    data = dict(config.get("data") or {})
    data["snapshot"] = prepared.snapshot
    data["cdl"] = {
        "features": FEATURES_FOLDER,
        "trainer": prepared.trainer,
        "spec": str(spec_path),
        **({"batches_per_epoch": prepared.batches_per_epoch} if prepared.batches_per_epoch else {}),
    }
    config["data"] = data
    labels = list(config.get("labels") or [])
    config["labels"] = labels if LABEL in labels else [*labels, LABEL]
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    files = [p for p in folder.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    if size > limit:
        biggest = max(files, key=lambda p: p.stat().st_size)
        raise Invalid(
            f"the experiment's context is {size / 2**20:.1f} MiB, over Determined's "
            f"{limit / 2**20:.0f} MiB (biggest: {biggest.relative_to(folder)}, "
            f"{biggest.stat().st_size / 2**20:.1f} MiB)",
            "train on a smaller snapshot or vocabulary, or make the features reach the trials "
            "another way (bind_mounts, checkpoint storage)",
        )
    return Context(folder, config, len(files), size)


def _when(text: str | None) -> datetime | None:
    """A time from Determined's JSON (RFC 3339, up to nanoseconds)."""
    if not text:
        return None
    text = text.replace("Z", "+00:00")
    head, dot, rest = text.partition(".")
    if dot:
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{head}.{rest[: min(digits, 6)]}{rest[digits:]}"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _state(raw: str | None, table: dict[str, str]) -> str:
    name = (raw or "").removeprefix("STATE_")
    return table.get(name, "active" if table is EXPERIMENT_STATES else "running")


def _last(summary: dict | None, name: str) -> float | None:
    value = ((summary or {}).get("validation_metrics") or {}).get(name) or {}
    last = value.get("last") if isinstance(value, dict) else None
    return float(last) if isinstance(last, (int, float)) else None


def _budget(config: dict) -> int:
    consts = {
        k: v.get("val") if isinstance(v, dict) and v.get("type") == "const" else v
        for k, v in (config.get("hyperparameters") or {}).items()
        if k in BUDGET_KEYS
    }
    try:
        return budget_epochs(config, consts)
    except CDLError:
        return 0


def to_trial(raw: dict, experiment: dict) -> Trial:
    """A CDL trial from Determined's trial JSON (trialv1Trial) and its experiment's config."""
    config = experiment.get("config") or {}
    searcher = config.get("searcher") or {}
    summary = raw.get("summaryMetrics")
    epochs = int(_last(summary, "epochs") or 0)
    state = _state(raw.get("state"), TRIAL_STATES)
    if state == "completed" and epochs < _budget(config):
        state = "pruned"  # ASHA stopped it before its budget
    metric = _last(summary, searcher.get("metric", ""))
    if metric is None and raw.get("searcherMetricValue") is not None:
        metric = float(raw["searcherMetricValue"])
    checkpoint = raw.get("bestCheckpoint") or {}
    return Trial(
        experiment=int(raw.get("experimentId") or experiment.get("id") or 0),
        number=int(raw["id"]),
        state=state,
        hparams=dict(raw.get("hparams") or {}),
        epochs=epochs,
        bracket=0,
        rung=0,
        metric=metric,
        restarts=int(raw.get("restarts") or 0),
        mlflow_run=None,
        checkpoints=str(checkpoint.get("uuid") or ""),
        runner=raw.get("taskId"),
        error=None,
        started_at=_when(raw.get("startTime")) or datetime.now(timezone.utc),
        finished_at=_when(raw.get("endTime")),
    )


def to_experiment(raw: dict, trials: list[Trial] | None = None) -> Experiment:
    """A CDL experiment from Determined's experiment JSON (v1Experiment)."""
    config = raw.get("config") or {}
    searcher = config.get("searcher") or {}
    data = config.get("data") or {}
    cdl = data.get("cdl") or {}
    name = searcher.get("name", "")
    max_trials = (
        1 if name == "single" else int(searcher.get("max_trials") or raw.get("numTrials") or 1)
    )
    return Experiment(
        id=int(raw["id"]),
        name=raw.get("name") or config.get("name") or "",
        use_case=data.get("use_case", ""),
        snapshot=data.get("snapshot", ""),
        state=_state(raw.get("state"), EXPERIMENT_STATES),
        searcher=name,
        metric=searcher.get("metric", ""),
        smaller_is_better=bool(searcher.get("smaller_is_better", True)),
        max_trials=max_trials,
        max_epochs=_budget(config),
        max_restarts=int(config.get("max_restarts", 5)),
        workers=int(searcher.get("max_concurrent_trials") or 0),
        spec_path=cdl.get("spec", ""),
        trainer=cdl.get("trainer", ""),
        best_trial=raw.get("bestTrialId"),
        best_metric=raw.get("bestTrialSearcherMetric"),
        mlflow_run=None,
        error=None,
        created_at=_when(raw.get("startTime")) or datetime.now(timezone.utc),
        finished_at=_when(raw.get("endTime")),
        trials_started=int(raw.get("numTrials") or 0),
        trials_running=sum(1 for t in trials or [] if t.state == "running"),
    )


class DeterminedExperiments(ExperimentEngine):
    def __init__(self, stack):
        super().__init__(stack)
        self.master = stack.settings.stack.experiments.determined_master
        self.python = stack.settings.venvs / VENV / "bin" / "python"

    # -- the bridge ---------------------------------------------------------------------------

    def call(self, op: str, timeout_s: float = 120, **args: Any) -> Any:
        """One SDK operation in the Determined environment (determined_bridge.py)."""
        if not self.python.exists():
            raise Unavailable(
                f"the Determined environment is missing ({self.python.parent.parent})",
                "run make setup",
            )
        request = json.dumps({"op": op, "master": self.master, **args})
        env = {**os.environ, "PYTHONPATH": str(CHECKOUT)}
        try:
            done = subprocess.run(
                [str(self.python), "-m", BRIDGE],
                input=request,
                capture_output=True,
                text=True,
                env=env,
                timeout=timeout_s,
                start_new_session=True,  # no terminal: the SDK never prompts for a password
            )
        except subprocess.TimeoutExpired:
            raise Unavailable(
                f"Determined master {self.master} did not answer '{op}' within {timeout_s:g} s",
                "check the master (det master info) and try again",
            ) from None
        lines = done.stdout.strip().splitlines()
        try:
            answer = json.loads(lines[-1])
        except (IndexError, ValueError):
            tail = " ".join(done.stderr.strip().splitlines()[-3:])
            raise Unavailable(
                f"the Determined client failed ({op}, exit {done.returncode}): {tail}",
                "check the Determined environment: run make setup",
            ) from None
        if "error" in answer:
            raise self.translate(answer["error"], op, args)
        return answer["ok"]

    def translate(self, error: dict, op: str, args: dict) -> CDLError:
        kind, message = error.get("kind"), error.get("message", "")
        setting = "experiments.determined_master (CDL_EXPERIMENTS__DETERMINED_MASTER)"
        if kind == "unavailable":
            return Unavailable(
                f"Determined master {self.master} does not answer: {message}",
                f"start it, or point {setting} at it",
            )
        if kind == "auth":
            return Unavailable(
                f"Determined master {self.master} refused the credentials: {message}",
                "set DET_USER and DET_PASS (or DET_USER_TOKEN) in the environment, or run "
                "det user login",
            )
        if kind == "not_found":
            what = f"experiment {args['id']}" if "id" in args else "what was asked for"
            return NotFound(
                f"Determined master {self.master} has no {what}: {message}",
                "see cdl experiment list",
            )
        if kind == "invalid":
            what = "the experiment" if op == "create" else f"'{op}'"
            return Invalid(
                f"Determined master {self.master} refused {what}: {message}",
                "fix the experiment spec" if op == "create" else "check the request",
            )
        return Unavailable(
            f"Determined client failed ({op}): {message}", "check the master and try again"
        )

    # -- submit -------------------------------------------------------------------------------

    def submit(self, spec_path: Path, attached: bool = False) -> Submission:
        from pipelines.model.search import prepare, spec_features

        spec = load_experiment(spec_path)
        prepared = prepare(self.stack, spec, spec_path)
        consts = {
            k: leaf.val
            for k, leaf in search_space(spec).items()
            if k in BUDGET_KEYS and leaf.type == "const"
        }
        try:  # what the trial will count, by the entrypoint's rules
            budget_epochs(spec.canonical(), consts, prepared.batches_per_epoch)
        except CDLError as exc:
            raise type(exc)(f"{spec_path}: {exc.problem}", exc.fix) from None
        features = spec_features(self.stack, spec, prepared.features, prepared.snapshot)
        scratch = self.stack.settings.home / "determined"
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="context-", dir=scratch) as folder:
            context = build_context(
                spec, Path(spec_path).resolve(), prepared, features, Path(folder)
            )
            raw = self.call("create", 600, config=context.config, model_dir=str(context.folder))
        return Submission(to_experiment(raw), [], spec.notes())

    # -- reading ------------------------------------------------------------------------------

    def list(self) -> list[Experiment]:
        return [to_experiment(raw) for raw in self.call("list", label=LABEL)]

    def _show(self, answer: dict) -> tuple[Experiment, list[Trial]]:
        trials = [to_trial(t, answer["experiment"]) for t in answer["trials"]]
        trials.sort(key=lambda t: t.number)
        return to_experiment(answer["experiment"], trials), trials

    def show(self, experiment_id: int) -> tuple[Experiment, list[Trial]]:
        return self._show(self.call("show", id=experiment_id))

    def logs(self, experiment_id: int, trial: int | None = None) -> list[tuple[Trial, str]]:
        answer = self.call("logs", 300, id=experiment_id, trial=trial)
        experiment = answer["experiment"]
        if trial is not None and not answer["trials"]:
            raise NotFound(
                f"experiment {experiment_id} has no trial {trial}",
                f"see cdl experiment show {experiment_id} (trials are numbered by Determined)",
            )
        return [
            (to_trial(t, experiment), answer["logs"].get(str(t["id"]), ""))
            for t in sorted(answer["trials"], key=lambda t: t["id"])
        ]

    def kill(self, experiment_id: int) -> Experiment:
        return self._show(self.call("kill", id=experiment_id))[0]

    def worker(
        self,
        experiment_id: int,
        say: Callable[[str], None],
        stop: Any = None,
        threads: int | None = None,
    ) -> None:
        raise Unsupported(
            "Determined schedules its own trials: there are no CDL workers to run",
            f"follow it with cdl experiment show {experiment_id} --watch",
        )

    def wait(
        self, experiment_id: int, progress: Progress | None = None, poll_s: float = 1.0
    ) -> Experiment:
        while True:
            experiment, trials = self.show(experiment_id)
            if progress:
                progress(experiment, trials)
            if not experiment.active:
                return experiment
            time.sleep(max(poll_s, WAIT_POLL_S))
