"""`cdl stack`: bring the platform's services up, down, and show their health."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer
from rich.table import Table

from pipelines.cli.context import cli_context, console
from pipelines.core.stack import ComponentStatus

app = typer.Typer(
    rich_markup_mode=None,
    help="Start, stop and inspect the stack (Postgres and the platform services).",
    no_args_is_help=True,
)


def status_table(rows: list[ComponentStatus]) -> Table:
    table = Table(title="CDL stack", title_justify="left")
    for column in ("service", "health", "address", "pid", "log"):
        table.add_column(column, overflow="fold")
    for row in rows:
        colour = "green" if row.healthy else "red"
        table.add_row(
            row.service,
            f"[{colour}]{row.health}[/]",
            row.address,
            str(row.pid or "-"),
            _short(row.log),
        )
    return table


def _short(path: Path | None) -> str:
    """A log path relative to the working directory when it is below it."""
    if path is None:
        return "-"
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@app.command()
def up(
    ctx: typer.Context,
    with_services: List[str] = typer.Option(
        [],
        "--with",
        help="Also start an optional service: label-studio (and its webhook receiver), "
        "mlflow-ui (the MLflow UI, see 'cdl ui').",
    ),
) -> None:
    """Start the stack: initialise the embedded Postgres on first use (or check the external DSN),
    create the platform databases, apply migrations and start the event dispatcher.
    Safe to run again: what already runs is left as it is."""
    stack = cli_context(ctx).stack
    with console.status("bringing the stack up"):
        done = stack.up(with_services)
    for line in done:
        console.print(f"• {line}")
    console.print(status_table(stack.status()))


@app.command()
def down(
    ctx: typer.Context,
    purge: bool = typer.Option(
        False,
        "--purge",
        help="Also delete the embedded Postgres cluster, every database in it, wherever it lives "
        "(as root: under /var/lib/cdl). 'make clean' uses it.",
    ),
) -> None:
    """Stop the platform services and the embedded Postgres (an external server is left running).
    The data is kept, unless --purge."""
    stack = cli_context(ctx).stack
    stopped = stack.down()
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
    if purge:
        console.print(stack.purge() or "no embedded Postgres cluster to remove")


@app.command()
def status(ctx: typer.Context) -> None:
    """Show each service: health, address, pid and log file. Exits 1 if any is not healthy."""
    rows = cli_context(ctx).stack.status()
    console.print(status_table(rows))
    if not all(r.healthy for r in rows):
        raise typer.Exit(1)
