"""db.keep_connected, the reconnect loop of the long-running services, without a database: the
services' own tests kill the real postmaster under them (test_events, test_pipelines)."""

import threading

import psycopg

from pipelines.core import db
from pipelines.core.errors import StackError


class Clock(threading.Event):
    """A stop event whose waits are recorded instead of slept."""

    def __init__(self):
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout=None):
        self.waits.append(timeout)
        return self.is_set()


def test_lost_connections_back_off_from_1_s_doubling_to_30_s():
    stop, said = Clock(), []
    outcomes = [psycopg.OperationalError("server closed the connection\n\tunexpectedly")] * 6
    refused = StackError("cannot reach the platform database", "run 'cdl stack up'")
    outcomes += ["connected", refused, "done"]

    def session(connected):
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        connected()  # back: the next loss waits 1 s again
        if outcome == "connected":
            raise psycopg.OperationalError("terminating connection")

    db.keep_connected(session, stop, said.append, "listener: ")
    assert stop.waits == [1, 2, 4, 8, 16, 30, 1, 2]
    assert said[0] == (
        "listener: database connection lost (server closed the connection); retrying in 1 s"
    )
    assert "(cannot reach the platform database (fix: run 'cdl stack up')); retrying" in said[-1]
    assert outcomes == []  # it returned when the session did


def test_stop_ends_the_retries():
    stop, said = Clock(), []

    def session(connected):
        stop.set()
        raise psycopg.OperationalError("refused")

    db.keep_connected(session, stop, said.append)
    assert stop.waits == [1] and len(said) == 1
