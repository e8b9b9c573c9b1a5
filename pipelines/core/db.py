"""The one way the platform's store modules take advisory locks, match path prefixes and map rows.

Advisory locks are named ("cdl.data.branch:raw@master") and hashed by the server (`hashtext`), so
every module names its locks in its own namespace. Session locks are released by the server when
the connection ends, so a process that dies never leaves one behind.

Long-running services (the events dispatcher, the pipeline worker) keep their connection with
`keep_connected`: when Postgres restarts under them they say so in one line, wait (1 s doubling to
30 s) and go on, instead of dying or filling their log with tracebacks.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import psycopg
from psycopg.rows import class_row

from pipelines.core.errors import Unavailable

T = TypeVar("T")

# What psycopg raises when the server goes away under a connection, or refuses a new one.
CONNECTION_LOST = (psycopg.OperationalError, psycopg.InterfaceError)


RECONNECT_FIRST_S, RECONNECT_MAX_S = 1.0, 30.0


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def keep_connected(
    session: Callable[[Callable[[], None]], None],
    stop: threading.Event,
    say: Callable[[str], None],
    who: str = "",
) -> None:
    """Run `session`, a service's work over one database connection, until it returns or `stop`
    is set.

    When the session loses its connection or cannot get one (Postgres restarting; `Unavailable`
    is what `Stack.connect` raises for a refused one), `say` gets one line and the session runs
    again after a wait of 1 s, doubling up to 30 s. The session calls the function it is given
    once it is connected, so that the next loss waits 1 s again.
    """
    backoff = RECONNECT_FIRST_S

    def connected() -> None:
        nonlocal backoff
        backoff = RECONNECT_FIRST_S

    while not stop.is_set():
        try:
            session(connected)
            return
        except (*CONNECTION_LOST, Unavailable) as exc:
            say(f"{who}database connection lost ({first_line(exc)}); retrying in {backoff:g} s")
            stop.wait(backoff)
            backoff = min(backoff * 2, RECONNECT_MAX_S)


def try_lock(conn: psycopg.Connection, name: str) -> bool:
    """Take the session lock `name` if nobody holds it; release it with `unlock`."""
    return conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", [name]).fetchone()[0]


def unlock(conn: psycopg.Connection, name: str) -> None:
    if not conn.closed and not conn.broken:
        conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", [name])


@contextmanager
def advisory_lock(
    conn: psycopg.Connection,
    name: str,
    wait: bool = True,
    on_wait: Callable[[], None] | None = None,
) -> Iterator[bool]:
    """Hold the session lock `name` inside the block; yields whether it is held. Without `wait`
    it yields False at once when another session holds it; with `wait`, `on_wait` is called
    before waiting for it."""
    held = try_lock(conn, name)
    if not held and wait:
        if on_wait:
            on_wait()
        conn.execute("SELECT pg_advisory_lock(hashtext(%s))", [name])
        held = True
    try:
        yield held
    finally:
        if held:
            unlock(conn, name)


def transaction_lock(conn: psycopg.Connection, name: str) -> None:
    """Take the lock `name` until the current transaction ends (waiting for it)."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [name])


def like_escape(text: str) -> str:
    """`text` with LIKE's wildcards escaped, to match it literally in `LIKE text || '%'`."""
    return text.replace("\\", "\\\\").replace("%", r"\%").replace("_", r"\_")


def fetch_all(conn: psycopg.Connection, cls: type[T], query: str, params: Any = ()) -> list[T]:
    """Rows of `query` as `cls` instances (a dataclass whose fields are the columns)."""
    with conn.cursor(row_factory=class_row(cls)) as cur:
        return cur.execute(query, params).fetchall()


def fetch_one(conn: psycopg.Connection, cls: type[T], query: str, params: Any = ()) -> T | None:
    with conn.cursor(row_factory=class_row(cls)) as cur:
        return cur.execute(query, params).fetchone()
