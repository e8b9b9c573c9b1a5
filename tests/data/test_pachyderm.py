"""The Pachyderm backend, as far as pachyderm-sdk goes without a pachd: every spec the project
ships translates to pachd's CreatePipelineRequest and back unchanged, and a pachd that cannot be
reached is a clear error."""

import re
from pathlib import Path

import pytest

from pipelines.core.errors import CDLError, Unavailable
from pipelines.core.postgres import free_port
from pipelines.data.pachyderm import PachydermRepos, request_as_dict, request_for, spec_json
from pipelines.data.spec import load_spec, parse_spec
from tests.conftest import REPO, cdl

SPECS = sorted(p for p in (REPO / "use_cases").glob("*/data/*") if p.suffix in (".json", ".yaml"))


def normalise(value):
    """Protobuf JSON writes int64 as strings and durations as '300.000s': compare numbers."""
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v) for v in value]
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)?s", value):
        return float(value[:-1])
    return value


def test_the_project_ships_specs():
    assert len(SPECS) >= 6, "the use cases' pipeline specs are missing"


@pytest.mark.parametrize("path", SPECS, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_specs_round_trip_through_the_request(path: Path):
    spec = load_spec(path)
    request = request_for(spec)
    assert request.pipeline.name == spec.name
    assert request.transform.cmd == spec.transform.cmd
    assert normalise(request_as_dict(request)) == normalise(spec_json(spec))


def test_every_input_kind_and_duration_translates():
    spec = parse_spec(
        {
            "pipeline": {"name": "joined"},
            "transform": {"cmd": ["python3", "join.py"], "env": {"MODE": "fast"}},
            "input": {
                "cross": [
                    {"pfs": {"repo": "images", "glob": "/*"}},
                    {
                        "join": [
                            {"pfs": {"repo": "a", "glob": "/(*).txt", "join_on": "$1"}},
                            {
                                "pfs": {
                                    "repo": "b",
                                    "glob": "/(*).txt",
                                    "join_on": "$1",
                                    "outer_join": True,
                                }
                            },
                        ]
                    },
                ]
            },
            "datum_timeout": "5m",
            "resource_requests": {"cpu": 2, "memory": "4G"},
        }
    )
    as_json = spec_json(spec)
    assert as_json["datum_timeout"] == "300s"
    assert as_json["datum_tries"] == 3 and as_json["parallelism_spec"] == {"constant": 1}
    assert as_json["input"]["cross"][0]["pfs"]["name"] == "images"
    request = request_for(spec)
    assert request.datum_timeout.total_seconds() == 300
    assert request.input.cross[1].join[1].pfs.outer_join is True
    assert request.resource_requests.memory == "4G"
    assert normalise(request_as_dict(request)) == normalise(as_json)


def test_unreachable_pachd_is_a_clear_error(pachyderm_stack):
    pach = PachydermRepos(pachyderm_stack(f"grpc://127.0.0.1:{free_port()}"))
    with pytest.raises(Unavailable) as err:
        pach.check()
    assert "cannot reach pachd at grpc://127.0.0.1:" in str(err.value)
    assert "pachd_address" in err.value.fix


def test_bad_pachd_address(pachyderm_stack):
    with pytest.raises(CDLError, match="pachd_address 'ftp://x'"):
        PachydermRepos(pachyderm_stack("ftp://x"))


def test_cli_on_a_pachyderm_stack(project_dir):
    address = f"grpc://127.0.0.1:{free_port()}"
    folder = project_dir(
        {"stacks": {"local": {"data": {"engine": "pachyderm", "pachd_address": address}}}}
    )
    listing = cdl("data", "repo", "list", cwd=folder)
    assert listing.returncode == 1
    [line] = listing.stderr.strip().splitlines()
    assert f"cannot reach pachd at {address}" in line
    log = cdl("data", "log", "images@master", cwd=folder)
    assert (
        log.returncode == 1
        and f"cannot reach pachd at {address} (list commits of images)" in log.stderr
    )
    local_only = cdl("data", "clean", "a", cwd=folder)
    assert local_only.returncode == 1
    assert "'cdl data clean' needs the local data engine" in local_only.stderr
    # The CLI reads the stack's engine and calls its backend: no local repos are consulted.
    put = cdl("data", "put", "images@master", str(folder / "cdl.yaml"), cwd=folder)
    assert put.returncode == 1 and f"cannot reach pachd at {address}" in put.stderr
