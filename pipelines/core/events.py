"""Events: a Postgres-backed log that pipelines append to, and the subscribers that hear it.

`emit` inserts a row; a trigger notifies channel 'cdl_events' when the row commits. The dispatcher
(`cdl events dispatch`, run by `cdl stack up` as the 'events' service) delivers each event to every
configured subscriber whose patterns match its type: the console (the dispatcher's output), a
webhook URL (POST JSON, retried with exponential backoff) or a command (event JSON on stdin).
Delivery is recorded per subscriber and event, so a restarted dispatcher resumes where it stopped
and never delivers an event twice to the same subscriber.
"""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Iterator, TextIO

import httpx
import psycopg
from psycopg.types.json import Jsonb

from pipelines.core import db
from pipelines.core.config import Subscriber
from pipelines.core.errors import Invalid

CHANNEL = "cdl_events"
POLL_S = 5.0  # fallback poll, in case a notification is missed (e.g. across a reconnect)
MAX_BACKOFF_S = 60.0
# Ids are assigned at insert and may commit out of order; readers that follow the log by id look
# this far back for late commits.
REORDER_WINDOW = 100

# The event types the pipelines emit.
COMMIT_FINISHED = "data.commit.finished"
JOB_FINISHED = "data.job.finished"
TRIAL_FINISHED = "model.trial.finished"
TRAINING_FINISHED = "model.training.finished"
MODEL_REGISTERED = "model.registered"
EVALUATION_PASSED = "model.evaluation.passed"
EVALUATION_FAILED = "model.evaluation.failed"
MODEL_PROMOTED = "model.promoted"
MODEL_ROLLED_BACK = "model.rolled_back"  # approving a version older than the champion's
DRIFT_DETECTED = "deploy.drift.detected"


@dataclass(frozen=True)
class Event:
    id: int
    type: str
    subject: str | None
    payload: dict
    created_at: datetime

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "type": self.type,
            "subject": self.subject,
            "payload": self.payload,
            "created_at": self.created_at.isoformat(),
        }

    def line(self) -> str:
        when = self.created_at.astimezone().strftime("%Y-%m-%d %H:%M:%S")
        subject = f" {self.subject}" if self.subject else ""
        payload = f" {json.dumps(self.payload, sort_keys=True)}" if self.payload else ""
        return f"{when} #{self.id} {self.type}{subject}{payload}"


_COLUMNS = "id, type, subject, payload, created_at"


def matches(event_type: str, patterns: list[str] | None) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(event_type, p) for p in patterns)


def emit(
    conn: psycopg.Connection, type: str, subject: str | None = None, payload: dict | None = None
) -> Event:
    """Append an event. It is delivered when `conn`'s transaction commits."""
    try:
        row = conn.execute(
            f"INSERT INTO events (type, subject, payload) VALUES (%s, %s, %s) RETURNING {_COLUMNS}",
            [type, subject, Jsonb(payload or {})],
        ).fetchone()
    except psycopg.errors.CheckViolation as exc:
        raise Invalid(
            f"invalid event type {type!r}",
            "use dotted lower-case words, e.g. model.training.finished",
        ) from exc
    return Event(*row)


def recent(
    conn: psycopg.Connection, limit: int = 20, patterns: list[str] | None = None
) -> list[Event]:
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM events ORDER BY id DESC LIMIT %s",
        [limit if not patterns else limit * 50],
    ).fetchall()
    found = [Event(*r) for r in rows if matches(r[1], patterns)][:limit]
    return list(reversed(found))


def last_id(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]


def follow(
    dsn: str, after_id: int, patterns: list[str] | None = None, timeout_s: float | None = None
) -> Iterator[Event]:
    """Yield events newer than `after_id` as they commit, until `timeout_s` (None: forever)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    seen: set[int] = set()
    high = after_id
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"LISTEN {CHANNEL}")
        while True:
            floor = max(after_id, high - REORDER_WINDOW)
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM events WHERE id > %s ORDER BY id", [floor]
            ).fetchall()
            for row in rows:
                event = Event(*row)
                if event.id in seen:
                    continue
                seen.add(event.id)
                high = max(high, event.id)
                if matches(event.type, patterns):
                    yield event
            seen = {i for i in seen if i > high - REORDER_WINDOW}
            wait = POLL_S
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return
            for _ in conn.notifies(timeout=wait, stop_after=1):
                pass


class EventLog:
    """A stack's event log as commands use it: each call on its own connection."""

    def __init__(self, stack):
        self.stack = stack

    def recent(self, limit: int = 20, patterns: list[str] | None = None) -> list[Event]:
        with self.stack.connect() as conn:
            return recent(conn, limit, patterns)

    def last_id(self) -> int:
        with self.stack.connect() as conn:
            return last_id(conn)

    def emit(self, type: str, subject: str | None, payload: dict) -> Event:
        with self.stack.connect() as conn:
            return emit(conn, type, subject, payload)

    def follow(
        self, after_id: int, patterns: list[str] | None = None, timeout_s: float | None = None
    ) -> Iterator[Event]:
        return follow(self.stack.dsn(), after_id, patterns, timeout_s)

    def dispatcher(self) -> "Dispatcher":
        return Dispatcher(self.stack.dsn(), self.stack.settings.stack.events.subscribers)


def register(conn: psycopg.Connection, subscribers: list[Subscriber]) -> None:
    """New subscribers hear the events after the newest one now, instead of all history."""
    for sub in subscribers:
        conn.execute(
            """INSERT INTO event_subscribers (name, start_after)
               VALUES (%s, (SELECT coalesce(max(id), 0) FROM events))
               ON CONFLICT (name) DO NOTHING""",
            [sub.name],
        )


# -- delivery ----------------------------------------------------------------------------


class DeliveryError(Exception):
    def __init__(self, message: str, retry: bool = True):
        super().__init__(message)
        self.retry = retry


def _expand(value: str) -> str:
    """${VAR} from the environment, so that secrets stay out of cdl.yaml."""
    return os.path.expandvars(value)


def deliver_webhook(sub: Subscriber, event: Event) -> None:
    headers = {k: _expand(v) for k, v in sub.headers.items()}
    headers.setdefault("X-CDL-Event", event.type)
    headers.setdefault("X-CDL-Delivery", f"{sub.name}/{event.id}")
    try:
        response = httpx.post(sub.url, json=event.to_dict(), headers=headers, timeout=sub.timeout_s)
    except httpx.HTTPError as exc:
        raise DeliveryError(f"POST {sub.url}: {type(exc).__name__}: {exc}") from exc
    if response.status_code >= 500 or response.status_code in (408, 429):
        raise DeliveryError(f"POST {sub.url}: HTTP {response.status_code}")
    if response.status_code >= 400:  # the receiver refuses this event: retrying will not help
        raise DeliveryError(
            f"POST {sub.url}: HTTP {response.status_code} {response.text[:200]}", retry=False
        )


def deliver_command(sub: Subscriber, event: Event) -> None:
    env = {
        **os.environ,
        "CDL_EVENT_ID": str(event.id),
        "CDL_EVENT_TYPE": event.type,
        "CDL_EVENT_SUBJECT": event.subject or "",
    }
    try:
        result = subprocess.run(
            sub.command,
            shell=True,
            input=json.dumps(event.to_dict()),
            text=True,
            capture_output=True,
            env=env,
            timeout=sub.timeout_s,
        )
    except subprocess.TimeoutExpired as exc:
        raise DeliveryError(f"command timed out after {sub.timeout_s:g} s: {sub.command}") from exc
    if result.returncode != 0:
        tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise DeliveryError(f"command exited {result.returncode}: {tail}")


class Dispatcher:
    """Delivers events to subscribers; one thread per subscriber so a slow one delays no other."""

    def __init__(
        self,
        dsn: str,
        subscribers: list[Subscriber],
        out: TextIO | None = None,
        sleep: Callable[[float], None] | None = None,
    ):
        self.dsn = dsn
        self.subscribers = subscribers
        self.out = out or sys.stdout
        self.stop_event = threading.Event()
        self._sleep = sleep or (lambda s: self.stop_event.wait(s))
        self._print_lock = threading.Lock()

    def _say(self, text: str) -> None:
        with self._print_lock:
            print(text, file=self.out, flush=True)

    def pending(self, conn: psycopg.Connection, sub: Subscriber, limit: int = 100) -> list[Event]:
        rows = conn.execute(
            f"""SELECT {_COLUMNS} FROM events e
                WHERE e.id > (SELECT start_after FROM event_subscribers WHERE name = %(name)s)
                  AND NOT EXISTS (SELECT 1 FROM event_deliveries d
                                  WHERE d.subscriber = %(name)s AND d.event_id = e.id)
                ORDER BY e.id LIMIT %(limit)s""",
            {"name": sub.name, "limit": limit},
        ).fetchall()
        return [Event(*r) for r in rows]

    def _send(self, sub: Subscriber, event: Event) -> None:
        if sub.kind == "console":
            self._say(event.line())
        elif sub.kind == "webhook":
            deliver_webhook(sub, event)
        else:
            deliver_command(sub, event)

    def deliver(self, sub: Subscriber, event: Event) -> tuple[str, int, str | None]:
        """Try up to 1 + retries times with doubling waits; return (status, attempts, error)."""
        error = None
        for attempt in range(1, sub.retries + 2):
            try:
                self._send(sub, event)
                return "delivered", attempt, None
            except DeliveryError as exc:
                error = str(exc)
                if not exc.retry or attempt > sub.retries or self.stop_event.is_set():
                    break
                self._sleep(min(sub.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S))
        self._say(
            f"delivery of event #{event.id} to {sub.name} failed after {attempt} "
            f"attempt(s): {error}"
        )
        return "failed", attempt, error

    def drain(self, conn: psycopg.Connection, sub: Subscriber) -> int:
        """Deliver everything pending for one subscriber; return how many events were handled."""
        handled = 0
        while not self.stop_event.is_set():
            batch = self.pending(conn, sub)
            if not batch:
                break
            for event in batch:
                if self.stop_event.is_set():
                    break
                if matches(event.type, sub.events):
                    status, attempts, error = self.deliver(sub, event)
                    if self.stop_event.is_set() and status == "failed":
                        return handled  # interrupted: try again after a restart
                else:
                    status, attempts, error = "delivered", 1, "skipped: type does not match"
                conn.execute(
                    """INSERT INTO event_deliveries (subscriber, event_id, status, attempts, error)
                       VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING""",
                    [sub.name, event.id, status, attempts, error],
                )
                handled += 1
        return handled

    def run_once(self) -> int:
        """Deliver everything pending to every subscriber, then return (for CI and tests)."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            register(conn, self.subscribers)
            return sum(self.drain(conn, sub) for sub in self.subscribers)

    def _worker(self, sub: Subscriber, wake: threading.Event) -> None:
        def session(connected: Callable[[], None]) -> None:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                connected()
                while not self.stop_event.is_set():
                    self.drain(conn, sub)
                    wake.wait(POLL_S)
                    wake.clear()

        db.keep_connected(session, self.stop_event, self._say, f"{sub.name}: ")

    def serve(self) -> None:
        """Deliver until `stop_event` is set. A lost database connection (Postgres restarting)
        is retried by each thread with backoff (db.keep_connected), and delivery goes on."""

        def register_all(connected: Callable[[], None]) -> None:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                register(conn, self.subscribers)

        # Postgres may be down as the dispatcher starts (the supervisor starts it again, or
        # Postgres is restarting): it waits for it as it would for a lost connection.
        db.keep_connected(register_all, self.stop_event, self._say)
        wakes = [threading.Event() for _ in self.subscribers]
        workers = [
            threading.Thread(target=self._worker, args=(s, w), name=f"events-{s.name}", daemon=True)
            for s, w in zip(self.subscribers, wakes, strict=True)
        ]
        for worker in workers:
            worker.start()
        self._say(
            f"dispatching events to {', '.join(s.name for s in self.subscribers) or 'nobody'}"
        )

        def listen(connected: Callable[[], None]) -> None:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                conn.execute(f"LISTEN {CHANNEL}")
                connected()
                for wake in wakes:  # what committed while nobody listened
                    wake.set()
                while not self.stop_event.is_set():
                    for _ in conn.notifies(timeout=1.0, stop_after=1):
                        for wake in wakes:
                            wake.set()

        db.keep_connected(listen, self.stop_event, self._say, "listener: ")
        for wake in wakes:  # stopping: the workers need not finish their wait
            wake.set()
        for worker in workers:
            worker.join(timeout=10)


def services(stack) -> list:
    """The event dispatcher, started by every `cdl stack up`."""
    from pipelines.core.services import Service

    return [Service("events", lambda: stack.cli_service("events", "events", "dispatch"))]
