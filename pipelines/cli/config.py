"""`cdl config`: what configuration a command runs with."""

from __future__ import annotations

import json

import typer
import yaml

from pipelines.cli.context import cli_context, console
from pipelines.core.postgres import mask_password

app = typer.Typer(
    rich_markup_mode=None,
    help="Inspect the configuration (cdl.yaml and CDL_* overrides).",
    no_args_is_help=True,
)


@app.command()
def show(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of YAML."),
) -> None:
    """Print the selected stack's effective configuration: the file's values with CDL_*
    environment overrides applied and paths resolved. Passwords in DSNs are masked."""
    settings = cli_context(ctx).settings
    stack = settings.stack.model_dump(mode="json")
    for section, field in (("postgres", "dsn"), ("tracking", "uri")):
        if stack[section][field]:
            stack[section][field] = mask_password(stack[section][field])
    document = {
        "config_file": str(settings.config_path) if settings.config_path else None,
        "stack": settings.stack_name,
        "overridden_by": list(settings.overrides),
        "settings": stack,
    }
    if as_json:
        print(json.dumps(document, indent=2))
    else:
        console.print(yaml.safe_dump(document, sort_keys=False), highlight=False, end="")
