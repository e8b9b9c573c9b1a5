"""The embedded stack against a real Postgres: lifecycle and the ways it can go wrong."""

import os
import signal
import socket
import subprocess
import time

import psutil
import psycopg
import pytest

from pipelines.core import migrations
from pipelines.core.errors import StackError
from pipelines.core.postgres import MAX_SOCKET_DIR_LEN, port_is_free


def wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while psutil.pid_exists(pid) and time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.05)


def put_marker(stack, value: str) -> None:
    with stack.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS marker (v text)")
        conn.execute("INSERT INTO marker VALUES (%s)", [value])


def markers(stack) -> list[str]:
    with stack.connect() as conn:
        return [r[0] for r in conn.execute("SELECT v FROM marker ORDER BY v")]


def test_up_creates_cluster_databases_schema_and_dispatcher(project_factory):
    stack = project_factory()
    done = stack.up()
    assert any("initialised Postgres cluster" in line for line in done)
    assert any("created databases: cdl, mlflow, label_studio, optuna" in line for line in done)
    rows = {r.service: r for r in stack.status()}
    assert rows["postgres"].healthy and rows["postgres"].pid
    assert rows["postgres"].address.startswith("127.0.0.1:")
    assert rows["events"].healthy and psutil.pid_exists(rows["events"].pid)
    assert rows["pipelines"].healthy and psutil.pid_exists(rows["pipelines"].pid)
    with stack.connect() as conn:
        dbs = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
        assert {"cdl", "mlflow", "label_studio", "optuna"} <= dbs
    assert migrations.applied_versions(stack.dsn()) == [m.version for m in migrations.discover()]
    # The unix socket is there too, for psql and friends.
    assert any(p.name.startswith(".s.PGSQL.") for p in stack.postgres.socket_dir.iterdir())
    # The password stays out of sight of other users.
    assert stack.postgres.password_file.stat().st_mode & 0o077 == 0


def test_up_twice_is_a_no_op_and_keeps_the_port(project_factory):
    stack = project_factory()
    stack.up()
    first = {r.service: (r.pid, r.address) for r in stack.status()}
    assert stack.up() == []
    assert {r.service: (r.pid, r.address) for r in stack.status()} == first


def test_down_then_up_keeps_data_and_migrations_apply_once(project_factory):
    stack = project_factory()
    stack.up()
    put_marker(stack, "kept")
    assert set(stack.down()) == {"events", "pipelines", "postgres"}
    assert {r.service: r.health for r in stack.status()} == {
        "postgres": "stopped",
        "events": "stopped",
        "pipelines": "stopped",
    }
    assert stack.down() == []
    done = stack.up()
    assert not any("migrations" in line or "initialised" in line for line in done)
    assert markers(stack) == ["kept"]


def test_stale_pid_file_with_a_recycled_pid(project_factory):
    stack = project_factory()
    stack.up()
    stack.down()
    # A postmaster.pid left behind whose pid now belongs to some other live process.
    other = subprocess.Popen(["sleep", "60"])
    try:
        pid_file = stack.postgres.data / "postmaster.pid"
        pid_file.write_text(f"{other.pid}\n{stack.postgres.data}\n")
        assert stack.postgres.running_pid() is None
        stack.up()
        assert stack.postgres.running_pid() not in (None, other.pid)
    finally:
        other.kill()
        other.wait()


def test_crashed_postmaster_recovers_with_data(project_factory):
    stack = project_factory()
    stack.up()
    put_marker(stack, "before crash")
    pid = stack.postgres.running_pid()
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    assert stack.status()[0].health == "stopped"
    stack.up()
    assert stack.status()[0].healthy
    assert markers(stack) == ["before crash"]


def test_fixed_port_taken_is_a_clear_error(project_factory):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        stack = project_factory(environ={"CDL_POSTGRES__PORT": str(port)})
        with pytest.raises(StackError) as err:
            stack.up()
    assert f"port {port} on 127.0.0.1 (postgres.port) is in use" in str(err.value)
    assert "CDL_POSTGRES__PORT" in err.value.fix
    assert stack.postgres.running_pid() is None


def test_remembered_port_taken_moves_to_a_free_one(project_factory):
    stack = project_factory()
    stack.up()
    old_port = stack.postgres.port
    stack.down()
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", old_port))
        busy.listen()
        stack.up()
        assert stack.postgres.port != old_port
        assert stack.status()[0].healthy


def test_home_on_a_path_with_spaces(project_factory):
    stack = project_factory(name="my project (copy)")
    stack.up()
    assert " " in str(stack.settings.home)  # and in the cluster's path unless run as root
    assert stack.status()[0].healthy
    put_marker(stack, "spaces ok")
    assert markers(stack) == ["spaces ok"]


def test_deep_home_gets_a_short_socket_folder(project_factory):
    deep = {"stacks": {"local": {"home": "/".join(["deep-folder-name"] * 8)}}}
    stack = project_factory(deep)
    stack.up()
    socket_dir = stack.postgres.socket_dir
    assert len(str(socket_dir)) <= MAX_SOCKET_DIR_LEN
    if os.geteuid() != 0:  # as root the cluster, socket included, is under /var/lib/cdl anyway
        assert socket_dir.parent.as_posix() == "/tmp"
    assert any(p.name.startswith(".s.PGSQL.") for p in socket_dir.iterdir())
    assert stack.status()[0].healthy
    stack.purge()
    assert not socket_dir.exists()


def test_interrupted_initdb_is_redone(project_factory):
    stack = project_factory()
    stack.postgres.init()
    # initdb writes to a staging folder; a crash leaves it half-written and no data folder.
    leftover = stack.postgres.cluster / "data.initdb"
    stack.postgres.data.rename(leftover)
    (leftover / "half-written").write_text("x")
    assert not stack.postgres.initialized
    assert any("initialised Postgres cluster" in line for line in stack.up())
    assert not leftover.exists()
    assert stack.status()[0].healthy


def test_external_dsn_is_used_as_is(shared_stack, project_factory):
    databases = {
        "platform": "ext_cdl",
        "mlflow": "ext_mlflow",
        "label_studio": "ext_ls",
        "search": "ext_optuna",
    }
    config = {
        "stacks": {
            "local": {"postgres": {"dsn": shared_stack.dsn("postgres"), "databases": databases}}
        }
    }
    stack = project_factory(config)
    done = stack.up()
    assert "created databases: ext_cdl, ext_mlflow, ext_ls, ext_optuna" in done
    assert not (stack.settings.home / "postgres").exists()  # no initdb
    assert stack.status()[0].service == "postgres (external)" and stack.status()[0].healthy
    assert migrations.applied_versions(stack.dsn()) == [m.version for m in migrations.discover()]
    stack.down()  # stops the dispatcher, leaves the external server alone
    with psycopg.connect(shared_stack.dsn()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_unreachable_external_dsn(project_factory):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert port_is_free(port)
    stack = project_factory(
        {
            "stacks": {
                "local": {"postgres": {"dsn": f"postgresql://cdl:hunter2@127.0.0.1:{port}/cdl"}}
            }
        }
    )
    with pytest.raises(StackError) as err:
        stack.up()
    message = str(err.value)
    assert f"cannot reach Postgres at 127.0.0.1:{port}" in message
    assert "hunter2" not in message and "***" in message
    assert "CDL_POSTGRES__DSN" in err.value.fix


def test_external_dsn_must_be_a_url(project_factory):
    with pytest.raises(StackError, match="must be a postgresql:// URL"):
        project_factory({"stacks": {"local": {"postgres": {"dsn": "host=x dbname=y"}}}})


def test_two_stacks_side_by_side(project_factory):
    one, two = project_factory(), project_factory()
    one.up()
    two.up()
    assert one.postgres.port != two.postgres.port
    put_marker(one, "one")
    put_marker(two, "two")
    assert markers(one) == ["one"] and markers(two) == ["two"]
