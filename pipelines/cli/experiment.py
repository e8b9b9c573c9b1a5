"""`cdl experiment`: hyperparameter searches and training runs from experiment specs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.live import Live
from rich.table import Table

from pipelines.cli.context import cli_context, console, err_console, say, stop_on_signal
from pipelines.model.experiments import Experiment, ExperimentEngine, Trial, experiment_engine

app = typer.Typer(
    rich_markup_mode=None,
    help="Hyperparameter searches and training runs: an experiment spec (Determined's format) "
    "runs its trials on the stack's experiment engine, each tracked in MLflow.",
    no_args_is_help=True,
)

EXPERIMENT = typer.Argument(..., metavar="EXPERIMENT", help="The experiment's number.")
STATE_COLOURS = {
    "active": "yellow",
    "running": "yellow",
    "completed": "green",
    "paused": "cyan",
    "pruned": "dim",
    "failed": "red",
    "killed": "magenta",
}


def engine(ctx: typer.Context) -> ExperimentEngine:
    return experiment_engine(cli_context(ctx).stack)


def coloured(state: str) -> str:
    return f"[{STATE_COLOURS.get(state, 'dim')}]{state}[/]"


def moment(value) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def hparams(values: dict) -> str:
    def flat(tree: dict, prefix: str = "") -> list[str]:
        found = []
        for key, value in tree.items():
            if isinstance(value, dict):
                found += flat(value, f"{prefix}{key}.")
            else:
                shown = f"{value:.4g}" if isinstance(value, float) else json.dumps(value)
                found.append(f"{prefix}{key}={shown}")
        return found

    return " ".join(flat(values))


def headline(experiment: Experiment) -> str:
    best = (
        f", best trial {experiment.best_trial} ({experiment.metric} "
        f"{number(experiment.best_metric)})"
        if experiment.best_trial is not None
        else ""
    )
    return (
        f"experiment {experiment.id} {experiment.name}: {coloured(experiment.state)}, "
        f"{experiment.trials_started}/{experiment.max_trials} trials started, "
        f"{experiment.trials_running} running{best}"
    )


def trial_table(experiment: Experiment, trials: list[Trial]) -> Table:
    table = Table(
        "trial",
        "state",
        "hyperparameters",
        "epochs",
        "rung",
        experiment.metric,
        "restarts",
        title=(
            f"experiment {experiment.id} {experiment.name} ({experiment.searcher}, "
            f"{experiment.use_case}/{experiment.snapshot}): {experiment.state}"
        ),
        title_justify="left",
    )
    for trial in trials:
        best = experiment.best_trial == trial.number
        table.add_row(
            f"{trial.number}{' *' if best else ''}",
            coloured(trial.state),
            hparams(trial.hparams),
            f"{trial.epochs}/{experiment.max_epochs}",
            f"{trial.rung}/{trial.bracket}",
            number(trial.metric),
            str(trial.restarts),
        )
    return table


@app.command()
def submit(
    ctx: typer.Context,
    spec: Path = typer.Argument(
        ..., metavar="SPEC", help="An experiment spec, e.g. use_cases/bbc_news/model/search.yaml."
    ),
    wait: bool = typer.Option(
        False,
        "--wait",
        help="Run the workers as child processes and wait for the end, printing each trial's "
        "outcome and the best trial; exit 1 if the experiment failed.",
    ),
) -> None:
    """Start an experiment: resolve its label snapshot, record it, and start its workers (in the
    background, unless --wait)."""
    experiments = engine(ctx)
    submission = experiments.submit(spec, attached=wait)
    experiment = submission.experiment
    if submission.ignored:
        err_console.print(
            "ignored by the local engine (cluster-only): " + ", ".join(submission.ignored),
            highlight=False,
        )
    for note in submission.notes:
        err_console.print(f"note: {note}", highlight=False)
    console.print(
        f"experiment {experiment.id} {experiment.name}: {experiment.searcher} search of up to "
        f"{experiment.max_trials} trial(s) x {experiment.max_epochs} epoch(s) on "
        f"{experiment.use_case}/{experiment.snapshot}, {experiment.workers} worker(s)",
        highlight=False,
    )
    if not wait:
        console.print(f"follow it with: cdl experiment show {experiment.id} --watch")
        return
    seen: dict[int, str] = {}

    def progress(current: Experiment, trials: list[Trial]) -> None:
        for trial in trials:
            if seen.get(trial.number) != trial.state and trial.state != "running":
                say(
                    f"trial {trial.number} {trial.state} after {trial.epochs} epoch(s), "
                    f"{current.metric} {number(trial.metric)} ({hparams(trial.hparams)})"
                )
            seen[trial.number] = trial.state

    ended = experiments.wait(experiment.id, progress)
    console.print(headline(ended), highlight=False)
    if ended.state == "failed":
        raise typer.Exit(1)


@app.command("list")
def list_(ctx: typer.Context) -> None:
    """List experiments, newest first: state, trials, best trial and metric."""
    table = Table("id", "name", "use case", "snapshot", "state", "trials", "best", "created")
    for e in engine(ctx).list():
        table.add_row(
            str(e.id),
            e.name,
            e.use_case,
            e.snapshot,
            coloured(e.state),
            f"{e.trials_started}/{e.max_trials}",
            "-" if e.best_trial is None else f"{e.best_trial}: {e.metric} {number(e.best_metric)}",
            moment(e.created_at),
        )
    console.print(table)


@app.command()
def show(
    ctx: typer.Context,
    experiment_id: int = EXPERIMENT,
    watch: bool = typer.Option(
        False, "--watch", "-w", help="Refresh the table every second until the experiment ends."
    ),
) -> None:
    """Show an experiment's trials: state (running, paused at an ASHA rung until promoted,
    completed, pruned, failed, killed), hyperparameters, epochs, rung and metric (the best trial
    is starred)."""
    experiments = engine(ctx)
    experiment, trials = experiments.show(experiment_id)
    if not watch or not experiment.active:
        console.print(trial_table(experiment, trials))
        console.print(headline(experiment), highlight=False)
        return
    stop = stop_on_signal()
    with Live(trial_table(experiment, trials), console=console, auto_refresh=False) as live:
        while experiment.active and not stop.is_set():
            stop.wait(1.0)
            experiment, trials = experiments.show(experiment_id)
            live.update(trial_table(experiment, trials), refresh=True)
    console.print(headline(experiment), highlight=False)


@app.command()
def logs(
    ctx: typer.Context,
    experiment_id: int = EXPERIMENT,
    trial: Optional[int] = typer.Option(None, "--trial", "-t", help="Only this trial's log."),
) -> None:
    """Print the trials' logs (each start, epoch and end) and the traceback of each failure."""
    for found, text in engine(ctx).logs(experiment_id, trial):
        console.print(f"[bold]trial {found.number}[/] {coloured(found.state)}", highlight=False)
        console.print(text.rstrip() or "(no log yet)", highlight=False, markup=False)
        if found.error:
            console.print(found.error.rstrip(), highlight=False, markup=False)


@app.command()
def kill(ctx: typer.Context, experiment_id: int = EXPERIMENT) -> None:
    """Stop an experiment: its running trials end killed and no new trial starts."""
    started = time.monotonic()
    experiment = engine(ctx).kill(experiment_id)
    if experiment.state != "killed":
        console.print(f"experiment {experiment_id} had already ended: {experiment.state}")
        return
    console.print(
        f"experiment {experiment_id} killed in {time.monotonic() - started:.1f} s", highlight=False
    )


@app.command()
def worker(
    ctx: typer.Context,
    experiment_id: int = EXPERIMENT,
    threads: Optional[int] = typer.Option(
        None, min=1, help="CPU threads per trial (default: every core of this machine)."
    ),
) -> None:
    """Run an experiment's trials until none is left. `submit` starts its workers; run more on
    any machine that reaches the stack's Postgres (with the same stack home, to resume each
    other's trials)."""
    engine(ctx).worker(experiment_id, say, stop_on_signal(), threads)
