"""`cdl ui`: the MLflow UI on the stack's tracking store (experiments, runs, models)."""

from __future__ import annotations

import webbrowser

import typer

from pipelines.cli.context import cli_context, console
from pipelines.model.services import ui as ui_address


def ui(
    ctx: typer.Context,
    open_browser: bool = typer.Option(
        False, "--open", help="Also open it in this machine's web browser."
    ),
) -> None:
    """Print the address of the MLflow UI over the stack's runs and models, starting it first
    when it is not running (the service mlflow-ui, as 'cdl stack up --with mlflow-ui' does;
    'cdl stack down' stops it). With tracking.uri set to an MLflow server, print that."""
    stack = cli_context(ctx).stack
    with console.status("starting the MLflow UI (about 10 s)"):
        address = ui_address(stack)
    console.print(f"MLflow UI: {address}", highlight=False, soft_wrap=True)
    if open_browser:
        webbrowser.open(address)
