"""Specs written for Pachyderm, not for CDL: tests/data/pachyderm_specs holds shapes from
Pachyderm's documentation and examples (every input kind and a spout, snake_case and camelCase,
JSON streams and YAML documents, cluster-only fields). Each parses, and translates to pachd's
CreatePipelineRequest and back unchanged; those whose transform runs here (sh, python3) run on
the local engine, on small inputs, and give the expected output."""

import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipelines.data.engine import PipelineEngine
from pipelines.data.pachyderm import request_as_dict, request_for, spec_json
from pipelines.data.repos import DataRepos
from pipelines.data.spec import INPUT_KINDS, load_specs
from tests.conftest import REPO
from tests.data.test_pachyderm import normalise
from tests.data.test_pipelines import contents, put

CORPUS = REPO / "tests" / "data" / "pachyderm_specs"
FILES = sorted(p for p in CORPUS.iterdir() if p.suffix in (".json", ".yaml"))
TICK = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def test_the_corpus_covers_what_pachyderm_specs_use():
    specs = {path: load_specs(path) for path in FILES}
    every = [spec for found in specs.values() for spec in found]
    assert len(every) >= 30
    kinds = {
        kind
        for spec in every
        for node in (spec.input.walk() if spec.input else [])
        for kind in INPUT_KINDS
        if getattr(node, kind) is not None
    }
    assert kinds == set(INPUT_KINDS) and any(spec.spout for spec in every)
    several = {path.suffix for path, found in specs.items() if len(found) > 1}
    assert several == {".json", ".yaml"}  # JSON streams and YAML documents
    text = "".join(path.read_text() for path in FILES)
    assert "parallelismSpec" in text and "parallelism_spec" in text


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_corpus_specs_round_trip_through_the_request(path: Path):
    for spec in load_specs(path):
        request = request_for(spec)
        assert request.pipeline.name == spec.name
        assert normalise(request_as_dict(request)) == normalise(spec_json(spec))


@dataclass
class Run:
    put: dict[str, dict[str, bytes]]  # repo: {path: bytes}, committed before the specs
    expect: dict[str, dict[str, bytes | re.Pattern]]  # output repo: its files, exactly
    extra: dict[str, int] = field(default_factory=dict)  # repo: the least number of commits


RUNS = {
    "word_count.json": Run(
        {"wc-docs": {"a.txt": b"the cat the hat\n", "b.txt": b"the end\n"}},
        {"wc-reduce": {"/the": b"3\n", "/cat": b"1\n", "/hat": b"1\n", "/end": b"1\n"}},
    ),
    "join_calibration.yaml": Run(
        {
            "jn-readings": {"dev1/s1.txt": b"1 2 3", "dev1/s2.txt": b"10", "dev2/s3.txt": b"5"},
            "jn-calibration": {"s1.txt": b"0.5", "s2.txt": b"-1", "s4.txt": b"9"},
        },
        {"jn-calibrated": {"/s1.txt": b"1.5 2.5 3.5\n", "/s2.txt": b"9\n"}},
    ),
    "group_sales.yaml": Run(
        {"gb-sales": {"jan-eu.csv": b"1\n", "feb-eu.csv": b"2\n", "jan-us.csv": b"5\n"}},
        {"gb-regional-totals": {"/eu": b"3\n", "/us": b"5\n"}},
    ),
    "union_logs.yaml": Run(
        {"un-east": {"east-1.log": b"e1"}, "un-west": {"west-1.log": b"w1", "west-2.log": b"w2"}},
        {"un-all-logs": {"/east-1.log": b"e1", "/west-1.log": b"w1", "/west-2.log": b"w2"}},
    ),
    # With overwrite, each tick commit holds only the newest tick, so each job has one datum.
    "cron_tick.json": Run(
        {},
        {
            "tick-tock_tick": {"/latest-tick": TICK},
            "tick-tock": {"/latest": re.compile(TICK.pattern + "\n")},
        },
        {"tick-tock_tick": 2},
    ),
    "spout_events.yaml": Run(
        {},
        {
            "sp-events": {
                "/pid": re.compile(r"\d+\n"),
                **{f"/event-{i}.txt": f"event {i}\n".encode() for i in (1, 2, 3)},
            }
        },
    ),
}


@pytest.fixture(scope="module")
def timers(shared_stack):
    """Cron ticks and spouts, as the worker runs them (the stack's worker may take some)."""
    stop = threading.Event()
    engine = PipelineEngine(shared_stack)
    thread = threading.Thread(target=engine.serve_timers, args=(stop, print), daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(timeout=30)


def matches(found: dict[str, bytes], expected: dict) -> bool:
    if "/latest-tick" in expected:  # a tick repo: one file, named by the tick time
        return len(found) == 1 and all(TICK.fullmatch(path[1:]) for path in found)
    if set(found) != set(expected):
        return False
    return all(
        want.fullmatch(found[path].decode())
        if isinstance(want, re.Pattern)
        else found[path] == want
        for path, want in expected.items()
    )


@pytest.mark.parametrize("file_name", RUNS)
def test_runnable_corpus_specs_run_locally(file_name, shared_stack, timers, tmp_path):
    run, engine, repos = RUNS[file_name], PipelineEngine(shared_stack), DataRepos(shared_stack)
    for repo, files in run.put.items():
        repos.create_repo(repo)
        put(repos, repo, tmp_path, files)
    specs = load_specs(CORPUS / file_name)
    try:
        for spec in specs:
            engine.create(CORPUS / file_name, spec=spec)
        deadline = time.monotonic() + 60
        while True:
            engine.run_pending()
            found = {repo: contents(repos, repo) if repos.log(repo) else {} for repo in run.expect}
            done = all(matches(found[repo], expected) for repo, expected in run.expect.items())
            if done and all(len(repos.log(r)) >= n for r, n in run.extra.items()):
                break
            assert time.monotonic() < deadline, f"{file_name}: got {found}"
            time.sleep(0.3)
    finally:
        for spec in reversed(specs):
            engine.delete(spec.name)
    if "sp-events" in run.expect:  # deleting the spout stopped its process
        pid = int(found["sp-events"]["/pid"])
        deadline = time.monotonic() + 15
        while pid_alive(pid):
            assert time.monotonic() < deadline, "the spout's process still runs"
            time.sleep(0.2)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
