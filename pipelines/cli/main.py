"""`cdl`: the entry point. Problems a user can fix are printed as one line, no traceback."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from pipelines import __version__
from pipelines.cli import config as config_cli
from pipelines.cli import data as data_cli
from pipelines.cli import demo as demo_cli
from pipelines.cli import events as events_cli
from pipelines.cli import experiment as experiment_cli
from pipelines.cli import label as label_cli
from pipelines.cli import lineage as lineage_cli
from pipelines.cli import model as model_cli
from pipelines.cli import stack as stack_cli
from pipelines.cli import ui as ui_cli
from pipelines.cli.context import CLIContext, err_console
from pipelines.core import db
from pipelines.core.errors import CDLError, Unavailable

app = typer.Typer(
    rich_markup_mode=None,
    name="cdl",
    help="CDL: continuous deep learning. Data, model and deployment pipelines as code, "
    "on an embedded local stack or on Pachyderm, Determined and Kubernetes.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    # CDLError is printed as one line by run(); bugs keep their tracebacks.
    pretty_exceptions_enable=False,
)
app.add_typer(stack_cli.app, name="stack")
app.add_typer(config_cli.app, name="config")
app.add_typer(data_cli.app, name="data")
app.add_typer(label_cli.app, name="label")
app.add_typer(model_cli.app, name="model")
app.add_typer(lineage_cli.app, name="lineage")
app.add_typer(events_cli.app, name="events")
app.add_typer(experiment_cli.app, name="experiment")
app.command("demo")(demo_cli.demo)
app.command("ui")(ui_cli.ui)


def _version(value: bool) -> None:
    if value:
        print(f"cdl {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(
        None,
        "--config",
        "-c",
        help="cdl.yaml to use (default: $CDL_CONFIG, else the nearest "
        "cdl.yaml in this folder or above).",
        dir_okay=False,
    ),
    stack: Optional[str] = typer.Option(
        None,
        "--stack",
        "-s",
        help="Named stack from cdl.yaml (default: $CDL_STACK, else default_stack).",
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    ctx.obj = CLIContext(config_path=config, stack_name=stack)


def run() -> None:
    try:
        try:
            app()  # exits by itself; usage errors are reported by typer with exit code 2
        except db.CONNECTION_LOST as exc:  # Postgres went away in the middle of the command
            raise Unavailable(
                f"lost the connection to the platform database: {db.first_line(exc)}",
                "check 'cdl stack status', run 'cdl stack up' if it is down, then run the "
                "command again (what it left unfinished is not committed)",
            ) from exc
    except CDLError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    run()
