"""The experiment port: hyperparameter searches and training runs of an experiment spec.

An experiment is one spec (Determined's experiment-config format, see spec.py) submitted once: a
searcher proposes trials (a set of hyperparameters each), trials train a use case's Trainer
(trainer.py) epoch by epoch and report the searcher's metric, and the searcher may stop them
early (ASHA). Every trial is tracked in MLflow as a run nested under the experiment's run.

Backends (pipelines/plugins.py, concern `experiments`; a stack picks one with
`experiments.engine`):
- `local` (search.py): an Optuna study on the stack's Postgres and worker processes on this
  machine, which workers on other machines reaching the same Postgres can join;
- `determined` (determined.py): the same spec sent to a Determined master with Determined's own
  client, its trials running `pipelines.model.entrypoint` (the same trainers, on the Core API).

Adding one is a class implementing `ExperimentEngine`, returning these dataclasses (never an
engine's own objects), one line in the plugin table, and tests/model's contract passing for it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from pipelines.core.stack import Stack
from pipelines.plugins import backend_class

EXPERIMENT_STATES = ("active", "completed", "killed", "failed")
TRIAL_STATES = ("running", "paused", "completed", "pruned", "failed", "killed")


@dataclass
class Experiment:
    id: int
    name: str
    use_case: str
    snapshot: str  # the label snapshot trained on (resolved: never 'latest')
    state: str  # active | completed | killed | failed
    searcher: str
    metric: str
    smaller_is_better: bool
    max_trials: int
    max_epochs: int
    max_restarts: int
    workers: int
    spec_path: str
    trainer: str  # module:Class
    best_trial: int | None
    best_metric: float | None
    mlflow_run: str | None
    error: str | None
    created_at: datetime
    finished_at: datetime | None
    trials_started: int = 0
    trials_running: int = 0

    @property
    def active(self) -> bool:
        return self.state == "active"


@dataclass
class Trial:
    experiment: int
    number: int
    state: str  # running | paused (waiting for an ASHA promotion) | completed | pruned | failed
    #             | killed
    hparams: dict[str, Any]
    epochs: int  # epochs done
    bracket: int  # rungs of its ASHA bracket
    rung: int  # rungs reached
    metric: float | None  # the searcher's metric after the last epoch
    restarts: int
    mlflow_run: str | None
    checkpoints: str
    runner: str | None
    error: str | None
    started_at: datetime
    finished_at: datetime | None


@dataclass
class Submission:
    """A submitted experiment, and what the user should hear about its spec once."""

    experiment: Experiment
    ignored: list[str] = field(default_factory=list)  # cluster-only fields not acted on here
    notes: list[str] = field(default_factory=list)  # deprecated forms the spec uses


# Called while waiting with the experiment and its trials, each time something may have changed.
Progress = Callable[[Experiment, list[Trial]], None]


class ExperimentEngine(ABC):
    """Runs experiment specs. Experiments are numbered; a trial by (experiment, number)."""

    def __init__(self, stack: Stack):
        self.stack = stack

    @abstractmethod
    def submit(self, spec_path: Path, attached: bool = False) -> Submission:
        """Check the spec, resolve its label snapshot (`latest`: the newest), record the
        experiment and start running its trials: in the background, or with `attached` in
        processes that end with this one (then `wait` for them)."""

    @abstractmethod
    def list(self) -> list[Experiment]:
        """Every experiment, newest first."""

    @abstractmethod
    def show(self, experiment_id: int) -> tuple[Experiment, list[Trial]]:
        """The experiment and its trials by number; NotFound when there is none."""

    @abstractmethod
    def logs(self, experiment_id: int, trial: int | None = None) -> list[tuple[Trial, str]]:
        """Each trial's log (one line per start, epoch and end; a failure's traceback), or
        that of trial `trial` only."""

    @abstractmethod
    def kill(self, experiment_id: int) -> Experiment:
        """Stop the experiment: running trials end `killed`, no trial starts any more."""

    @abstractmethod
    def worker(
        self,
        experiment_id: int,
        say: Callable[[str], None],
        stop: Any = None,
        threads: int | None = None,
    ) -> None:
        """Run trials of the experiment until it has none left to run (or `stop`, a
        threading.Event, is set), with `threads` CPU threads per trial."""

    @abstractmethod
    def wait(
        self, experiment_id: int, progress: Progress | None = None, poll_s: float = 1.0
    ) -> Experiment:
        """Block until the experiment ends; return it."""


def experiment_engine(stack: Stack) -> ExperimentEngine:
    """The stack's experiment engine (`experiments.engine` in cdl.yaml)."""
    return backend_class("experiments", stack.settings.stack.experiments.engine)(stack)
