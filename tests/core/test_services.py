"""The supervisor with real detached processes."""

import json
import os
import sys
import time

import psutil
import pytest

from pipelines.core.errors import StackError
from pipelines.core.postgres import free_port
from pipelines.core.services import ServiceSpec, Supervisor


@pytest.fixture
def supervisor(tmp_path):
    sup = Supervisor(tmp_path)
    yield sup
    for name in sup.names():
        sup.stop(name)


def http_service(port: int, name: str = "web") -> ServiceSpec:
    return ServiceSpec(
        name=name,
        argv=[sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        health_url=f"http://127.0.0.1:{port}/",
        address=f"http://127.0.0.1:{port}",
        start_timeout_s=20,
    )


def test_start_status_stop(supervisor):
    port = free_port()
    status = supervisor.start(http_service(port))
    assert status.healthy and status.address == f"http://127.0.0.1:{port}"
    assert psutil.Process(status.pid).is_running()
    # Detached: its own session, so it survives the command that started it.
    assert os.getsid(status.pid) == status.pid
    assert supervisor.start(http_service(port)).pid == status.pid  # already running: kept
    assert supervisor.names() == ["web"]
    assert supervisor.stop("web") is True
    assert not psutil.pid_exists(status.pid) or psutil.Process(status.pid).status() == "zombie"
    assert supervisor.status("web").state == "stopped"
    assert supervisor.stop("web") is False


def test_log_file_collects_output(supervisor, tmp_path):
    spec = ServiceSpec(
        name="talker",
        argv=[
            sys.executable,
            "-c",
            "import sys, time; print('hello from the service', flush=True); time.sleep(60)",
        ],
    )
    supervisor.start(spec)
    deadline = time.monotonic() + 10
    while "hello from the service" not in supervisor.log_path("talker").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert supervisor.log_path("talker") == tmp_path / "logs" / "talker.log"


def test_service_that_dies_at_start_reports_its_log(supervisor):
    spec = ServiceSpec(
        name="broken",
        argv=[sys.executable, "-c", "import sys; print('missing setting FOO'); sys.exit(3)"],
        health_url=f"http://127.0.0.1:{free_port()}/",
    )
    with pytest.raises(StackError) as err:
        supervisor.start(spec)
    assert "broken exited with code 3 while starting" in str(err.value)
    assert "missing setting FOO" in str(err.value)
    assert supervisor.status("broken").state == "stopped"


def test_health_timeout_kills_the_process(supervisor):
    spec = ServiceSpec(
        name="silent",
        argv=[sys.executable, "-c", "import time; time.sleep(60)"],
        health_url=f"http://127.0.0.1:{free_port()}/",
        start_timeout_s=1,
    )
    with pytest.raises(StackError, match="was not healthy at .* within 1 s"):
        supervisor.start(spec)
    assert supervisor.names() == []
    assert not [
        p
        for p in psutil.process_iter(["cmdline"])
        if p.info["cmdline"]
        and "time.sleep(60)" in " ".join(p.info["cmdline"])
        and p.status() != "zombie"
    ]


def test_missing_executable(supervisor, tmp_path):
    spec = ServiceSpec(name="ghost", argv=[str(tmp_path / "venv/bin/ghost")])
    with pytest.raises(StackError, match="cannot start ghost") as err:
        supervisor.start(spec)
    assert "make setup" in err.value.fix


def test_recycled_pid_in_state_file_counts_as_stopped(supervisor, tmp_path):
    (tmp_path / "run").mkdir()
    me = psutil.Process()
    (tmp_path / "run" / "old.json").write_text(
        json.dumps({"pid": me.pid, "create_time": me.create_time() - 1000, "health_url": None})
    )
    assert supervisor.status("old").state == "stopped"
    assert supervisor.stop("old") is False  # and it does not kill us
    assert supervisor.names() == []


def test_stop_kills_the_whole_process_group(supervisor):
    spec = ServiceSpec(
        name="parent",
        argv=[
            sys.executable,
            "-c",
            "import subprocess, time; subprocess.Popen(['sleep', '120']); time.sleep(120)",
        ],
    )
    status = supervisor.start(spec)
    deadline = time.monotonic() + 10
    while not psutil.Process(status.pid).children():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = psutil.Process(status.pid).children()[0]
    supervisor.stop("parent")
    child_gone = not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    assert child_gone


def test_unhealthy_service_is_reported(supervisor):
    port = free_port()
    status = supervisor.start(http_service(port))
    psutil.Process(status.pid).suspend()  # alive but not answering
    try:
        assert supervisor.status("web").state == "unhealthy"
    finally:
        psutil.Process(status.pid).resume()
