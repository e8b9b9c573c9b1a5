"""The local engine's transform processes: who runs them, how a job stops them, and what a
runner that was killed outright leaves behind.

A runner is the process running jobs (the stack's worker, or a command with `--wait`). Each
transform it starts runs in a process group of its own, so that a timeout or a stop kills
whatever the transform started too, inside the runner's session, so that stopping the worker's
service (which signals its whole session) stops them with it. Every transform carries its
runner's token in `$CDL_RUNNER` and works in a scratch folder under its runner's folder in the
system temp dir. A runner killed with SIGKILL leaves both behind: `sweep()`, run when a worker
starts and before a dead runner's job is resumed, kills those processes and removes those
folders.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import psutil

from pipelines.data.transform import LocalCommand

RUNNER_ENV = "CDL_RUNNER"
SCRATCH_PREFIX = "cdl-runner-"
KILL_WAIT_S = 5.0  # how long the output of a killed process is read before giving up


@dataclass(frozen=True)
class Runner:
    host: str
    pid: int
    started: int  # the process's start time (s): a recycled pid is not the runner

    @classmethod
    def parse(cls, token: str) -> Runner | None:
        try:
            host, pid, started = token.rsplit("/", 2)
            return cls(host, int(pid), int(started))
        except (AttributeError, ValueError):
            return None

    @property
    def token(self) -> str:
        return f"{self.host}/{self.pid}/{self.started}"

    def alive(self) -> bool | None:
        """Whether the runner still runs; None when it ran on another machine."""
        if self.host != socket.gethostname():
            return None
        try:
            proc = psutil.Process(self.pid)
            return int(proc.create_time()) == self.started and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    @property
    def scratch(self) -> Path:
        return Path(tempfile.gettempdir()) / f"{SCRATCH_PREFIX}{self.pid}-{self.started}"


@cache
def _runner(pid: int) -> Runner:
    runner = Runner(socket.gethostname(), pid, int(psutil.Process(pid).create_time()))
    atexit.register(_remove_scratch_if_empty, runner.scratch)
    return runner


def current_runner() -> Runner:
    return _runner(os.getpid())  # by pid: a forked child is a runner of its own


def _remove_scratch_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def scratch_folder(prefix: str) -> Path:
    """A new private folder for one datum (or one batching worker, or one spout)."""
    base = current_runner().scratch
    base.mkdir(mode=0o700, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def start(argv: list[str], env: dict[str, str], **popen) -> subprocess.Popen:
    """A transform process: its own process group, in this runner's session, marked as ours."""
    return subprocess.Popen(
        argv, env={**env, RUNNER_ENV: current_runner().token}, process_group=0, **popen
    )


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Swept:
    processes: int
    folders: int


def sweep() -> Swept:
    """Kill the transform processes and remove the scratch folders of runners that are gone."""
    killed = 0
    for proc in psutil.process_iter():
        try:
            runner = Runner.parse(proc.environ().get(RUNNER_ENV))
            if runner is not None and runner.alive() is False:
                proc.kill()
                killed += 1
        except psutil.Error:
            continue  # gone meanwhile, or not ours to read
    removed = 0
    for folder in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"):
        try:
            pid, started = folder.name.removeprefix(SCRATCH_PREFIX).split("-")
            runner = Runner(socket.gethostname(), int(pid), int(started))
        except ValueError:
            continue
        if not runner.alive():
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return Swept(killed, removed)


class JobControl:
    """What a running job's datums obey: a stop (by `cdl data job stop`, a pipeline update or
    delete, the job's timeout, or the runner itself stopping) kills every transform process the
    job has, and no new one starts. `state` is what the job becomes: killed, failure, or None
    when it stays running for the next runner to resume (the runner stopped or lost the
    database)."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.state: str | None = None
        self.counts: tuple[int, int] | None = None  # datums processed and failed so far
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()

    @property
    def stopped(self) -> bool:
        return self.reason is not None

    def stop(self, reason: str, state: str | None) -> None:
        with self._lock:
            if self.reason is None:
                self.reason, self.state = reason, state
            procs = list(self._procs)
        for proc in procs:
            kill_group(proc)

    def track(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._procs.add(proc)
            stopped = self.reason is not None
        if stopped:  # stopped while it was starting
            kill_group(proc)

    def untrack(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._procs.discard(proc)


def run_to_end(
    call: LocalCommand, timeout_s: float | None, control: JobControl
) -> tuple[int | None, str, str | None]:
    """Run one transform until it exits: (exit code, its output, None); or until its timeout or
    a stop kills it: (None, its output so far, why)."""
    proc = start(
        call.argv,
        call.env,
        cwd=call.cwd,
        stdin=subprocess.PIPE if call.stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    control.track(proc)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    stdin = call.stdin
    try:
        while True:
            try:
                output, _ = proc.communicate(stdin, timeout=0.2)
                return proc.returncode, output or "", None
            except subprocess.TimeoutExpired:
                stdin = None  # sent on the first call
            why = control.reason
            if why is None and deadline is not None and time.monotonic() > deadline:
                why = "timed out"
            if why is not None:
                kill_group(proc)
                try:
                    output, _ = proc.communicate(timeout=KILL_WAIT_S)
                except subprocess.TimeoutExpired:  # a process outside its group holds the pipe
                    proc.kill()
                    output = ""
                return None, output or "", why
    finally:
        control.untrack(proc)
