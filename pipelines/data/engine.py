"""The local pipeline engine: runs Pachyderm-format pipelines on this machine.

A pipeline's output repo has the pipeline's name. Whenever the heads of its input branches form a
combination no job has processed with the current pipeline version, a job runs: the input is
split into datums (see datums.py); each datum's files are copied under a private `/pfs`-like
folder, the transform runs as a subprocess with `/pfs/...` in its command, stdin and environment
rewritten to that folder, and whatever it writes to `/pfs/out` is collected. As on Pachyderm, its
environment names each input's path (`$<input name>`) and join or group key
(`$PACH_DATUM_<input name>_JOIN_ON`, `..._GROUP_BY`). The outputs of all datums make one commit
on the output repo, with provenance to every input commit.

With `transform.datum_batching`, the transform is started once per worker instead (see
`_BatchWorker` and batching.py): each worker mounts datum after datum in one folder of its own
and hands each over when the transform asks for the next one on a unix socket.

Incremental: a datum whose content (the bytes of its files) and pipeline version (transform,
inputs, the code files the transform names, the reprocess salt) were seen before is not run
again; its earlier output is reused (unless `reprocess_spec` is `every_job`).

One job per pipeline runs at a time (a Postgres advisory lock), whoever starts it: the background
worker (`cdl data worker`, started by `cdl stack up`) or a command run with `--wait`.

The worker also does what pachd does on a timer:
- Cron inputs: when a tick is due, an empty file named by the tick time (RFC 3339, UTC, e.g.
  `2024-05-01T10:00:00Z`) is committed to the input's repo (`<pipeline>_<name>`), which triggers
  a job; ticks accumulate, one datum each, or with `overwrite` the commit holds only the newest.
  The first tick is the first due time after `start` (default: when the pipeline was created);
  a worker that was down commits the missed ticks one by one.
- Spouts: the transform runs as a long-lived process (restarted if it exits) with `/pfs/out`
  rewritten to a private folder. About every second the files there that are new or changed,
  and have stayed the same for one scan (so a file still being written waits), are committed to
  the output repo (a file that keeps changing, after 10 s anyway); earlier files stay in the
  repo, as `put file` from a spout on Pachyderm would leave them. Deleting or updating the
  pipeline stops the process.
One worker runs a given spout or commits a given tick (advisory locks), however many run.

Fields that only matter on a cluster are ignored here; `create` returns their names.

`PipelineEngine` is the local `PipelineBackend` (see backend.py); it owns the SQL of the pipelines,
pipeline_inputs, pipeline_jobs, pipeline_job_datums and pipeline_datum_outputs tables.
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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from pipelines.core import db, events, lineage
from pipelines.core.errors import (
    AlreadyExists,
    CDLError,
    Invalid,
    NotFound,
    Unavailable,
    Unsupported,
)
from pipelines.core.stack import Stack
from pipelines.data.backend import DEFAULT_BRANCH, Commit, FileEntry, Job, PipelineBackend
from pipelines.data.batching import SOCKET_ENV
from pipelines.data.datums import Datum, datums
from pipelines.data.repos import DataRepos
from pipelines.data.schedule import parse_cron, parse_duration
from pipelines.data.spec import CronInput, PipelineSpec, Transform, load_spec, parse_spec

LOG_TAIL = 32_000  # characters of a datum's output kept for `cdl data job logs`
PFS = re.compile(r"(?<![\w./-])/pfs(?=/|\b|$)")
POLL_S = 5.0
TIMER_S = 1.0  # how often the worker checks cron ticks and spout output
SPOUT_RESTART_S = 10.0  # the least time between two starts of a spout that exits
SPOUT_MAX_WAIT_S = 10.0  # a spout's file that keeps changing is committed after this anyway
TICK_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # Go's time.RFC3339 for UTC, as pachd names tick files
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


@dataclass
class LocalCommand:
    argv: list[str]
    env: dict[str, str]
    stdin: str | None
    cwd: str | Path


def local_command(
    transform: Transform, pfs: Path, workdir: Path, env: dict[str, str] | None = None
) -> LocalCommand:
    """A transform as a local process: `/pfs` in its command, stdin and environment (the spec's
    and `env`) rewritten to the folder `pfs`."""

    def local(text: str) -> str:
        return PFS.sub(lambda _: str(pfs), text)

    # `python3` in a transform is the platform venv's, as the image's would be.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    full_env = {**os.environ, "PATH": path}
    full_env.update({k: local(v) for k, v in {**transform.env, **(env or {})}.items()})
    stdin = "".join(local(line) + "\n" for line in transform.stdin) or None
    # working_dir names a folder of the image on Pachyderm; locally the transform runs in the
    # spec's folder, unless working_dir is inside /pfs.
    inside_pfs = transform.working_dir and PFS.match(transform.working_dir)
    cwd = local(transform.working_dir) if inside_pfs else workdir
    return LocalCommand([local(a) for a in transform.cmd], full_env, stdin, cwd)


def _exit_error(code: int, output: str) -> str:
    return f"exit code {code}: " + " | ".join(output.strip().splitlines()[-5:])


def _datum_env(datum: Datum, pfs: Path) -> dict[str, str]:
    """The variables Pachyderm sets for a datum: each input's matched path, its join and group
    keys, and the datum's id."""
    env = {}
    for item in datum.inputs:
        env[item.name] = f"{pfs}/{item.name}{item.path.rstrip('/')}"
        if item.key is not None:
            env[f"PACH_DATUM_{item.name}_JOIN_ON"] = item.key
        if item.group_key is not None:
            env[f"PACH_DATUM_{item.name}_GROUP_BY"] = item.group_key
    env["PACH_DATUM_ID"] = datum.hash[:32]
    return env


class PipelineEngine(PipelineBackend):
    def __init__(self, stack: Stack):
        self.stack = stack
        self.repos = DataRepos(stack)
        self.store = self.repos.store

    # -- pipelines -----------------------------------------------------------------------

    def create(
        self,
        spec_path: Path,
        update: bool = False,
        reprocess: bool = False,
        spec: PipelineSpec | None = None,
    ) -> dict:
        """Create (or update) a pipeline from its spec file, or from `spec`, one of the specs of
        that file. The result's `ignored` names the cluster-only fields the spec sets."""
        spec = spec or load_spec(spec_path)
        if spec.service is not None and spec.spout is None:
            raise Unsupported(
                f"pipeline '{spec.name}' is a service (a server that never finishes a datum)",
                "run it on a pachyderm stack; locally, serve it yourself",
            )
        if spec.spout is not None and spec.input is not None:
            raise Unsupported(f"spout '{spec.name}' has an input: the local engine cannot run it")
        workdir = spec_path.resolve().parent
        code = code_hash(spec, workdir)
        cron_repos = {cron.repo for cron in spec.crons()}
        with self.stack.connect() as conn:
            for leaf in spec.leaves():
                if leaf.repo not in cron_repos:
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
        for cron in spec.crons():
            try:
                self.repos.create_repo(cron.repo, f"ticks of cron input {cron.name}")
            except AlreadyExists:
                pass  # an update, or a repo the spec names
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
            for leaf in spec.leaves():
                conn.execute(
                    """INSERT INTO pipeline_inputs (pipeline, repo, branch) VALUES (%s, %s, %s)
                       ON CONFLICT DO NOTHING""",
                    [spec.name, leaf.repo, leaf.branch],
                )
        return {**self.inspect(spec.name), "ignored": spec.ignored_locally()}

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
        """Delete a pipeline, its output repo and its cron inputs' tick repos (unless kept)."""
        with self.stack.connect() as conn:
            crons = parse_spec(self._row(conn, name)["spec"], f"pipeline {name}").crons()
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
                db.transaction_lock(conn, self._lock_key(name))
                conn.execute("DELETE FROM pipelines WHERE name = %s", [name])
        if not keep_repo:
            self.repos.delete_repo(name)
            for cron in crons:
                with self.stack.connect() as conn:
                    read = conn.execute(
                        "SELECT 1 FROM pipeline_inputs WHERE repo = %s", [cron.repo]
                    ).fetchone()
                if not read:
                    self.repos.delete_repo(cron.repo)

    # -- jobs ----------------------------------------------------------------------------

    @staticmethod
    def _lock_key(name: str) -> str:
        return f"cdl.pipeline:{name}"

    def _heads(self, conn: psycopg.Connection, spec: PipelineSpec) -> dict[str, Commit] | None:
        """The head commit of each input (by `repo@branch`), or None if one has no commit yet.
        (Not by input name: the inputs of a union may share one.)"""
        heads = {}
        for leaf in spec.leaves():
            head = self.repos.head(conn, leaf.repo, leaf.branch)
            if head is None:
                return None
            heads[leaf.ref] = head
        return heads

    def _plan(self, conn: psycopg.Connection, name: str):
        """(spec, row, heads, input_commits, version_hash) if a job is due, else None."""
        row = self._row(conn, name)
        spec = parse_spec(row["spec"], f"pipeline {name}")
        if spec.spout is not None:
            return None  # a spout has no jobs: the worker runs it (Spouts)
        heads = self._heads(conn, spec)
        if heads is None:
            return None
        input_commits = {ref: commit.id for ref, commit in heads.items()}
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
        with (
            self.stack.connect(autocommit=True) as conn,
            db.advisory_lock(conn, self._lock_key(name), wait=False) as held,
        ):
            if not held:
                return None
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
            reuse = spec.reprocess_spec != "every_job"
            cached = {
                h: outputs
                for h, outputs in conn.execute(
                    """SELECT datum_hash, outputs FROM pipeline_datum_outputs
                       WHERE pipeline = %s AND version_hash = %s AND datum_hash = ANY(%s)""",
                    [name, version_hash, list(hashes) if reuse else []],
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
    def _invocation(spec, workdir: Path, job_id: str, pfs: Path, datum: Datum) -> LocalCommand:
        """The transform as a process for `datum`, mounted at `pfs`."""
        env = {**_datum_env(datum, pfs), "PACH_JOB_ID": job_id}
        return local_command(spec.transform, pfs, workdir, env)

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
                    call.argv,
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
            except Invalid as exc:  # an output /pfs/out cannot hold
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
        with self.stack.connect() as conn:
            return db.fetch_all(
                conn,
                Job,
                """SELECT * FROM pipeline_jobs WHERE %(p)s::text IS NULL OR pipeline = %(p)s
                   ORDER BY started_at DESC LIMIT %(n)s""",
                {"p": pipeline, "n": limit},
            )

    def job(self, job_id: str) -> Job:
        with self.stack.connect() as conn:
            rows = db.fetch_all(
                conn, Job, "SELECT * FROM pipeline_jobs WHERE id LIKE %s LIMIT 2", [job_id + "%"]
            )
        if len(rows) != 1:
            raise NotFound(
                f"{'no job' if not rows else 'more than one job'} starts with '{job_id}'",
                "see 'cdl data job list'",
            )
        return rows[0]

    def job_datums(self, job_id: str, state: str | None = None) -> list[dict]:
        job = self.job(job_id)
        with self.stack.connect() as conn, conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(
                """SELECT datum_hash, inputs, state, attempts, seconds, log
                   FROM pipeline_job_datums WHERE job_id = %(j)s
                   AND (%(s)s::text IS NULL OR state = %(s)s) ORDER BY inputs::text""",
                {"j": job.id, "s": state},
            ).fetchall()

    # -- cron ticks --------------------------------------------------------------------------

    def commit_due_ticks(
        self,
        now: datetime | None = None,
        pipeline: str | None = None,
        say: Callable[[str], None] | None = None,
    ) -> list[Commit]:
        """Commit the next tick of every cron input (of every pipeline, or of one) whose tick is
        due at `now` (default: now), at most one each. With `say`, a tick that cannot be
        committed is reported there and the others go on; without, it raises."""
        now = now or datetime.now(timezone.utc)
        with self.stack.connect() as conn:
            rows = conn.execute(
                """SELECT name, spec, created_at FROM pipelines
                   WHERE position('"cron"' IN spec::text) > 0
                   AND (%(p)s::text IS NULL OR name = %(p)s)""",
                {"p": pipeline},
            ).fetchall()
        ticks = []
        for name, raw, created in rows:
            for cron in parse_spec(raw, f"pipeline {name}").crons():
                try:
                    commit = self._tick(name, cron, cron.start or created, now)
                except CDLError as exc:
                    if say is None:
                        raise
                    say(f"{name}: cannot commit a tick of cron input {cron.name}: {exc.problem}")
                    continue
                if commit is not None:
                    ticks.append(commit)
        return ticks

    def _tick(self, pipeline: str, cron: CronInput, start: datetime, now: datetime):
        key = f"cdl.cron:{cron.repo}"
        with (
            self.stack.connect(autocommit=True) as conn,
            db.advisory_lock(conn, key, wait=False) as held,
        ):
            if not held:
                return None  # another worker is committing this tick
            head = self.repos.head(conn, cron.repo, DEFAULT_BRANCH)
            latest = start
            if head:
                # The newest tick file names the last tick, as pachd reads it.
                for entry in self.repos.files(head):
                    try:
                        tick = datetime.strptime(entry.path[1:], TICK_FORMAT)
                    except ValueError:
                        continue  # not a tick file
                    latest = max(latest, tick.replace(tzinfo=timezone.utc))
            try:
                due = parse_cron(cron.spec).next(latest)
            except ValueError:
                return None  # a schedule that is never due, such as '0 0 30 2 *'
            if due > now:
                return None
            stamp = due.strftime(TICK_FORMAT)
            empty_sha256, _ = self.store.put_bytes(b"")
            with self.repos.writer(
                cron.repo,
                message=f"cron tick {stamp}",
                author=f"pipeline:{pipeline}",
                origin="pipeline",
                carry_parent=not cron.overwrite,
            ) as writer:
                writer.add_object(f"/{stamp}", empty_sha256, 0)
            return writer.commit

    # -- the worker ------------------------------------------------------------------------

    def serve(self, stop: threading.Event, say: Callable[[str], None]) -> None:
        """Run due jobs whenever a commit finishes (LISTEN), and every few seconds anyway; a
        thread commits cron ticks and runs spouts meanwhile."""
        timers_stop = threading.Event()
        timers = threading.Thread(
            target=self.serve_timers, args=(timers_stop, say), name="cdl-timers", daemon=True
        )
        timers.start()
        try:
            self._serve_jobs(stop, say)
        finally:
            timers_stop.set()
            timers.join(timeout=30)

    def _serve_jobs(self, stop: threading.Event, say: Callable[[str], None]) -> None:
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

    def serve_timers(self, stop: threading.Event, say: Callable[[str], None]) -> None:
        """Commit due cron ticks and run spouts until `stop` is set; spouts stop with it."""
        spouts = Spouts(self, say)
        try:
            while not stop.is_set():
                try:
                    for tick in self.commit_due_ticks(say=say):
                        say(f"cron: committed tick {tick.repo}@{tick.id[:12]}")
                    spouts.sync()
                except Exception as exc:  # the worker goes on; the next pass tries again
                    say(f"cron and spouts: {type(exc).__name__}: {exc}")
                stop.wait(TIMER_S)
        finally:
            spouts.stop_all()


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
        root = Path(tempfile.mkdtemp(prefix=f"cdl-spout-{spec.name}-"))
        (root / "pfs" / "out").mkdir(parents=True)
        run = SpoutRun(spec.name, row["version"], spec.output_branch, root)
        self.running[spec.name] = run
        self._launch(run, spec, row["workdir"])
        self.say(f"{spec.name}: spout started")

    def _launch(self, run: SpoutRun, spec: PipelineSpec, workdir: str) -> None:
        command = local_command(spec.transform, run.root / "pfs", Path(workdir))
        with open(run.root / "spout.log", "ab") as log:
            try:
                run.proc = subprocess.Popen(
                    command.argv,
                    stdin=subprocess.PIPE if command.stdin else subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=command.cwd,
                    env=command.env,
                    text=True,
                    start_new_session=True,  # stopped as a group, with its children
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
            except (CDLError, psycopg.Error) as exc:
                self.say(f"{run.name}: stopping the spout: {exc}")
        if self.conn is not None:
            self.conn.close()
            self.conn = None


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
                call.argv,
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
