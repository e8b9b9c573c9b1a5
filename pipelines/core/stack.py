"""The running stack: Postgres (embedded or external), the platform schema and the supervised
services. `cdl stack up|down|status` and every command that needs the database go through here.
"""

from __future__ import annotations

import fcntl
import importlib
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import psycopg

from pipelines.core import events, migrations
from pipelines.core.config import Settings
from pipelines.core.errors import Invalid, StackError
from pipelines.core.postgres import server_for
from pipelines.core.services import Service, ServiceSpec, Supervisor
from pipelines.plugins import SERVICE_PROVIDERS, load


@dataclass(frozen=True)
class ComponentStatus:
    service: str
    health: str  # healthy | unhealthy | stopped | ...
    address: str
    pid: int | None
    log: Path | None

    @property
    def healthy(self) -> bool:
        return self.health == "healthy"


class Stack:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.postgres = server_for(settings)
        self.supervisor = Supervisor(settings.home)

    def dsn(self, database: str | None = None) -> str:
        """Connection URL of one of the platform's databases (default: platform metadata)."""
        return self.postgres.dsn(database or self.settings.stack.postgres.databases.platform)

    def connect(self, autocommit: bool = False) -> psycopg.Connection:
        try:
            return psycopg.connect(self.dsn(), autocommit=autocommit, connect_timeout=5)
        except psycopg.OperationalError as exc:
            raise StackError(
                f"cannot reach the platform database at {self.postgres.address}",
                "run 'cdl stack up'",
            ) from exc

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """One `stack up` or `stack down` at a time per stack home."""
        self.settings.home.mkdir(parents=True, exist_ok=True)
        with open(self.settings.home / "stack.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def cli_service(self, name: str, *command: str) -> ServiceSpec:
        """A background `cdl` command of this stack, run by the platform venv's Python."""
        argv = [sys.executable, "-m", "pipelines.cli.main", "--stack", self.settings.stack_name]
        if self.settings.config_path:
            argv += ["--config", str(self.settings.config_path)]
        return ServiceSpec(
            name=name, argv=[*argv, *command], cwd=self.settings.root, start_timeout_s=30
        )

    def services(self) -> list[Service]:
        """Every service the packages offer for this stack (pipelines/plugins.py names them)."""
        return [s for provider in SERVICE_PROVIDERS for s in load(f"{provider}:services")(self)]

    def optional_groups(self) -> list[str]:
        """What `up --with` can start, e.g. label-studio."""
        return sorted({s.group for s in self.services() if s.group})

    def up(self, groups: Iterable[str] = ()) -> list[str]:
        """Bring the stack up (idempotent); return what was done, for the user. The services of
        the optional `groups` (e.g. label-studio) start too, once Postgres is up."""
        groups = set(groups)
        unknown = sorted(groups - set(self.optional_groups()))
        if unknown:
            raise Invalid(
                f"no optional service {', '.join(unknown)}",
                f"choose from {', '.join(self.optional_groups())}",
            )
        done = []
        with self._lock():
            initialised = self.postgres.init()
            if initialised:
                done.append(initialised)
            created = self.postgres.up()
            if created:
                done.append(f"created databases: {', '.join(created)}")
            applied = migrations.apply(self.dsn())
            if applied:
                done.append(
                    "applied migrations: " + ", ".join(f"{m.version:04d}_{m.name}" for m in applied)
                )
            # Registered here, not by the dispatcher as it starts, so that every event emitted
            # once `up` returns reaches the subscribers.
            with self.connect(autocommit=True) as conn:
                events.register(conn, self.settings.stack.events.subscribers)
            for service in self.services():
                if service.group is None:
                    self.supervisor.start(service.make())
                elif service.group in groups and not self.supervisor.status(service.name).healthy:
                    spec = service.make()
                    self.supervisor.start(spec)
                    done.append(f"started {spec.name} at {spec.address}")
        return done

    def down(self) -> list[str]:
        stopped = []
        with self._lock():
            for name in self.supervisor.names():
                if self.supervisor.stop(name):
                    stopped.append(name)
            if self.postgres.down():
                stopped.append("postgres")
        return stopped

    def purge(self) -> str | None:
        """Stop the stack and delete the embedded Postgres cluster (every database), wherever it
        lives; say what was removed. An external server is never touched."""
        self.down()
        with self._lock():
            return self.postgres.remove()

    def status(self) -> list[ComponentStatus]:
        pg = self.postgres.status()
        rows = [
            ComponentStatus(
                self.postgres.label,
                "healthy" if pg.healthy else pg.detail or "unhealthy",
                pg.address,
                pg.pid,
                pg.log,
            )
        ]
        names = [s.name for s in self.services() if s.group is None]
        names += [n for n in self.supervisor.names() if n not in names]
        for name in names:
            svc = self.supervisor.status(name)
            health = {"running": "healthy"}.get(svc.state, svc.state)
            rows.append(ComponentStatus(name, health, svc.address or "-", svc.pid, svc.log))
        if pg.healthy:  # what the services are doing, from the packages that report it
            for provider in SERVICE_PROVIDERS:
                report = getattr(importlib.import_module(provider), "status", None)
                if report is not None:
                    rows += report(self)
        return rows
