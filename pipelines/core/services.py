"""A small supervisor for the stack's long-running processes (event dispatcher, Label Studio,
MLflow UI, model servers).

Each service runs detached in its own session (so it outlives the `cdl` command that started it),
usually from its own venv, with stdout and stderr in `<home>/logs/<name>.log`. Its pid, start time
and address are kept in `<home>/run/<name>.json`; the start time guards against a recycled pid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx
import psutil

from pipelines.core.errors import StackError
from pipelines.core.postgres import log_tail


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # added to the current environment
    cwd: Path | None = None
    health_url: str | None = None  # healthy when it answers below 500; None: alive is healthy
    address: str | None = None  # shown in status, e.g. http://127.0.0.1:8080
    start_timeout_s: float = 60.0


@dataclass(frozen=True)
class Service:
    """A supervised service a package offers (its `services(stack)`); `make` builds the spec
    when the service is started."""

    name: str
    make: Callable[[], ServiceSpec]
    group: str | None = None  # None: started by every `stack up`; else by `stack up --with GROUP`


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    state: str  # running | unhealthy | stopped
    pid: int | None
    address: str | None
    log: Path

    @property
    def healthy(self) -> bool:
        return self.state == "running"


class Supervisor:
    def __init__(self, home: Path):
        self.run_dir = home / "run"
        self.log_dir = home / "logs"
        self._children: dict[str, subprocess.Popen] = {}  # reaped by us while we live

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def _state_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.json"

    def _read_state(self, name: str) -> dict | None:
        try:
            return json.loads(self._state_path(name).read_text())
        except (OSError, ValueError):
            return None

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.run_dir.glob("*.json"))

    def pid(self, name: str) -> int | None:
        """The service's pid if that very process is still alive (not a recycled pid)."""
        state = self._read_state(name)
        if not state:
            return None
        child = self._children.get(name)
        if child is not None and child.poll() is not None:
            return None
        try:
            proc = psutil.Process(state["pid"])
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            if abs(proc.create_time() - state["create_time"]) > 1.0:
                return None
        except (psutil.Error, KeyError):
            return None
        return state["pid"]

    @staticmethod
    def _answers(url: str) -> bool:
        try:
            return httpx.get(url, timeout=2.0).status_code < 500
        except httpx.HTTPError:
            return False

    def status(self, name: str) -> ServiceStatus:
        state = self._read_state(name) or {}
        pid = self.pid(name)
        if pid is None:
            state_name = "stopped"
        elif state.get("health_url") and not self._answers(state["health_url"]):
            state_name = "unhealthy"
        else:
            state_name = "running"
        return ServiceStatus(name, state_name, pid, state.get("address"), self.log_path(name))

    def start(self, spec: ServiceSpec) -> ServiceStatus:
        """Start the service unless it already runs; wait until it is healthy."""
        current = self.status(spec.name)
        if current.healthy:
            return current
        if current.pid:  # alive but not answering: replace it
            self.stop(spec.name)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_path(spec.name)
        with open(log_path, "ab") as log:
            log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {spec.name}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(
                    spec.argv,
                    cwd=spec.cwd,
                    env={**os.environ, **spec.env},
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                raise StackError(
                    f"cannot start {spec.name}: {spec.argv[0]}: {exc.strerror}",
                    "run 'make setup' to create its environment",
                ) from exc
        self._children[spec.name] = proc
        state = {
            "pid": proc.pid,
            "create_time": psutil.Process(proc.pid).create_time(),
            "argv": spec.argv,
            "health_url": spec.health_url,
            "address": spec.address,
            "started_at": time.time(),
        }
        tmp = self._state_path(spec.name).with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self._state_path(spec.name))

        deadline = time.monotonic() + spec.start_timeout_s
        while True:
            code = proc.poll()
            if code is not None:
                self._forget(spec.name)
                raise StackError(
                    f"{spec.name} exited with code {code} while starting; last log lines:\n"
                    f"{log_tail(log_path)}",
                    f"read {log_path}",
                )
            if spec.health_url is None or self._answers(spec.health_url):
                return self.status(spec.name)
            if time.monotonic() > deadline:
                self.stop(spec.name)
                raise StackError(
                    f"{spec.name} was not healthy at {spec.health_url} within "
                    f"{spec.start_timeout_s:.0f} s; last log lines:\n{log_tail(log_path)}",
                    f"read {log_path}",
                )
            time.sleep(0.2)

    def stop(self, name: str, timeout_s: float = 15.0) -> bool:
        """Stop the service and everything it started; True if something was running.

        SIGTERM goes to its process group, so that it can stop its work in order; what is left
        of its session after `timeout_s` (it, or processes it started in groups of their own,
        such as the pipeline worker's transforms) is killed."""
        pid = self.pid(name)
        if pid is None:
            self._forget(name)
            return False
        try:
            os.killpg(pid, signal.SIGTERM)  # its own session: the group holds its children too
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self._group_alive(pid):
            child = self._children.get(name)
            if child is not None:
                child.poll()
            time.sleep(0.1)
        for proc in self._session(pid):
            try:
                proc.kill()
            except psutil.Error:
                pass
        child = self._children.get(name)
        if child is not None:
            child.wait(timeout=5)
        self._forget(name)
        return True

    @staticmethod
    def _session(sid: int) -> list[psutil.Process]:
        """The live processes of session `sid` (a service is the leader of its own)."""
        found = []
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        return found

    @staticmethod
    def _group_alive(pgid: int) -> bool:
        for proc in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(proc.info["pid"]) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                    return True
            except (ProcessLookupError, psutil.Error):
                continue
        return False

    def forget(self, name: str) -> None:
        """Drop the record of a service that has ended (or is the calling process, about to)."""
        if self.pid(name) in (None, os.getpid()):
            self._forget(name)

    def _forget(self, name: str) -> None:
        self._children.pop(name, None)
        self._state_path(name).unlink(missing_ok=True)
