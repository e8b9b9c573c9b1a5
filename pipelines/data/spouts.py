"""Spout pipelines on the local engine: the transform runs as a long-lived process (restarted if
it exits) with `/pfs/out` rewritten to a private folder; about every second the files there that
are new or changed, and have stayed the same for one scan (so a file still being written waits),
are committed to the output repo (a file that keeps changing, after 10 s anyway). Earlier files
stay in the repo, as `put file` from a spout on Pachyderm would leave them. Deleting or updating
the pipeline stops the process; a session advisory lock per spout keeps other workers off it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import psycopg
from psycopg.rows import dict_row

from pipelines.core import db
from pipelines.data import processes
from pipelines.data.spec import PipelineSpec, parse_spec
from pipelines.data.transform import local_command

if TYPE_CHECKING:
    from pipelines.data.engine import PipelineEngine

SPOUT_RESTART_S = 10.0  # the least time between two starts of a spout that exits
SPOUT_MAX_WAIT_S = 10.0  # a spout's file that keeps changing is committed after this anyway


@dataclass
class SpoutRun:
    name: str
    version: int
    branch: str
    root: Path  # its /pfs, and the process's log
    proc: subprocess.Popen | None = None  # None: the command could not be started
    started: float = 0.0
    seen: dict[str, tuple[int, int]] = field(default_factory=dict)  # path: (size, mtime)
    committed: dict[str, tuple[int, int]] = field(default_factory=dict)
    pending: dict[str, float] = field(default_factory=dict)  # path: when it first differed

    @property
    def exited(self) -> bool:
        return self.proc is None or self.proc.poll() is not None


class Spouts:
    """The spout pipelines one worker runs: a process each, whose /pfs/out is committed as it
    changes. A session advisory lock per spout, held on `self.conn`, keeps other workers off."""

    def __init__(self, engine: PipelineEngine, say: Callable[[str], None]):
        self.engine, self.say = engine, say
        self.running: dict[str, SpoutRun] = {}
        self.conn: psycopg.Connection | None = None

    def sync(self) -> None:
        """Start, commit, restart and stop spouts to match the pipelines table."""
        if self.conn is None or self.conn.closed or self.conn.broken:
            self.stop_all()  # their locks went with the connection
            self.conn = self.engine.stack.connect(autocommit=True)
        with self.conn.cursor(row_factory=dict_row) as cur:
            rows = {
                r["name"]: r
                for r in cur.execute(
                    "SELECT name, version, spec, workdir FROM pipelines WHERE spec ? 'spout'"
                )
            }
        for name, run in list(self.running.items()):
            if name not in rows or rows[name]["version"] != run.version:
                self._stop(run, commit=name in rows)
        for name, row in rows.items():
            run = self.running.get(name)
            if run is None:
                if db.try_lock(self.conn, f"cdl.spout:{name}"):
                    self._start(row)
                continue
            self._commit(run, final=run.exited)
            if run.exited and time.monotonic() - run.started > SPOUT_RESTART_S:
                log = (run.root / "spout.log").read_text(errors="replace").strip()
                code = run.proc.returncode if run.proc else "none"
                self.say(
                    f"{name}: spout exited (code {code}); restarting"
                    + (f"; its last output: {log.splitlines()[-1]}" if log else "")
                )
                self._launch(run, parse_spec(row["spec"], f"pipeline {name}"), row["workdir"])

    def _start(self, row: dict) -> None:
        spec = parse_spec(row["spec"], f"pipeline {row['name']}")
        root = processes.scratch_folder(f"spout-{spec.name}-")
        (root / "pfs" / "out").mkdir(parents=True)
        run = SpoutRun(spec.name, row["version"], spec.output_branch, root)
        self.running[spec.name] = run
        self._launch(run, spec, row["workdir"])
        self.say(f"{spec.name}: spout started")

    def _launch(self, run: SpoutRun, spec: PipelineSpec, workdir: str) -> None:
        command = local_command(spec.transform, run.root / "pfs", Path(workdir))
        with open(run.root / "spout.log", "ab") as log:
            try:
                run.proc = processes.start(  # stopped as a group, with its children
                    command.argv,
                    command.env,
                    stdin=subprocess.PIPE if command.stdin else subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=command.cwd,
                    text=True,
                )
            except OSError as exc:
                log.write(f"cannot run {command.argv[0]!r}: {exc.strerror}\n".encode())
                run.proc = None
        run.started = time.monotonic()
        if command.stdin and run.proc is not None:
            try:
                run.proc.stdin.write(command.stdin)
                run.proc.stdin.close()
            except OSError:
                pass  # it exited before reading: seen as exited at the next pass

    def _commit(self, run: SpoutRun, final: bool = False) -> None:
        """Commit the files of /pfs/out that are new or changed and that stayed the same since
        the last scan, or have been changing for SPOUT_MAX_WAIT_S (all of them once the process
        has exited)."""
        out = run.root / "pfs" / "out"
        current = {}
        for folder, _, names in os.walk(out):
            for file_name in names:
                path = Path(folder) / file_name
                if path.is_file() and not path.is_symlink():
                    info = path.stat()
                    current["/" + path.relative_to(out).as_posix()] = (
                        info.st_size,
                        info.st_mtime_ns,
                    )
        now, ready = time.monotonic(), {}
        for path, mark in current.items():
            if run.committed.get(path) == mark:
                continue
            since = run.pending.setdefault(path, now)
            if final or run.seen.get(path) == mark or now - since >= SPOUT_MAX_WAIT_S:
                ready[path] = mark
        run.seen = current
        if not ready:
            return
        with self.engine.repos.writer(
            run.name, run.branch, message="spout", author=f"pipeline:{run.name}", origin="pipeline"
        ) as writer:
            for path in sorted(ready):
                writer.add_file(path, out / path[1:])
        run.committed.update(ready)
        for path in ready:
            del run.pending[path]

    def _stop(self, run: SpoutRun, commit: bool) -> None:
        if not run.exited:
            try:
                os.killpg(run.proc.pid, signal.SIGTERM)
                run.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(run.proc.pid, signal.SIGKILL)
                run.proc.wait()
            except ProcessLookupError:
                pass
        try:
            if commit:
                self._commit(run, final=True)
        finally:
            shutil.rmtree(run.root, ignore_errors=True)
            del self.running[run.name]
            if self.conn is not None:
                db.unlock(self.conn, f"cdl.spout:{run.name}")
            self.say(f"{run.name}: spout stopped")

    def stop_all(self) -> None:
        """Stop every spout, committing what each wrote last (the worker is stopping)."""
        for run in list(self.running.values()):
            try:
                self._stop(run, commit=True)
            except Exception as exc:  # the other spouts are stopped all the same
                self.say(f"{run.name}: stopping the spout: {exc}")
        if self.conn is not None:
            self.conn.close()
            self.conn = None
