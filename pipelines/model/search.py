"""The local experiment engine: Optuna on the stack's Postgres, trials in worker processes.

`submit` checks the spec, resolves the label snapshot (`latest`: the newest), records the
experiment (experiment_store.py), creates its Optuna study in the `optuna` database and its
MLflow run, and starts `max_concurrent_trials` workers (`cdl experiment worker ID`): supervised
services that outlive the command, or with `--wait` child processes. Each gets its share of the
CPU threads (and a GPU of its own when there are GPUs). Workers on other machines that reach the
same Postgres join with `cdl experiment worker ID`; they need the same code and, to resume each
other's trials, the same stack home (checkpoints live under `<home>/experiments/<id>/`).

A worker loops: claim a trial (the store decides under the experiment's lock: a trial whose runner
is gone or that ASHA promoted first, else a new one while fewer than max_trials started), run it,
repeat; when nothing is left and nothing runs it ends the experiment. A trial trains the Trainer
epoch by epoch; after each epoch (checkpointed by the trainer) the report hands the epoch's metrics
to a thread that logs them to MLflow in one batch (training goes on meanwhile), reports the metric
to Optuna, records the epoch, and at a rung of its ASHA bracket asks the store whether it is
promoted (asha.py): if not, the trial pauses, to be resumed from its checkpoint when later trials
promote it, or pruned when the search ends. A heartbeat thread marks the trial's
runner alive every second and notices a kill. A worker killed outright loses at most the epoch it
was in: the trial is resumed by any worker, on this machine at once (its pid is dead), from
elsewhere once its heartbeat is older than LEASE_S, from its checkpoints, in the same Optuna trial
and MLflow run, up to max_restarts times; then it fails. A worker asked to stop (SIGTERM) releases
its trial at the end of the epoch, and the next worker resumes it without counting a restart.

Tracking: each trial is an MLflow run nested under the experiment's run, started with its
hyperparameters as params, the provenance tags (provenance.py: code commit, package versions, data
commits), the label snapshot and its data commits as dataset inputs; once its trainer is built,
its parameter count and features (`cdl.parameters`, `cdl.features`). A trial that completes
logs its model (`model`), final checkpoint (`checkpoint/`), learning curves and validation
confusion matrix (`plots/`); a paused one its checkpoint and learning curves so far. These extras
are best effort: one that cannot be logged is said in the trial's log and the trial goes on.

A trainer that raises, or reports a metric that is missing or not finite, fails its trial with
the traceback kept (`cdl experiment logs`); the experiment goes on. When Postgres goes away,
every database, Optuna and MLflow call is retried (one line each time, 1 s doubling to 30 s).
"""

from __future__ import annotations

import inspect
import math
import os
import random
import shutil
import subprocess
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipelines.core import db
from pipelines.core.errors import CDLError, Invalid, NotFound, Unavailable
from pipelines.core.services import ServiceSpec
from pipelines.core.stack import Stack
from pipelines.data import processes
from pipelines.data.labeling.spec import use_case
from pipelines.data.labeling.store import LabelStore
from pipelines.model import asha, provenance, tracking
from pipelines.model.experiment_store import Claim, ExperimentStore, NewTrial
from pipelines.model.experiments import (
    Experiment,
    ExperimentEngine,
    Progress,
    Submission,
    Trial,
)
from pipelines.model.registry import registered_name
from pipelines.model.spec import (
    LATEST,
    ExperimentSpec,
    GridSearcher,
    SingleSearcher,
    load_experiment,
    max_epochs,
    parse_experiment,
    search_space,
    training_budget,
)
from pipelines.model.trainer import Resources, Trainer
from pipelines.plugins import load, target

LEASE_S = 30.0  # a running trial whose runner has not beaten for this long is resumed
BEAT_S = 1.0  # how often a running trial's runner marks itself alive and looks for a kill
WAIT_S = 1.0  # how often an idle worker looks again while others run the last trials
STOP_WAIT_S = 10.0  # how long `kill` lets workers end their trials before stopping them
RETRY_FIRST_S, RETRY_MAX_S, RETRY_FOR_S = 1.0, 30.0, 900.0
FEATURES = "pipelines.model.features:features_for"  # the transformation registry
WORKER_PREFIX = "experiment-{id}-worker-"
# Where a trial's files go in its run (tracking.py).
CHECKPOINT_ARTIFACT = tracking.CHECKPOINT_ARTIFACT
LEARNING_CURVES = tracking.LEARNING_CURVES
CONFUSION_MATRIX = tracking.CONFUSION_MATRIX
# OpenMP threads that sleep while waiting instead of spinning: a spinning thread burns the core
# that another worker (or anything else on the machine) needs, and a trial on 2 threads of a busy
# 2-core machine ran its epochs 5-10x slower than on 1 (bench/search_workers.py); sleeping, the
# same as on 1. Read when the OpenMP runtime starts (torch's import): set in a worker's
# environment.
OMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def spec_trainer(spec, spec_path: Path) -> str:
    """The spec's trainer as "module:Class": its `data.trainer`, else the use case's in the
    plugin table."""
    data = spec.data
    trainer = (data.model_extra or {}).get("trainer") or target("trainer", data.use_case)
    if trainer is None:
        raise Invalid(
            f"{spec_path}: no trainer for use case {data.use_case}",
            "name one in data.trainer (module:Class)",
        )
    return trainer


class TrialError(Exception):
    """A trial cannot go on (a metric missing or not finite)."""


def study_name(experiment_id: int) -> str:
    return f"cdl-experiment-{experiment_id}"


def storage_url(stack: Stack) -> str:
    dsn = stack.dsn(stack.settings.stack.postgres.databases.search)
    return "postgresql+psycopg://" + dsn.split("://", 1)[1]


def _transient(exc: BaseException) -> bool:
    """A lost or refused database connection, however the library in between wraps it (Optuna
    raises its own StorageInternalError from SQLAlchemy's from psycopg's: the chain is read)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (*db.CONNECTION_LOST, Unavailable)):
            return True
        text = f"{type(exc).__name__}: {exc}"
        if any(
            mark in text
            for mark in ("OperationalError", "InterfaceError", "connection", "Connection refused")
        ):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def retry(call: Callable[[], Any], say: Callable[[str], None], what: str) -> Any:
    """`call()`, again while the database is away (up to RETRY_FOR_S)."""
    backoff, deadline = RETRY_FIRST_S, time.monotonic() + RETRY_FOR_S
    while True:
        try:
            return call()
        except Exception as exc:
            if not _transient(exc) or time.monotonic() > deadline:
                raise
            say(f"{what}: database unavailable ({db.first_line(exc)}); retrying in {backoff:g} s")
            time.sleep(backoff)
            backoff = min(backoff * 2, RETRY_MAX_S)


def resolve_snapshot(stack: Stack, case: str, wanted: str) -> str:
    """The label snapshot an experiment trains on: `wanted`, or the newest for `latest`."""
    names = [s["name"] for s in LabelStore(stack, use_case(case)).snapshots()]
    if wanted == LATEST:
        if not names:
            raise NotFound(
                f"no label snapshot of {case} yet, so 'latest' names none",
                f"make one: cdl label snapshot create {case} NAME",
            )
        return names[0]
    if wanted not in names:
        raise NotFound(f"no label snapshot {case}/{wanted}", f"see cdl label snapshot list {case}")
    return wanted


def _import(path: str, what: str, key: str) -> Any:
    if not isinstance(path, str) or ":" not in path:
        raise Invalid(f"{key}: '{path}' is not module:name", f"name the {what} as module:name")
    try:
        return load(path)
    except (ImportError, AttributeError) as exc:
        raise Unavailable(
            f"{key}: the {what} {path} cannot be loaded: {db.first_line(exc)}",
            "check the name, and that its package is installed",
        ) from exc


@dataclass(frozen=True)
class Prepared:
    """What an engine needs of a spec before the experiment exists, checked against the stack."""

    trainer: str  # module:Class
    features: str  # module:function, the transformation registry by default
    snapshot: str  # the label snapshot, `latest` resolved
    max_epochs: int  # the longest trial's length in epochs
    batches_per_epoch: int | None  # when the spec's time metric is batches


def prepare(stack: Stack, spec: ExperimentSpec, spec_path: Path) -> Prepared:
    """Every engine's submit checks: the trainer and features function load, the training length
    is set, the snapshot exists (`latest` resolved) and holds the spec's label set. A budget in
    batches is counted in epochs of the snapshot's train split, at the spec's batch size."""
    data = spec.data
    trainer = spec_trainer(spec, spec_path)
    trainer_type = _import(trainer, "trainer", f"{spec_path}: data.trainer")
    features = (data.model_extra or {}).get("features") or FEATURES
    _import(features, "features function", f"{spec_path}: data.features")
    budget = training_budget(spec)
    if budget is None:
        raise Invalid(
            f"{spec_path}: the spec sets no training length",
            "set searcher.max_time and time_metric: epochs, or an 'epochs' hyperparameter",
        )
    try:
        snapshot = resolve_snapshot(stack, data.use_case, data.snapshot)
    except NotFound as exc:
        raise NotFound(f"{spec_path}: data.snapshot: {exc.problem}", exc.fix) from None
    check_label_set(stack, spec, spec_path, snapshot)
    per_epoch = None
    if budget.unit == "batches":
        leaf = search_space(spec).get("batch_size")
        if leaf is not None and leaf.type != "const":
            raise Invalid(
                f"{spec_path}: time_metric: batches with a searched batch_size: trials would "
                "count different batches as the same time",
                "make batch_size a const hyperparameter, or use time_metric: epochs",
            )
        consts = {"batch_size": leaf.val} if leaf is not None else {}
        per_epoch = trainer_type.batches_per_epoch(
            spec_features(stack, spec, features, snapshot), consts
        )
    try:
        epochs = max_epochs(spec, per_epoch)
    except CDLError as exc:
        raise type(exc)(f"{spec_path}: {exc.problem}", exc.fix) from None
    return Prepared(trainer, features, snapshot, epochs, per_epoch)


def spec_features(stack: Stack, spec: ExperimentSpec, features: str, snapshot: str):
    """The features an experiment trains on: the features function `features` (module:function,
    called with the stack, use case and snapshot, and the keyword `val_fraction`: the spec's)."""
    return load(features)(stack, spec.data.use_case, snapshot, val_fraction=spec.data.val_fraction)


def check_label_set(stack: Stack, spec: ExperimentSpec, spec_path: Path, snapshot: str) -> None:
    """The snapshot's labels must be the experiment's label set: `data.labels`, else the
    choices of the use case's labeling config. A class missing from the snapshot would leave the
    model unable to predict it; an unknown one, a class the use case does not have."""
    data = spec.data
    case = use_case(data.use_case)
    wanted = set(data.labels) if data.labels is not None else set(case.labels)
    found = set(LabelStore(stack, case).snapshot_labels(snapshot))
    if found != wanted:
        where = "data.labels" if data.labels is not None else f"{data.use_case}'s labeling config"
        problems = []
        if wanted - found:
            problems.append(f"without {', '.join(sorted(wanted - found))}")
        if found - wanted:
            problems.append(f"with {', '.join(sorted(found - wanted))} that {where} lacks")
        raise Invalid(
            f"{spec_path}: label snapshot {data.use_case}/{snapshot} is {' and '.join(problems)} "
            f"(the label set of {where}: {', '.join(sorted(wanted))})",
            "label the missing classes and take a new snapshot, or set data.labels to the "
            "snapshot's classes",
        )


def _gpus() -> int:
    """GPUs on this machine (none when nvidia-smi is missing)."""
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for row in out.stdout.splitlines() if row.startswith("GPU "))


class _Heartbeat(threading.Thread):
    """Marks a trial's runner alive every BEAT_S; sets `reason` when the trial must stop:
    `killed` (the experiment was), `lost` (another runner took it over), `released` (this worker
    was asked to stop)."""

    def __init__(self, store, experiment_id, number, runner, stop, say):
        super().__init__(daemon=True, name=f"heartbeat-{number}")
        self.args = (experiment_id, number, runner)
        self.store, self.stop, self.say = store, stop, say
        self.done = threading.Event()
        self.reason: str | None = None

    def stop_for(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def run(self) -> None:
        failing = False
        while not self.done.wait(BEAT_S):
            try:
                owned, state = self.store.beat(*self.args)
                failing = False
            except Exception as exc:
                if not failing:
                    self.say(f"heartbeat: {db.first_line(exc)} (retrying)")
                failing = True
                continue
            if state != "active":
                self.stop_for("killed")
            elif not owned:
                self.stop_for("lost")
            elif self.stop.is_set():
                self.stop_for("released")


class LocalExperiments(ExperimentEngine):
    def __init__(self, stack: Stack):
        super().__init__(stack)
        self.store = ExperimentStore(stack)
        self._children: list[subprocess.Popen] = []

    # -- submit -------------------------------------------------------------------------------

    def submit(self, spec_path: Path, attached: bool = False) -> Submission:
        submission = self.record(spec_path)
        experiment = submission.experiment
        try:
            self._start_workers(experiment.id, experiment.workers, attached)
        except BaseException as exc:
            self.store.fail(experiment.id, f"its workers could not start: {db.first_line(exc)}")
            raise
        return submission

    def record(self, spec_path: Path) -> Submission:
        """Everything `submit` does but start workers (run `worker` to run its trials)."""
        spec = load_experiment(spec_path)
        data = spec.data
        prepared = prepare(self.stack, spec, spec_path)
        snapshot = prepared.snapshot
        searcher = spec.searcher
        if isinstance(searcher, SingleSearcher):
            max_trials = 1
        elif isinstance(searcher, GridSearcher):
            max_trials = asha.grid_size(spec)
        else:
            max_trials = searcher.max_trials
        wanted = getattr(searcher, "max_concurrent_trials", 0) or (os.cpu_count() or 1)
        workers = max(1, min(wanted, max_trials))
        seed = (spec.reproducibility and spec.reproducibility.experiment_seed) or random.randrange(
            2**31
        )
        name = spec.name or Path(spec_path).stem
        experiment_id = self.store.create(
            name=name,
            use_case=data.use_case,
            snapshot=snapshot,
            spec=spec.canonical(),
            spec_path=str(Path(spec_path).resolve()),
            trainer=prepared.trainer,
            features=(data.model_extra or {}).get("features"),
            searcher=searcher.name,
            metric=searcher.metric,
            smaller_is_better=searcher.smaller_is_better,
            max_trials=max_trials,
            max_epochs=prepared.max_epochs,
            max_restarts=spec.max_restarts,
            workers=workers,
            seed=seed,
        )
        try:
            self._create_study(experiment_id, spec)
            tracker = tracking.client(self.stack)
            run = tracking.start_run(
                tracker,
                tracking.experiment_id(self.stack, registered_name(data.use_case)),
                f"{name}-{experiment_id}",
                {
                    "cdl.experiment": str(experiment_id),
                    "cdl.snapshot": f"{data.use_case}/{snapshot}",
                    "cdl.searcher": searcher.name,
                },
                {
                    "searcher": searcher.name,
                    "metric": searcher.metric,
                    "max_trials": max_trials,
                    "max_epochs": prepared.max_epochs,
                    "seed": seed,
                },
            )
            self.store.set_mlflow_run(experiment_id, run)
        except BaseException as exc:
            self.store.fail(experiment_id, f"submit failed: {db.first_line(exc)}")
            raise
        return Submission(self.store.get(experiment_id), spec.ignored_locally(), spec.notes())

    def _storage(self, create: bool = False):
        import optuna

        return optuna.storages.RDBStorage(
            storage_url(self.stack),
            engine_kwargs={"pool_pre_ping": True},
            skip_table_creation=not create,
        )

    def _create_study(self, experiment_id: int, spec) -> None:
        import optuna

        # Optuna creates its tables on first use: one command at a time does that.
        with self.stack.connect(autocommit=True) as conn, db.advisory_lock(conn, "cdl.optuna"):
            optuna.create_study(
                storage=self._storage(create=True),
                study_name=study_name(experiment_id),
                direction=asha.direction(spec),
            )

    def _start_workers(self, experiment_id: int, workers: int, attached: bool) -> None:
        threads = max(1, (os.cpu_count() or 1) // workers)
        gpus = _gpus()
        for n in range(workers):
            service = self.stack.cli_service(
                f"{WORKER_PREFIX.format(id=experiment_id)}{n + 1}",
                "experiment",
                "worker",
                str(experiment_id),
                "--threads",
                str(threads),
            )
            env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **OMP_ENV}
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(n % gpus)
            service = ServiceSpec(service.name, service.argv, env, service.cwd, start_timeout_s=30)
            if attached:
                self._children.append(self._start_child(service))
            else:
                self.stack.supervisor.start(service)

    def _start_child(self, service: ServiceSpec) -> subprocess.Popen:
        log_path = self.stack.supervisor.log_path(service.name)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                service.argv,
                cwd=service.cwd,
                env={**os.environ, **service.env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    # -- reading ------------------------------------------------------------------------------

    def list(self) -> list[Experiment]:
        return self.store.all()

    def show(self, experiment_id: int) -> tuple[Experiment, list[Trial]]:
        return self.store.get(experiment_id), self.store.trials(experiment_id)

    def logs(self, experiment_id: int, trial: int | None = None) -> list[tuple[Trial, str]]:
        trials = self.store.trials(experiment_id)
        if trial is not None:
            trials = [t for t in trials if t.number == trial]
            if not trials:
                self.store.get(experiment_id)
                raise NotFound(
                    f"experiment {experiment_id} has no trial {trial}",
                    f"see cdl experiment show {experiment_id}",
                )
        texts = self.store.logs(experiment_id)
        return [(t, texts.get(t.number, "")) for t in trials]

    def wait(
        self, experiment_id: int, progress: Progress | None = None, poll_s: float = 1.0
    ) -> Experiment:
        while True:
            experiment, trials = self.show(experiment_id)
            if progress:
                progress(experiment, trials)
            if not experiment.active:
                for child in self._children:
                    child.wait()
                return experiment
            if self._children and all(c.poll() is not None for c in self._children):
                ended = self._finish(experiment_id, print)
                if ended is None:
                    log = self.stack.supervisor.log_path(
                        f"{WORKER_PREFIX.format(id=experiment_id)}1"
                    )
                    self.store.fail(experiment_id, f"its workers exited before it ended: see {log}")
                continue
            time.sleep(poll_s)

    # -- kill ---------------------------------------------------------------------------------

    def kill(self, experiment_id: int) -> Experiment:
        experiment = self.store.get(experiment_id)
        if not self.store.kill(experiment_id):
            return experiment
        self._close_run(experiment.mlflow_run, "KILLED")
        deadline = time.monotonic() + STOP_WAIT_S
        while time.monotonic() < deadline and self.store.get(experiment_id).trials_running:
            time.sleep(0.2)
        prefix = WORKER_PREFIX.format(id=experiment_id)
        for name in self.stack.supervisor.names():
            if name.startswith(prefix):
                self.stack.supervisor.stop(name)
        for child in self._children:
            child.terminate()
        self.store.end_running(experiment_id, "killed", "killed with the experiment")
        return self.store.get(experiment_id)

    # -- workers ------------------------------------------------------------------------------

    def worker(
        self,
        experiment_id: int,
        say: Callable[[str], None],
        stop: threading.Event | None = None,
        threads: int | None = None,
    ) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        for name, value in OMP_ENV.items():  # a worker started by hand (before torch loads)
            os.environ.setdefault(name, value)
        stop = stop or threading.Event()
        experiment = self.store.get(experiment_id)
        recipe = self.store.recipe(experiment_id)
        spec = parse_experiment(recipe.spec, f"experiment {experiment_id}")
        plan = asha.brackets(spec, experiment.max_epochs, experiment.max_trials)
        study = optuna.load_study(
            study_name=study_name(experiment_id),
            storage=self._storage(),
        )
        runner = processes.current_runner().token
        resources = Resources(threads=threads or os.cpu_count() or 1, gpus=min(1, _gpus()))
        tracker = tracking.client(self.stack)
        context = _Context(
            self,
            experiment,
            spec,
            recipe.seed,
            plan,
            study,
            tracker,
            runner,
            resources,
            stop,
            say,
            recipe.features,
        )
        say(f"worker {runner} joins experiment {experiment_id} ({resources.threads} thread(s))")
        while not stop.is_set():
            claim: Claim = retry(
                lambda: self.store.claim(experiment_id, runner, LEASE_S, self._gone, context.draw),
                say,
                "claiming a trial",
            )
            for number in claim.failed:
                context.tell(number, "FAIL")
            for number, run_id in claim.pruned:
                context.tell(number, "PRUNED")
                context.close_trial_run(run_id, "pruned", "FINISHED")
            if claim.kind == "done":
                ended = self._finish(experiment_id, say)
                if ended:
                    say(f"experiment {experiment_id} {ended.state}" + _best(ended))
                break
            if claim.kind == "wait":
                stop.wait(WAIT_S)
                continue
            context.run(claim)
        self._forget_workers(experiment_id)
        say(f"worker {runner} leaves experiment {experiment_id}")

    @staticmethod
    def _gone(token: str | None) -> bool:
        runner = processes.Runner.parse(token)
        return runner is None or runner.alive() is False

    def _finish(self, experiment_id: int, say: Callable[[str], None]) -> Experiment | None:
        ended = retry(lambda: self.store.finish(experiment_id), say, "ending the experiment")
        if ended is not None:
            self._close_run(
                ended.mlflow_run,
                "FINISHED" if ended.state == "completed" else "FAILED",
                ended,
            )
        return ended

    def _close_run(self, run_id: str | None, status: str, ended: Experiment | None = None):
        if not run_id:
            return
        tracker = tracking.client(self.stack)
        if ended is not None and ended.best_trial is not None:
            tracker.set_tag(run_id, "cdl.best_trial", str(ended.best_trial))
            tracking.log_metrics(tracker, run_id, {f"best_{ended.metric}": ended.best_metric}, 0)
        tracker.set_terminated(run_id, status)

    def _forget_workers(self, experiment_id: int) -> None:
        """Drop the service records of this experiment's workers that have exited (this one
        too), so that `cdl stack status` does not list them for ever."""
        prefix = WORKER_PREFIX.format(id=experiment_id)
        supervisor = self.stack.supervisor
        for name in supervisor.names():
            if name.startswith(prefix):
                supervisor.forget(name)


def _best(experiment: Experiment) -> str:
    if experiment.best_trial is None:
        return ""
    return f": best trial {experiment.best_trial}, {experiment.metric} {experiment.best_metric:.4g}"


class _Context:
    """What a worker keeps between trials: the study, the trainer and its features, MLflow."""

    def __init__(
        self,
        engine,
        experiment,
        spec,
        seed,
        plan,
        study,
        tracker,
        runner,
        resources,
        stop,
        say,
        features,
    ):
        self.engine, self.store = engine, engine.store
        self.experiment, self.spec, self.seed, self.plan = experiment, spec, seed, plan
        self.study, self.tracker, self.runner = study, tracker, runner
        self.resources, self.stop, self.say = resources, stop, say
        self.features_path = features or FEATURES
        self._features = None
        self._trainer = None
        self._run_tags: dict[str, str] | None = None
        self._training_rows: list[tuple[str, str]] | None = None
        self.mlflow_experiment = tracking.experiment_id(
            engine.stack, registered_name(experiment.use_case)
        )

    # -- drawing and telling ---------------------------------------------------------------

    def draw(self, number: int) -> NewTrial:
        """A new trial from the searcher (called under the experiment's lock)."""
        self.study.sampler = asha.sampler(self.spec, self.seed, number)
        trial = self.study.ask()
        hparams = asha.suggest(trial, self.spec)
        bracket = self.plan.rungs[self.plan.bracket_of(trial.number)]
        folder = self.engine.stack.settings.home / "experiments" / str(self.experiment.id)
        return NewTrial(trial.number, hparams, bracket, str(folder / f"trial-{number}"))

    def tell(self, optuna_number: int, state: str, value: float | None = None) -> None:
        import optuna

        # The grid sampler's after_trial stops an `optimize` loop when the grid is done, and
        # raises outside one: telling needs no sampler, so tell with a neutral one.
        self.study.sampler = optuna.samplers.RandomSampler()
        try:
            retry(
                lambda: self.study.tell(
                    optuna_number,
                    values=value if state == "COMPLETE" else None,
                    state=getattr(optuna.trial.TrialState, state),
                    skip_if_finished=True,
                ),
                self.say,
                "telling Optuna",
            )
        except Exception as exc:  # the search goes on without this trial's result
            self.say(f"Optuna could not record trial {optuna_number}: {db.first_line(exc)}")

    # -- running a trial -------------------------------------------------------------------

    def _trainer_class(self) -> type[Trainer]:
        if self._trainer is None:
            self._trainer = load(self.experiment.trainer)
        return self._trainer

    def _setup(self):
        self._trainer_class()
        if self._features is None:
            self._features = spec_features(
                self.engine.stack, self.spec, self.features_path, self.experiment.snapshot
            )
        return self._trainer, self._features

    def run(self, claim: Claim) -> None:
        import optuna

        trial, exp, say = claim.trial, self.experiment, self.say
        where = f"trial {trial.number}"
        doing = f"resuming at epoch {trial.epochs + 1}" if claim.resumed else "starting"
        say(f"{where}: {doing} {trial.hparams}")
        run_id = trial.mlflow_run or retry(lambda: self._start_run(trial), say, "MLflow")
        optuna_trial = optuna.trial.Trial(
            self.study,
            self.study._storage.get_trial_id_from_study_id_trial_number(
                self.study._study_id, claim.optuna_number
            ),
        )
        bracket = self.plan.bracket_of(claim.optuna_number)
        rungs = self.plan.milestones(bracket)[:-1]  # the last ends the trial anyway
        checkpoints = Path(trial.checkpoints) / "checkpoints"
        checkpoints.mkdir(parents=True, exist_ok=True)
        beat = _Heartbeat(self.store, exp.id, trial.number, self.runner, self.stop, say)
        last = {"epoch": trial.epochs, "value": trial.metric}

        def report(epoch: int, metrics) -> bool:
            value = metrics.get(exp.metric)
            if value is None:
                raise TrialError(
                    f"epoch {epoch} reported no '{exp.metric}' (reported: {', '.join(metrics)})"
                )
            value = float(value)
            if not math.isfinite(value):
                raise TrialError(f"{exp.metric} is {value} at epoch {epoch}")
            epoch_log.put(metrics, epoch)
            retry(lambda: optuna_trial.report(value, epoch), say, "Optuna")
            last.update(epoch=epoch, value=value)
            rung = self.plan.rung_of(bracket, epoch)
            text = f"epoch {epoch}: " + ", ".join(f"{k} {float(v):.4g}" for k, v in metrics.items())
            if not retry(
                lambda: self.store.epoch(
                    exp.id, trial.number, self.runner, epoch, rung, value, text
                ),
                say,
                "recording the epoch",
            ):
                beat.stop_for("lost")
            if beat.reason:
                return False
            if epoch in rungs and epoch < exp.max_epochs:
                goes_on = retry(
                    lambda: self.store.reach_rung(
                        exp.id, trial.number, self.runner, epoch, value, self.plan.divisor
                    ),
                    say,
                    "recording the rung",
                )
                if not goes_on:
                    beat.stop_for("lost" if goes_on is None else "paused")
                    return False
            return True

        epoch_log = tracking.EpochLog(
            lambda metrics, epoch: retry(
                lambda: tracking.log_metrics(self.tracker, run_id, metrics, epoch), say, "MLflow"
            )
        )
        beat.start()
        try:
            trainer_class, features = self._setup()
            seed = (self.seed + trial.number) % 2**31  # the same when the trial resumes
            model = trainer_class(asha.nested(trial.hparams), features, self.resources, seed)
            self._extra(
                "its model tags",
                lambda: tracking.log_tags(
                    self.tracker, run_id, tracking.model_tags(model, features)
                ),
            )
            model.fit(exp.max_epochs, checkpoints, report)
            epoch_log.close()  # every epoch's metrics are in MLflow before the trial ends
            reason = beat.reason
            if reason is None:
                if last["value"] is None:
                    raise TrialError("the trainer finished without reporting an epoch")
                self._save_model(trial, run_id, model)
            elif reason == "paused":  # it may end as the experiment's best: keep its model
                self._extra("its model", lambda: self._save_model(trial, run_id, model))
            if reason in (None, "paused"):
                self._log_outcome(trial, run_id, model, features, checkpoints, reason is None)
        except Exception as exc:
            beat.done.set()
            try:
                epoch_log.close()
            except Exception:  # the trial fails for `exc` already
                pass
            error = "".join(traceback.format_exception(exc))
            say(f"{where} failed: {type(exc).__name__}: {exc}")
            self._end(
                trial,
                "failed",
                last["value"],
                error,
                f"failed: {type(exc).__name__}: {exc}",
                run_id,
                "FAILED",
            )
            self.tell(claim.optuna_number, "FAIL")
            return
        finally:
            beat.done.set()
        epochs = f"after epoch {last['epoch']}"
        if reason == "lost":
            say(f"{where}: another worker took it over; leaving it")
        elif reason == "released":
            retry(
                lambda: self.store.release(
                    exp.id, trial.number, self.runner, f"released {epochs}: its worker was stopped"
                ),
                say,
                "releasing the trial",
            )
            say(f"{where}: released {epochs}")
        elif reason == "killed":
            self._end(trial, "killed", None, None, f"killed {epochs}", run_id, "KILLED")
            self.tell(claim.optuna_number, "FAIL")
        elif reason == "paused":
            say(f"{where}: paused {epochs} ({exp.metric} {last['value']:.4g}), not among the best")
            self._extra("its state", lambda: self.tracker.set_tag(run_id, "cdl.state", "paused"))
        else:
            self._end(
                trial,
                "completed",
                last["value"],
                None,
                f"completed {epochs} ({exp.metric} {last['value']:.4g})",
                run_id,
                "FINISHED",
            )
            self.tell(claim.optuna_number, "COMPLETE", last["value"])

    def _save_model(self, trial: Trial, run_id: str, model: Trainer) -> None:
        """The trained model as the run's `model` artifact (replacing a paused trial's)."""
        folder = Path(trial.checkpoints) / "model"
        shutil.rmtree(folder, ignore_errors=True)
        model.save_model(folder)
        retry(
            lambda: self.tracker.log_artifacts(run_id, str(folder), tracking.MODEL_ARTIFACT),
            self.say,
            "MLflow",
        )

    def _start_run(self, trial: Trial) -> str:
        exp = self.experiment
        snapshot = f"{exp.use_case}/{exp.snapshot}"
        rows, tags = self._provenance()
        run_id = tracking.start_run(
            self.tracker,
            self.mlflow_experiment,
            f"{exp.name}-{exp.id}-trial-{trial.number}",
            {
                **tags,
                "mlflow.parentRunId": exp.mlflow_run,
                "cdl.experiment": str(exp.id),
                "cdl.trial": str(trial.number),
                "cdl.snapshot": snapshot,
            },
            trial.hparams,
        )
        self.store.set_trial_run(exp.id, trial.number, run_id)
        if rows:
            commits = tags["cdl.data_commits"].split(",")
            self._extra(
                "its training data",
                lambda: tracking.log_training_data(self.tracker, run_id, snapshot, rows, commits),
            )
        return run_id

    def _provenance(self) -> tuple[list[tuple[str, str]], dict[str, str]]:
        """(the snapshot's train rows, the provenance tags), once per worker: the code of the
        trainer's checkout, the package versions, the data commits of the train rows."""
        if self._run_tags is None:
            exp = self.experiment
            store = LabelStore(self.engine.stack, use_case(exp.use_case))
            try:
                rows = retry(lambda: store.train_rows(exp.snapshot), self.say, "reading labels")
            except Exception as exc:  # features_for will say what is wrong, failing the trial
                self.say(f"no training data to track: {db.first_line(exc)}")
                rows = []
            code = provenance.code_version(Path(inspect.getfile(self._trainer_class())))
            commits = provenance.data_commits(source for source, _ in rows)
            self._training_rows = [(source, label) for source, label in rows]
            self._run_tags = provenance.tags(code, provenance.package_versions(), commits)
        return self._training_rows or [], self._run_tags

    def _log_outcome(self, trial, run_id, model, features, checkpoints, completed) -> None:
        title = f"{self.experiment.name}-{self.experiment.id} trial {trial.number}"
        for what, call in tracking.outcome_logs(
            self.tracker, run_id, model, features.labels, checkpoints, completed, title
        ):
            self._extra(what, call)

    def _extra(self, what: str, call: Callable[[], Any]) -> None:
        """Log something a trial does not need to go on: retried while the database is away,
        else said in the trial's log and left out."""
        try:
            retry(call, self.say, "MLflow")
        except Exception as exc:
            self.say(f"could not log {what}: {type(exc).__name__}: {db.first_line(exc)}")

    def _end(self, trial, state, metric, error, text, run_id, status) -> None:
        exp = self.experiment
        ended = retry(
            lambda: self.store.end_trial(
                exp.id, trial.number, self.runner, state, metric, error, text
            ),
            self.say,
            "ending the trial",
        )
        if ended:
            self.say(f"trial {trial.number}: {text}")
            self.close_trial_run(run_id, state, status)

    def close_trial_run(self, run_id: str | None, state: str, status: str) -> None:
        """Tag a trial's MLflow run with how the trial ended, and end the run."""
        if not run_id:
            return
        try:
            retry(lambda: self.tracker.set_tag(run_id, "cdl.state", state), self.say, "MLflow")
            retry(lambda: self.tracker.set_terminated(run_id, status), self.say, "MLflow")
        except CDLError:
            raise
        except Exception as exc:
            self.say(f"MLflow could not close run {run_id}: {db.first_line(exc)}")
