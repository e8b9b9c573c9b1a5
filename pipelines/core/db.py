"""The one way the platform's store modules take advisory locks, match path prefixes and map rows.

Advisory locks are named ("cdl.data.branch:raw@master") and hashed by the server (`hashtext`), so
every module names its locks in its own namespace. Session locks are released by the server when
the connection ends, so a process that dies never leaves one behind.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import psycopg
from psycopg.rows import class_row

T = TypeVar("T")

# What psycopg raises when the server goes away under a connection, or refuses a new one.
CONNECTION_LOST = (psycopg.OperationalError, psycopg.InterfaceError)


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


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
