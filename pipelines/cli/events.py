"""`cdl events`: read, emit, wait for and deliver platform events."""

from __future__ import annotations

import json
from typing import List, Optional

import typer

from pipelines.cli.context import cli_context, console, stop_on_signal
from pipelines.core import events
from pipelines.core.errors import Invalid, NotFound

app = typer.Typer(
    rich_markup_mode=None,
    help="The event log: what the pipelines did, and who is told about it.",
    no_args_is_help=True,
)

TYPE_HELP = "Only events whose type matches this glob (repeatable), e.g. 'model.*'."


@app.command()
def tail(
    ctx: typer.Context,
    lines: int = typer.Option(20, "--lines", "-n", min=0, help="How many past events to show."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new events."),
    types: Optional[List[str]] = typer.Option(None, "--type", "-t", help=TYPE_HELP),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """Print the latest events, and with --follow every new one as it happens."""
    log = events.EventLog(cli_context(ctx).stack)

    def show(event: events.Event) -> None:
        if as_json:
            print(json.dumps(event.to_dict()), flush=True)
        else:
            console.print(event.line(), highlight=False, soft_wrap=True)

    start = log.last_id()
    past = log.recent(lines, types) if lines else []
    for event in past:
        show(event)
    if follow:
        for event in log.follow(max([start, *(e.id for e in past)]), types):
            show(event)


@app.command()
def emit(
    ctx: typer.Context,
    event_type: str = typer.Argument(..., metavar="TYPE", help="e.g. model.training.finished"),
    subject: Optional[str] = typer.Option(None, help="What it is about, e.g. a lineage id."),
    payload: str = typer.Option("{}", help="A JSON object with the details."),
) -> None:
    """Append an event to the log (from CI jobs or scripts)."""
    try:
        data = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise Invalid(
            f"--payload is not valid JSON: {exc}", 'pass a JSON object, e.g. \'{"run": "abc"}\''
        ) from exc
    if not isinstance(data, dict):
        raise Invalid("--payload must be a JSON object", "wrap the value in {...}")
    event = events.EventLog(cli_context(ctx).stack).emit(event_type, subject, data)
    console.print(event.line(), highlight=False, soft_wrap=True)


@app.command()
def wait(
    ctx: typer.Context,
    types: List[str] = typer.Argument(..., metavar="TYPE...", help="Glob(s) of event types."),
    subject: Optional[str] = typer.Option(None, help="Only events about this subject."),
    timeout: float = typer.Option(600, min=0, help="Seconds to wait; exit 1 when they pass."),
    after: Optional[int] = typer.Option(
        None, help="Count events after this id (default: only events from now on)."
    ),
) -> None:
    """Block until a matching event happens, print it as JSON and exit 0 (for CI jobs that wait
    on a pipeline, e.g. `cdl events wait model.evaluation.passed`)."""
    log = events.EventLog(cli_context(ctx).stack)
    if after is None:
        after = log.last_id()
    for event in log.follow(after, types, timeout_s=timeout):
        if subject is None or event.subject == subject:
            print(json.dumps(event.to_dict()), flush=True)
            return
    raise NotFound(
        f"no event matching {', '.join(types)} within {timeout:g} s",
        "raise --timeout or check that the pipeline ran (cdl events tail)",
    )


@app.command()
def dispatch(
    ctx: typer.Context,
    once: bool = typer.Option(False, "--once", help="Deliver what is pending, then exit."),
) -> None:
    """Deliver events to the subscribers in cdl.yaml (console, webhook, command). `cdl stack up`
    runs this in the background as the 'events' service; run it here to watch deliveries."""
    dispatcher = events.EventLog(cli_context(ctx).stack).dispatcher()
    if once:
        handled = dispatcher.run_once()
        console.print(f"handled {handled} event deliveries")
        return
    dispatcher.stop_event = stop_on_signal()
    dispatcher.serve()
