"""The local pipeline engine: runs Pachyderm-format pipelines on this machine.

A pipeline's output repo has the pipeline's name. Whenever the heads of its input branches form a
combination no job has processed with the current pipeline version, a job runs: the input is
split into datums (see datums.py); each datum's files are copied under a private `/pfs`-like
folder, the transform runs as a subprocess with `/pfs/...` in its command, stdin and environment
rewritten to that folder, and whatever it writes to `/pfs/out` is collected. As on Pachyderm, its
environment names each input's path (`$<input name>`) and join or group key
(`$PACH_DATUM_<input name>_JOIN_ON`, `..._GROUP_BY`). The outputs of all datums make one commit
on the output repo, with provenance to every input commit.

With `transform.datum_batching`, the transform is started once per worker instead (batches.py
runs it, batching.py is its side): each worker mounts datum after datum in one folder of its own
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
- Spouts (spouts.py): the transform runs as a long-lived process, and what it writes to
  `/pfs/out` is committed to the output repo as it settles.
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
import shutil
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Mapping

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from pipelines.core import db, events, lineage
from pipelines.core.durations import parse_duration
from pipelines.core.errors import (
    AlreadyExists,
    CDLError,
    Invalid,
    NotFound,
    Unavailable,
    Unsupported,
)
from pipelines.core.stack import Stack
from pipelines.data import processes
from pipelines.data.backend import DEFAULT_BRANCH, Commit, FileEntry, Job, PipelineBackend
from pipelines.data.batches import BatchWorker
from pipelines.data.datums import Datum, datums
from pipelines.data.repos import DataRepos
from pipelines.data.schedule import parse_cron
from pipelines.data.spec import CronInput, PipelineSpec, load_spec, parse_spec
from pipelines.data.spouts import Spouts
from pipelines.data.transform import (
    DatumResult,
    LocalCommand,
    datum_env,
    exit_error,
    local_command,
    tail,
)

POLL_S = 5.0  # how often an idle worker looks for due jobs without being notified
JOB_POLL_S = 0.5  # how often a busy worker looks for finished and due jobs
STOP_CHECK_S = 0.5  # how soon a waiting worker notices it was asked to stop
BEAT_S = 1.0  # how often a running job marks itself alive and checks for a stop
LEASE_S = 30.0  # a running job not marked alive for this long has lost its runner
STOP_WAIT_S = 60.0  # how long a stop waits for the job's runner to end it
JOB_COLUMNS = """id, pipeline, pipeline_version, version_hash, input_commits, state, output_commit,
    datums_total, datums_processed, datums_skipped, datums_failed, error, started_at,
    finished_at"""  # the fields of Job
TIMER_S = 1.0  # how often the worker checks cron ticks and spout output
TICK_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # Go's time.RFC3339 for UTC, as pachd names tick files

# The jobs this process is running, by id: what stops them.
_ACTIVE: dict[str, processes.JobControl] = {}


class _Stopped(Exception):
    """A job's datums were stopped (see its JobControl for why and what it becomes)."""


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
        stopped = []
        if existing:
            version = self.inspect(spec.name)["version"]
            stopped = self.stop_running(spec.name, f"pipeline updated to version {version}")
        return {
            **self.inspect(spec.name),
            "ignored": spec.ignored_locally(),
            "stopped": stopped,
        }

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

    def delete(self, name: str, keep_repo: bool = False) -> list[Job]:
        """Delete a pipeline, its output repo and its cron inputs' tick repos (unless kept).
        Its running job is stopped first; returns it."""
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
        stopped = self.stop_running(name, f"pipeline {name} was deleted")
        with self.stack.connect() as conn, conn.transaction():
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
        return stopped

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
        spec = self._effective(spec)
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

    def _effective(self, spec: PipelineSpec) -> PipelineSpec:
        """The spec as it runs here: without its own datum_timeout, the stack's default bounds a
        hung datum."""
        if spec.datum_timeout is not None:
            return spec
        default = self.stack.settings.stack.data.datum_timeout
        return spec.model_copy(update={"datum_timeout": default})

    def pending(self) -> list[str]:
        return self._due_and_running()[0]

    def _due_and_running(self) -> tuple[list[str], int]:
        """The pipelines with a due job, and how many jobs run, seen in one snapshot: read one
        after another, a job could end (and make its downstream job due) between the check of
        its downstream pipeline and its own, and look like nothing left to do."""
        with self.stack.connect() as conn:
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            with conn.transaction():
                names = [r[0] for r in conn.execute("SELECT name FROM pipelines ORDER BY name")]
                due = [n for n in names if self._plan(conn, n) is not None]
                running = conn.execute(
                    "SELECT count(*) FROM pipeline_jobs WHERE state = 'running'"
                ).fetchone()[0]
        return due, running

    def run_pending(
        self, progress: Callable[[str], None] | None = None, timeout_s: float = 3600
    ) -> list[Job]:
        """Run every due job, following the chain downstream, until none is due or running.
        Jobs being run by another process (the worker) are waited for."""
        finished: list[Job] = []
        deadline = time.monotonic() + timeout_s
        while True:
            due, running = self._due_and_running()
            if not due and not running:
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
        """Run one job of `name` if one is due and nobody else is running it: a job whose runner
        is gone is resumed first."""
        with (
            self.stack.connect(autocommit=True) as conn,
            db.advisory_lock(conn, self._lock_key(name), wait=False) as held,
        ):
            if not held:
                return None
            # A 'running' job whose lock we got has no live session behind it.
            left = conn.execute(
                """SELECT id, pipeline_version, input_commits, version_hash, runner,
                          stop_requested, now() - heartbeat_at > %s * interval '1 second'
                   FROM pipeline_jobs WHERE pipeline = %s AND state = 'running'""",
                [LEASE_S, name],
            ).fetchone()
            if left is not None:
                job_id, version, commits, version_hash, runner, stop_reason, stale = left
                if stop_reason:
                    return self._end(conn, name, job_id, "killed", stop_reason)
                if not (stale or self._runner_gone(job_id, runner)):
                    return None  # its runner lives but lost its session: it resumes it itself
                plan = self._resume_plan(conn, name, job_id, version, commits, version_hash)
                if plan is not None:
                    processes.sweep()
                    return self._run(conn, name, *plan, progress=progress, resume=job_id)
            plan = self._plan(conn, name)
            if plan is None:
                return None
            return self._run(conn, name, *plan, progress=progress)

    @staticmethod
    def _runner_gone(job_id: str, token: str | None) -> bool:
        runner = processes.Runner.parse(token)
        if runner is None:
            return True
        if runner == processes.current_runner():
            return job_id not in _ACTIVE
        return runner.alive() is False

    def _resume_plan(self, conn, name, job_id, version, commits, version_hash):
        """The plan of an interrupted job, to finish it; None (the job ended killed) when the
        pipeline has a newer version or an input commit is gone."""
        row = self._row(conn, name)
        if row["version"] != version:
            self._end(conn, name, job_id, "killed", f"superseded by version {row['version']}")
            return None
        spec = self._effective(parse_spec(row["spec"], f"pipeline {name}"))
        heads = {ref: self.repos.commit_by_id(conn, commit) for ref, commit in commits.items()}
        if None in heads.values() or set(heads) != {leaf.ref for leaf in spec.leaves()}:
            self._end(conn, name, job_id, "killed", "its input commits are gone")
            return None
        return spec, row, heads, commits, version_hash

    def _end(self, conn, name: str, job_id: str, state: str, error: str) -> Job:
        """End a running job as killed or failure, with `error`, and announce it."""
        ended = conn.execute(
            """UPDATE pipeline_jobs SET state = %s, finished_at = now(), error = %s
               WHERE id = %s AND state = 'running'""",
            [state, error, job_id],
        ).rowcount
        if ended:
            events.emit(
                conn,
                events.JOB_FINISHED,
                lineage.node_id("pipeline_job", job_id),
                {"pipeline": name, "job": job_id, "state": state, "error": error},
            )
        return self.job(job_id)

    def _run(
        self, conn, name, spec, row, heads, input_commits, version_hash, progress, resume=None
    ) -> Job:
        """Run (or, with `resume`, finish) a job while holding the pipeline's lock on `conn`."""
        runner = processes.current_runner().token
        timeouts = [
            parse_duration(t) if t else None for t in (spec.datum_timeout, spec.job_timeout)
        ]
        if resume:
            job_id = resume
            conn.execute(
                """UPDATE pipeline_jobs SET runner = %s, heartbeat_at = now(),
                          resumed = resumed + 1 WHERE id = %s""",
                [runner, job_id],
            )
        else:
            job_id = uuid.uuid4().hex
            conn.execute(
                """INSERT INTO pipeline_jobs (id, pipeline, pipeline_version, version_hash,
                       input_commits, state, runner, heartbeat_at, progress_at, datum_timeout_s,
                       job_timeout_s)
                   VALUES (%s, %s, %s, %s, %s, 'running', %s, now(), now(), %s, %s)""",
                [job_id, name, row["version"], version_hash, Jsonb(input_commits), runner]
                + timeouts,
            )
        say = progress or (lambda _: None)
        if resume:
            say(f"{name}: resuming job {job_id[:12]}, whose runner stopped")
        control = processes.JobControl()
        _ACTIVE[job_id] = control
        beat = threading.Thread(
            target=self._beat,
            args=(conn, job_id, control, spec.job_timeout, timeouts[1]),
            name=f"beat-{job_id[:8]}",
            daemon=True,
        )
        beat.start()
        try:
            output = self._finished_commit(conn, name, job_id) if resume else None
            if output is None:
                output = self._work(conn, name, spec, row, job_id, heads, version_hash, say)
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
        except _Stopped:
            if control.state is None:  # left running: the next runner resumes it
                raise Unavailable(
                    f"job {job_id[:12]} of {name} was interrupted: {control.reason}",
                    "it resumes when a worker runs again",
                ) from None
            self._end(conn, name, job_id, control.state, control.reason)
        except db.CONNECTION_LOST:
            control.stop("lost the database connection", None)
            raise
        except Exception as exc:
            control.stop("the job failed", "failure")
            message = exc.problem if isinstance(exc, CDLError) else f"{type(exc).__name__}: {exc}"
            self._end(conn, name, job_id, "failure", message)
            if not isinstance(exc, CDLError):
                raise
        finally:
            _ACTIVE.pop(job_id, None)
            control.stop("the job ended", control.state)  # ends the beat
            beat.join()
        return self.job(job_id)

    def _beat(self, conn, job_id, control, job_timeout, job_timeout_s) -> None:
        """While the job runs: mark it alive every second, and stop it when a stop is requested
        on its row, when its job_timeout passes, or when the database connection is lost."""
        deadline = None if job_timeout_s is None else time.monotonic() + job_timeout_s
        while not control.stopped:
            done, bad = control.counts or (None, None)
            try:
                row = conn.execute(
                    """UPDATE pipeline_jobs SET heartbeat_at = now(),
                           progress_at = CASE WHEN %(done)s::int IS NULL
                               OR (datums_processed, datums_failed) = (%(done)s, %(bad)s)
                               THEN progress_at ELSE now() END,
                           datums_processed = coalesce(%(done)s, datums_processed),
                           datums_failed = coalesce(%(bad)s, datums_failed)
                       WHERE id = %(id)s RETURNING stop_requested""",
                    {"id": job_id, "done": done, "bad": bad},
                ).fetchone()
            except (*db.CONNECTION_LOST, psycopg.Error):
                control.stop("lost the database connection", None)
                return
            if row and row[0]:
                control.stop(row[0], "killed")
            elif deadline is not None and time.monotonic() > deadline:
                control.stop(f"timed out after {job_timeout} (job_timeout)", "failure")
            time.sleep(BEAT_S)

    def _finished_commit(self, conn, name: str, job_id: str) -> Commit | None:
        """The output commit of a resumed job, if its runner stopped just after making it."""
        row = conn.execute(
            """SELECT id FROM data_commits WHERE repo = %s AND message = %s
               AND origin = 'pipeline' AND state = 'finished'""",
            [name, f"job {job_id}"],
        ).fetchone()
        return self.repos.commit_by_id(conn, row[0]) if row else None

    def _work(self, conn, name, spec, row, job_id, heads, version_hash, say) -> Commit:
        """Run the job's datums that have no output yet and commit the outputs of all."""
        control = _ACTIVE[job_id]
        files_cache: dict[str, list[FileEntry]] = {}

        def files_of(commit: Commit) -> list[FileEntry]:
            if commit.id not in files_cache:
                files_cache[commit.id] = list(self.repos.files(commit))
            return files_cache[commit.id]

        all_datums = datums(spec.input, heads, files_of)
        hashes = {d.hash: d for d in all_datums}
        reuse = spec.reprocess_spec != "every_job"
        # This job's own outputs count as processed (it is being resumed); others' as reused.
        cached = {
            h: (outputs, by == job_id)
            for h, outputs, by in conn.execute(
                """SELECT datum_hash, outputs, job_id FROM pipeline_datum_outputs
                   WHERE pipeline = %s AND version_hash = %s AND datum_hash = ANY(%s)
                   AND (%s OR job_id = %s)""",
                [name, version_hash, list(hashes), reuse, job_id],
            )
        }
        results = [
            DatumResult(
                d,
                "processed" if ours else "skipped",
                log="[cdl] processed before the job was resumed" if ours else "",
                outputs=[tuple(o) for o in outputs],
            )
            for h, d in hashes.items()
            if h in cached
            for outputs, ours in [cached[h]]
        ]
        to_run = [d for h, d in hashes.items() if h not in cached]
        done_before = sum(r.state == "processed" for r in results)
        conn.execute(
            """UPDATE pipeline_jobs SET datums_total = %s, datums_skipped = %s,
                      datums_processed = %s WHERE id = %s""",
            [len(hashes), len(results) - done_before, done_before, job_id],
        )
        say(
            f"{name}: job {job_id[:12]}: {len(hashes)} datums, {len(results) - done_before} "
            f"unchanged, {done_before} done before, {len(to_run)} to run"
        )
        results += self._process(conn, name, spec, row, job_id, version_hash, to_run, say)
        if control.stopped:
            raise _Stopped()
        self._record_datums(conn, job_id, results)
        failed = [r for r in results if r.state == "failed"]
        if failed:
            first = failed[0]
            raise CDLError(
                f"datum {json.dumps(first.datum.describe())} failed after {first.attempts} "
                f"attempt(s): {first.error}"
                + (f" ({len(failed) - 1} more datums failed)" if len(failed) > 1 else "")
            )
        return self._commit_outputs(name, spec, job_id, heads, results)

    def _process(self, conn, name, spec, row, job_id, version_hash, to_run, say):
        results: list[DatumResult] = []
        if not to_run:
            return results
        control = _ACTIVE[job_id]
        run = self._run_batched if spec.transform.datum_batching else self._run_each
        last_report = time.monotonic()
        earlier = conn.execute(
            "SELECT datums_processed FROM pipeline_jobs WHERE id = %s", [job_id]
        ).fetchone()[0]
        try:
            for result in run(spec, Path(row["workdir"]), job_id, to_run, control):
                if control.stopped:
                    continue  # what a stopped job's datums did is not kept
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
                done = sum(r.state == "processed" for r in results)
                bad = sum(r.state == "failed" for r in results)
                control.counts = (earlier + done, bad)  # written by the job's beat
                if time.monotonic() - last_report > 1 or len(results) == len(to_run):
                    last_report = time.monotonic()
                    say(f"{name}: {done + bad}/{len(to_run)} datums run ({bad} failed)")
            if control.counts is not None:
                conn.execute(
                    """UPDATE pipeline_jobs SET datums_processed = %s, datums_failed = %s,
                              progress_at = now() WHERE id = %s""",
                    [*control.counts, job_id],
                )
        except BaseException:
            control.stop("the job's runner failed", None)  # kill its datums before unwinding
            raise
        return results

    def _run_each(self, spec, workdir, job_id, to_run, control) -> Iterator[DatumResult]:
        """One transform process per datum, `parallelism_spec` at a time."""
        workers = spec.parallelism_spec.constant
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="datum") as pool:
            futures = [
                pool.submit(self._run_datum, spec, workdir, job_id, d, control) for d in to_run
            ]
            for future in as_completed(futures):
                yield future.result()

    def _run_batched(self, spec, workdir, job_id, to_run, control) -> Iterator[DatumResult]:
        """`parallelism_spec` transform processes, each fed datums until none is left (or the
        job is stopped)."""
        todo: queue.SimpleQueue = queue.SimpleQueue()
        for datum in to_run:
            todo.put(datum)
        done: queue.SimpleQueue = queue.SimpleQueue()
        stop = threading.Event()

        def work() -> None:
            worker = None
            try:
                worker = BatchWorker(self, spec, workdir, job_id, control)
                while not (stop.is_set() or control.stopped):
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
                done.put(None)  # this worker is done

        threads = [
            threading.Thread(target=work, name=f"batch-{i}", daemon=True)
            for i in range(min(spec.parallelism_spec.constant, len(to_run)))
        ]
        for thread in threads:
            thread.start()
        try:
            working = len(threads)
            while working:
                item = done.get()
                if item is None:
                    working -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
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
        env = {**datum_env(datum, pfs), "PACH_JOB_ID": job_id}
        return local_command(spec.transform, pfs, workdir, env)

    def _run_datum(self, spec: PipelineSpec, workdir: Path, job_id: str, datum: Datum, control):
        transform = spec.transform
        timeout = parse_duration(spec.datum_timeout) if spec.datum_timeout else None
        error, log, started = "", "", time.monotonic()
        for attempt in range(1, spec.datum_tries + 1):
            if control.stopped:
                return DatumResult(datum, "failed", attempt - 1, 0.0, log, control.reason)
            root = processes.scratch_folder("datum-")
            try:
                pfs = root / "pfs"
                self._mount(datum, pfs)
                call = self._invocation(spec, workdir, job_id, pfs, datum)
                code, output, killed = processes.run_to_end(call, timeout, control)
                log = tail(output)
                if killed == "timed out":
                    error = f"timed out after {spec.datum_timeout} (datum_timeout)"
                elif killed:
                    error = killed
                elif code == 0 or code in transform.accept_return_code:
                    outputs = self._collect(pfs / "out")
                    return DatumResult(
                        datum,
                        "processed",
                        attempt,
                        time.monotonic() - started,
                        log,
                        outputs=outputs,
                    )
                else:
                    error = exit_error(code, output)
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

    # -- stopping jobs -------------------------------------------------------------------

    def stop(self, job_id: str, reason: str = "stopped by 'cdl data job stop'") -> Job:
        """Stop a running job: its datums are killed, nothing is committed, it ends `killed`.
        Waits until its runner has ended it (or ends it here if its runner is gone)."""
        job = self.job(job_id)
        if job.state != "running":
            raise Invalid(f"job {job.id[:12]} is not running: it ended ({job.state})")
        with self.stack.connect(autocommit=True) as conn:
            conn.execute(
                """UPDATE pipeline_jobs SET stop_requested = %s
                   WHERE id = %s AND state = 'running' AND stop_requested IS NULL""",
                [reason, job.id],
            )
        deadline = time.monotonic() + STOP_WAIT_S
        while True:
            with (
                self.stack.connect(autocommit=True) as conn,
                db.advisory_lock(conn, self._lock_key(job.pipeline), wait=False) as held,
            ):
                if held:  # no live session runs it: end it here
                    return self._end(conn, job.pipeline, job.id, "killed", reason)
            job = self.job(job.id)
            if job.state != "running":
                return job
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"job {job.id[:12]} was asked to stop but its runner has not ended it "
                    f"within {STOP_WAIT_S:.0f} s",
                    "see 'cdl stack status'; stopping the stack kills its transforms",
                )
            time.sleep(0.2)

    def stop_running(self, pipeline: str, reason: str) -> list[Job]:
        """Stop the running job of `pipeline`, if it has one; returns what was stopped."""
        with self.stack.connect() as conn:
            running = [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM pipeline_jobs WHERE pipeline = %s AND state = 'running'",
                    [pipeline],
                )
            ]
        stopped = []
        for job_id in running:
            try:
                stopped.append(self.stop(job_id, reason))
            except Invalid:
                pass  # it ended meanwhile
        return stopped

    def running_jobs(self) -> list[dict]:
        """The running jobs with their progress: `stalled` when no datum finished for longer
        than the datum timeout, `orphaned` when the runner is gone (the next one resumes it)."""
        with self.stack.connect() as conn, conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(
                """SELECT id, pipeline, runner, datums_total, datums_processed,
                          datums_skipped, datums_failed,
                          extract(epoch FROM now() - coalesce(progress_at, started_at))
                              AS idle_s,
                          datum_timeout_s,
                          now() - heartbeat_at > %s * interval '1 second' AS stale
                   FROM pipeline_jobs WHERE state = 'running' ORDER BY started_at""",
                [LEASE_S],
            ).fetchall()
        for row in rows:
            runner = processes.Runner.parse(row["runner"])
            gone = row["stale"] or runner is None or runner.alive() is False
            timeout = row["datum_timeout_s"]
            row["runner_pid"] = runner.pid if runner else None
            row["health"] = (
                "orphaned"
                if gone
                else "stalled"
                if timeout is not None and row["idle_s"] > timeout + LEASE_S
                else "running"
            )
        return rows

    # -- reading jobs --------------------------------------------------------------------

    def jobs(self, pipeline: str | None = None, limit: int = 20) -> list[Job]:
        with self.stack.connect() as conn:
            return db.fetch_all(
                conn,
                Job,
                f"""SELECT {JOB_COLUMNS} FROM pipeline_jobs
                   WHERE %(p)s::text IS NULL OR pipeline = %(p)s
                   ORDER BY started_at DESC LIMIT %(n)s""",
                {"p": pipeline, "n": limit},
            )

    def triggered_by(
        self, commits: list[str] = (), versions: Mapping[str, int] | None = None
    ) -> list[Job]:
        versions = versions or {}
        with self.stack.connect() as conn:
            return db.fetch_all(
                conn,
                Job,
                f"""WITH RECURSIVE triggered AS (
                       SELECT j.* FROM pipeline_jobs j
                       WHERE EXISTS (SELECT 1 FROM jsonb_each_text(j.input_commits) i
                                     WHERE i.value = ANY(%(commits)s))
                          OR (j.pipeline, j.pipeline_version) IN
                             (SELECT * FROM unnest(%(names)s::text[], %(numbers)s::int[]))
                       UNION
                       SELECT j.* FROM pipeline_jobs j JOIN triggered t
                         ON EXISTS (SELECT 1 FROM jsonb_each_text(j.input_commits) i
                                    WHERE i.value = t.output_commit))
                   SELECT {JOB_COLUMNS} FROM triggered ORDER BY started_at""",
                {"commits": list(commits), "names": [*versions], "numbers": [*versions.values()]},
            )

    def job(self, job_id: str) -> Job:
        with self.stack.connect() as conn:
            rows = db.fetch_all(
                conn,
                Job,
                f"SELECT {JOB_COLUMNS} FROM pipeline_jobs WHERE id LIKE %s LIMIT 2",
                [job_id + "%"],
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
        """Until `stop`: run due jobs, those of different pipelines at once up to the stack's
        `data.job_slots`. A lost or refused connection (Postgres restarting) is retried with
        backoff (db.keep_connected), and the worker goes on once it answers again. On `stop`,
        running jobs are interrupted (their transforms killed) and left for the next worker to
        resume."""
        swept = processes.sweep()
        partial = self.store.clean()  # objects half-written by a killed writer (pid-aware)
        if swept.processes or swept.folders or partial:
            say(
                f"cleaned up after a worker that was killed: {swept.processes} transform "
                f"processes, {swept.folders} scratch folders, {partial} half-written objects"
            )
        slots = self.stack.settings.stack.data.job_slots
        running: dict[str, Future] = {}

        def session(connected: Callable[[], None]) -> None:
            with self.stack.connect(autocommit=True) as conn:
                conn.execute(f"LISTEN {events.CHANNEL}")
                connected()
                while not stop.is_set():
                    self._reap(running, say)
                    for name in self.pending():
                        if len(running) < slots and name not in running:
                            running[name] = pool.submit(self.run_job, name, say)
                    deadline = time.monotonic() + (JOB_POLL_S if running else POLL_S)
                    while not stop.is_set() and time.monotonic() < deadline:
                        if any(conn.notifies(timeout=STOP_CHECK_S, stop_after=1)):
                            break

        with ThreadPoolExecutor(max_workers=slots, thread_name_prefix="job") as pool:
            try:
                db.keep_connected(session, stop, say)
            finally:
                for control in list(_ACTIVE.values()):
                    control.stop("the worker stopped", None)
                for future in running.values():
                    future.cancel()

    def _reap(self, running: dict[str, Future], say: Callable[[str], None]) -> None:
        """Report the jobs that ended and free their slots."""
        for name, future in list(running.items()):
            if not future.done():
                continue
            del running[name]
            try:
                job = future.result()
            except (*db.CONNECTION_LOST, Unavailable) as exc:
                say(f"{name}: {db.first_line(exc)}")
                continue
            except Exception as exc:  # the worker goes on; the job is marked failed
                say(f"{name}: {type(exc).__name__}: {exc}")
                continue
            if job is not None:
                say(
                    f"{job.pipeline}: job {job.id[:12]} {job.state}"
                    + (f": {job.error}" if job.error else "")
                )

    def serve_timers(self, stop: threading.Event, say: Callable[[str], None]) -> None:
        """Commit due cron ticks and run spouts until `stop` is set; spouts stop with it."""
        spouts = Spouts(self, say)

        def session(connected: Callable[[], None]) -> None:
            while not stop.is_set():
                try:
                    for tick in self.commit_due_ticks(say=say):
                        say(f"cron: committed tick {tick.repo}@{tick.id[:12]}")
                    spouts.sync()
                    connected()
                except (*db.CONNECTION_LOST, Unavailable):
                    raise  # waited for by keep_connected
                except Exception as exc:  # the worker goes on; the next pass tries again
                    say(f"cron and spouts: {type(exc).__name__}: {db.first_line(exc)}")
                stop.wait(TIMER_S)

        try:
            db.keep_connected(session, stop, say, who="cron and spouts: ")
        finally:
            spouts.stop_all()
