"""The model pipeline's supervised service: the MLflow UI (`cdl ui`, or `cdl stack up --with
mlflow-ui`).

Clients write runs straight into the stack's tracking store (tracking.py); the UI is an `mlflow
server` over that same store, run from the platform venv (it is MLflow's own package, no venv of
its own needed) on 127.0.0.1 and a port chosen at its first start and kept while it stays free.
Its backend store is the stack's tracking URI, given in the environment (it holds the database
password; a command line is visible to other users); new experiments made from the UI keep their
artifacts in the stack's artifact folder, like CDL's own (`--default-artifact-root`), and the
artifacts of runs are read by the server from where the runs put them. One worker process: the
server takes ~2.5 GB and ~10 s to start with MLflow's default of four.

With `tracking.uri` pointing at an MLflow server (a team's), that server is the UI: nothing is
started, and `cdl ui` prints its address.
"""

from __future__ import annotations

import json
import sys

from pipelines.core.postgres import free_port, port_is_free
from pipelines.core.services import Service, ServiceSpec
from pipelines.core.stack import Stack

SERVICE = "mlflow-ui"
GROUP = "mlflow-ui"
START_TIMEOUT_S = 180.0  # ~10 s on an idle laptop; much more on a loaded 2-core machine


def remote_ui(stack: Stack) -> str | None:
    """The configured MLflow server's address, when tracking goes to one."""
    uri = stack.settings.stack.tracking.uri
    return uri if uri and uri.startswith(("http://", "https://")) else None


def services(stack: Stack) -> list[Service]:
    if remote_ui(stack):
        return []
    return [Service(SERVICE, lambda: MlflowUI(stack).spec(), group=GROUP)]


class MlflowUI:
    def __init__(self, stack: Stack):
        self.stack = stack
        self.folder = stack.settings.home / SERVICE
        self.state_file = self.folder / "state.json"

    @property
    def port(self) -> int:
        """Chosen at the first start and kept while it stays free."""
        try:
            port = json.loads(self.state_file.read_text())["port"]
        except (OSError, ValueError, KeyError):
            port = None
        running = self.stack.supervisor.status(SERVICE).healthy
        if port is None or (not running and not port_is_free(port)):
            port = free_port()
            self.folder.mkdir(parents=True, exist_ok=True)
            self.state_file.write_text(json.dumps({"port": port}))
        return port

    def spec(self) -> ServiceSpec:
        from pipelines.model import tracking

        tracking.client(self.stack)  # creates or upgrades MLflow's tables, under CDL's lock
        port = self.port
        self.folder.mkdir(parents=True, exist_ok=True)
        artifacts = self.stack.settings.stack.tracking.artifacts or str(
            self.stack.settings.home / "artifacts"
        )
        argv = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--default-artifact-root",
            artifacts,
        ]
        return ServiceSpec(
            name=SERVICE,
            argv=argv,
            env={"MLFLOW_BACKEND_STORE_URI": tracking.tracking_uri(self.stack)},
            cwd=self.folder,
            health_url=f"http://127.0.0.1:{port}/health",
            address=f"http://127.0.0.1:{port}",
            start_timeout_s=START_TIMEOUT_S,
        )


def ui(stack: Stack) -> str:
    """The MLflow UI's address, started first (with the stack) when it is not running."""
    remote = remote_ui(stack)
    if remote:
        return remote
    status = stack.supervisor.status(SERVICE)
    if not status.healthy:
        stack.up([GROUP])
        status = stack.supervisor.status(SERVICE)
    return status.address or f"http://127.0.0.1:{MlflowUI(stack).port}"
