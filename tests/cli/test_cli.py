"""The `cdl` command line as a user runs it, in a subprocess (help: tests/cli/test_help.py)."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, cdl, destroy, make_project, stack_for


def test_version():
    result = cdl("--version", cwd=REPO)
    assert result.returncode == 0 and result.stdout.startswith("cdl 0.")


def test_unknown_command_is_a_usage_error():
    result = cdl("stak", "up", cwd=REPO)
    assert result.returncode == 2
    assert "No such command 'stak'" in result.stderr


def test_stack_up_status_down_through_the_cli(project_dir):
    folder = project_dir()
    try:
        up = cdl("stack", "up", cwd=folder)
        assert up.returncode == 0, up.stderr
        assert "initialised Postgres cluster" in up.stdout
        status = cdl("stack", "status", cwd=folder)
        assert status.returncode == 0, status.stdout
        assert status.stdout.count("healthy") == 3
        again = cdl("stack", "up", cwd=folder)
        assert again.returncode == 0 and "initialised" not in again.stdout
    finally:
        down = cdl("stack", "down", cwd=folder)
    assert down.returncode == 0 and "stopped: events, pipelines, postgres" in down.stdout
    after = cdl("stack", "status", cwd=folder)
    assert after.returncode == 1 and "stopped" in after.stdout


def test_occupied_port_is_a_one_line_error(project_dir):
    folder = project_dir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = cdl("stack", "up", cwd=folder, env={"CDL_POSTGRES__PORT": str(port)})
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert f"port {port} on 127.0.0.1 (postgres.port) is in use" in line
    assert "fix: set postgres.port / CDL_POSTGRES__PORT to a free port" in line


def test_unreachable_dsn_is_a_one_line_error(project_dir):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder = project_dir({"stacks": {"local": {}}})
    result = cdl(
        "stack",
        "up",
        cwd=folder,
        env={"CDL_POSTGRES__DSN": f"postgresql://cdl:pw@127.0.0.1:{port}/cdl"},
    )
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert (
        f"cannot reach Postgres at 127.0.0.1:{port}" in line and "fix: check postgres.dsn" in line
    )


def test_commands_needing_the_database_say_to_start_the_stack(project_dir):
    folder = project_dir()
    result = cdl("events", "tail", cwd=folder)
    assert result.returncode == 1
    assert "run 'cdl stack up'" in result.stderr


def test_demo_runs_the_bbc_news_data_labeling_and_model_loop(project_dir):
    folder = project_dir()
    try:
        result = cdl("demo", "--docs", "40", cwd=folder, timeout=600)
        assert result.returncode == 0, result.stderr
        out = result.stdout
        assert "CDL demo" in out and out.count("healthy") == 5
        assert "bbc-clean: job" in out and "success" in out
        assert "validation: 41 valid, 2 quarantined" in out  # the latin-1 one is cleaned
        assert "41 new task(s), 0 already there" in out  # 40 articles + the latin-1 one
        assert "annotated 41 task(s)" in out
        assert "snapshot bbc_news/demo-" in out and "label_snapshot bbc_news/demo-" in out
        # The model pipeline on that snapshot: search, register, gate, approve, lineage.
        assert "experiment 1: ASHA over 4 trials" in out
        assert "registered bbc-news/1 from experiment 1" in out
        assert "passed: candidate" in out and "approved bbc-news/1: champion" in out
        assert "champion bbc-news/1" in out and "model_version bbc-news/1" in out
        again = cdl("demo", "--docs", "40", cwd=folder, timeout=600)
        assert again.returncode == 0, again.stderr
        rerun = again.stdout
        assert "0 new task(s), 41 already there" in rerun
        assert "0 datums run" in rerun and "0 new row(s) loaded" in rerun
        assert "the labels are unchanged since, reused" in rerun
        assert "experiment 1 already searched this snapshot, reused" in rerun
        assert "bbc-news/1 was registered from experiment 1, reused" in rerun
        assert "champion bbc-news/1" in rerun and "approved bbc-news" not in rerun
    finally:
        cdl("stack", "down", cwd=folder)


@pytest.fixture(scope="module")
def killed_stack():
    """A stack whose postmaster was SIGKILLed under `cdl events wait` (a command that holds its
    connection while it waits); yields the stack and what that command printed."""
    stack = stack_for(make_project())
    stack.up()
    waiter = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli.main", "events", "wait", "never.happens"],
        cwd=stack.settings.root,
        env={k: v for k, v in os.environ.items() if not k.startswith("CDL_")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        with stack.connect(autocommit=True) as conn:
            while not conn.execute(  # it is following the log on its connection
                """SELECT 1 FROM pg_stat_activity
                   WHERE pid <> pg_backend_pid() AND query LIKE '%FROM events WHERE id >%'"""
            ).fetchone():
                assert waiter.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
            os.kill(stack.postgres.running_pid(), signal.SIGKILL)
        out, err = waiter.communicate(timeout=30)
        yield stack, waiter.returncode, err
    finally:
        waiter.kill()
        destroy(stack)


def assert_one_line_error(returncode: int, stderr: str, problem: str) -> None:
    assert returncode == 1 and "Traceback" not in stderr, stderr
    [line] = stderr.strip().splitlines()
    assert line.startswith(f"error: {problem}") and "(fix: " in line, line


def test_command_whose_postgres_dies_under_it_is_a_one_line_error(killed_stack):
    _, returncode, stderr = killed_stack
    problem = "lost the connection to the platform database"
    assert_one_line_error(returncode, stderr, problem)
    assert "run 'cdl stack up' if it is down" in stderr


@pytest.mark.parametrize(
    "command",
    [
        ["data", "pipeline", "list"],
        ["data", "put", "raw", "cdl.yaml"],
        ["events", "tail"],
        ["label", "snapshot", "list", "bbc_news"],
        ["lineage", "show", "dataset_commit:raw@1"],
    ],
    ids=" ".join,
)
def test_commands_right_after_a_postgres_kill_are_one_line_errors(killed_stack, command):
    stack = killed_stack[0]
    result = cdl(*command, cwd=stack.settings.root)
    assert_one_line_error(result.returncode, result.stderr, "cannot reach the platform database")
    assert "(fix: run 'cdl stack up')" in result.stderr
