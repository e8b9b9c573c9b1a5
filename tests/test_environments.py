"""The environments `make setup` creates work, and the supervisor runs a service from one."""

import subprocess

import httpx
import pytest

from pipelines.core.config import load_settings
from pipelines.core.postgres import free_port
from pipelines.core.services import ServiceSpec, Supervisor
from tests.conftest import REPO

VENVS = load_settings(REPO / "cdl.yaml", environ={}).venvs


def python_in(venv: str, code: str) -> str:
    result = subprocess.run(
        [str(VENVS / venv / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_label_studio_environment():
    version = python_in(
        "label-studio", "import importlib.metadata as m; print(m.version('label-studio'))"
    )
    assert version.startswith("1.23.")
    assert (VENVS / "label-studio" / "bin" / "label-studio").exists()


def test_serving_environment_keeps_its_old_pins_apart():
    versions = python_in(
        "serving",
        "import importlib.metadata as m; "
        "print(m.version('seldon-core'), m.version('protobuf'), m.version('numpy'))",
    )
    seldon, protobuf, numpy = versions.split()
    assert seldon == "1.18.2"
    assert int(protobuf.split(".")[0]) < 4 and int(numpy.split(".")[0]) < 2


def test_determined_environment_keeps_its_requests_pin_apart():
    versions = python_in(
        "determined",
        "import importlib.metadata as m; "
        "print(m.version('determined'), m.version('requests'), m.version('torch'))",
    )
    determined, requests, torch = versions.split()
    assert determined == "0.38.1" and torch.startswith("2.13.0")
    assert tuple(int(n) for n in requests.split(".")[:2]) < (2, 32)


@pytest.fixture
def supervisor(tmp_path):
    sup = Supervisor(tmp_path / "home")
    yield sup
    for name in sup.names():
        sup.stop(name)


def test_supervisor_runs_a_seldon_microservice_from_the_serving_venv(supervisor, tmp_path):
    (tmp_path / "Doubler.py").write_text(
        "class Doubler:\n    def predict(self, X, features_names=None):\n        return X * 2\n"
    )
    http, grpc, metrics = free_port(), free_port(), free_port()
    spec = ServiceSpec(
        name="doubler",
        argv=[
            str(VENVS / "serving" / "bin" / "seldon-core-microservice"),
            "Doubler",
            "--service-type",
            "MODEL",
            "--http-port",
            str(http),
            "--grpc-port",
            str(grpc),
            "--metrics-port",
            str(metrics),
            "--workers",
            "1",
            "--threads",
            "1",
        ],
        cwd=tmp_path,
        health_url=f"http://127.0.0.1:{http}/health/ping",
        address=f"http://127.0.0.1:{http}",
        start_timeout_s=60,
    )
    status = supervisor.start(spec)
    assert status.healthy
    reply = httpx.post(
        f"http://127.0.0.1:{http}/api/v1.0/predictions",
        json={"data": {"ndarray": [[1.5, 2.0]]}},
        timeout=10,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["data"]["ndarray"] == [[3.0, 4.0]]
    assert supervisor.stop("doubler")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{http}/health/ping", timeout=2)
