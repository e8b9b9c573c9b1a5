"""The embedded Postgres is its owner's alone, and a project anywhere gets one.

Every connection needs the generated password, over TCP and the unix socket, from any OS user;
a cluster an older CDL made with trust is tightened by the next `stack up`. As root, a project in
a folder the postgres user cannot enter gets its cluster under /var/lib/cdl, and `cdl stack down
--purge` (what `make clean` runs) deletes it there.
"""

import json
import os
import shutil
import stat
import subprocess
import time

import psycopg
import pytest

from pipelines.core.errors import StackError
from pipelines.core.postgres import CLUSTERS, SYSTEM_USER, find_server_binaries
from tests.conftest import cdl
from tests.core.test_stack import markers, put_marker

AS_ROOT = os.geteuid() == 0
root_only = pytest.mark.skipif(not AS_ROOT, reason="only root runs Postgres as another user")


def psql(stack, host, password=None, user="cdl", as_user=None) -> subprocess.CompletedProcess:
    """psql with a clean environment (no ~/.pgpass, no PG* variables), never prompting."""
    argv = ["env", "-i", "PGPASSFILE=/nonexistent", "PGCONNECT_TIMEOUT=5"]
    if password is not None:
        argv.append(f"PGPASSWORD={password}")
    argv += [find_server_binaries() / "psql", "-w", "-At", "-h", host, "-p", stack.postgres.port]
    argv += ["-U", user, "-d", "cdl", "-c", "SELECT current_user"]
    if as_user:
        argv = ["runuser", "-u", as_user, "--", *argv]
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd="/")


def server_uid() -> int:
    """The OS user Postgres runs as."""
    return int(subprocess.check_output(["id", "-u", SYSTEM_USER])) if AS_ROOT else os.geteuid()


def hosts(stack) -> dict[str, str]:
    return {"socket": str(stack.postgres.socket_dir), "tcp": "127.0.0.1"}


@pytest.mark.parametrize("via", ["socket", "tcp"])
def test_every_connection_needs_the_password(shared_stack, via):
    host = hosts(shared_stack)[via]
    password = shared_stack.postgres.password
    none = psql(shared_stack, host)
    assert none.returncode != 0 and "no password supplied" in none.stderr
    wrong = psql(shared_stack, host, password="not-" + password)
    assert wrong.returncode != 0 and "password authentication failed" in wrong.stderr
    right = psql(shared_stack, host, password=password)
    assert right.returncode == 0 and right.stdout.strip() == "cdl", right.stderr
    # The label roles are NOLOGIN: reached by SET ROLE on a password-checked connection only.
    role = psql(shared_stack, host, password=password, user="cdl_scientist")
    assert role.returncode != 0 and "cdl_scientist" in role.stderr


def test_no_trust_and_a_private_socket_folder(shared_stack):
    with shared_stack.connect() as conn:
        methods = {r[0] for r in conn.execute("SELECT auth_method FROM pg_hba_file_rules")}
        assert methods == {"scram-sha-256"}
        conn.execute("SET ROLE cdl_evaluator")
        conn.execute("SELECT count(*) FROM labels_test")  # the roles still work through it
    info = shared_stack.postgres.socket_dir.stat()
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == server_uid()


@root_only
def test_another_os_user_needs_the_password_too(shared_stack):
    socket, tcp = hosts(shared_stack).values()
    password = shared_stack.postgres.password
    # The socket folder does not let them in at all, password or not.
    for attempt in (None, password):
        through_socket = psql(shared_stack, socket, attempt, as_user="nobody")
        assert through_socket.returncode != 0 and "Permission denied" in through_socket.stderr
    assert "no password supplied" in psql(shared_stack, tcp, as_user="nobody").stderr
    wrong = psql(shared_stack, tcp, "not-" + password, as_user="nobody")
    assert "password authentication failed" in wrong.stderr
    right = psql(shared_stack, tcp, password, as_user="nobody")
    assert right.returncode == 0 and right.stdout.strip() == "cdl", right.stderr


def old_cdl_layout(stack) -> None:
    """Make the stopped cluster look like one an older CDL made: in the project (as root too,
    where the postgres user had to be able to enter it), with no record of its location."""
    pg = stack.postgres
    if pg.cluster == pg.root:
        return
    cluster = pg.cluster
    for part in ("data", "run"):
        shutil.move(cluster / part, pg.root / part)
    shutil.rmtree(cluster)
    pg.state_file.write_text(json.dumps({"port": pg.port}))
    for folder in (pg.root, pg.home, stack.settings.root, stack.settings.root.parent):
        folder.chmod(0o755)
    os.chown(pg.root, server_uid(), -1)


def trust_everyone(stack) -> None:
    """What an older CDL wrote: local connections trusted, a socket folder anyone may enter."""
    (stack.postgres.data / "pg_hba.conf").write_text(
        "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
    )
    stack.postgres.socket_dir.chmod(0o777)


def wait_for(check, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_up_tightens_a_cluster_an_older_cdl_made_with_trust(project_factory):
    stack = project_factory()
    stack.up()
    put_marker(stack, "kept")
    stack.down()
    old_cdl_layout(stack)
    stack.postgres.start()
    trust_everyone(stack)
    with psycopg.connect(stack.dsn(), autocommit=True) as conn:
        conn.execute("SELECT pg_reload_conf()")
    socket = str(stack.postgres.socket_dir)
    outsider = "nobody" if AS_ROOT else None
    assert wait_for(lambda: psql(stack, socket, as_user=outsider).returncode == 0)  # the hole

    # Running: `up` rewrites pg_hba.conf, reloads, and closes the socket folder.
    done = stack.up()
    assert not any("initialised" in line for line in done)
    refused = psql(stack, socket, as_user=outsider)
    assert refused.returncode != 0, refused.stdout
    assert stat.S_IMODE(stack.postgres.socket_dir.stat().st_mode) == 0o700
    assert "no password supplied" in psql(stack, socket).stderr
    assert markers(stack) == ["kept"]

    # Stopped: the next start writes the rules before the server accepts anyone.
    stack.down()
    trust_everyone(stack)
    stack.up()
    assert "no password supplied" in psql(stack, socket).stderr
    assert stat.S_IMODE(stack.postgres.socket_dir.stat().st_mode) == 0o700
    assert markers(stack) == ["kept"]


def test_project_in_a_private_folder_gets_a_cluster_and_purge_removes_it(project_factory):
    stack = project_factory()
    private = stack.settings.root.parent
    private.chmod(0o700)
    stack.up()
    put_marker(stack, "private")
    pg = stack.postgres
    cluster = pg.cluster
    if AS_ROOT:  # out of the project, in a folder of its own that only postgres may enter
        assert cluster.parent == CLUSTERS and private not in cluster.parents
        assert stat.S_IMODE(cluster.stat().st_mode) == 0o700
        assert cluster.stat().st_uid == server_uid()
        assert json.loads(pg.state_file.read_text())["cluster"] == str(cluster)
    else:
        assert cluster == stack.settings.home / "postgres"

    stack.down()
    stack.up()
    assert pg.cluster == cluster and markers(stack) == ["private"]

    folder = stack.settings.root
    purged = cdl("stack", "down", "--purge", cwd=folder)
    assert purged.returncode == 0, purged.stderr
    assert "stopped: events, pipelines, postgres" in purged.stdout
    assert f"removed the Postgres cluster in {cluster}" in purged.stdout.replace("\n", "")
    assert not cluster.exists() and not pg.root.exists()
    again = cdl("stack", "down", "--purge", cwd=folder)
    assert again.returncode == 0 and "no embedded Postgres cluster to remove" in again.stdout
    # A new start makes a new, empty cluster.
    stack.up()
    with stack.connect() as conn:
        assert conn.execute("SELECT to_regclass('marker')").fetchone() == (None,)


def test_purge_deletes_only_a_cdl_cluster_folder(project_factory, tmp_path):
    stack = project_factory()
    keep = tmp_path / "not-a-cluster"
    keep.mkdir()
    stack.postgres.root.mkdir(parents=True)
    stack.postgres.state_file.write_text(json.dumps({"cluster": str(keep)}))
    with pytest.raises(StackError) as err:
        stack.purge()
    assert f"names {keep} as the Postgres cluster" in str(err.value)
    assert keep.exists()
    stack.postgres.state_file.unlink()  # so that the fixture can clean up
