"""The engine's side of datum batching (`transform.datum_batching: true`; the transform's side is
batching.py): one transform process per worker, fed one datum after another through a unix
socket, each datum mounted at the same `/pfs` folder."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.core.durations import parse_duration
from pipelines.core.errors import Invalid
from pipelines.data import processes
from pipelines.data.batching import SOCKET_ENV
from pipelines.data.datums import Datum
from pipelines.data.spec import PipelineSpec
from pipelines.data.transform import DatumResult, datum_env, exit_error, tail

if TYPE_CHECKING:
    from pipelines.data.engine import PipelineEngine
    from pipelines.data.processes import JobControl

EXIT_GRACE_S = 5.0  # a batching transform told that no datum is left gets this long to exit


class BatchWorker:
    """One transform process of a datum-batching pipeline, and the one `/pfs` folder it sees.

    Each datum is mounted in that folder (emptied first) and handed over as the answer to the
    process's request on the worker's unix socket; its next request reports the datum done, or
    failed with an error. The process exiting also concludes the datum, by its exit code as
    without batching, and datum_timeout kills it. A failed datum is tried again (in a new process
    if the old one is gone), and the remaining datums go on in the live or a restarted process.
    The output goes to one file; a datum's log is what was written while it was in hand.
    """

    def __init__(
        self,
        engine: PipelineEngine,
        spec: PipelineSpec,
        workdir: Path,
        job_id: str,
        control: JobControl,
    ):
        self.engine, self.spec, self.workdir, self.job_id = engine, spec, workdir, job_id
        self.control = control
        self.timeout = parse_duration(spec.datum_timeout) if spec.datum_timeout else None
        self.root = processes.scratch_folder("batch-")
        self.pfs = self.root / "pfs"
        self.pfs.mkdir()
        self.log_path = self.root / "output.log"
        self.log_path.touch()
        self.socket_path = str(self.root / "datum.sock")
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.socket_path)
        self.server.listen(8)
        self.proc: subprocess.Popen | None = None
        self.asked = False  # whether the process asked for its first datum
        self.datum: Datum | None = None  # the datum in hand
        self.offset = 0  # where its log starts in the output file
        self.waiting: socket.socket | None = None  # a request to answer with the next datum

    def run(self, datum: Datum) -> DatumResult:
        started = time.monotonic()
        log, error = "", None
        for attempt in range(1, self.spec.datum_tries + 1):
            if self.control.stopped:
                return DatumResult(datum, "failed", attempt - 1, 0.0, log, self.control.reason)
            log, error, outputs = self._attempt(datum)
            if error is None:
                seconds = time.monotonic() - started
                return DatumResult(datum, "processed", attempt, seconds, log, outputs=outputs)
        seconds = time.monotonic() - started
        return DatumResult(datum, "failed", self.spec.datum_tries, seconds, log, error)

    def _attempt(self, datum: Datum) -> tuple[str, str | None, list | None]:
        """One try of `datum`: (its log, an error or None, its outputs)."""
        self.datum, self.offset = datum, self.log_path.stat().st_size
        try:
            self._clear(datum)
            self.engine._mount(datum, self.pfs)
            if self.proc is None:
                self._start(datum)
            else:
                self._answer({"env": datum_env(datum, self.pfs)})
            error = self._wait()
            outputs = None if error else self.engine._collect(self.pfs / "out")
            return self._log(), error, outputs
        except FileNotFoundError as exc:
            return "", f"cannot run {self.spec.transform.cmd[0]!r}: {exc.strerror}", None
        except Invalid as exc:  # an output /pfs/out cannot hold
            return self._log(), exc.problem, None

    def _start(self, datum: Datum) -> None:
        call = self.engine._invocation(self.spec, self.workdir, self.job_id, self.pfs, datum)
        call.env[SOCKET_ENV] = self.socket_path
        stdin = self.root / "stdin"
        stdin.write_text(call.stdin or "")
        with open(self.log_path, "ab") as log, open(stdin, "rb") as src:
            self.proc = processes.start(
                call.argv, call.env, cwd=call.cwd, stdin=src, stdout=log, stderr=subprocess.STDOUT
            )
        self.control.track(self.proc)
        self.asked = False

    def _wait(self) -> str | None:
        """Until the datum in hand is concluded: None if it succeeded, else the error."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            if self.control.stopped:
                self._kill()
                return self.control.reason
            if left <= 0:
                self._kill()
                return f"timed out after {self.spec.datum_timeout} (datum_timeout)"
            self.server.settimeout(left)
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                code = self.proc.poll()
                if code is None:
                    continue
                self._kill()
                ok = code == 0 or code in self.spec.transform.accept_return_code
                return None if ok else exit_error(code, self._log())
            try:
                conn.settimeout(10)
                error = json.loads(conn.makefile("rb").readline() or b"{}").get("error")
            except (OSError, ValueError, AttributeError) as exc:
                error = f"unreadable request on ${SOCKET_ENV}: {exc}"
            self.waiting = conn
            if self.asked:
                return error or None
            self.asked = True  # its first request: the datum mounted is the answer
            self._answer({"env": datum_env(self.datum, self.pfs)})

    def _answer(self, message: dict) -> None:
        conn, self.waiting = self.waiting, None
        if conn is None:
            return
        try:
            conn.sendall(json.dumps(message).encode() + b"\n")
        except OSError:
            pass  # the process is gone: the next wait sees it exit
        finally:
            conn.close()

    def _log(self) -> str:
        """What the process wrote since the datum in hand was mounted."""
        with open(self.log_path, "rb") as log:
            log.seek(self.offset)
            return tail(log.read().decode("utf-8", errors="replace"))

    def _clear(self, datum: Datum) -> None:
        """Empty the mount: the folders of this datum's inputs and out stay (same paths)."""
        keep = {i.name for i in datum.inputs} | {"out"}
        for child in self.pfs.iterdir():
            if child.name in keep and child.is_dir() and not child.is_symlink():
                for inner in child.iterdir():
                    _remove(inner)
            else:
                _remove(child)

    def _kill(self) -> None:
        if self.proc is not None:
            processes.kill_group(self.proc)
            self.proc.wait()
            self.control.untrack(self.proc)
            self.proc = None
        if self.waiting is not None:
            self.waiting.close()
            self.waiting = None

    def close(self) -> None:
        if self.proc is not None and self.waiting is not None:
            self._answer({"done": True})
            try:
                self.proc.wait(EXIT_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        self._kill()
        self.server.close()
        shutil.rmtree(self.root, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
