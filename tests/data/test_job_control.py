"""Jobs of the local engine that survive their runner, can be stopped, are bounded in time and
do not hold up other pipelines (pipelines/data/engine.py, processes.py)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from pipelines.data import processes
from pipelines.data.engine import PipelineEngine
from pipelines.data.repos import DataRepos
from tests.conftest import cdl
from tests.data.test_pipelines import contents, put, simple_spec, uid, write_spec

# Notes the datum in $NOTES, sleeps $PAUSE seconds, then writes its file upper-cased.
SLOW = [
    'echo "$src" >> "$NOTES"',
    'sleep "$PAUSE"',
    'for f in $(find "$src" -type f); do tr a-z A-Z < "$f" > "/pfs/out/${f##*/}"; done',
]


# Notes the datum in $NOTES; a file named slow* hangs the first time its datum runs.
HANGS_ONCE = [
    'echo "$src" >> "$NOTES"',
    'm="$NOTES.${src##*/}"',
    'case "$src" in *slow*) [ -e "$m" ] || { touch "$m"; sleep 60; } ;; esac',
    'for f in $(find "$src" -type f); do tr a-z A-Z < "$f" > "/pfs/out/${f##*/}"; done',
]


def slow_spec(name: str, repo: str, notes: Path, pause: float, **extra) -> dict:
    spec = simple_spec(name, repo, stdin=SLOW, **extra)
    spec["transform"]["env"] = {"NOTES": str(notes), "PAUSE": str(pause)}
    return spec


def processes_poll() -> float:
    from pipelines.data.engine import JOB_POLL_S, POLL_S

    return max(JOB_POLL_S, POLL_S) / 2


def wait_for(check, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        time.sleep(0.1)


def transforms_of(token: str) -> list[psutil.Process]:
    """Live transform processes started by the runner `token`."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(processes.RUNNER_ENV) == token:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def running_job(engine, name: str):
    jobs = engine.jobs(name, limit=1)
    return jobs[0] if jobs and jobs[0].state == "running" else None


def runner_token(stack, job_id: str) -> str:
    with stack.connect() as conn:
        return conn.execute("SELECT runner FROM pipeline_jobs WHERE id = %s", [job_id]).fetchone()[
            0
        ]


@pytest.fixture(scope="module")
def stack(request):
    """A stack of its own: these tests kill and restart its worker."""
    from tests.conftest import destroy, make_project, stack_for

    stack = stack_for(make_project())
    stack.up()
    yield stack
    destroy(stack)


def test_a_killed_workers_job_is_resumed_once_and_its_leftovers_removed(stack, tmp_path):
    """kill -9 of the worker mid-job, then `cdl stack up`: the new worker kills the orphaned
    transform, removes its scratch folder and half-written objects, and finishes the same job,
    running only the datums that had not finished, with exactly one output commit. Stopping the
    worker (stack down) kills its transforms and leaves the job for the next worker too."""
    engine, repos = PipelineEngine(stack), DataRepos(stack)
    source, name, notes = uid("src"), uid("resume"), tmp_path / "notes.txt"
    repos.create_repo(source)
    files = {f"f{i}.txt": f"file {i}".encode() for i in range(4)}
    files |= {"slow1.txt": b"one", "slow2.txt": b"two"}
    put(repos, source, tmp_path, files)
    spec = simple_spec(name, source, stdin=HANGS_ONCE, parallelism_spec={"constant": 2})
    spec["transform"]["env"] = {"NOTES": str(notes)}
    engine.create(write_spec(tmp_path, spec))
    job = wait_for(lambda: running_job(engine, name), "the worker starts the job")
    wait_for(lambda: engine.job(job.id).datums_processed >= 4, "the quick datums finish", 30)
    token = runner_token(stack, job.id)
    runner = processes.Runner.parse(token)
    assert runner.pid == stack.supervisor.pid("pipelines")

    os.kill(runner.pid, signal.SIGKILL)
    orphans = transforms_of(token)
    assert orphans, "the transform outlives a worker killed outright"
    assert runner.scratch.exists()
    half = repos.store.objects / "ab" / f".tmp-{runner.pid}-cut-off"  # a put it was writing
    half.parent.mkdir(parents=True, exist_ok=True)
    half.write_bytes(b"half an object")
    status = cdl("stack", "status", cwd=stack.settings.root)
    assert status.returncode == 1
    assert f"job {job.id[:12]}" in status.stdout and "orphaned" in status.stdout, status.stdout
    with stack.connect() as conn:
        done_before = {
            r[0]
            for r in conn.execute(
                "SELECT datum_hash FROM pipeline_datum_outputs WHERE job_id = %s", [job.id]
            )
        }
    stack.up()
    # (They sleep for a minute: gone sooner, they were killed. Any worker that starts on this
    # machine removes what dead runners left, so another test's may have done it.)
    wait_for(lambda: not transforms_of(token), "the new worker kills the orphans", 15)
    wait_for(lambda: not runner.scratch.exists(), "the new worker removes the scratch folder")
    wait_for(lambda: not half.exists(), "the new worker removes half-written objects")
    finished = wait_for(
        lambda: engine.job(job.id) if engine.job(job.id).state != "running" else None,
        "the resumed job ends",
    )
    assert finished.state == "success", finished.error
    assert [j.id for j in engine.jobs(name)] == [job.id]  # the same job, no other
    assert finished.datums_processed == 6 and finished.datums_skipped == 0
    assert len(repos.log(name)) == 1
    assert contents(repos, name) == {f"/{k}": v.upper() for k, v in files.items()}
    runs = notes.read_text().split()
    with stack.connect() as conn:
        hashes = dict(
            conn.execute(
                "SELECT inputs->>'src', datum_hash FROM pipeline_job_datums WHERE job_id = %s",
                [job.id],
            ).fetchall()
        )
    # Only datums that had not finished ran again: each finished one ran once.
    assert len(done_before) == 4
    for path, datum_hash in hashes.items():
        count = sum(run.endswith(path) for run in runs)
        assert count == (1 if datum_hash in done_before else 2), path

    # A worker stopped in order kills its transforms; the next one finishes the job.
    put(repos, source, tmp_path, {"slow3.txt": b"more"})
    job = wait_for(lambda: running_job(engine, name), "the worker starts the next job")
    wait_for(lambda: transforms_of(runner_token(stack, job.id)), "a transform runs")
    token = runner_token(stack, job.id)
    stack.supervisor.stop("pipelines")
    assert not transforms_of(token)
    assert engine.job(job.id).state == "running"
    stack.up()
    finished = wait_for(
        lambda: engine.job(job.id) if engine.job(job.id).state != "running" else None,
        "the interrupted job ends",
    )
    assert finished.state == "success", finished.error
    assert contents(repos, name)["/slow3.txt"] == b"MORE"


def test_stop_update_and_delete_end_a_running_job(stack, tmp_path):
    """`cdl data job stop` kills a hung job's transforms and commits nothing; `pipeline update`
    and `pipeline delete` stop the running job first and say so. Other pipelines' jobs run
    meanwhile (job slots), and `cdl stack status` shows the running job."""
    engine, repos = PipelineEngine(stack), DataRepos(stack)
    folder = stack.settings.root
    source, hung, quick = uid("src"), uid("hung"), uid("quick")
    repos.create_repo(source)
    put(repos, source, tmp_path, {"a.txt": b"a"})
    spec = write_spec(tmp_path / "hung", slow_spec(hung, source, tmp_path / "n1", pause=300))
    engine.create(spec)
    job = wait_for(lambda: running_job(engine, hung), "the hung job starts")
    engine.create(write_spec(tmp_path / "quick", simple_spec(quick, source)))
    done = wait_for(
        lambda: [j for j in engine.jobs(quick) if j.state != "running"],
        "another pipeline's job runs while one hangs",
    )
    assert done[0].state == "success"

    status = cdl("stack", "status", cwd=folder)
    assert status.returncode == 0, status.stdout
    assert f"job {job.id[:12]}" in status.stdout and f"{hung}: 0/1 datums" in status.stdout
    with stack.connect(autocommit=True) as conn:  # as if no datum had finished for 2 hours
        conn.execute(
            """UPDATE pipeline_jobs SET progress_at = now() - interval '2 hours',
                      datum_timeout_s = 60 WHERE id = %s""",
            [job.id],
        )
    status = cdl("stack", "status", cwd=folder)
    assert status.returncode == 1 and "stalled" in status.stdout

    token = runner_token(stack, job.id)
    stopped = cdl("data", "job", "stop", job.id[:12], cwd=folder)
    assert stopped.returncode == 0, stopped.stderr
    assert f"stopped job {job.id[:12]} of {hung}" in stopped.stdout
    job = engine.job(job.id)
    assert (job.state, job.output_commit) == ("killed", None)
    assert "cdl data job stop" in job.error
    assert not [p for p in transforms_of(token) if "sleep" in " ".join(p.cmdline())]
    assert repos.log(hung) == []
    again = cdl("data", "job", "stop", job.id[:12], cwd=folder)
    assert again.returncode == 1 and "is not running" in again.stderr
    time.sleep(2 * processes_poll())
    assert len(engine.jobs(hung)) == 1  # a killed job is not run again by itself

    # A killed job is not run again by itself; an update runs the new version, stopping the
    # running job of the old one first.
    put(repos, source, tmp_path, {"b.txt": b"b"})
    job = wait_for(lambda: running_job(engine, hung), "the next hung job starts")
    spec.write_text(spec.read_text().replace("'300'", "'0'"))
    updated = cdl("data", "pipeline", "update", "-f", str(spec), "--wait", cwd=folder)
    assert updated.returncode == 0, updated.stderr
    assert f"stopped job {job.id[:12]} of {hung}: pipeline updated to version 2" in updated.stdout
    assert engine.job(job.id).state == "killed"
    assert contents(repos, hung) == {"/a.txt": b"A", "/b.txt": b"B"}

    spec.write_text(spec.read_text().replace("'0'", "'301'"))  # a new version
    engine.create(spec, update=True)
    job = wait_for(lambda: running_job(engine, hung), "a hung job of version 3 starts")
    deleted = cdl("data", "pipeline", "delete", hung, "-y", cwd=folder)
    assert deleted.returncode == 0, deleted.stderr
    assert f"stopped job {job.id[:12]} of {hung}: pipeline {hung} was deleted" in deleted.stdout
    assert hung not in {r.name for r in repos.list_repos()}
    engine.delete(quick)


def test_job_timeout_fails_the_job_and_commits_nothing(stack, tmp_path):
    engine, repos = PipelineEngine(stack), DataRepos(stack)
    source, name = uid("src"), uid("timeout")
    repos.create_repo(source)
    put(repos, source, tmp_path, {f"{i}.txt": b"x" for i in range(4)})
    spec = slow_spec(name, source, tmp_path / "notes", pause=1, job_timeout="2s")
    engine.create(write_spec(tmp_path, spec))
    job = wait_for(
        lambda: [j for j in engine.jobs(name) if j.state != "running"], "the job ends", 30
    )[0]
    assert (job.state, job.error) == ("failure", "timed out after 2s (job_timeout)")
    assert repos.log(name) == []
    assert len((tmp_path / "notes").read_text().split()) < 4
