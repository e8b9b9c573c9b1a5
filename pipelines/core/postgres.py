"""Postgres for the platform: an embedded cluster CDL runs, or an external server.

The embedded cluster is a plain Postgres data directory, created with initdb and run with pg_ctl,
under `<home>/postgres`. Postgres refuses to run as root, so when CDL runs as root both run as
the `postgres` system user, and the cluster lives in a folder of its own under /var/lib/cdl
instead (that user may not be able to enter the project: a clone under /root, a mode-700 folder),
named in `<home>/postgres/state.json`; `cdl stack down --purge` deletes it wherever it is.

Every connection must give the generated password kept in `<home>/secrets` (outside git):
pg_hba.conf, rewritten before each start, has no trust lines. Clients connect over TCP on
127.0.0.1; the unix socket, for local tools such as psql, is in a folder only the server's user
(and root) can enter.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import psutil
import psycopg
from psycopg import sql

from pipelines.core.config import Databases, Settings
from pipelines.core.errors import StackError
from pipelines.plugins import backend_class

SYSTEM_USER = "postgres"
START_TIMEOUT_S = 60
# A unix socket path must fit in sockaddr_un (108 bytes, NUL included) with "/.s.PGSQL.NNNNN".
MAX_SOCKET_DIR_LEN = 107 - len("/.s.PGSQL.65535")
# Where the clusters of stacks run by root live, one folder each (the postgres user can reach it).
CLUSTERS = Path("/var/lib/cdl")
HBA = """\
# Written by CDL before each start: every connection, over TCP or the unix socket and from any
# OS user, must give the password (scram-sha-256). There are no trust lines.
local  all  all                scram-sha-256
host   all  all  127.0.0.1/32  scram-sha-256
"""


@dataclass(frozen=True)
class ServerStatus:
    healthy: bool
    address: str
    pid: int | None
    log: Path | None
    detail: str = ""


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(log is empty)"


def find_server_binaries() -> Path:
    """The folder holding initdb, pg_ctl and postgres (newest Debian install, else PATH)."""
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if debian:
        return debian[-1].parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    raise StackError(
        "Postgres server binaries (initdb, pg_ctl) were not found",
        "run 'make setup' (installs the postgresql package) or set postgres.dsn to a server",
    )


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Postgres itself binds
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def url_for_database(dsn: str, database: str) -> str:
    """The same server and credentials as `dsn`, another database."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + quote(database), parts.query, ""))


def mask_password(dsn: str) -> str:
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def ensure_databases(admin_dsn: str, names: list[str]) -> list[str]:
    """Create the databases that do not exist yet; return the ones created."""
    created = []
    with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=10) as conn:
        for name in names:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
            if exists:
                continue
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            except psycopg.errors.DuplicateDatabase:
                continue  # created concurrently by another `stack up`
            except psycopg.Error as exc:
                raise StackError(
                    f"cannot create database '{name}': {exc.diag.message_primary or exc}",
                    "create it yourself or grant CREATEDB to the DSN's user",
                ) from exc
            created.append(name)
    return created


class PostgresServer(ABC):
    """The platform's Postgres, as the stack uses it: `up` makes it ready (starting it if CDL
    manages it) and creates the platform databases it lacks, returning their names; `down` stops
    it if CDL manages it; `remove` deletes its data if CDL manages it; `status` never raises;
    `dsn(database)` is the URL of one database.
    `StackError` (an `Unavailable`) when it cannot be started or reached. Backends are registered
    in pipelines/plugins.py under `postgres`."""

    label = "postgres"  # how `cdl stack status` names it

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: Settings) -> "PostgresServer": ...

    @property
    @abstractmethod
    def address(self) -> str: ...

    @abstractmethod
    def dsn(self, database: str) -> str: ...

    def init(self) -> str | None:
        """Prepare the server on first use; say what was done, or None (nothing to do)."""
        return None

    @abstractmethod
    def up(self) -> list[str]: ...

    @abstractmethod
    def down(self) -> bool:
        """Stop the server if CDL runs it; whether it was running."""

    def remove(self) -> str | None:
        """Stop the server and delete its data if CDL manages it; say what was removed, or None
        (nothing to remove, or a server that is not CDL's)."""
        return None

    @abstractmethod
    def status(self) -> ServerStatus: ...


class ExternalPostgres(PostgresServer):
    """A server CDL does not manage: used as-is through the DSN in the stack config."""

    label = "postgres (external)"

    @classmethod
    def from_settings(cls, settings: Settings) -> "ExternalPostgres":
        return cls(settings.stack.postgres.dsn, settings.stack.postgres.databases)

    def __init__(self, dsn: str, databases: Databases):
        if not dsn.startswith(("postgresql://", "postgres://")):
            raise StackError(
                f"postgres.dsn must be a postgresql:// URL, got {mask_password(dsn)!r}",
                "write it as postgresql://USER:PASSWORD@HOST:PORT/DATABASE",
            )
        self.base_dsn = dsn
        self.databases = databases

    @property
    def address(self) -> str:
        parts = urlsplit(self.base_dsn)
        return f"{parts.hostname or 'localhost'}:{parts.port or 5432}"

    def dsn(self, database: str) -> str:
        return url_for_database(self.base_dsn, database)

    def _check(self) -> None:
        try:
            psycopg.connect(self.base_dsn, connect_timeout=5).close()
        except psycopg.OperationalError as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "no answer"
            raise StackError(
                f"cannot reach Postgres at {self.address} ({mask_password(self.base_dsn)}): "
                f"{reason}",
                "check postgres.dsn / CDL_POSTGRES__DSN, or start that server",
            ) from exc

    def up(self) -> list[str]:
        self._check()
        return ensure_databases(self.base_dsn, list(self.databases.model_dump().values()))

    def down(self) -> bool:
        """An external server is not CDL's to stop."""
        return False

    def status(self) -> ServerStatus:
        try:
            self._check()
        except StackError as exc:
            return ServerStatus(False, self.address, None, None, exc.problem)
        return ServerStatus(True, self.address, None, None, "external")


class EmbeddedPostgres(PostgresServer):
    """A Postgres cluster started and stopped by CDL, recorded under `<home>/postgres`."""

    @classmethod
    def from_settings(cls, settings: Settings) -> "EmbeddedPostgres":
        pg = settings.stack.postgres
        return cls(settings.home, pg.port, pg.user, pg.databases)

    def __init__(self, home: Path, port: int, user: str, databases: Databases):
        self.home = home
        self.requested_port = port  # 0: any free port
        self.user = user
        self.databases = databases
        self.root = home / "postgres"  # state.json; also the cluster, unless CDL runs as root
        self.state_file = self.root / "state.json"
        self.password_file = home / "secrets" / "postgres-password"
        self.log = home / "logs" / "postgres.log"
        self.as_root = os.geteuid() == 0

    # -- paths and state ---------------------------------------------------------------

    @property
    def cluster(self) -> Path:
        """The folder Postgres works in: `data/` and `run/` (the socket). As root, a folder of
        its own under CLUSTERS named in state.json; otherwise, or for a cluster an older CDL made
        in the project as root (no record), `<home>/postgres`."""
        recorded = self._state().get("cluster")
        if not recorded:
            return self.root
        path = Path(recorded)
        # `remove` deletes what the record names: it must be one of CDL's cluster folders.
        if path.parent != CLUSTERS or path.name == "..":
            raise StackError(
                f"{self.state_file} names {path} as the Postgres cluster, not a folder of "
                f"{CLUSTERS}",
                f"restore {self.state_file}, or delete it to start over with an empty cluster",
            )
        return path

    @property
    def data(self) -> Path:
        return self.cluster / "data"

    @property
    def socket_dir(self) -> Path:
        local = self.cluster / "run"
        if len(str(local)) <= MAX_SOCKET_DIR_LEN:
            return local
        # Deep homes get a short socket folder of their own under /tmp.
        digest = hashlib.sha256(str(self.cluster).encode()).hexdigest()[:12]
        return Path("/tmp") / f"cdl-pg-{digest}"

    @property
    def initialized(self) -> bool:
        return (self.data / "PG_VERSION").is_file()

    def _state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def _save_state(self, **changes: object) -> None:
        self.state_file.write_text(json.dumps({**self._state(), **changes}))

    @property
    def port(self) -> int | None:
        return self._state().get("port")

    @property
    def password(self) -> str:
        try:
            return self.password_file.read_text().strip()
        except OSError as exc:
            raise StackError(
                f"the embedded Postgres password file {self.password_file} is missing",
                "run 'cdl stack up' (or delete the stack home to start over)",
            ) from exc

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}" if self.port else "-"

    def dsn(self, database: str) -> str:
        if not self.port:
            raise StackError("the embedded Postgres has never been started", "run 'cdl stack up'")
        return (
            f"postgresql://{quote(self.user)}:{quote(self.password)}@127.0.0.1:{self.port}/"
            f"{quote(database)}"
        )

    # -- running as the postgres user --------------------------------------------------

    def _cmd(self, *argv: str | Path) -> list[str]:
        argv = [str(a) for a in argv]
        return ["runuser", "-u", SYSTEM_USER, "--", *argv] if self.as_root else argv

    @property
    def _server_uid(self) -> int:
        return pwd.getpwnam(SYSTEM_USER).pw_uid if self.as_root else os.geteuid()

    def _own(self, *paths: Path) -> None:
        if self.as_root:
            entry = pwd.getpwnam(SYSTEM_USER)
            for path in paths:
                os.chown(path, entry.pw_uid, entry.pw_gid)

    def _run(self, *argv: str | Path, what: str) -> subprocess.CompletedProcess:
        result = subprocess.run(self._cmd(*argv), capture_output=True, text=True)
        if result.returncode != 0:
            output = (result.stderr or result.stdout).strip().splitlines()[-10:]
            raise StackError(
                f"{what} failed (exit {result.returncode}): " + " | ".join(output),
                f"see {self.log}" if self.log.exists() else "check the output above",
            )
        return result

    # -- lifecycle ---------------------------------------------------------------------

    def _make_cluster(self) -> Path:
        """The cluster folder, private to the user Postgres runs as. As root that user may not be
        able to enter the project (a clone under /root, a mode-700 folder), so the cluster gets a
        folder under CLUSTERS, recorded in state.json so that later commands find it."""
        cluster = self.cluster
        if self.as_root and cluster == self.root:
            CLUSTERS.mkdir(mode=0o711, parents=True, exist_ok=True)
            cluster = Path(tempfile.mkdtemp(prefix="pg-", dir=CLUSTERS))
            # So that a folder whose project is gone can be traced back to it.
            (cluster / "project").write_text(f"{self.home.resolve()}\n")
            self._save_state(cluster=str(cluster))
        cluster.mkdir(parents=True, exist_ok=True)  # a recorded folder deleted by hand
        self._own(cluster)
        cluster.chmod(0o700)
        return cluster

    def init(self) -> str | None:
        """initdb once; a crash half-way leaves only a temporary folder, removed on the next try."""
        if self.initialized:
            return None
        bindir = find_server_binaries()
        for folder in (self.root, self.log.parent, self.password_file.parent):
            folder.mkdir(parents=True, exist_ok=True)
        self.password_file.parent.chmod(0o700)
        if not self.password_file.exists():
            fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(24))
        cluster = self._make_cluster()
        staging = cluster / "data.initdb"
        shutil.rmtree(staging, ignore_errors=True)
        if self.data.exists():  # left by an old crash: no PG_VERSION, so nothing usable
            shutil.rmtree(self.data)
        pwfile = cluster / ".initdb-password"
        pwfile.write_text(self.password)
        pwfile.chmod(0o600)
        self._own(pwfile)
        try:
            self._run(
                bindir / "initdb",
                "-D",
                staging,
                "-U",
                self.user,
                "-E",
                "UTF8",
                "--locale=C",
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                what="initdb",
            )
        finally:
            pwfile.unlink(missing_ok=True)
        with open(staging / "postgresql.conf", "a") as conf:
            conf.write("\n# Port, addresses and sockets are written by CDL before each start.\n")
            conf.write("include_if_exists = 'cdl.conf'\n")
        staging.rename(self.data)
        return f"initialised Postgres cluster in {self.data}"

    def running_pid(self) -> int | None:
        """The postmaster's pid if it is really running this cluster, else None."""
        try:
            first = (self.data / "postmaster.pid").read_text().splitlines()[0]
            pid = int(first)
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            if "postgres" not in proc.name() and "postgres" not in " ".join(proc.cmdline()[:1]):
                return None
            return pid
        except (OSError, ValueError, IndexError, psutil.Error):
            return None

    def _clear_stale_lock_files(self) -> None:
        """Remove what a postmaster that died without cleaning up left behind (its pid may still
        exist as a zombie, which Postgres would take for a live owner): postmaster.pid, and the
        socket lock files in this cluster's own socket folder."""
        if self.running_pid() is not None:
            return
        (self.data / "postmaster.pid").unlink(missing_ok=True)
        for leftover in self.socket_dir.glob(".s.PGSQL.*"):
            leftover.unlink(missing_ok=True)

    def _choose_port(self) -> int:
        if self.requested_port:
            if not port_is_free(self.requested_port):
                raise StackError(
                    f"port {self.requested_port} on 127.0.0.1 (postgres.port) is in use by "
                    "another program",
                    "set postgres.port / CDL_POSTGRES__PORT to a free port, or to 0 to pick one",
                )
            return self.requested_port
        remembered = self.port
        if remembered and port_is_free(remembered):
            return remembered  # keep the address stable across restarts when possible
        return free_port()

    def _make_socket_dir(self) -> Path:
        """The socket folder, which only the server's user (and root) may enter: any other OS
        user has TCP and the password, like CDL itself."""
        folder = self.socket_dir
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid not in (os.geteuid(), self._server_uid):
            raise StackError(
                f"the Postgres socket folder {folder} belongs to another user",
                f"remove {folder}, or give the stack a shorter home path",
            )
        self._own(folder)
        folder.chmod(0o700)
        return folder

    def _write_hba(self) -> bool:
        """Write CDL's pg_hba.conf; whether it changed."""
        path = self.data / "pg_hba.conf"
        try:
            if path.read_text() == HBA:
                return False
        except OSError:
            pass
        path.write_text(HBA)
        path.chmod(0o600)
        self._own(path)
        return True

    def _write_runtime_conf(self, port: int) -> None:
        quoted_socket = str(self._make_socket_dir()).replace("'", "''")
        (self.data / "cdl.conf").write_text(
            f"port = {port}\n"
            "listen_addresses = '127.0.0.1'\n"
            f"unix_socket_directories = '\"{quoted_socket}\"'\n"
            "max_connections = 200\n"
        )
        self._own(self.data / "cdl.conf")
        self._write_hba()

    def _reload(self) -> None:
        """Make the running server read its configuration again, and wait until new connections
        see it (a reload is only a signal)."""

        def load_time():
            with psycopg.connect(self.dsn("postgres"), autocommit=True, connect_timeout=5) as c:
                return c.execute("SELECT pg_conf_load_time()").fetchone()[0]

        before = load_time()
        with psycopg.connect(self.dsn("postgres"), autocommit=True, connect_timeout=5) as conn:
            conn.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + START_TIMEOUT_S
        while load_time() == before:
            if time.monotonic() > deadline:
                raise StackError(
                    "Postgres did not reload its configuration", f"restart it; see {self.log}"
                )
            time.sleep(0.05)

    def start(self) -> bool:
        """Start the cluster if it is not running; True if it was started now."""
        if self.running_pid():
            return False
        bindir = find_server_binaries()
        self._clear_stale_lock_files()
        port = self._choose_port()
        self._write_runtime_conf(port)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(10):
            # The server writes to a log CDL opens: the postgres user may not reach the project.
            log_fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                result = subprocess.run(
                    self._cmd(
                        bindir / "pg_ctl", "-D", self.data, "-w", "-t", START_TIMEOUT_S, "start"
                    ),
                    stdin=subprocess.DEVNULL,
                    stdout=log_fd,
                    stderr=subprocess.STDOUT,
                )
            finally:
                os.close(log_fd)
            if result.returncode == 0:
                break
            # After a crash, orphaned backends may still hold the old shared memory for a moment.
            if "pre-existing shared memory block" in log_tail(self.log, 5) and attempt < 9:
                time.sleep(1)
                continue
            raise StackError(
                f"Postgres did not start on 127.0.0.1:{port}; last log lines:\n"
                f"{log_tail(self.log)}",
                f"read {self.log}; if the data folder is damaged, stop and move {self.data} away",
            )
        self._save_state(port=port)
        return True

    def up(self) -> list[str]:
        self.init()
        if not self.start():
            # Already running, perhaps started by an older CDL that trusted local connections.
            self._make_socket_dir()
            if self._write_hba():
                self._reload()
        return ensure_databases(self.dsn("postgres"), list(self.databases.model_dump().values()))

    def down(self) -> bool:
        if not self.running_pid():
            self._clear_stale_lock_files()
            return False
        self._run(
            find_server_binaries() / "pg_ctl",
            "-D",
            self.data,
            "-m",
            "fast",
            "-w",
            "stop",
            what="pg_ctl stop",
        )
        return True

    def remove(self) -> str | None:
        """Stop the cluster, then delete it (every database) and its record."""
        if not self.root.exists():
            return None
        cluster, socket_dir = self.cluster, self.socket_dir
        self.down()
        if socket_dir.parent != cluster:  # the short one under /tmp
            shutil.rmtree(socket_dir, ignore_errors=True)
        if cluster.exists():
            shutil.rmtree(cluster)
        shutil.rmtree(self.root, ignore_errors=True)
        return f"removed the Postgres cluster in {cluster}"

    def status(self) -> ServerStatus:
        pid = self.running_pid()
        if not self.initialized:
            return ServerStatus(False, "-", None, self.log, "not initialised")
        if not pid:
            return ServerStatus(False, self.address, None, self.log, "stopped")
        try:
            psycopg.connect(self.dsn("postgres"), connect_timeout=3).close()
        except psycopg.OperationalError as exc:
            return ServerStatus(False, self.address, pid, self.log, str(exc).strip()[:120])
        return ServerStatus(True, self.address, pid, self.log, "accepting connections")


def server_for(settings: Settings) -> PostgresServer:
    """The embedded cluster, or with `postgres.dsn` the external server (pipelines/plugins.py)."""
    engine = "external" if settings.stack.postgres.dsn else "embedded"
    return backend_class("postgres", engine).from_settings(settings)
