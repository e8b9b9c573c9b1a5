"""`cdl model`: the model registry: register a trained model, list and compare versions, gate
them on their test split, approve a champion."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from pipelines.cli.context import cli_context, console, err_console
from pipelines.core.errors import NotFound
from pipelines.model import approvals, evaluation, registry
from pipelines.model.registry import VersionInfo, registered_name

app = typer.Typer(
    rich_markup_mode=None,
    help="Registered models (MLflow), one per use case (bbc-news, fashion-mnist): versions with "
    "their lineage and metadata, the evaluation gate, approval of the champion.",
    no_args_is_help=True,
)

VERSION = typer.Argument(..., metavar="NAME/VERSION", help="e.g. bbc-news/3 (or bbc-news@champion)")
ALIAS_COLOURS = {"champion": "green", "candidate": "cyan"}


def _when(moment: datetime) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _aliases(info: VersionInfo) -> str:
    return " ".join(f"[{ALIAS_COLOURS.get(a, 'white')}]{a}[/]" for a in info.aliases)


def _size(value: str | None) -> str:
    if not value or not value.isdigit():
        return "-"
    size = float(value)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return value


def _gate(info: VersionInfo) -> str:
    passed = info.tags.get("cdl.eval.passed")
    if passed is None:
        return "[dim]not evaluated[/]"
    accuracy = info.tags.get("cdl.eval.accuracy", "?")
    colour, word = ("green", "passed") if passed == "true" else ("red", "failed")
    return (
        f"[{colour}]{word}[/] {float(accuracy):.3f} (>= {info.tags.get('cdl.eval.min_accuracy')})"
    )


@app.command()
def register(
    ctx: typer.Context,
    ref: str = typer.Argument(
        ...,
        metavar="EXPERIMENT|RUN",
        help="An MLflow run id (a trial's run), an experiment's MLflow parent run id or a CDL "
        "experiment id (both: the experiment's best trial).",
    ),
) -> None:
    """Register the model of a finished training run as a new version of its use case's
    model, tagged with its lineage (run, snapshot, data commits, git sha), task, label set,
    validation metrics, parameter count, artifact size and per-sample CPU latency."""
    done = registry.register(cli_context(ctx).stack, ref)
    info, run = done.version, done.run
    source = f"run {run.run_id}"
    if run.experiment is not None:
        source += f" (experiment {run.experiment}, trial {run.trial})"
    for note in done.notes:
        err_console.print(f"note: {note}", highlight=False)
    console.print(
        f"registered {info.ref} from {source}: {info.tags.get('cdl.parameters', '?')} "
        f"parameters, {_size(info.tags.get('cdl.artifact_bytes'))}, "
        f"{info.tags.get('cdl.latency_ms')} ms per sample (CPU), val_accuracy "
        f"{info.tags.get('cdl.metric.val_accuracy', '-')} ({done.seconds:.1f} s)",
        highlight=False,
    )


@app.command("list")
def list_versions(
    ctx: typer.Context,
    name: Optional[str] = typer.Argument(
        None, metavar="NAME", help="A registered model (default: every one)."
    ),
) -> None:
    """List the versions of a registered model (of every one), newest first."""
    models = registry.Registry(cli_context(ctx).stack)
    names = [registry.checked_name(name)] if name else models.names()
    if not names:
        console.print("no registered models yet ('cdl model register EXPERIMENT|RUN')")
        return
    for model in names:
        versions = models.versions(model)
        if name and not versions:
            raise NotFound(f"no registered model {model}", "see 'cdl model list'")
        table = Table(
            "version",
            "aliases",
            "snapshot",
            "val acc",
            "test gate",
            "params",
            "size",
            "latency ms",
            "run",
            "registered",
            title=f"{model}: {len(versions)} version(s)",
        )
        for info in versions:
            table.add_row(
                info.version,
                _aliases(info),
                info.tags.get("cdl.snapshot", "-"),
                info.tags.get("cdl.metric.val_accuracy", "-"),
                _gate(info),
                info.tags.get("cdl.parameters", "-"),
                _size(info.tags.get("cdl.artifact_bytes")),
                info.tags.get("cdl.latency_ms", "-"),
                (info.run_id or "-")[:12],
                _when(info.created_at),
            )
        console.print(table)


@app.command()
def show(
    ctx: typer.Context,
    ref: str = VERSION,
    as_json: bool = typer.Option(False, "--json", help="Print the version as JSON."),
) -> None:
    """Show one version: aliases, source and every tag (lineage, metadata, evaluation)."""
    info = registry.Registry(cli_context(ctx).stack).get(ref)
    if as_json:
        data = {
            "name": info.name,
            "version": info.version,
            "aliases": info.aliases,
            "run_id": info.run_id,
            "source": info.source,
            "created_at": info.created_at.isoformat(),
            "tags": info.tags,
        }
        print(json.dumps(data, indent=2, sort_keys=True))
        return
    table = Table("field", "value", title=f"{info.ref} {_aliases(info)}")
    table.add_row("registered", _when(info.created_at))
    table.add_row("source", info.source)
    table.add_row("evaluation gate", _gate(info))
    for key, value in sorted(info.tags.items()):
        if key == "cdl.eval.scores":
            continue  # shown below as per-class rows
        table.add_row(key, value)
    console.print(table)
    if "cdl.eval.scores" in info.tags:
        console.print(_per_class(info))


def _per_class(info: VersionInfo) -> Table:
    scores = evaluation.Scores.from_dict(json.loads(info.tags["cdl.eval.scores"]))
    table = Table(
        "label",
        "precision",
        "recall",
        "F1",
        "support",
        title=f"{info.ref} on the test split of {scores.snapshot}",
    )
    for label in scores.labels:
        v = scores.per_class[label]
        table.add_row(
            label,
            f"{v['precision']:.3f}",
            f"{v['recall']:.3f}",
            f"{v['f1']:.3f}",
            str(v["support"]),
        )
    return table


COMPARED = (
    ("aliases", None),
    ("snapshot", "cdl.snapshot"),
    ("val accuracy", "cdl.metric.val_accuracy"),
    ("val loss", "cdl.metric.val_loss"),
    ("test accuracy", "cdl.eval.accuracy"),
    ("test macro F1", "cdl.eval.macro_f1"),
    ("test split", "cdl.eval.snapshot"),
    ("gate passed", "cdl.eval.passed"),
    ("parameters", "cdl.parameters"),
    ("artifact bytes", "cdl.artifact_bytes"),
    ("latency ms (p50)", "cdl.latency_ms"),
    ("latency ms (p95)", "cdl.latency_p95_ms"),
    ("run", "cdl.run"),
    ("experiment / trial", None),
    ("git sha", "cdl.git_sha"),
    ("data commits", "cdl.data_commits"),
)


@app.command()
def compare(ctx: typer.Context, a: str = VERSION, b: str = VERSION) -> None:
    """Two versions side by side: metrics, size, latency, lineage (and the run's
    hyperparameters that differ)."""
    models = registry.Registry(cli_context(ctx).stack)
    left, right = models.get(a), models.get(b)
    table = Table("", left.ref, right.ref, title=f"{left.ref} vs {right.ref}")
    for label, key in COMPARED:
        if label == "aliases":
            values = [_aliases(left), _aliases(right)]
        elif key is None:
            values = [
                f"{v.tags.get('cdl.experiment', '-')} / {v.tags.get('cdl.trial', '-')}"
                for v in (left, right)
            ]
        else:
            values = [left.tags.get(key, "-"), right.tags.get(key, "-")]
        style = "" if values[0] == values[1] else "bold"
        table.add_row(label, *values, style=style)
    params = [_params(models, v) for v in (left, right)]
    for key in sorted(set(params[0]) | set(params[1])):
        values = [params[0].get(key, "-"), params[1].get(key, "-")]
        if values[0] != values[1]:
            table.add_row(f"param {key}", *values, style="bold")
    console.print(table)


def _params(models: registry.Registry, info: VersionInfo) -> dict[str, str]:
    if not info.run_id:
        return {}
    try:
        return dict(models.client.get_run(info.run_id).data.params)
    except Exception:  # the run was deleted: its params are not shown
        return {}


@app.command()
def evaluate(
    ctx: typer.Context,
    ref: str = VERSION,
    min_accuracy: float = typer.Option(
        ..., "--min-accuracy", min=0.0, max=1.0, help="The gate: the least test accuracy to pass."
    ),
    junit: Optional[Path] = typer.Option(
        None,
        "--junit",
        dir_okay=False,
        help="JUnit XML for CI (default: reports/<name>-<version>-evaluation.xml here).",
    ),
    report: Optional[Path] = typer.Option(
        None,
        "--report",
        dir_okay=False,
        help="Markdown report, with the confusion matrix PNG beside it (default: "
        "reports/<name>-<version>-evaluation.md here).",
    ),
) -> None:
    """Score a version on the test split of its own label snapshot; record accuracy, per-class
    precision/recall/F1 and a confusion matrix on the version (tags, and an evaluation run's
    artifacts); write a JUnit XML and a markdown report; give a passing version the alias
    'candidate'. Exits 1 below the gate."""
    result = evaluation.evaluate(cli_context(ctx).stack, ref, min_accuracy, junit, report)
    scores = result.scores
    colour, word = ("green", "PASSED") if result.passed else ("red", "FAILED")
    relation = ">=" if result.passed else "<"
    console.print(
        f"{result.version.ref}: [{colour}]{word}[/] accuracy {scores.accuracy:.4f} {relation} "
        f"{min_accuracy:g} on {scores.rows} test files of {scores.snapshot} (macro F1 "
        f"{scores.macro_f1:.4f}, {result.seconds:.1f} s)",
        highlight=False,
    )
    console.print(
        f"report {result.report}, JUnit {result.junit}, confusion matrix {result.figure}; "
        f"evaluation run {result.run_id}"
        + (f"; alias {registry.CANDIDATE} set" if result.passed else ""),
        highlight=False,
    )
    if not result.passed:
        raise typer.Exit(1)


@app.command()
def approve(
    ctx: typer.Context,
    ref: str = VERSION,
    by: str = typer.Option(..., "--by", help="Who approves (name or e-mail), recorded."),
    reason: str = typer.Option(..., "--reason", help="Why, recorded in the history."),
    force: bool = typer.Option(
        False, "--force", help="Approve a version that has not passed the evaluation gate."
    ),
) -> None:
    """Show the version against the current champion on the same test split, move the alias
    'champion' to it, and record the approval (cdl model history). Approving an earlier
    version is a rollback."""
    done = approvals.approve(cli_context(ctx).stack, ref, by, reason, force)
    comparison = done.comparison
    for note in comparison.notes:
        err_console.print(f"note: {note}", highlight=False)
    console.print(_comparison(comparison))
    approval = done.approval
    what = "rolled back to" if approval.action == approvals.ROLLED_BACK else "promoted"
    previous = f" (previous champion: {approval.model}/{approval.previous_version})"
    console.print(
        f"{what} {approval.ref} as champion{previous if approval.previous_version else ''}, "
        f"approved by {approval.approved_by}" + (" [yellow](forced)[/]" if approval.forced else ""),
        highlight=False,
    )


def _comparison(comparison: approvals.Comparison) -> Table:
    mine, theirs = comparison.challenger_scores, comparison.champion_scores
    champion = comparison.champion.ref + " (champion)" if comparison.champion else "no champion"
    table = Table(
        "",
        comparison.challenger.ref,
        champion,
        title=f"on the test split of {comparison.snapshot} ({mine.rows} files)",
    )

    def cell(scores, pick) -> str:
        return "-" if scores is None else f"{pick(scores):.3f}"

    table.add_row("accuracy", cell(mine, lambda s: s.accuracy), cell(theirs, lambda s: s.accuracy))
    table.add_row("macro F1", cell(mine, lambda s: s.macro_f1), cell(theirs, lambda s: s.macro_f1))
    for label in mine.labels:
        table.add_row(
            f"F1 {label}",
            cell(mine, lambda s, lab=label: s.per_class[lab]["f1"]),
            cell(theirs, lambda s, lab=label: s.per_class.get(lab, {"f1": 0.0})["f1"]),
        )
    return table


@app.command()
def history(ctx: typer.Context, name: str = typer.Argument(..., metavar="NAME")) -> None:
    """The approvals of a registered model, newest first: who, when, why, the previous
    champion, and both versions' test accuracy on the split they were compared on."""
    rows = approvals.history(cli_context(ctx).stack, name)
    model = registered_name(name)
    if not rows:
        console.print(f"{model}: no approvals yet ('cdl model approve {model}/VERSION')")
        return
    table = Table(
        "when",
        "version",
        "action",
        "by",
        "reason",
        "previous",
        "accuracy",
        "previous acc",
        "test split",
        title=f"{model}: approvals",
    )
    for row in rows:
        action = row.action + (" [yellow](forced)[/]" if row.forced else "")
        previous_acc = row.previous_metrics["accuracy"] if row.previous_metrics else None
        table.add_row(
            _when(row.approved_at),
            str(row.version),
            action,
            row.approved_by,
            row.reason,
            str(row.previous_version) if row.previous_version else "-",
            f"{row.metrics['accuracy']:.3f}",
            f"{previous_acc:.3f}" if previous_acc is not None else "-",
            row.snapshot,
        )
    console.print(table)
