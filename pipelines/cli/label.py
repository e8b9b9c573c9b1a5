"""`cdl label`: the labeling loop between validated data, Label Studio and the label store."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress
from rich.table import Table

from pipelines.cli.context import cli_context, console, err_console, say, stop_on_signal
from pipelines.core.errors import Invalid, NotFound
from pipelines.data.labeling.predictor import file_predictor
from pipelines.data.labeling.server import LabelStudioServer
from pipelines.data.labeling.service import Labeling
from pipelines.data.labeling.spec import use_case, use_cases_by_project
from pipelines.data.labeling.webhooks import WebhookReceiver
from pipelines.model.predictor import model_predictor
from pipelines.model.registry import CHAMPION, registered_name

app = typer.Typer(
    rich_markup_mode=None,
    help="Label validated data in Label Studio and keep the labels in Postgres. USE_CASE is a "
    "folder of use_cases/ with a labeling.yaml (bbc_news, fashion_mnist).",
    no_args_is_help=True,
)
snapshot_app = typer.Typer(
    rich_markup_mode=None,
    help="Immutable, named sets of labels that training reads.",
    no_args_is_help=True,
)
app.add_typer(snapshot_app, name="snapshot")
users_app = typer.Typer(
    rich_markup_mode=None,
    help="The people who label: sign-up is closed, so accounts are made here.",
    no_args_is_help=True,
)
app.add_typer(users_app, name="users")

USE_CASE = typer.Argument(..., metavar="USE_CASE", help="e.g. bbc_news")


def labeling(ctx: typer.Context, name: str) -> Labeling:
    return Labeling(cli_context(ctx).stack, use_case(name))


@app.command()
def sync(
    ctx: typer.Context,
    name: str = USE_CASE,
    ref: Optional[str] = typer.Option(
        None, help="Commit to import from (default: the head of the use case's validated repo)."
    ),
    pre_annotate: bool = typer.Option(
        False,
        "--pre-annotate",
        help="Pre-annotate new tasks with the predictions of the use case's champion: the "
        "version with alias 'champion' of the MLflow registered model named after the use case "
        "(bbc_news: bbc-news). Without a champion yet, tasks are imported without "
        "pre-annotations, and the output says so.",
    ),
    predictions: Optional[Path] = typer.Option(
        None,
        exists=True,
        dir_okay=False,
        help='Pre-annotations for new tasks from a file: JSON lines {"path", "label", "score", '
        '"model"}.',
    ),
) -> None:
    """Create or update the use case's Label Studio project and import a task for every
    validated file that has none yet (each task keeps repo@commit:path in its meta),
    optionally with a model's predictions as pre-annotations."""
    if pre_annotate and predictions:
        raise Invalid(
            "--pre-annotate and --predictions both give pre-annotations", "choose one of them"
        )
    stack = cli_context(ctx).stack
    case = use_case(name)
    predict, source = None, ""
    if predictions:
        predict, source = file_predictor(predictions), f" from {predictions}"
    elif pre_annotate:
        predict = model_predictor(stack, case, CHAMPION)
        if predict:
            source = f" from {predict.ref} ({CHAMPION})"
        else:
            err_console.print(
                f"no '{CHAMPION}' version of model {registered_name(name)} yet: importing "
                "without pre-annotations",
                highlight=False,
            )
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task(f"importing {name} tasks", total=None)
        new, known = Labeling(stack, case).sync(
            ref,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            predict=predict,
        )
    pre = f", pre-annotated{source}" if predict and new else ""
    console.print(
        f"{name}: imported {new} new task(s){pre}; {known} file(s) already had one",
        highlight=False,
    )


@app.command()
def auto(
    ctx: typer.Context,
    name: str = USE_CASE,
    limit: Optional[int] = typer.Option(None, min=1, help="Annotate at most N tasks."),
) -> None:
    """For demos and tests: annotate unlabelled tasks through the Label Studio API, as a labeler
    would, with the class folder of each task's file as the answer."""
    count = labeling(ctx, name).auto_annotate(limit)
    console.print(f"{name}: annotated {count} task(s)")


@app.command()
def export(ctx: typer.Context, name: str = USE_CASE) -> None:
    """Pull all annotations, commit the raw export to the labels repo (<use-case>-labels, one
    JSON file per annotated task), and load new or changed annotations into the label store in
    one transaction; annotations deleted in Label Studio get a version marked deleted and leave
    the current labels. Annotations with no choice, several choices or a label outside the
    config, and tasks whose file has left the dataset, are reported and not loaded."""
    result = labeling(ctx, name).export()
    for problem in result.problems:
        err_console.print(f"skipped: {problem}", highlight=False)
    deleted = f", {result.deleted} deleted annotation(s) marked" if result.deleted else ""
    console.print(
        f"{name}: {result.tasks} tasks, {result.rows} usable annotation(s), {result.loaded} new "
        f"row(s) loaded{deleted}; raw export in {result.commit.ref}",
        highlight=False,
    )


@snapshot_app.command("create")
def snapshot_create(
    ctx: typer.Context,
    name: str = USE_CASE,
    snapshot: str = typer.Argument(..., metavar="NAME", help="e.g. 2026-11-22 or v1"),
) -> None:
    """Freeze the current labels of a use case as snapshot NAME (recorded in lineage)."""
    rows = labeling(ctx, name).snapshot(snapshot)
    console.print(
        f"snapshot {name}/{snapshot}: {rows} labels (lineage id label_snapshot:{name}/{snapshot})"
    )


@snapshot_app.command("list")
def snapshot_list(ctx: typer.Context, name: str = USE_CASE) -> None:
    """List a use case's snapshots, newest first, with their label counts."""
    table = Table("snapshot", "labels", "created", title=name)
    for found in labeling(ctx, name).snapshots():
        created = found["created_at"].astimezone().strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(found["name"], str(found["rows"]), created)
    console.print(table)


@snapshot_app.command("show")
def snapshot_show(
    ctx: typer.Context,
    name: str = USE_CASE,
    snapshot: str = typer.Argument(..., metavar="NAME"),
) -> None:
    """Count a snapshot's labels per split and label."""
    rows = labeling(ctx, name).snapshot_rows(snapshot)
    if not rows:
        raise NotFound(
            f"no snapshot {name}/{snapshot}",
            f"'cdl label snapshot list {name}' lists them",
        )
    counts: dict[tuple[str, str], int] = {}
    for row in rows:
        counts[(row["split"], row["label"])] = counts.get((row["split"], row["label"]), 0) + 1
    table = Table("split", "label", "rows", title=f"{name}/{snapshot}: {len(rows)} labels")
    for (split, label), count in sorted(counts.items()):
        table.add_row(split, label, str(count))
    console.print(table)


@app.command()
def webhooks(
    ctx: typer.Context,
    port: int = typer.Option(..., help="Port on 127.0.0.1 to receive Label Studio webhooks on."),
) -> None:
    """Receive Label Studio's annotation webhooks and run an incremental export of the tasks
    they concern, retried with backoff when it fails. `cdl stack up --with label-studio` runs
    this as the 'label-webhooks' service, and `cdl label sync` points the project's webhooks at
    it."""
    stack = cli_context(ctx).stack
    receiver = WebhookReceiver(
        use_cases_by_project(),
        lambda name, scope: Labeling(stack, use_case(name)).export_scope(scope),
        say,
    )
    receiver.serve(port, stop_on_signal())


@users_app.command("add")
def users_add(
    ctx: typer.Context,
    email: str = typer.Argument(..., help="The labeler's email, their user name."),
) -> None:
    """Create a labeler's Label Studio account in the organization that holds the projects, with
    a generated password, and print how they sign in. (Label Studio's open-source edition has
    one role for all members: they can see and label every project.)"""
    server = LabelStudioServer(cli_context(ctx).stack)
    password = server.add_user(email)
    console.print(
        f"created {email}: they sign in at {server.url}/user/login with the password "
        f"{password} (and can change it under Account & Settings)",
        highlight=False,
    )
