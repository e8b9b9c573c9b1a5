"""Events against the real Postgres, delivered to a real webhook receiver on 127.0.0.1."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg
import pytest

from pipelines.core import events
from pipelines.core.config import Subscriber
from pipelines.core.errors import CDLError
from pipelines.core.postgres import free_port
from tests.conftest import cdl


class Receiver:
    """A webhook endpoint that records requests and answers with scripted status codes."""

    def __init__(self, codes=()):
        self.codes = list(codes)
        self.requests: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append({"headers": dict(self.headers), "body": json.loads(body)})
                code = receiver.codes.pop(0) if receiver.codes else 200
                self.send_response(code)
                self.end_headers()
                self.wfile.write(b"no thanks" if code >= 400 else b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def bodies(self):
        return [r["body"] for r in self.requests]

    def wait_for(self, count: int, timeout: float = 15) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            assert time.monotonic() < deadline, f"got {len(self.requests)} of {count} deliveries"
            time.sleep(0.05)
        return self.bodies()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


def webhook(url: str, **extra) -> Subscriber:
    fields = {
        "name": f"hook-{uuid.uuid4().hex[:8]}",
        "kind": "webhook",
        "url": url,
        "retries": 2,
        "backoff_s": 0.5,
    }
    return Subscriber(**{**fields, **extra})


def dispatcher(stack, *subs, sleeps=None):
    record = sleeps.append if sleeps is not None else (lambda s: None)
    return events.Dispatcher(stack.dsn(), list(subs), out=io.StringIO(), sleep=record)


def delivery(conn, sub, event):
    return conn.execute(
        "SELECT status, attempts, error FROM event_deliveries "
        "WHERE subscriber = %s AND event_id = %s",
        [sub.name, event.id],
    ).fetchone()


def test_emit_and_read_back(conn):
    first = events.emit(conn, "model.training.finished", "run:abc", {"accuracy": 0.91})
    second = events.emit(conn, "data.commit.finished", "dataset_commit:x@1")
    assert second.id > first.id
    latest = events.recent(conn, 2)
    assert [e.id for e in latest] == [first.id, second.id]
    assert latest[0].payload == {"accuracy": 0.91}
    assert [e.id for e in events.recent(conn, 5, ["model.*"])][-1] == first.id
    assert "model.training.finished run:abc" in first.line()


@pytest.mark.parametrize("bad", ["Model.Trained", "model..x", "", "model trained", ".x"])
def test_invalid_event_types(conn, bad):
    with pytest.raises(CDLError, match="invalid event type"):
        events.emit(conn, bad)


def test_webhook_delivery_once(shared_stack, conn, receiver):
    sub = webhook(receiver.url, headers={"Authorization": "Bearer ${CDL_TEST_TOKEN}"})
    d = dispatcher(shared_stack, sub)
    d.run_once()  # registers: history before this is not replayed
    os.environ["CDL_TEST_TOKEN"] = "t0ken"
    try:
        event = events.emit(conn, "model.registered", "model_version:bbc/1", {"version": 1})
        assert d.run_once() >= 1
    finally:
        del os.environ["CDL_TEST_TOKEN"]
    [request] = receiver.requests
    assert request["body"]["id"] == event.id
    assert request["body"]["type"] == "model.registered"
    assert request["body"]["payload"] == {"version": 1}
    assert request["headers"]["Authorization"] == "Bearer t0ken"
    assert request["headers"]["X-CDL-Event"] == "model.registered"
    assert request["headers"]["X-CDL-Delivery"] == f"{sub.name}/{event.id}"
    assert delivery(conn, sub, event) == ("delivered", 1, None)
    d.run_once()
    assert len(receiver.requests) == 1  # never twice


def test_webhook_retries_with_exponential_backoff(shared_stack, conn, receiver):
    receiver.codes = [500, 503]
    sub = webhook(receiver.url, retries=3)
    sleeps = []
    d = dispatcher(shared_stack, sub, sleeps=sleeps)
    d.run_once()
    event = events.emit(conn, "model.promoted")
    d.run_once()
    assert len(receiver.requests) == 3
    assert sleeps == [0.5, 1.0]
    assert delivery(conn, sub, event) == ("delivered", 3, None)


def test_webhook_gives_up_and_records_why(shared_stack, conn):
    port = free_port()  # nothing listens here
    sub = webhook(f"http://127.0.0.1:{port}/hook", retries=2)
    sleeps = []
    d = dispatcher(shared_stack, sub, sleeps=sleeps)
    d.run_once()
    event = events.emit(conn, "model.promoted")
    d.run_once()
    status, attempts, error = delivery(conn, sub, event)
    assert (status, attempts) == ("failed", 3)
    assert f"POST http://127.0.0.1:{port}/hook: ConnectError" in error
    assert sleeps == [0.5, 1.0]
    assert "failed after 3 attempt(s)" in d.out.getvalue()


def test_webhook_client_error_is_not_retried(shared_stack, conn, receiver):
    receiver.codes = [422]
    sub = webhook(receiver.url)
    d = dispatcher(shared_stack, sub)
    d.run_once()
    event = events.emit(conn, "model.promoted")
    d.run_once()
    status, attempts, error = delivery(conn, sub, event)
    assert (status, attempts) == ("failed", 1)
    assert "HTTP 422 no thanks" in error


def test_patterns_filter_what_a_subscriber_hears(shared_stack, conn, receiver):
    sub = webhook(receiver.url, events=["model.*", "deploy.drift.detected"])
    d = dispatcher(shared_stack, sub)
    d.run_once()
    events.emit(conn, "data.commit.finished")
    wanted = [events.emit(conn, "model.registered"), events.emit(conn, "deploy.drift.detected")]
    d.run_once()
    assert [b["id"] for b in receiver.bodies()] == [e.id for e in wanted]


def test_command_subscriber_gets_event_on_stdin(shared_stack, conn, tmp_path):
    out = tmp_path / "heard.json"
    sub = Subscriber(
        name=f"cmd-{uuid.uuid4().hex[:8]}",
        kind="command",
        command=f'cat > "{out}"; echo "$CDL_EVENT_TYPE $CDL_EVENT_ID" >> "{out}.env"',
    )
    d = dispatcher(shared_stack, sub)
    d.run_once()
    event = events.emit(conn, "deploy.drift.detected", "deployment:bbc@2", {"psi": 0.4})
    d.run_once()
    heard = json.loads(out.read_text())
    assert heard["id"] == event.id and heard["payload"] == {"psi": 0.4}
    assert (tmp_path / "heard.json.env").read_text().strip() == f"deploy.drift.detected {event.id}"


def test_failing_command_is_retried_then_recorded(shared_stack, conn):
    sub = Subscriber(
        name=f"cmd-{uuid.uuid4().hex[:8]}",
        kind="command",
        retries=1,
        backoff_s=0,
        command="echo 'retrain queue full' >&2; exit 4",
    )
    d = dispatcher(shared_stack, sub)
    d.run_once()
    event = events.emit(conn, "deploy.drift.detected")
    d.run_once()
    status, attempts, error = delivery(conn, sub, event)
    assert (status, attempts) == ("failed", 2)
    assert error == "command exited 4: retrain queue full"


def test_events_committed_out_of_id_order_are_all_delivered(shared_stack, conn, receiver):
    sub = webhook(receiver.url)
    d = dispatcher(shared_stack, sub)
    d.run_once()
    with psycopg.connect(shared_stack.dsn()) as slow:  # takes an id, commits later
        early = events.emit(slow, "model.registered", "slow")
        late = events.emit(conn, "model.registered", "fast")
        d.run_once()
        assert receiver.bodies()[-1]["id"] == late.id
        slow.commit()
    d.run_once()
    assert sorted(b["id"] for b in receiver.bodies()) == sorted([early.id, late.id])


def test_serve_delivers_on_notify_and_survives_a_database_restart(project_factory, receiver):
    stack = project_factory()
    stack.up()
    sub = webhook(receiver.url)
    d = events.Dispatcher(stack.dsn(), [sub], out=io.StringIO())
    thread = threading.Thread(target=d.serve, daemon=True)
    thread.start()
    try:
        time.sleep(0.5)
        started = time.monotonic()
        with stack.connect(autocommit=True) as conn:
            first = events.emit(conn, "model.training.finished")
        assert receiver.wait_for(1, timeout=3)[0]["id"] == first.id
        assert time.monotonic() - started < events.POLL_S  # woken by NOTIFY, not the poll

        stack.postgres.down()
        stack.postgres.start()
        with stack.connect(autocommit=True) as conn:
            second = events.emit(conn, "model.training.finished")
        assert receiver.wait_for(2, timeout=20)[1]["id"] == second.id
    finally:
        d.stop_event.set()
        thread.join(timeout=15)
    assert not thread.is_alive()
    assert "connection lost" in d.out.getvalue()


def test_stack_events_service_delivers_to_configured_webhook(project_factory, receiver):
    config = {
        "stacks": {
            "local": {
                "events": {
                    "subscribers": [
                        {"name": "console", "kind": "console"},
                        {
                            "name": "ci",
                            "kind": "webhook",
                            "url": receiver.url,
                            "events": ["model.*"],
                        },
                    ]
                }
            }
        }
    }
    stack = project_factory(config)
    stack.up()
    folder = stack.settings.root
    result = cdl(
        "events",
        "emit",
        "model.evaluation.passed",
        "--subject",
        "model_version:bbc/2",
        "--payload",
        '{"accuracy": 0.93}',
        cwd=folder,
    )
    assert result.returncode == 0, result.stderr
    [body] = receiver.wait_for(1)
    assert body["type"] == "model.evaluation.passed" and body["payload"] == {"accuracy": 0.93}
    log = stack.supervisor.log_path("events")
    deadline = time.monotonic() + 10
    while "model.evaluation.passed model_version:bbc/2" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)


def test_events_service_outlives_a_postgres_kill(project_factory, receiver):
    """The postmaster SIGKILLed under the stack's events service: the dispatcher says so in one
    line a try, and once `stack up` has Postgres back the same process delivers the next event.
    A dispatcher started while Postgres is down waits for it the same way."""
    hook = {"name": "ci", "kind": "webhook", "url": receiver.url, "retries": 0}
    stack = project_factory({"stacks": {"local": {"events": {"subscribers": [hook]}}}})
    stack.up()
    log = stack.supervisor.log_path("events")

    def emitted_and_delivered() -> None:
        event = events.EventLog(stack).emit("model.registered", None, {})
        assert receiver.wait_for(len(receiver.requests) + 1, timeout=40)[-1]["id"] == event.id

    def wait_for_log(text: str, since: int) -> None:
        deadline = time.monotonic() + 15
        while text not in log.read_text()[since:]:
            assert stack.supervisor.pid("events"), log.read_text()[since:]  # it exited
            assert time.monotonic() < deadline, log.read_text()[since:]
            time.sleep(0.2)

    dispatcher = stack.supervisor.pid("events")
    emitted_and_delivered()  # it is serving
    os.kill(stack.postgres.running_pid(), signal.SIGKILL)
    wait_for_log("retrying in 2 s", 0)  # lost, and a reconnect refused: it goes on trying
    stack.up()
    assert stack.supervisor.pid("events") == dispatcher  # not restarted: it lived through it
    emitted_and_delivered()
    assert stack.supervisor.pid("events") == dispatcher

    stack.postgres.down()  # and the dispatcher (re)started meanwhile, as a supervisor would
    stack.supervisor.stop("events")
    seen = len(log.read_text())
    [service] = [s for s in stack.services() if s.name == "events"]
    dispatcher = stack.supervisor.start(service.make()).pid
    wait_for_log("database connection lost", seen)
    stack.up()
    assert stack.supervisor.pid("events") == dispatcher
    emitted_and_delivered()

    text = log.read_text()
    assert "Traceback" not in text and "error:" not in text
    lost = [line for line in text.splitlines() if "database connection lost" in line]
    assert all(re.search(r"; retrying in \d+ s$", line) for line in lost), lost  # one line each


def test_cli_wait_tail_and_emit(shared_stack):
    folder = shared_stack.settings.root
    waiter = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipelines.cli.main",
            "events",
            "wait",
            "model.promoted",
            "--subject",
            "model_version:w/1",
            "--timeout",
            "30",
        ],
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)
    cdl("events", "emit", "model.promoted", "--subject", "model_version:other/1", cwd=folder)
    emitted = cdl("events", "emit", "model.promoted", "--subject", "model_version:w/1", cwd=folder)
    assert emitted.returncode == 0, emitted.stderr
    out, err = waiter.communicate(timeout=30)
    assert waiter.returncode == 0, err
    assert json.loads(out)["subject"] == "model_version:w/1"

    tail = cdl("events", "tail", "-n", "2", "--json", "--type", "model.promoted", cwd=folder)
    rows = [json.loads(line) for line in tail.stdout.splitlines()]
    assert [r["subject"] for r in rows] == ["model_version:other/1", "model_version:w/1"]

    timeout = cdl("events", "wait", "never.happens", "--timeout", "1", cwd=folder)
    assert timeout.returncode == 1
    assert "no event matching never.happens within 1 s" in timeout.stderr

    bad = cdl("events", "emit", "x.y", "--payload", "[1, 2]", cwd=folder)
    assert bad.returncode == 1 and "--payload must be a JSON object" in bad.stderr
