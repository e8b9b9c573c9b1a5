"""The data pipeline's supervised services, started by `cdl stack up` (see pipelines/plugins.py):
the local engine's pipeline worker, and with `--with label-studio` the Label Studio server and
its webhook receiver; and what `cdl stack status` shows of their work: the running jobs."""

from __future__ import annotations

from pipelines.core.services import Service
from pipelines.core.stack import ComponentStatus, Stack

WORKER = "pipelines"
LABEL_STUDIO = "label-studio"


def services(stack: Stack) -> list[Service]:
    from pipelines.data.labeling.server import SERVICE, LabelStudioServer
    from pipelines.data.labeling.webhooks import WEBHOOK_SERVICE, webhook_spec

    offered = [
        Service(SERVICE, lambda: LabelStudioServer(stack).spec(), group=LABEL_STUDIO),
        Service(WEBHOOK_SERVICE, lambda: webhook_spec(stack), group=LABEL_STUDIO),
    ]
    if stack.settings.stack.data.engine == "local":  # pachd runs its own jobs
        offered.insert(0, Service(WORKER, lambda: stack.cli_service(WORKER, "data", "worker")))
    return offered


def status(stack: Stack) -> list[ComponentStatus]:
    """A row per running job of the local engine: healthy while it makes progress, `stalled`
    when no datum finished for longer than its datum timeout, `orphaned` when its runner is gone
    (the next worker resumes it)."""
    if stack.settings.stack.data.engine != "local":
        return []
    import psycopg

    from pipelines.data.engine import PipelineEngine

    try:
        running = PipelineEngine(stack).running_jobs()
    except psycopg.errors.UndefinedColumn:  # a schema older than this code
        return [ComponentStatus("jobs", "unknown (run 'cdl stack up')", "-", None, None)]
    rows = []
    for job in running:
        done = job["datums_processed"] + job["datums_skipped"] + job["datums_failed"]
        health = "healthy" if job["health"] == "running" else job["health"]
        if job["health"] == "stalled":
            health += f" (no datum finished for {job['idle_s']:.0f} s)"
        rows.append(
            ComponentStatus(
                f"job {job['id'][:12]}",
                health,
                f"{job['pipeline']}: {done}/{job['datums_total']} datums",
                job["runner_pid"],
                None,
            )
        )
    return rows
