"""The data pipeline's supervised services, started by `cdl stack up` (see pipelines/plugins.py):
the local engine's pipeline worker, and with `--with label-studio` the Label Studio server and
its webhook receiver."""

from __future__ import annotations

from pipelines.core.services import Service
from pipelines.core.stack import Stack

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
