"""`cdl demo`: the platform end to end on the local stack."""

from __future__ import annotations

import typer

from pipelines.cli.context import cli_context, console
from pipelines.cli.stack import status_table


def demo(ctx: typer.Context) -> None:
    """Run the demo on the selected stack: bring the stack up and show its status."""
    stack = cli_context(ctx).stack
    console.rule("CDL demo: the stack")
    with console.status("bringing the stack up"):
        done = stack.up()
    for line in done:
        console.print(f"• {line}")
    console.print(status_table(stack.status()))
    console.print(
        "Next: [bold]cdl events tail -f[/] to watch events, [bold]cdl stack down[/] to stop."
    )
