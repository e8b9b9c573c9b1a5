"""Pachyderm-format pipelines on the local engine: specs, datums, jobs, incrementality."""

import json
import os
import signal
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from pipelines.core import events, lineage
from pipelines.core.errors import CDLError
from pipelines.data.datums import datums, match
from pipelines.data.engine import PipelineEngine
from pipelines.data.repos import DataRepos, FileEntry, Ref
from pipelines.data.schedule import parse_cron
from pipelines.data.spec import load_spec, load_specs, parse_spec
from tests.conftest import cdl

# Copies each input file of the datum to /pfs/out under the same path, upper-cased.
UPPER = [
    'find "$src" -type f | while read -r f; do',
    '  rel="${f#/pfs/src}"; mkdir -p "/pfs/out$(dirname "$rel")"',
    '  tr a-z A-Z < "$f" > "/pfs/out$rel"',
    "done",
]


def uid(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


@pytest.fixture
def engine(shared_stack):
    return PipelineEngine(shared_stack)


@pytest.fixture
def repos(shared_stack):
    return DataRepos(shared_stack)


def write_spec(folder: Path, spec: dict, suffix: str = ".yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{spec['pipeline']['name']}{suffix}"
    path.write_text(json.dumps(spec) if suffix == ".json" else yaml.safe_dump(spec))
    return path


def simple_spec(name: str, repo: str, glob: str = "/*", stdin=None, **extra) -> dict:
    return {
        "pipeline": {"name": name},
        "transform": {"cmd": ["sh", "-e"], "stdin": stdin or UPPER},
        "input": {"pfs": {"repo": repo, "glob": glob, "name": "src"}},
        **extra,
    }


def put(repos, repo: str, tmp: Path, files: dict[str, bytes]):
    src = tmp / uuid.uuid4().hex
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    return repos.put(Ref.parse(repo), [src])[0]


def contents(repos, ref: str) -> dict[str, bytes]:
    commit = repos.resolve(ref)
    return {f.path: b"".join(repos.store.read_chunks(f.sha256)) for f in repos.files(commit)}


def settle(engine, name: str):
    """Run what is due (the stack's worker may take some of it) and return the newest job."""
    engine.run_pending()
    return engine.jobs(name, limit=1)[0]


@pytest.fixture
def source(repos):
    name = uid("src")
    repos.create_repo(name)
    return name


# -- specs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        ({"transform": {"cmdd": ["x"]}}, "transform.cmdd: unknown field"),
        ({"colour": "blue"}, "colour: unknown field"),
        ({"transform": {"cmd": ["x"], "errCmdd": []}}, "transform.errCmdd: unknown field"),
        ({"parallelismSpec": {"constant": 0}}, "parallelismSpec.constant"),
        ({"reprocessSpec": "sometimes"}, "reprocessSpec: Input should be 'until_success'"),
        ({"input": {"pfs": {"repo": "r", "glob": "/[a*"}}}, "unclosed '\\['"),
        ({"input": {"pfs": {"repo": "r", "glob": "/{a,b}"}}}, "use a union"),
        ({"input": {"pfs": {"repo": "r", "glob": "/"}, "union": []}}, "exactly one of pfs"),
        ({"input": {"cross": []}}, "'cross' needs at least one input"),
        ({"input": {"pfs": {"repo": "out", "glob": "/"}}}, "no input can be named 'out'"),
        (
            {"input": {"group": [{"pfs": {"repo": "a", "glob": "/*", "joinOn": "$1"}}]}},
            "every input of a group is a pfs input with 'group_by'",
        ),
        ({"input": {"cron": {"name": "t", "spec": "@sometimes"}}}, "input.cron.spec: unknown"),
        ({"input": {"cron": {"name": "t", "spec": "61 * * * *"}}}, "minute '61' is outside"),
        ({"spout": {}}, "a spout pipeline .* has no 'input'"),
        ({"input": None}, "'input' is missing"),
        (
            {
                "input": {
                    "cross": [
                        {"pfs": {"repo": "r", "glob": "/"}},
                        {"pfs": {"repo": "r", "glob": "/*"}},
                    ]
                }
            },
            "repeated: r",
        ),
        (  # the inputs of a union may share a name, but not with an input crossed with it
            {
                "input": {
                    "cross": [
                        {
                            "union": [
                                {"pfs": {"repo": "a", "glob": "/", "name": "x"}},
                                {"pfs": {"repo": "b", "glob": "/", "name": "x"}},
                            ]
                        },
                        {"pfs": {"repo": "c", "glob": "/", "name": "x"}},
                    ]
                }
            },
            "repeated: x",
        ),
        (
            {
                "input": {
                    "join": [
                        {"pfs": {"repo": "a", "glob": "/"}},
                        {"pfs": {"repo": "b", "glob": "/"}},
                    ]
                }
            },
            "with 'join_on'",
        ),
        ({"datum_timeout": "soon"}, "is not like '30s'"),
        ({"pipeline": {"name": "bad name"}}, "pipeline.name"),
        ({"parallelism_spec": {"constant": 0}}, "parallelism_spec.constant"),
        ({"transform": {"cmd": []}}, "transform.cmd"),
        ({"input": {"pfs": {"repo": "p", "glob": "/"}}}, "cannot read its own output"),
    ],
)
def test_spec_errors_name_the_field(change, message):
    spec = {
        "pipeline": {"name": "p"},
        "transform": {"cmd": ["true"]},
        "input": {"pfs": {"repo": "r", "glob": "/*"}},
    }
    spec.update(change)
    with pytest.raises(CDLError, match=message):
        parse_spec(spec, "spec.yaml")


def test_camel_and_snake_case_make_one_spec():
    snake = {
        "pipeline": {"name": "p"},
        "transform": {"cmd": ["true"], "accept_return_code": [3], "image_pull_secrets": ["k"]},
        "input": {
            "join": [
                {"pfs": {"repo": "a", "glob": "(*)", "join_on": "$1", "outer_join": True}},
                {"pfs": {"repo": "b", "glob": "/(*)", "join_on": "$1", "empty_files": True}},
            ]
        },
        "parallelism_spec": {"constant": 2},
        "datum_tries": 1,
        "output_branch": "out",
        "resource_requests": {"cpu": 1, "memory": "1G"},
        "datum_set_spec": {"size_bytes": 1000},
    }
    camel = {
        "pipeline": {"name": "p"},
        "transform": {"cmd": ["true"], "acceptReturnCode": [3], "imagePullSecrets": ["k"]},
        "input": {
            "join": [
                {"pfs": {"repo": "a", "glob": "/(*)", "joinOn": "$1", "outerJoin": True}},
                {"pfs": {"repo": "b", "glob": "(*)", "joinOn": "$1", "emptyFiles": True}},
            ]
        },
        "parallelismSpec": {"constant": 2},
        "datumTries": 1,
        "outputBranch": "out",
        "resourceRequests": {"cpu": 1, "memory": "1G"},
        "datumSetSpec": {"sizeBytes": 1000},
    }
    one, other = parse_spec(snake), parse_spec(camel)
    assert one.canonical() == other.canonical()
    assert one.version_hash() == other.version_hash()
    # Pachyderm reads '(*)' as '/(*)'; the engine gets the leading-slash form.
    assert [leaf.glob for leaf in one.leaves()] == ["/(*)", "/(*)"]
    assert one.transform.accept_return_code == [3] and one.parallelism_spec.constant == 2
    assert one.ignored_locally() == [
        "resource_requests",
        "datum_set_spec",
        "transform.image_pull_secrets",
        "pfs.empty_files",
    ]


def test_spec_files_json_and_yaml(tmp_path):
    spec = simple_spec(
        "p", "r", description="d", datum_tries=1, resource_requests={"cpu": 1}, pod_patch="[]"
    )
    for suffix in (".json", ".yaml"):
        loaded = load_spec(write_spec(tmp_path / suffix[1:], spec, suffix))
        assert loaded.name == "p" and loaded.datum_tries == 1
        assert loaded.input.pfs.input_name == "src"
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(CDLError, match="broken.json: not valid json"):
        load_spec(broken)


def test_several_specs_in_one_file(tmp_path):
    first, second = simple_spec("first", "r"), simple_spec("second", "first")
    stream = tmp_path / "dag.json"  # as pachctl reads it: JSON objects one after another
    stream.write_text(json.dumps(first, indent=2) + "\n" + json.dumps(second) + json.dumps(second))
    with pytest.raises(CDLError, match="pipeline second is specified more than once"):
        load_specs(stream)
    stream.write_text(json.dumps(first, indent=2) + "\n\n" + json.dumps(second))
    assert [s.name for s in load_specs(stream)] == ["first", "second"]
    with pytest.raises(CDLError, match="holds 2 pipeline specs where one is expected"):
        load_spec(stream)
    docs = tmp_path / "dag.yaml"
    docs.write_text(yaml.safe_dump_all([first, {**second, "datumTriez": 2}], explicit_start=True))
    with pytest.raises(CDLError, match=r"dag.yaml \(spec 2 of 2\): datumTriez: unknown field"):
        load_specs(docs)
    docs.write_text(yaml.safe_dump_all([first, second]) + "---\n")
    assert [s.name for s in load_specs(docs)] == ["first", "second"]
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    with pytest.raises(CDLError, match="holds no pipeline spec"):
        load_specs(tmp_path / "empty.yaml")


@pytest.mark.parametrize(
    "spec, after, expected",
    [
        ("@every 10s", "2024-05-01T10:00:00.5Z", "2024-05-01T10:00:10Z"),
        ("@every 1h30m", "2024-05-01T10:00:00Z", "2024-05-01T11:30:00Z"),
        ("*/15 * * * *", "2024-05-01T10:07:00Z", "2024-05-01T10:15:00Z"),
        ("0 9 * * MON-FRI", "2024-05-03T09:00:00Z", "2024-05-06T09:00:00Z"),  # Fri to Mon
        ("@monthly", "2024-12-15T00:00:00Z", "2025-01-01T00:00:00Z"),
        ("30 2 29 2 *", "2023-03-01T00:00:00Z", "2024-02-29T02:30:00Z"),
        ("0 0 13 * FRI", "2024-09-01T00:00:00Z", "2024-09-06T00:00:00Z"),  # either day field
        ("TZ=Europe/Paris 0 9 * * *", "2024-07-01T00:00:00Z", "2024-07-01T07:00:00Z"),
    ],
)
def test_cron_schedules(spec, after, expected):
    def at(text):
        return datetime.fromisoformat(text.replace("Z", "+00:00"))

    assert parse_cron(spec).next(at(after)) == at(expected)


# -- datums ----------------------------------------------------------------------------------


def entries(*paths):
    return [FileEntry(p, "0" * 64, 1) for p in paths]


@pytest.mark.parametrize(
    "glob, expected",
    [
        ("/", {"/": 4}),
        ("/*", {"/a": 2, "/b": 1, "/top.txt": 1}),
        ("/*/*", {"/a/1.txt": 1, "/a/2.csv": 1, "/b/3.txt": 1}),
        ("/*/*.txt", {"/a/1.txt": 1, "/b/3.txt": 1}),
        ("/[ab]", {"/a": 2, "/b": 1}),
        ("/**.txt", {"/a/1.txt": 1, "/b/3.txt": 1, "/top.txt": 1}),
        ("/nothing/*", {}),
    ],
)
def test_glob_matching(glob, expected):
    files = entries("/a/1.txt", "/a/2.csv", "/b/3.txt", "/top.txt")
    assert {k: len(v) for k, v in match(glob, files).items()} == expected


def datums_of(spec_input: dict, files: dict[str, list[str]]) -> list[dict[str, str]]:
    """The datums of an input over repos holding `files` (repo: paths), described."""
    spec = parse_spec(
        {"pipeline": {"name": "p"}, "transform": {"cmd": ["true"]}, "input": spec_input}
    )
    commits = {f"{repo}@master": repo for repo in files}
    return [d.describe() for d in datums(spec.input, commits, lambda c: entries(*files[c]))]


def test_group_datums():
    files = {
        "sales": ["/jan-eu.csv", "/feb-eu.csv", "/jan-us.csv"],
        "rates": ["/eu.txt", "/us.txt", "/asia.txt"],
    }
    group = {
        "group": [
            {"pfs": {"repo": "sales", "glob": "/*-(*).csv", "groupBy": "$1"}},
            {"pfs": {"repo": "rates", "glob": "/(*).txt", "group_by": "$1"}},
        ]
    }
    # One datum per key, holding every match of every input with that key.
    assert datums_of(group, files) == [
        {"rates": "/asia.txt"},
        {"sales": "/feb-eu.csv, /jan-eu.csv", "rates": "/eu.txt"},
        {"sales": "/jan-us.csv", "rates": "/us.txt"},
    ]


def test_union_inputs_may_share_a_name():
    union = {
        "union": [
            {"pfs": {"repo": "a", "glob": "/*", "name": "in"}},
            {"pfs": {"repo": "b", "glob": "*", "name": "in"}},
        ]
    }
    assert datums_of(union, {"a": ["/1"], "b": ["/2", "/3"]}) == [
        {"in": "/1"},
        {"in": "/2"},
        {"in": "/3"},
    ]


# -- jobs ------------------------------------------------------------------------------------


def test_pipeline_runs_commits_output_with_provenance_and_lineage(
    engine, repos, source, tmp_path, conn
):
    first = put(repos, source, tmp_path, {"a/1.txt": b"one", "a/2.txt": b"two", "b/3.txt": b"x"})
    name = uid("up")
    engine.create(write_spec(tmp_path / "specs", simple_spec(name, source)))
    job = settle(engine, name)
    assert (job.state, job.datums_total, job.datums_processed) == ("success", 2, 2)
    assert contents(repos, name) == {"/a/1.txt": b"ONE", "/a/2.txt": b"TWO", "/b/3.txt": b"X"}
    output = repos.resolve(name)
    assert output.origin == "pipeline" and output.id == job.output_commit
    assert [c.id for c in repos.provenance(output)] == [first.id]
    tree = lineage.tree(conn, output.lineage_id)
    assert tree.children[0].id == job.lineage_id
    assert tree.children[0].children[0].id == first.lineage_id
    finished = [
        e for e in events.recent(conn, 50, ["data.job.finished"]) if e.payload.get("job") == job.id
    ]
    assert finished and finished[0].payload["state"] == "success"


def test_incremental_jobs_run_only_new_or_changed_datums(engine, repos, source, tmp_path):
    put(repos, source, tmp_path, {f"d{i}/f.txt": f"file {i}".encode() for i in range(5)})
    name = uid("inc")
    spec_path = write_spec(tmp_path / "specs", simple_spec(name, source))
    engine.create(spec_path)
    assert settle(engine, name).datums_processed == 5

    put(repos, source, tmp_path, {"d5/f.txt": b"new", "d0/f.txt": b"changed"})
    job = settle(engine, name)
    assert (job.datums_total, job.datums_processed, job.datums_skipped) == (6, 2, 4)
    assert contents(repos, name)["/d0/f.txt"] == b"CHANGED"
    assert len(contents(repos, name)) == 6

    # An update that changes nothing runs nothing; --reprocess runs every datum again.
    assert engine.create(spec_path, update=True)["version"] == 2
    assert engine.pending() == [] or name not in engine.pending()
    engine.create(spec_path, update=True, reprocess=True)
    job = settle(engine, name)
    assert (job.datums_processed, job.datums_skipped) == (6, 0)


def test_changed_code_file_makes_a_new_version(engine, repos, source, tmp_path):
    put(repos, source, tmp_path, {"a.txt": b"a", "b.txt": b"b"})
    name = uid("code")
    folder = tmp_path / "specs"
    folder.mkdir()
    # Code gets /pfs paths as arguments: they are rewritten in cmd and stdin, not inside files.
    (folder / "step.sh").write_text('cp "$1" "$2/"\n')
    spec = simple_spec(name, source, stdin=['sh step.sh "$src" /pfs/out'])
    path = write_spec(folder, spec)
    engine.create(path)
    job = settle(engine, name)
    assert job.datums_processed == 2, job.error
    (folder / "step.sh").write_text('tr a-z A-Z < "$1" > "$2/$(basename "$1")"\n')
    engine.create(path, update=True)
    job = settle(engine, name)
    assert job.datums_processed == 2
    assert contents(repos, name) == {"/a.txt": b"A", "/b.txt": b"B"}


def test_failing_datum_is_retried_then_fails_the_job(engine, repos, source, tmp_path):
    put(repos, source, tmp_path, {"good.txt": b"fine", "bad.txt": b"boom"})
    attempts = tmp_path / "attempts.log"
    stdin = [
        f'echo try >> "{attempts}"',
        'if grep -q boom "$src"; then echo "cannot parse $(basename $src)" >&2; exit 3; fi',
        'cp "$src" /pfs/out/',
    ]
    name = uid("fail")
    engine.create(write_spec(tmp_path, simple_spec(name, source, stdin=stdin, datum_tries=2)))
    job = settle(engine, name)
    assert job.state == "failure" and job.output_commit is None
    assert '{"src": "/bad.txt"} failed after 2 attempt(s): exit code 3' in job.error
    assert "cannot parse bad.txt" in job.error
    assert attempts.read_text().count("try") == 3  # good once, bad twice
    [failed] = engine.job_datums(job.id, "failed")
    assert "cannot parse bad.txt" in failed["log"] and failed["attempts"] == 2
    with pytest.raises(CDLError, match="has no commits yet"):
        repos.resolve(name)
    # The same inputs are not retried forever; a new commit is.
    assert name not in engine.pending()
    put(repos, source, tmp_path, {"bad.txt": b"fixed"})
    job = settle(engine, name)
    assert job.state == "success" and job.datums_skipped == 1


def test_datums_run_in_parallel(engine, repos, source, tmp_path):
    put(repos, source, tmp_path, {f"{i}.txt": b"x" for i in range(4)})
    spans = tmp_path / "spans"
    stdin = [
        f'echo "start $(date +%s.%N)" >> "{spans}"',
        "sleep 0.5",
        f'echo "end $(date +%s.%N)" >> "{spans}"',
        'cp "$src" /pfs/out/',
    ]
    name = uid("par")
    engine.create(
        write_spec(
            tmp_path, simple_spec(name, source, stdin=stdin, parallelism_spec={"constant": 4})
        )
    )
    assert settle(engine, name).datums_processed == 4
    marks = sorted(
        (float(t), kind) for kind, t in (line.split() for line in spans.read_text().splitlines())
    )
    running = peak = 0
    for _, kind in marks:
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    assert peak >= 2


def test_pfs_paths_are_rewritten_in_cmd_env_and_stdin(engine, repos, source, tmp_path):
    put(repos, source, tmp_path, {"in.txt": b"data"})
    name = uid("pfs")
    spec = {
        "pipeline": {"name": name},
        "transform": {
            "cmd": ["sh", "-c", 'cp /pfs/src/in.txt "$TARGET" && sh', "ignored"],
            "env": {"TARGET": "/pfs/out/copied.txt"},
            "stdin": ['echo "$src" | sed "s|.*/pfs/|/pfs/|" > /pfs/out/where.txt'],
        },
        "input": {"pfs": {"repo": source, "glob": "/", "name": "src"}},
    }
    engine.create(write_spec(tmp_path, spec))
    assert settle(engine, name).state == "success"
    out = contents(repos, name)
    assert out["/copied.txt"] == b"data"
    # The input's variable points at its local mount, a private folder ending in /pfs/src.
    where = out["/where.txt"].decode()
    assert where.endswith("/pfs/src\n") and not where.startswith("/pfs/")


def test_cross_union_and_join(engine, repos, tmp_path):
    left, right = uid("left"), uid("right")
    repos.create_repo(left)
    repos.create_repo(right)
    put(repos, left, tmp_path, {"1.txt": b"L1", "2.txt": b"L2", "3.txt": b"L3"})
    put(repos, right, tmp_path, {"1.txt": b"R1", "2.txt": b"R2"})
    both = 'cat "$l" "$r" > "/pfs/out/$(basename "$l")-$(basename "$r")"'
    either = (
        'for f in "${l:-}" "${r:-}"; do [ -n "$f" ] && '
        'cp "$f" "/pfs/out/$(basename $(dirname $f))-$(basename $f)"; done; true'
    )

    def pipeline(kind, command, left_extra=None, right_extra=None):
        name = uid(kind)
        leaves = [
            {"pfs": {"repo": left, "glob": "/*", "name": "l", **(left_extra or {})}},
            {"pfs": {"repo": right, "glob": "/*", "name": "r", **(right_extra or {})}},
        ]
        spec = {
            "pipeline": {"name": name},
            "transform": {"cmd": ["sh"], "stdin": [command]},
            "input": {kind: leaves},
        }
        engine.create(write_spec(tmp_path / kind, spec))
        assert settle(engine, name).state == "success"
        return contents(repos, name)

    assert len(pipeline("cross", both)) == 6
    assert pipeline(
        "join", both, {"glob": "/(*).txt", "join_on": "$1"}, {"glob": "/(*).txt", "join_on": "$1"}
    ) == {"/1.txt-1.txt": b"L1R1", "/2.txt-2.txt": b"L2R2"}
    outer = pipeline(
        "join",
        either,
        {"glob": "/(*).txt", "join_on": "$1", "outer_join": True},
        {"glob": "/(*).txt", "join_on": "$1"},
    )
    assert "/l-3.txt" in outer and len(outer) == 5
    assert len(pipeline("union", either)) == 5


def test_datum_timeout(engine, repos, source, tmp_path):
    put(repos, source, tmp_path, {"slow.txt": b"x"})
    name = uid("slow")
    engine.create(
        write_spec(
            tmp_path,
            simple_spec(name, source, stdin=["sleep 30"], datum_timeout="1s", datum_tries=1),
        )
    )
    job = settle(engine, name)
    assert job.state == "failure" and "timed out after 1s (datum_timeout)" in job.error


def test_stack_default_datum_timeout_bounds_a_hung_datum(project_factory, tmp_path):
    """A spec without datum_timeout gets the stack's (data.datum_timeout, default 1h)."""
    stack = project_factory(environ={"CDL_DATA__DATUM_TIMEOUT": "1s"})
    stack.up()
    engine, repos = PipelineEngine(stack), DataRepos(stack)
    repos.create_repo("in")
    put(repos, "in", tmp_path, {"hang.txt": b"x"})
    engine.create(
        write_spec(tmp_path, simple_spec("hang", "in", stdin=["sleep 60"], datum_tries=1))
    )
    started = time.monotonic()
    job = settle(engine, "hang")
    assert job.state == "failure" and "timed out after 1s (datum_timeout)" in job.error
    assert time.monotonic() - started < 30


def test_two_datums_writing_one_path_fail_the_job(engine, repos, source, tmp_path):
    put(repos, source, tmp_path, {"a.txt": b"a", "b.txt": b"b"})
    name = uid("clash")
    engine.create(
        write_spec(tmp_path, simple_spec(name, source, stdin=['cp "$src" /pfs/out/same.txt']))
    )
    job = settle(engine, name)
    assert job.state == "failure" and "both wrote /same.txt" in job.error


def test_missing_command_and_input_repo(engine, repos, source, tmp_path):
    put(repos, source, tmp_path, {"a.txt": b"a"})
    name = uid("nocmd")
    spec = simple_spec(name, source)
    spec["transform"] = {"cmd": ["no-such-tool-anywhere"]}
    engine.create(write_spec(tmp_path, spec))
    job = settle(engine, name)
    assert "cannot run 'no-such-tool-anywhere'" in job.error
    with pytest.raises(CDLError, match="no repo 'missing-repo'"):
        engine.create(write_spec(tmp_path / "x", simple_spec(uid("p"), "missing-repo")))
    with pytest.raises(CDLError, match="already exists"):
        engine.create(write_spec(tmp_path / "y", simple_spec(name, source)))


def test_chained_pipelines(engine, repos, source, tmp_path):
    put(repos, source, tmp_path, {"x/a.txt": b"abc"})
    first, second = uid("first"), uid("second")
    engine.create(write_spec(tmp_path, simple_spec(first, source)))
    engine.create(
        write_spec(
            tmp_path,
            simple_spec(
                second,
                first,
                stdin=[
                    'for f in $(find "$src" -type f); do rev < "$f" > "/pfs/out/${f##*/}"; done'
                ],
            ),
        )
    )
    engine.run_pending()
    assert contents(repos, second) == {"/a.txt": b"CBA"}
    put(repos, source, tmp_path, {"x/b.txt": b"def"})
    engine.run_pending()
    assert [j.state for j in engine.jobs(first)] == ["success", "success"]
    assert contents(repos, second) == {"/a.txt": b"CBA", "/b.txt": b"FED"}


def test_cron_ticks_trigger_jobs(engine, repos, tmp_path):
    name = uid("cron")
    # A start the worker's clock does not reach during the test: the ticks are the test's.
    start = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=1)
    spec = {
        "pipeline": {"name": name},
        "transform": {"cmd": ["sh", "-c", "ls /pfs/tick > /pfs/out/$(ls /pfs/tick)"]},
        "input": {"cron": {"name": "tick", "spec": "@every 10m", "start": start.isoformat()}},
    }
    engine.create(write_spec(tmp_path, spec))
    assert f"{name}_tick" in {r.name for r in repos.list_repos()}

    def tick(minutes: int, expect_one: bool = False) -> list[str]:
        # The stack's worker checks the same cron every second, under the tick's lock: a tick
        # due now may have to wait for that check to end.
        for _ in range(50):
            when = start + timedelta(minutes=minutes)
            ticks = [c.ref for c in engine.commit_due_ticks(when, name)]
            if ticks or not expect_one:
                return ticks
            time.sleep(0.1)
        return []

    assert tick(5) == []
    first, second = (start + timedelta(minutes=m) for m in (10, 20))
    # A worker that was down commits the missed ticks one by one; ticks accumulate.
    assert len(tick(25, expect_one=True)) == 1 and len(tick(25, expect_one=True)) == 1
    assert tick(25) == []
    stamps = [t.strftime("%Y-%m-%dT%H:%M:%SZ") for t in (first, second)]
    assert contents(repos, f"{name}_tick") == {f"/{s}": b"" for s in stamps}
    job = settle(engine, name)
    assert (job.state, job.datums_total) == ("success", 2), job.error
    assert contents(repos, name) == {f"/{s}": f"{s}\n".encode() for s in stamps}
    engine.delete(name)
    assert f"{name}_tick" not in {r.name for r in repos.list_repos()}


def test_service_pipelines_need_a_cluster(engine, tmp_path):
    spec = simple_spec(uid("svc"), "r", service={"internalPort": 8888, "externalPort": 30888})
    with pytest.raises(CDLError, match="is a service"):
        engine.create(write_spec(tmp_path, spec))


def test_stack_worker_runs_jobs_in_the_background(engine, repos, source, tmp_path):
    put(repos, source, tmp_path, {"w.txt": b"worker"})
    name = uid("bg")
    engine.create(write_spec(tmp_path, simple_spec(name, source)))
    deadline = time.monotonic() + 30
    while not engine.jobs(name) or engine.jobs(name)[0].state == "running":
        assert time.monotonic() < deadline, "the worker did not run the job"
        time.sleep(0.2)
    assert engine.jobs(name)[0].state == "success"
    assert contents(repos, name) == {"/w.txt": b"WORKER"}


def test_cli(shared_stack, repos, source, tmp_path):
    folder = shared_stack.settings.root
    src = tmp_path / "files"
    src.mkdir()
    (src / "hello.txt").write_text("hello")
    name, other = uid("cli"), uid("cli")
    spec = tmp_path / "specs.yaml"  # two pipelines in one file: both are created, in order
    spec.write_text(
        yaml.safe_dump_all(
            [simple_spec(name, source), simple_spec(other, source, podPatch="[]")],
            explicit_start=True,
        )
    )
    created = cdl("data", "pipeline", "create", "-f", str(spec), cwd=folder)
    assert created.returncode == 0, created.stderr
    assert f"created pipeline {name} " in created.stdout
    assert f"created pipeline {other} " in created.stdout
    assert "cluster-only, ignored here: pod_patch" in created.stdout
    put_result = cdl("data", "put", source, str(src), "--wait", cwd=folder)
    assert put_result.returncode == 0, put_result.stderr
    assert cdl("data", "get", f"{name}:/hello.txt", cwd=folder).stdout == "HELLO"
    listing = cdl("data", "pipeline", "list", cwd=folder)
    assert name in listing.stdout and "success" in listing.stdout
    job_id = PipelineEngine(shared_stack).jobs(name)[0].id
    assert job_id[:12] in cdl("data", "job", "list", "-p", name, cwd=folder).stdout
    assert "input" in cdl("data", "job", "inspect", job_id[:10], cwd=folder).stdout
    prov = cdl("data", "provenance", name, cwd=folder)
    assert source in prov.stdout and job_id in prov.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**simple_spec(uid("b"), source), "paralelism": 2}))
    refused = cdl("data", "pipeline", "create", "-f", str(bad), cwd=folder)
    assert refused.returncode == 1 and "paralelism: unknown field" in refused.stderr
    deleted = cdl("data", "pipeline", "delete", name, "-y", cwd=folder)
    assert deleted.returncode == 0, deleted.stderr
    assert name not in cdl("data", "repo", "list", cwd=folder).stdout
    assert os.path.exists(spec)


def test_wait_reports_every_triggered_job_whoever_ran_it(shared_stack, engine, repos, tmp_path):
    """`put --wait` and `cdl data job wait` report each job the commit triggered, downstream
    included, and exit 1 naming a failed one, also when the worker ran it, not the command."""
    folder = shared_stack.settings.root
    source, upper, broken = uid("src"), uid("upper"), uid("broken")
    repos.create_repo(source)
    engine.create(write_spec(tmp_path, simple_spec(upper, source)))
    failing = {**simple_spec(broken, upper), "transform": {"cmd": ["sh", "-c", "exit 3"]}}
    engine.create(write_spec(tmp_path, {**failing, "datum_tries": 1}))
    commit = put(repos, source, tmp_path / "one", {"a.txt": b"a"})
    engine.run_pending()  # as the stack's worker would: the command runs nothing itself
    waited = cdl("data", "job", "wait", f"{source}@{commit.id}", cwd=folder)
    assert waited.returncode == 1
    assert f"of {upper}: success" in waited.stdout and f"of {broken}: failure" in waited.stdout
    [failed] = [j for j in engine.jobs(broken)]
    assert f"job {failed.id[:12]} of pipeline {broken} failed" in waited.stderr
    assert f"cdl data job logs {failed.id[:12]} --failed" in waited.stderr
    src = tmp_path / "two"
    src.mkdir()
    (src / "b.txt").write_text("b")
    put_wait = cdl("data", "put", source, str(src), "--wait", cwd=folder)  # the worker races it
    assert put_wait.returncode == 1, put_wait.stdout
    assert f"of pipeline {broken} failed" in put_wait.stderr
    for name in (broken, upper):
        engine.delete(name)


def test_worker_outlives_a_postgres_restart(project_factory, tmp_path):
    """The postmaster killed under the stack's pipeline worker: the worker keeps retrying, and
    once `cdl stack up` has Postgres back, the same worker process runs the next job."""
    stack = project_factory()
    stack.up()
    worker = stack.supervisor.pid("pipelines")
    os.kill(stack.postgres.running_pid(), signal.SIGKILL)
    time.sleep(4)  # the worker's reconnects are refused meanwhile
    assert stack.supervisor.pid("pipelines") == worker
    stack.up()
    assert stack.supervisor.pid("pipelines") == worker  # not restarted: it lived through it
    engine, repos = PipelineEngine(stack), DataRepos(stack)
    repos.create_repo("in")
    engine.create(write_spec(tmp_path, simple_spec("up", "in")))
    put(repos, "in", tmp_path, {"x.txt": b"x"})
    deadline = time.monotonic() + 60
    while not engine.jobs("up") or engine.jobs("up")[0].state == "running":
        assert time.monotonic() < deadline, "the worker ran no job after the restart"
        time.sleep(0.5)
    assert engine.jobs("up")[0].state == "success"
    log = (stack.settings.home / "logs" / "pipelines.log").read_text()
    assert "database connection lost" in log


# -- datum batching --------------------------------------------------------------------------

# A batching transform: started once per worker, one call of `step` per datum. Each call notes
# its pid and datum; "boom" in a file raises (fails the datum), "die" kills the process the first
# time (a marker file remembers), "slow" sleeps past any datum_timeout.
BATCHED = """
import os, sys, time
from pathlib import Path
from pipelines.data.batching import batch_all_datums

def step(src, out):
    with open(os.environ["NOTES"], "a") as notes:
        notes.write(f"{os.getpid()} {os.environ['src']}\\n")
    print("datum", os.path.basename(os.environ["src"]))
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if b"boom" in data:
            raise ValueError(f"cannot parse {path.name}")
        if b"die" in data and not (src.parents[1] / "died").exists():
            (src.parents[1] / "died").touch()
            os._exit(9)
        if b"slow" in data:
            time.sleep(30)
        (out / path.name).write_bytes(data.upper())

if __name__ == "__main__":
    batch_all_datums(step)(Path(sys.argv[1]), Path(sys.argv[2]))
"""


def batched_pipeline(engine, source, tmp_path, **extra) -> tuple[str, Path]:
    """A batching pipeline running BATCHED; returns its name and the notes file it writes."""
    folder = tmp_path / uuid.uuid4().hex[:8]
    folder.mkdir()
    (folder / "step.py").write_text(BATCHED)
    notes = folder / "notes.txt"
    name = uid("batch")
    spec = {
        "pipeline": {"name": name},
        "transform": {
            "cmd": ["python3", "step.py", "/pfs/src", "/pfs/out"],
            "env": {"NOTES": str(notes)},
            "datum_batching": True,
        },
        "input": {"pfs": {"repo": source, "glob": "/*", "name": "src"}},
        **extra,
    }
    engine.create(write_spec(folder, spec))
    return name, notes


def noted(notes: Path) -> list[tuple[str, str]]:
    """(pid, datum path) of each call, in order."""
    return [tuple(line.split()) for line in notes.read_text().splitlines()]


def test_batching_runs_one_process_per_worker_and_stays_incremental(
    engine, repos, source, tmp_path
):
    put(repos, source, tmp_path, {f"{i:02d}.txt": f"file {i}".encode() for i in range(30)})
    name, notes = batched_pipeline(engine, source, tmp_path, parallelism_spec={"constant": 2})
    job = settle(engine, name)
    assert (job.state, job.datums_processed) == ("success", 30), job.error
    assert contents(repos, name) == {f"/{i:02d}.txt": f"FILE {i}".encode() for i in range(30)}
    calls = noted(notes)
    assert sorted(path.rsplit("/", 1)[1] for _, path in calls) == [
        f"{i:02d}.txt" for i in range(30)
    ]
    pids = {pid for pid, _ in calls}
    assert len(pids) == 2  # one process per worker, not one per datum
    for pid in pids:  # each worker mounts every datum at the same /pfs paths
        assert len({path.rsplit("/", 1)[0] for p, path in calls if p == pid}) == 1
    # Each datum's log is its own output.
    logs = {d["inputs"]["src"]: d["log"] for d in engine.job_datums(job.id)}
    assert logs["/07.txt"].strip() == "datum 07.txt"

    put(repos, source, tmp_path, {"30.txt": b"new", "00.txt": b"changed"})
    job = settle(engine, name)
    assert (job.datums_total, job.datums_processed, job.datums_skipped) == (31, 2, 29)
    assert sorted(path.rsplit("/", 1)[1] for _, path in noted(notes)[30:]) == ["00.txt", "30.txt"]
    assert contents(repos, name)["/00.txt"] == b"CHANGED"


def test_batching_retries_a_failing_datum_then_fails_the_job(
    engine, repos, source, tmp_path, shared_stack
):
    files = {f"good{i}.txt": b"fine" for i in range(5)}
    put(repos, source, tmp_path, {**files, "bad.txt": b"boom"})
    name, notes = batched_pipeline(engine, source, tmp_path, datum_tries=2)
    job = settle(engine, name)
    assert job.state == "failure" and job.output_commit is None
    assert job.datums_processed == 5 and job.datums_failed == 1
    assert (
        '{"src": "/bad.txt"} failed after 2 attempt(s): ValueError: cannot parse bad.txt'
        in job.error
    )
    calls = noted(notes)
    assert [path.endswith("/bad.txt") for _, path in calls].count(True) == 2
    assert len({pid for pid, _ in calls}) == 1  # a reported error does not stop the process
    [failed] = engine.job_datums(job.id, "failed")
    assert failed["attempts"] == 2 and "ValueError: cannot parse bad.txt" in failed["log"]
    logs = cdl("data", "job", "logs", job.id, "--failed", cwd=shared_stack.settings.root)
    assert "cannot parse bad.txt" in logs.stdout and "good" not in logs.stdout
    put(repos, source, tmp_path, {"bad.txt": b"fixed"})
    job = settle(engine, name)
    assert (job.state, job.datums_processed, job.datums_skipped) == ("success", 1, 5)


def test_batching_restarts_a_process_that_dies(engine, repos, source, tmp_path):
    put(repos, source, tmp_path, {f"{c}.txt": c.encode() for c in "abcdef"} | {"c.txt": b"die"})
    name, notes = batched_pipeline(engine, source, tmp_path, datum_tries=2)
    job = settle(engine, name)
    assert (job.state, job.datums_processed) == ("success", 6), job.error
    assert contents(repos, name)["/c.txt"] == b"DIE"
    # c's first attempt killed the process; a new one took c again and the rest.
    assert len({pid for pid, _ in noted(notes)}) == 2
    attempts = {d["inputs"]["src"]: d["attempts"] for d in engine.job_datums(job.id)}
    assert attempts["/c.txt"] == 2 and attempts["/a.txt"] == attempts["/f.txt"] == 1


def test_batching_datum_timeout_kills_and_restarts(engine, repos, source, tmp_path):
    put(repos, source, tmp_path, {"a.txt": b"quick", "b.txt": b"slow", "c.txt": b"quick"})
    name, notes = batched_pipeline(engine, source, tmp_path, datum_tries=1, datum_timeout="3s")
    job = settle(engine, name)
    assert job.state == "failure" and "timed out after 3s (datum_timeout)" in job.error
    assert (job.datums_processed, job.datums_failed) == (2, 1)
    assert len({pid for pid, _ in noted(notes)}) == 2


def test_batching_runs_code_that_does_not_ask_once_per_datum(engine, repos, source, tmp_path):
    put(repos, source, tmp_path, {"a.txt": b"a", "b/c.txt": b"c"})
    name = uid("plain")
    spec = simple_spec(name, source)
    spec["transform"]["datum_batching"] = True
    engine.create(write_spec(tmp_path, spec))
    assert settle(engine, name).state == "success"
    assert contents(repos, name) == {"/a.txt": b"A", "/b/c.txt": b"C"}
    # Batching changes how datums reach the code, not its outputs: turning it off reruns nothing.
    spec["transform"]["datum_batching"] = False
    assert engine.create(write_spec(tmp_path, spec), update=True)["version"] == 2
    assert name not in engine.pending()


def test_batching_helper_outside_an_engine_runs_the_mounted_datum_once(monkeypatch):
    from pipelines.data import batching

    monkeypatch.delenv(batching.SOCKET_ENV, raising=False)
    monkeypatch.delenv(batching.PACHYDERM_ENV, raising=False)
    monkeypatch.setitem(batching._state, "served", False)
    calls = []
    batching.batch_all_datums(lambda x: calls.append(x))(1)
    assert calls == [1] and batching.next_datum() is None
