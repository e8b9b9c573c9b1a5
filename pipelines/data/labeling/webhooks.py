"""The webhook receiver: Label Studio's annotation webhooks trigger incremental exports.

A burst of events becomes one export per use case (debounced), scoped to the tasks the events
name; a failed export (Label Studio or Postgres restarting) is retried after 1, 2, 4, ... up to
30 s, as the stack's other services retry a lost database connection, while the receiver keeps
receiving. `cdl stack up --with label-studio` runs it as the service 'label-webhooks'.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Callable

from pipelines.core import db
from pipelines.core.postgres import free_port
from pipelines.core.services import ServiceSpec
from pipelines.core.stack import Stack

if TYPE_CHECKING:
    from pipelines.data.labeling.service import ExportResult

WEBHOOK_SERVICE = "label-webhooks"
# ANNOTATIONS_CREATED: annotations made in bulk (a Data Manager action, `cdl label auto`).
WEBHOOK_ACTIONS = [
    "ANNOTATION_CREATED",
    "ANNOTATIONS_CREATED",
    "ANNOTATION_UPDATED",
    "ANNOTATIONS_DELETED",
]
DEBOUNCE_S = 1.0  # a burst of annotations becomes one export
RETRY_S, RETRY_MAX_S = 1.0, 30.0  # a failed export is retried after 1, 2, 4, ... 30 s

# What a burst of events asks to export: ("task", id) and ("annotation", id) keys, or None for
# the whole project (an event that names neither, or too many to name in one request).
Scope = set[tuple[str, int]] | None
MAX_SCOPE = 1000


def webhook_port(stack: Stack) -> int:
    state = stack.settings.home / "label-studio" / "webhooks.json"
    try:
        return json.loads(state.read_text())["port"]
    except (OSError, ValueError, KeyError):
        port = free_port()
        state.parent.mkdir(parents=True, exist_ok=True)
        state.write_text(json.dumps({"port": port}))
        return port


def webhook_spec(stack: Stack) -> ServiceSpec:
    port = webhook_port(stack)
    spec = stack.cli_service(WEBHOOK_SERVICE, "label", "webhooks", "--port", str(port))
    return replace(
        spec, health_url=f"http://127.0.0.1:{port}/", address=f"http://127.0.0.1:{port}/hook"
    )


def event_scope(payload: dict) -> Scope:
    """The tasks an annotation event concerns, or the annotations it deleted."""
    try:
        action = payload.get("action")
        if action == "ANNOTATIONS_DELETED":
            keys = {("annotation", int(a["id"])) for a in payload.get("annotations") or []}
        elif action == "ANNOTATIONS_CREATED":
            keys = {("task", int(a["task"])) for a in payload["annotation"]}
        else:
            task = (payload.get("task") or {}).get("id") or payload["annotation"]["task"]
            keys = {("task", int(task))}
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return keys or None


def merge_scopes(a: Scope, b: Scope) -> Scope:
    if a is None or b is None or len(a | b) > MAX_SCOPE:
        return None
    return a | b


class WebhookReceiver:
    """Receives webhooks for the projects in `projects` (use case by project title) and calls
    `export(use case, scope)` for what they name, from one thread, one use case at a time."""

    def __init__(
        self,
        projects: dict[str, str],
        export: Callable[[str, Scope], "ExportResult"],
        say: Callable[[str], None],
    ):
        self.projects = projects
        self.export = export
        self.say = say
        self.pending: dict[str, Scope] = {}  # use case -> what to export
        self.retry: dict[str, tuple[float, float]] = {}  # use case -> (when, backoff)
        self.wake = threading.Condition()

    def add(self, name: str, scope: Scope) -> None:
        with self.wake:
            pending = self.pending
            pending[name] = merge_scopes(pending[name], scope) if name in pending else scope
            self.wake.notify()

    def receive(self, payload: dict) -> bool:
        """Queue what an event asks to export; whether it concerns one of our projects."""
        try:
            name = self.projects.get((payload.get("project") or {}).get("title"))
        except AttributeError:
            return False
        if name and payload.get("action") in WEBHOOK_ACTIONS:
            self.add(name, event_scope(payload))
        return bool(name)

    def serve(self, port: int, stop: threading.Event) -> None:
        server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.say(f"receiving Label Studio webhooks on http://127.0.0.1:{port}/hook")
        try:
            while not stop.is_set():
                if not self._wait_for_work(stop):
                    continue
                if stop.wait(DEBOUNCE_S):  # a burst of events becomes one export
                    break
                with self.wake:
                    work = {n: self.pending.pop(n) for n in self._ready()}
                for name, scope in work.items():
                    self._export(name, scope)
        finally:
            server.shutdown()

    def _ready(self) -> list[str]:
        now = time.monotonic()
        return sorted(n for n in self.pending if self.retry.get(n, (0.0, 0.0))[0] <= now)

    def _wait_for_work(self, stop: threading.Event) -> bool:
        with self.wake:
            retries = [self.retry[n][0] for n in self.pending if n in self.retry]
            wait_s = min([1.0] + [when - time.monotonic() for when in retries])
            return self.wake.wait_for(
                lambda: self._ready() or stop.is_set(), timeout=max(0.0, wait_s)
            )

    def _export(self, name: str, scope: Scope) -> None:
        try:
            result = self.export(name, scope)
        except Exception as exc:  # the receiver outlives a failed export and retries it
            backoff = min(2 * self.retry.get(name, (0.0, RETRY_S / 2))[1], RETRY_MAX_S)
            self.retry[name] = (time.monotonic() + backoff, backoff)
            self.add(name, scope)
            self.say(f"{name}: export failed, retrying in {backoff:g} s: {db.first_line(exc)}")
            return
        self.retry.pop(name, None)
        self.say(
            f"{name}: exported {result.tasks} task(s)"
            + (" (incremental)" if scope is not None else "")
            + f", {result.loaded} new label row(s)"
            + (f", {result.deleted} deleted" if result.deleted else "")
            + (f", {len(result.problems)} skipped" if result.problems else "")
        )

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # health
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    payload = json.loads(body or b"{}")
                except ValueError:
                    payload = {}
                ours = isinstance(payload, dict) and receiver.receive(payload)
                self.send_response(200 if ours else 202)
                self.end_headers()

            def log_message(self, *args):
                pass

        return Handler
