"""The local pipeline engine: runs Pachyderm-format pipelines on this machine.

A pipeline's output repo has the pipeline's name. Whenever the heads of its input branches form a
combination no job has processed with the current pipeline version, a job runs: the input is
split into datums (see datums.py); each datum's files are copied under a private `/pfs`-like
folder, the transform runs as a subprocess with `/pfs/...` in its command, stdin and environment
rewritten to that folder, and whatever it writes to `/pfs/out` is collected. The outputs of all
datums make one commit on the output repo, with provenance to every input commit.

With `transform.datum_batching`, the transform is started once per worker instead (see
`_BatchWorker` and batching.py): each worker mounts datum after datum in one folder of its own
and hands each over when the transform asks for the next one on a unix socket.

Incremental: a datum whose content (the bytes of its files) and pipeline version (transform,
inputs, the code files the transform names, the reprocess salt) were seen before is not run
again; its earlier output is reused.

One job per pipeline runs at a time (a Postgres advisory lock), whoever starts it: the background
worker (`cdl data worker`, started by `cdl stack up`) or a command run with `--wait`.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from pipelines.core import events, lineage
from pipelines.core.errors import AlreadyExists, CDLError, Invalid, NotFound, Unavailable
from pipelines.core.stack import Stack
from pipelines.data.batching import SOCKET_ENV
from pipelines.data.datums import Datum, datums
from pipelines.data.repos import Commit, DataRepos, FileEntry
from pipelines.data.spec import PipelineSpec, load_spec, parse_duration, parse_spec

LOG_TAIL = 32_000  # characters of a datum's output kept for `cdl data job logs`
PFS = re.compile(r"(?<![\w./-])/pfs(?=/|\b|$)")
POLL_S = 5.0
EXIT_GRACE_S = 5.0  # a batching transform told that no datum is left gets this long to exit


@dataclass
class DatumResult:
    datum: Datum
    state: str  # processed | skipped | failed
    attempts: int = 0
    seconds: float = 0.0
    log: str = ""
    error: str = ""
    outputs: list[tuple[str, str, int]] | None = None


@dataclass
class Job:
    id: str
    pipeline: str
    pipeline_version: int
    version_hash: str
    input_commits: dict
    state: str
    output_commit: str | None
    datums_total: int
    datums_processed: int
    datums_skipped: int
    datums_failed: int
    error: str | None
    started_at: datetime
    finished_at: datetime | None

    @property
    def lineage_id(self) -> str:
        return lineage.node_id(lineage.Kind.PIPELINE_JOB, self.id)


def code_hash(spec: PipelineSpec, workdir: Path) -> str:
    """Hash of the files in `workdir` that the transform names in its cmd or stdin, so that
    changing a script and running `pipeline update` makes its datums run again."""
    digest = hashlib.sha256()
    words = [w for part in [*spec.transform.cmd, *spec.transform.stdin] for w in part.split()]
    for word in sorted(set(words)):
        candidate = workdir / word
        if not word.startswith("/") and candidate.is_file():
            digest.update(word.encode() + b"\0" + candidate.read_bytes())
    return digest.hexdigest()


def _tail(text: str) -> str:
    return text[-LOG_TAIL:]


def _exit_error(code: int, output: str) -> str:
    return f"exit code {code}: " + " | ".join(output.strip().splitlines()[-5:])


def _datum_env(datum: Datum, pfs: Path) -> dict[str, str]:
    """The variables Pachyderm sets for a datum: each input's matched path, and the datum's id."""
    env = {i.name: f"{pfs}/{i.name}{i.path.rstrip('/')}" for i in datum.inputs}
    env["PACH_DATUM_ID"] = datum.hash[:32]
    return env


@dataclass
class _Invocation:
    args: list[str]
    cwd: Path | str
    env: dict[str, str]
    stdin: str | None


class PipelineEngine:
    def __init__(self, stack: Stack):
        self.stack = stack
        self.repos = DataRepos(stack)
        self.store = self.repos.store

    # -- pipelines -----------------------------------------------------------------------

    def create(self, spec_path: Path, update: bool = False, reprocess: bool = False) -> dict:
        spec = load_spec(spec_path)
        workdir = spec_path.resolve().parent
        code = code_hash(spec, workdir)
        with self.stack.connect() as conn:
            for leaf in spec.input.leaves():
                self.repos.require_repo(conn, leaf.repo)
            existing = conn.execute(
                "SELECT version, salt FROM pipelines WHERE name = %s", [spec.name]
            ).fetchone()
            if existing and not update:
                raise AlreadyExists(
                    f"pipeline '{spec.name}' already exists",
                    f"use 'cdl data pipeline update -f {spec_path}'",
                )
            if not existing and update:
                raise NotFound(
                    f"no pipeline '{spec.name}' to update",
                    f"use 'cdl data pipeline create -f {spec_path}'",
                )
            repo_exists = conn.execute(
                "SELECT 1 FROM data_repos WHERE name = %s", [spec.name]
            ).fetchone()
            if repo_exists and not existing:
                raise AlreadyExists(
                    f"repo '{spec.name}' already exists; a pipeline's output repo takes its name",
                    "rename the pipeline or delete that repo",
                )
        if not existing:
            self.repos.create_repo(spec.name, f"output of pipeline {spec.name}")
        salt = uuid.uuid4().hex if (reprocess or not existing) else existing[1]
        with self.stack.connect() as conn, conn.transaction():
            conn.execute(
                """INSERT INTO pipelines (name, spec, spec_path, workdir, code_hash, salt)
                   VALUES (%(name)s, %(spec)s, %(path)s, %(workdir)s, %(code)s, %(salt)s)
                   ON CONFLICT (name) DO UPDATE SET spec = EXCLUDED.spec,
                       spec_path = EXCLUDED.spec_path, workdir = EXCLUDED.workdir,
                       code_hash = EXCLUDED.code_hash, salt = EXCLUDED.salt,
                       version = pipelines.version + 1, updated_at = now()""",
                {
                    "name": spec.name,
                    "spec": Jsonb(spec.canonical()),
                    "path": str(spec_path.resolve()),
                    "workdir": str(workdir),
                    "code": code,
                    "salt": salt,
                },
            )
            conn.execute("DELETE FROM pipeline_inputs WHERE pipeline = %s", [spec.name])
            for leaf in spec.input.leaves():
                conn.execute(
                    """INSERT INTO pipeline_inputs (pipeline, repo, branch) VALUES (%s, %s, %s)
                       ON CONFLICT DO NOTHING""",
                    [spec.name, leaf.repo, leaf.branch],
                )
        return self.inspect(spec.name)

    def _row(self, conn: psycopg.Connection, name: str) -> dict:
        with conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute("SELECT * FROM pipelines WHERE name = %s", [name]).fetchone()
        if row is None:
            known = [r[0] for r in conn.execute("SELECT name FROM pipelines ORDER BY name")]
            raise NotFound(
                f"no pipeline '{name}'" + (f" (pipelines: {', '.join(known)})" if known else ""),
                "see 'cdl data pipeline list'",
            )
        return row

    def inspect(self, name: str) -> dict:
        with self.stack.connect() as conn:
            row = self._row(conn, name)
        return {**row, "jobs": self.jobs(name, limit=5)}

    def list(self) -> list[dict]:
        with self.stack.connect() as conn, conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(
                """SELECT p.name, p.version, p.spec->>'description' AS description,
                          p.updated_at, j.state AS last_state, j.started_at AS last_started,
                          (SELECT string_agg(i.repo || '@' || i.branch, ', ' ORDER BY i.repo)
                           FROM pipeline_inputs i WHERE i.pipeline = p.name) AS inputs
                   FROM pipelines p
                   LEFT JOIN LATERAL (SELECT state, started_at FROM pipeline_jobs
                                      WHERE pipeline = p.name
                                      ORDER BY started_at DESC LIMIT 1) j ON true
                   ORDER BY p.name"""
            ).fetchall()

    def delete(self, name: str, keep_repo: bool = False) -> None:
        with self.stack.connect() as conn:
            self._row(conn, name)
            readers = [
                r[0]
                for r in conn.execute(
                    "SELECT DISTINCT pipeline FROM pipeline_inputs WHERE repo = %s", [name]
                )
            ]
            if readers and not keep_repo:
                raise Invalid(
                    f"pipelines {', '.join(readers)} read the output of '{name}'",
                    "delete them first, or pass --keep-repo",
                )
            with conn.transaction():
                self._lock(conn, name, wait=True)
                conn.execute("DELETE FROM pipelines WHERE name = %s", [name])
        if not keep_repo:
            self.repos.delete_repo(name)

    # -- jobs ----------------------------------------------------------------------------

    @staticmethod
    def _lock(conn: psycopg.Connection, name: str, wait: bool = False) -> bool:
        key = f"cdl.pipeline:{name}"
        if wait:
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [key])
            return True
        return conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", [key]).fetchone()[0]

    def _heads(self, conn: psycopg.Connection, spec: PipelineSpec) -> dict[str, Commit] | None:
        """The head commit of each input (by input name), or None if one has no commit yet."""
        heads = {}
        for leaf in spec.input.leaves():
            row = conn.execute(
                "SELECT head FROM data_branches WHERE repo = %s AND name = %s",
                [leaf.repo, leaf.branch],
            ).fetchone()
            if row is None or row[0] is None:
                return None
            heads[leaf.input_name] = self.repos.commit_by_id(conn, row[0])
        return heads

    def _plan(self, conn: psycopg.Connection, name: str):
        """(spec, row, heads, input_commits, version_hash) if a job is due, else None."""
        row = self._row(conn, name)
        spec = parse_spec(row["spec"], f"pipeline {name}")
        heads = self._heads(conn, spec)
        if heads is None:
            return None
        input_commits = {
            f"{leaf.repo}@{leaf.branch}": heads[leaf.input_name].id for leaf in spec.input.leaves()
        }
        version_hash = spec.version_hash(row["code_hash"], row["salt"])
        done = conn.execute(
            """SELECT 1 FROM pipeline_jobs WHERE pipeline = %s AND version_hash = %s
               AND input_commits = %s AND state <> 'running'""",
            [name, version_hash, Jsonb(input_commits)],
        ).fetchone()
        if done:
            return None
        return spec, row, heads, input_commits, version_hash

    def pending(self) -> list[str]:
        with self.stack.connect() as conn:
            names = [r[0] for r in conn.execute("SELECT name FROM pipelines ORDER BY name")]
            return [n for n in names if self._plan(conn, n) is not None]

    def run_pending(
        self, progress: Callable[[str], None] | None = None, timeout_s: float = 3600
    ) -> list[Job]:
        """Run every due job, following the chain downstream, until none is due or running.
        Jobs being run by another process (the worker) are waited for."""
        finished: list[Job] = []
        deadline = time.monotonic() + timeout_s
        while True:
            due = self.pending()
            if not due:
                with self.stack.connect() as conn:
                    running = conn.execute(
                        "SELECT count(*) FROM pipeline_jobs WHERE state = 'running'"
                    ).fetchone()[0]
                if not running:
                    return finished
            ran = False
            for name in due:
                job = self.run_job(name, progress)
                if job is not None:
                    finished.append(job)
                    ran = True
            if not ran:
                if time.monotonic() > deadline:
                    raise Unavailable(f"pipelines still running after {timeout_s:.0f} s")
                time.sleep(0.3)

    def run_job(self, name: str, progress: Callable[[str], None] | None = None) -> Job | None:
        """Run one job of `name` if one is due and nobody else is running it."""
        with self.stack.connect(autocommit=True) as conn:
            if not self._lock(conn, name):
                return None
            try:
                # A 'running' job we can lock was left by a process that died.
                conn.execute(
                    """UPDATE pipeline_jobs SET state = 'failure', finished_at = now(),
                              error = 'interrupted: the process running it stopped'
                       WHERE pipeline = %s AND state = 'running'""",
                    [name],
                )
                plan = self._plan(conn, name)
                if plan is None:
                    return None
                return self._run(conn, name, *plan, progress=progress)
            finally:
                conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", [f"cdl.pipeline:{name}"])

    def _run(self, conn, name, spec, row, heads, input_commits, version_hash, progress) -> Job:
        job_id = uuid.uuid4().hex
        conn.execute(
            """INSERT INTO pipeline_jobs (id, pipeline, pipeline_version, version_hash,
                                          input_commits, state)
               VALUES (%s, %s, %s, %s, %s, 'running')""",
            [job_id, name, row["version"], version_hash, Jsonb(input_commits)],
        )
        say = progress or (lambda _: None)
        files_cache: dict[str, list[FileEntry]] = {}

        def files_of(commit: Commit) -> list[FileEntry]:
            if commit.id not in files_cache:
                files_cache[commit.id] = list(self.repos.files(commit))
            return files_cache[commit.id]

        try:
            all_datums = datums(spec.input, heads, files_of)
            hashes = {d.hash: d for d in all_datums}
            cached = {
                h: outputs
                for h, outputs in conn.execute(
                    """SELECT datum_hash, outputs FROM pipeline_datum_outputs
                       WHERE pipeline = %s AND version_hash = %s AND datum_hash = ANY(%s)""",
                    [name, version_hash, list(hashes)],
                )
            }
            results = [
                DatumResult(d, "skipped", outputs=[tuple(o) for o in cached[h]])
                for h, d in hashes.items()
                if h in cached
            ]
            to_run = [d for h, d in hashes.items() if h not in cached]
            conn.execute(
                "UPDATE pipeline_jobs SET datums_total = %s, datums_skipped = %s WHERE id = %s",
                [len(hashes), len(results), job_id],
            )
            say(
                f"{name}: job {job_id[:12]}: {len(hashes)} datums, {len(results)} unchanged, "
                f"{len(to_run)} to run"
            )
            results += self._process(conn, name, spec, row, job_id, version_hash, to_run, say)
            self._record_datums(conn, job_id, results)
            failed = [r for r in results if r.state == "failed"]
            if failed:
                first = failed[0]
                raise CDLError(
                    f"datum {json.dumps(first.datum.describe())} failed after {first.attempts} "
                    f"attempt(s): {first.error}"
                    + (f" ({len(failed) - 1} more datums failed)" if len(failed) > 1 else "")
                )
            output = self._commit_outputs(name, spec, job_id, heads, results)
            conn.execute(
                """UPDATE pipeline_jobs SET state = 'success', finished_at = now(),
                          output_commit = %s WHERE id = %s""",
                [output.id, job_id],
            )
            with conn.transaction():
                node = lineage.record_node(
                    conn, lineage.Kind.PIPELINE_JOB, job_id, pipeline=name, version=row["version"]
                )
                lineage.consumed(conn, node, *{c.lineage_id for c in heads.values()})
                lineage.produced(conn, node, output.lineage_id)
                events.emit(
                    conn,
                    events.JOB_FINISHED,
                    node,
                    {
                        "pipeline": name,
                        "job": job_id,
                        "state": "success",
                        "output_commit": output.ref,
                    },
                )
        except Exception as exc:
            message = exc.problem if isinstance(exc, CDLError) else f"{type(exc).__name__}: {exc}"
            conn.execute(
                """UPDATE pipeline_jobs SET state = 'failure', finished_at = now(), error = %s
                   WHERE id = %s""",
                [message, job_id],
            )
            events.emit(
                conn,
                events.JOB_FINISHED,
                lineage.node_id("pipeline_job", job_id),
                {"pipeline": name, "job": job_id, "state": "failure", "error": message},
            )
            if not isinstance(exc, CDLError):
                raise
        return self.job(job_id)

    def _process(self, conn, name, spec, row, job_id, version_hash, to_run, say):
        results: list[DatumResult] = []
        if not to_run:
            return results
        run = self._run_batched if spec.transform.datum_batching else self._run_each
        last_report = time.monotonic()
        for result in run(spec, Path(row["workdir"]), job_id, to_run):
            results.append(result)
            if result.state == "processed":
                conn.execute(
                    """INSERT INTO pipeline_datum_outputs
                           (pipeline, version_hash, datum_hash, outputs, job_id)
                       VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING""",
                    [
                        name,
                        version_hash,
                        result.datum.hash,
                        Jsonb([list(o) for o in result.outputs]),
                        job_id,
                    ],
                )
            if time.monotonic() - last_report > 1 or len(results) == len(to_run):
                last_report = time.monotonic()
                done = sum(r.state == "processed" for r in results)
                bad = sum(r.state == "failed" for r in results)
                conn.execute(
                    """UPDATE pipeline_jobs SET datums_processed = %s, datums_failed = %s
                       WHERE id = %s""",
                    [done, bad, job_id],
                )
                say(f"{name}: {done + bad}/{len(to_run)} datums run ({bad} failed)")
        return results

    def _run_each(self, spec, workdir, job_id, to_run) -> Iterator[DatumResult]:
        """One transform process per datum, `parallelism_spec` at a time."""
        workers = spec.parallelism_spec.constant
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="datum") as pool:
            futures = [pool.submit(self._run_datum, spec, workdir, job_id, d) for d in to_run]
            for future in as_completed(futures):
                yield future.result()

    def _run_batched(self, spec, workdir, job_id, to_run) -> Iterator[DatumResult]:
        """`parallelism_spec` transform processes, each fed datums until none is left."""
        todo: queue.SimpleQueue = queue.SimpleQueue()
        for datum in to_run:
            todo.put(datum)
        done: queue.SimpleQueue = queue.SimpleQueue()
        stop = threading.Event()

        def work() -> None:
            worker = None
            try:
                worker = _BatchWorker(self, spec, workdir, job_id)
                while not stop.is_set():
                    try:
                        datum = todo.get_nowait()
                    except queue.Empty:
                        return
                    done.put(worker.run(datum))
            except BaseException as exc:  # raised again in the job's thread
                done.put(exc)
            finally:
                if worker is not None:
                    worker.close()

        threads = [
            threading.Thread(target=work, name=f"batch-{i}", daemon=True)
            for i in range(min(spec.parallelism_spec.constant, len(to_run)))
        ]
        for thread in threads:
            thread.start()
        try:
            for _ in to_run:
                item = done.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            for thread in threads:
                thread.join()

    def _mount(self, datum: Datum, pfs: Path) -> None:
        """The datum's files under `pfs/<input>`, and an empty `pfs/out`."""
        for item in datum.inputs:
            for entry in item.files:
                self.store.materialize(entry.sha256, pfs / item.name / entry.path[1:])
            (pfs / item.name).mkdir(parents=True, exist_ok=True)
        (pfs / "out").mkdir(exist_ok=True)

    @staticmethod
    def _invocation(spec, workdir: Path, job_id: str, pfs: Path, datum: Datum) -> _Invocation:
        """The transform's command, stdin and environment with `/pfs` rewritten to `pfs`."""
        transform = spec.transform

        def local(text: str, root: str = str(pfs)) -> str:
            return PFS.sub(lambda _: root, text)

        # `python3` in a transform is the platform venv's, as the image's would be.
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        env = {**os.environ, "PATH": path}
        env.update({k: local(v) for k, v in transform.env.items()})
        env.update(_datum_env(datum, pfs))
        env["PACH_JOB_ID"] = job_id
        # working_dir names a folder of the image on Pachyderm; locally the transform runs in
        # the spec's folder, unless working_dir is inside /pfs.
        inside_pfs = transform.working_dir and PFS.match(transform.working_dir)
        return _Invocation(
            [local(a) for a in transform.cmd],
            local(transform.working_dir) if inside_pfs else workdir,
            env,
            "".join(local(line) + "\n" for line in transform.stdin) or None,
        )

    def _run_datum(self, spec: PipelineSpec, workdir: Path, job_id: str, datum: Datum):
        transform = spec.transform
        timeout = parse_duration(spec.datum_timeout) if spec.datum_timeout else None
        error, log, started = "", "", time.monotonic()
        for attempt in range(1, spec.datum_tries + 1):
            root = Path(tempfile.mkdtemp(prefix="cdl-datum-"))
            try:
                pfs = root / "pfs"
                self._mount(datum, pfs)
                call = self._invocation(spec, workdir, job_id, pfs, datum)
                proc = subprocess.run(
                    call.args,
                    input=call.stdin,
                    cwd=call.cwd,
                    env=call.env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    errors="replace",
                    timeout=timeout,
                )
                log = _tail(proc.stdout)
                if proc.returncode == 0 or proc.returncode in transform.accept_return_code:
                    outputs = self._collect(pfs / "out")
                    return DatumResult(
                        datum,
                        "processed",
                        attempt,
                        time.monotonic() - started,
                        log,
                        outputs=outputs,
                    )
                error = _exit_error(proc.returncode, proc.stdout)
            except subprocess.TimeoutExpired as exc:
                log = _tail(exc.stdout or "") if isinstance(exc.stdout, str) else ""
                error = f"timed out after {spec.datum_timeout} (datum_timeout)"
            except FileNotFoundError as exc:
                error = f"cannot run {transform.cmd[0]!r}: {exc.strerror}"
            except CDLError as exc:
                error = exc.problem
            finally:
                shutil.rmtree(root, ignore_errors=True)
        return DatumResult(
            datum, "failed", spec.datum_tries, time.monotonic() - started, log, error
        )

    def _collect(self, out: Path) -> list[tuple[str, str, int]]:
        outputs = []
        for folder, dirs, names in os.walk(out):
            for name in sorted(names):
                path = Path(folder) / name
                if path.is_symlink() or not path.is_file():
                    raise Invalid(f"/pfs/out/{path.relative_to(out)} is not a regular file")
                sha256, size = self.store.put_file(path)
                outputs.append(("/" + str(path.relative_to(out)), sha256, size))
            dirs.sort()
        return outputs

    def _record_datums(self, conn, job_id: str, results: list[DatumResult]) -> None:
        with conn.cursor().copy(
            """COPY pipeline_job_datums (job_id, datum_hash, inputs, state, attempts, seconds,
                                         log) FROM STDIN"""
        ) as copy:
            for r in results:
                copy.write_row(
                    [
                        job_id,
                        r.datum.hash,
                        json.dumps(r.datum.describe()),
                        r.state,
                        r.attempts,
                        r.seconds,
                        r.log if r.state != "failed" else f"{r.log}\n[cdl] {r.error}",
                    ]
                )

    def _commit_outputs(self, name, spec, job_id, heads, results) -> Commit:
        merged: dict[str, tuple[str, int, dict]] = {}
        for result in results:
            for path, sha256, size in result.outputs:
                if path in merged and merged[path][0] != sha256:
                    raise Invalid(
                        f"datums {json.dumps(merged[path][2])} and "
                        f"{json.dumps(result.datum.describe())} both wrote {path}",
                        "write each output path from one datum only",
                    )
                merged[path] = (sha256, size, result.datum.describe())
        with self.repos.writer(
            name,
            spec.output_branch,
            message=f"job {job_id}",
            author=f"pipeline:{name}",
            origin="pipeline",
            provenance=list({c.id: c for c in heads.values()}.values()),
            carry_parent=False,
        ) as writer:
            for path in sorted(merged):
                sha256, size, _ = merged[path]
                writer.add_object(path, sha256, size)
        return writer.commit

    # -- reading jobs --------------------------------------------------------------------

    def jobs(self, pipeline: str | None = None, limit: int = 20) -> list[Job]:
        with self.stack.connect() as conn, conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(
                """SELECT * FROM pipeline_jobs WHERE %(p)s::text IS NULL OR pipeline = %(p)s
                   ORDER BY started_at DESC LIMIT %(n)s""",
                {"p": pipeline, "n": limit},
            ).fetchall()
        return [Job(**r) for r in rows]

    def job(self, job_id: str) -> Job:
        with self.stack.connect() as conn, conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(
                "SELECT * FROM pipeline_jobs WHERE id LIKE %s LIMIT 2", [job_id + "%"]
            ).fetchall()
        if len(rows) != 1:
            raise NotFound(
                f"{'no job' if not rows else 'more than one job'} starts with '{job_id}'",
                "see 'cdl data job list'",
            )
        return Job(**rows[0])

    def job_datums(self, job_id: str, state: str | None = None) -> list[dict]:
        job = self.job(job_id)
        with self.stack.connect() as conn, conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(
                """SELECT datum_hash, inputs, state, attempts, seconds, log
                   FROM pipeline_job_datums WHERE job_id = %(j)s
                   AND (%(s)s::text IS NULL OR state = %(s)s) ORDER BY inputs::text""",
                {"j": job.id, "s": state},
            ).fetchall()

    # -- the worker ------------------------------------------------------------------------

    def serve(self, stop: threading.Event, say: Callable[[str], None]) -> None:
        """Run due jobs whenever a commit finishes (LISTEN), and every few seconds anyway."""
        while not stop.is_set():
            try:
                with self.stack.connect(autocommit=True) as conn:
                    conn.execute(f"LISTEN {events.CHANNEL}")
                    while not stop.is_set():
                        for job in self.run_pending(say):
                            say(
                                f"{job.pipeline}: job {job.id[:12]} {job.state}"
                                + (f": {job.error}" if job.error else "")
                            )
                        for _ in conn.notifies(timeout=POLL_S, stop_after=1):
                            pass
            except psycopg.OperationalError as exc:
                say(f"database connection lost ({exc}); reconnecting")
                stop.wait(2.0)


class _BatchWorker:
    """One transform process of a datum-batching pipeline, and the one `/pfs` folder it sees.

    Each datum is mounted in that folder (emptied first) and handed over as the answer to the
    process's request on the worker's unix socket; its next request reports the datum done, or
    failed with an error. The process exiting also concludes the datum, by its exit code as
    without batching, and datum_timeout kills it. A failed datum is tried again (in a new process
    if the old one is gone), and the remaining datums go on in the live or a restarted process.
    The output goes to one file; a datum's log is what was written while it was in hand.
    """

    def __init__(self, engine: PipelineEngine, spec: PipelineSpec, workdir: Path, job_id: str):
        self.engine, self.spec, self.workdir, self.job_id = engine, spec, workdir, job_id
        self.timeout = parse_duration(spec.datum_timeout) if spec.datum_timeout else None
        self.root = Path(tempfile.mkdtemp(prefix="cdl-batch-"))
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
        for attempt in range(1, self.spec.datum_tries + 1):
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
                self._answer({"env": _datum_env(datum, self.pfs)})
            error = self._wait()
            outputs = None if error else self.engine._collect(self.pfs / "out")
            return self._log(), error, outputs
        except FileNotFoundError as exc:
            return "", f"cannot run {self.spec.transform.cmd[0]!r}: {exc.strerror}", None
        except CDLError as exc:
            return self._log(), exc.problem, None

    def _start(self, datum: Datum) -> None:
        call = self.engine._invocation(self.spec, self.workdir, self.job_id, self.pfs, datum)
        call.env[SOCKET_ENV] = self.socket_path
        stdin = self.root / "stdin"
        stdin.write_text(call.stdin or "")
        with open(self.log_path, "ab") as log, open(stdin, "rb") as src:
            self.proc = subprocess.Popen(
                call.args,
                cwd=call.cwd,
                env=call.env,
                stdin=src,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # to kill what it started too
            )
        self.asked = False

    def _wait(self) -> str | None:
        """Until the datum in hand is concluded: None if it succeeded, else the error."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
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
                return None if ok else _exit_error(code, self._log())
            try:
                conn.settimeout(10)
                error = json.loads(conn.makefile("rb").readline() or b"{}").get("error")
            except (OSError, ValueError, AttributeError) as exc:
                error = f"unreadable request on ${SOCKET_ENV}: {exc}"
            self.waiting = conn
            if self.asked:
                return error or None
            self.asked = True  # its first request: the datum mounted is the answer
            self._answer({"env": _datum_env(self.datum, self.pfs)})

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
            return _tail(log.read().decode("utf-8", errors="replace"))

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
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
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
