"""Versioned data repos against the real Postgres and object store, bad inputs included."""

import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from pathlib import Path

import pytest

from pipelines.core import events, lineage
from pipelines.core.errors import CDLError
from pipelines.data.backend import Entry, Ref
from pipelines.data.repos import DataRepos
from tests.conftest import cdl


@pytest.fixture
def repos(shared_stack):
    return DataRepos(shared_stack)


@pytest.fixture
def repo(repos):
    name = f"r{uuid.uuid4().hex[:10]}"
    repos.create_repo(name, "test data")
    return name


def tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def listing(repos, ref) -> dict[str, int]:
    return {f.path: f.size for f in repos.files(repos.resolve(ref))}


def test_put_commit_list_get(repos, repo, tmp_path):
    src = tree(tmp_path / "src", {"a/1.txt": b"one", "a/2.txt": b"two", "b/1.txt": b"one"})
    commit, scan = repos.put(Ref.parse(repo), [src], message="first")
    assert scan.skipped == []
    assert (commit.state, commit.file_count, commit.size_bytes) == ("finished", 3, 9)
    assert commit.message == "first" and commit.parent is None
    assert listing(repos, repo) == {"/a/1.txt": 3, "/a/2.txt": 3, "/b/1.txt": 3}
    shas = {f.path: f.sha256 for f in repos.files(commit)}
    assert shas["/a/1.txt"] == shas["/b/1.txt"]  # identical bytes, one object
    assert repos.store.path(shas["/a/1.txt"]).read_bytes() == b"one"
    assert repos.listing(commit) == [Entry("a", "dir", 6, 2), Entry("b", "dir", 3, 1)]
    out = tmp_path / "out"
    assert repos.get(commit, "/a", out) == 2
    assert (out / "2.txt").read_bytes() == b"two"
    with pytest.raises(CDLError, match="has no file or folder /nope"):
        repos.get(commit, "/nope", out)


def test_second_put_carries_files_and_diff_shows_changes(repos, repo, tmp_path):
    first, _ = repos.put(Ref.parse(repo), [tree(tmp_path / "v1", {"x": b"1", "y": b"2"})])
    second, _ = repos.put(
        Ref.parse(f"{repo}@master"), [tree(tmp_path / "v2", {"x": b"9", "z": b"3"})]
    )
    assert second.parent == first.id
    assert listing(repos, repo) == {"/x": 1, "/y": 1, "/z": 1}
    assert repos.resolve(f"{repo}@master^").id == first.id
    assert repos.resolve(f"{repo}@{first.id[:8]}").id == first.id
    changes = list(repos.diff(first, second))
    assert changes == [("modified", "/x", 1, 1), ("added", "/z", None, 1)]
    back = list(repos.diff(second, first))
    assert ("removed", "/z", 1, None) in back
    assert [c.id for c in repos.log(repo, "master")] == [second.id, first.id]


def test_put_under_a_destination_folder_and_single_files(repos, repo, tmp_path):
    src = tree(tmp_path, {"one.csv": b"a,b\n", "dir/two.csv": b"c\n"})
    repos.put(Ref.parse(repo), [src / "one.csv", src / "dir"], dest="tables/2026")
    assert listing(repos, repo) == {"/tables/2026/one.csv": 4, "/tables/2026/two.csv": 2}


def test_branches(repos, repo, tmp_path):
    first, _ = repos.put(Ref.parse(repo), [tree(tmp_path / "a", {"f": b"1"})])
    repos.put(Ref.parse(repo), [tree(tmp_path / "b", {"g": b"2"})])
    assert repos.create_branch(repo, "dev", Ref.parse(f"{repo}@master^")).id == first.id
    repos.put(Ref.parse(f"{repo}@dev"), [tree(tmp_path / "c", {"h": b"3"})])
    assert listing(repos, f"{repo}@dev") == {"/f": 1, "/h": 1}
    assert listing(repos, repo) == {"/f": 1, "/g": 1}
    repos.put(Ref.parse(f"{repo}@new-branch"), [tree(tmp_path / "d", {"k": b"4"})])
    assert [name for name, _ in repos.branches(repo)] == ["dev", "master", "new-branch"]
    with pytest.raises(CDLError, match="already exists"):
        repos.create_branch(repo, "dev")
    repos.delete_branch(repo, "dev")
    with pytest.raises(CDLError, match="has no branch 'dev'"):
        repos.resolve(f"{repo}@dev")


@pytest.mark.parametrize(
    "text, message",
    [
        ("bad name@x", "is not a repo name"),
        ("r@^", "'\\^' must follow a branch"),
        ("r:../etc", "leaves the repo"),
    ],
)
def test_bad_refs(text, message):
    with pytest.raises(CDLError, match=message):
        Ref.parse(text)


def test_resolve_errors(repos, repo, tmp_path):
    with pytest.raises(CDLError, match="has no commits yet"):
        repos.resolve(repo)
    commit, _ = repos.put(Ref.parse(repo), [tree(tmp_path, {"f": b"1"})])
    with pytest.raises(CDLError, match="goes past the first commit"):
        repos.resolve(f"{repo}@master^")
    with pytest.raises(CDLError, match="no commit in .* starts with 'abcdef'"):
        repos.resolve(f"{repo}@abcdef")
    with pytest.raises(CDLError, match="has no branch 'main'"):
        repos.resolve(f"{repo}@main")
    with pytest.raises(CDLError, match="no repo 'nothere'"):
        repos.resolve("nothere")
    assert repos.resolve(f"{repo}@{commit.id}").id == commit.id


def test_repo_errors(repos, repo):
    with pytest.raises(CDLError, match="already exists"):
        repos.create_repo(repo)
    with pytest.raises(CDLError, match="not a valid repo name"):
        repos.create_repo("has space")
    repos.delete_repo(repo)
    with pytest.raises(CDLError, match=f"no repo '{repo}'"):
        repos.delete_repo(repo)


def test_commit_records_lineage_and_event(repos, repo, tmp_path, conn):
    before = events.last_id(conn)
    commit, _ = repos.put(Ref.parse(repo), [tree(tmp_path, {"f": b"12345"})], message="m")
    node = lineage.get_node(conn, commit.lineage_id)
    assert node.kind == "dataset_commit" and node.attributes["files"] == 1
    [event] = [
        e for e in events.recent(conn, 50) if e.id > before and e.subject == commit.lineage_id
    ]
    assert event.type == "data.commit.finished"
    assert event.payload["commit"] == commit.id and event.payload["size"] == 5


# -- bad inputs ---------------------------------------------------------------------------


def test_odd_characters_in_names_round_trip(repos, repo, tmp_path):
    names = [
        "with space.txt",
        "ünïcødé.txt",
        'quote\'s "and".txt',
        "100%_done#1.txt",
        "-dash",
        "emoji 📦.txt",
        "semi;colon&amp.txt",
    ]
    src = tree(tmp_path / "src", {n: n.encode() for n in names})
    commit, _ = repos.put(Ref.parse(repo), [src])
    assert sorted(listing(repos, repo)) == sorted("/" + n for n in names)
    for name in names:
        out = tmp_path / "out" / name
        repos.get(commit, "/" + name, out)
        assert out.read_bytes() == name.encode()
    # LIKE wildcards in a prefix match literally, not as patterns.
    assert [f.path for f in repos.files(commit, "/100%_done#1.txt")] == ["/100%_done#1.txt"]


def test_name_that_is_not_utf8_is_refused(repos, repo, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.txt").write_bytes(b"ok")
    with open(os.path.join(os.fsencode(src), b"caf\xe9.txt"), "wb") as fh:
        fh.write(b"latin-1 name")
    with pytest.raises(CDLError, match=r"file name b'.*caf\\xe9.txt' is not valid UTF-8"):
        repos.put(Ref.parse(repo), [src])
    assert repos.log(repo) == []


def test_symlinks_and_special_files_are_skipped_with_a_reason(repos, repo, tmp_path):
    src = tree(tmp_path / "src", {"real.txt": b"data"})
    (src / "to-passwd").symlink_to("/etc/passwd")
    (src / "loop").symlink_to(src)
    os.mkfifo(src / "pipe")
    commit, scan = repos.put(Ref.parse(repo), [src])
    assert listing(repos, repo) == {"/real.txt": 4}
    assert sorted((p.name, r) for p, r in scan.skipped) == [
        ("loop", "symbolic link"),
        ("pipe", "not a regular file"),
        ("to-passwd", "symbolic link"),
    ]


def test_empty_folders_and_empty_files(repos, repo, tmp_path):
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    with pytest.raises(CDLError, match="nothing to put"):
        repos.put(Ref.parse(repo), [tmp_path / "empty"])
    src = tree(tmp_path / "src", {"zero.bin": b"", "x/y/also-zero": b""})
    (src / "empty-dir").mkdir()
    commit, _ = repos.put(Ref.parse(repo), [src])
    assert listing(repos, repo) == {"/x/y/also-zero": 0, "/zero.bin": 0}
    repos.get(commit, "/zero.bin", tmp_path / "got")
    assert (tmp_path / "got").read_bytes() == b""


def test_unreadable_file_fails_the_put_and_leaves_nothing(repos, repo, tmp_path):
    src = tree(tmp_path / "src", {"good.txt": b"fine"})
    if os.geteuid() == 0:
        unreadable = Path("/proc/self/mem")  # a regular file whose read fails, even for root
    else:
        unreadable = src / "locked.txt"
        unreadable.write_bytes(b"secret")
        unreadable.chmod(0)
    with pytest.raises(CDLError, match=f"cannot read {unreadable}"):
        repos.put(Ref.parse(repo), [src / "good.txt", unreadable])
    assert repos.log(repo) == []  # no commit, not even an open one
    repos.put(Ref.parse(repo), [src / "good.txt"])
    assert listing(repos, repo) == {"/good.txt": 4}


def test_missing_path_and_clashing_destinations(repos, repo, tmp_path):
    with pytest.raises(CDLError, match="cannot read .*nope: No such file"):
        repos.put(Ref.parse(repo), [tmp_path / "nope"])
    a = tree(tmp_path / "a", {"same.txt": b"1"})
    b = tree(tmp_path / "b", {"same.txt": b"2"})
    with pytest.raises(CDLError, match="would both be stored as /same.txt"):
        repos.put(Ref.parse(repo), [a, b])


def test_large_file_is_streamed(repos, repo, tmp_path):
    big = tmp_path / "big.bin"
    chunk = os.urandom(1 << 20)
    with open(big, "wb") as fh:
        for _ in range(64):
            fh.write(chunk)
    tracemalloc.start()
    try:
        commit, _ = repos.put(Ref.parse(repo), [big])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert commit.size_bytes == 64 << 20
    assert peak < 8 << 20, f"put held {peak / 2**20:.0f} MB for a 64 MB file"
    out = tmp_path / "back.bin"
    repos.get(commit, "/big.bin", out)
    assert out.stat().st_size == 64 << 20 and out.read_bytes()[: 1 << 20] == chunk


def test_put_killed_midway_leaves_no_finished_commit(repos, repo, tmp_path, shared_stack):
    first, _ = repos.put(Ref.parse(repo), [tree(tmp_path / "v1", {"keep.txt": b"kept"})])
    many = tmp_path / "many"
    for i in range(6000):
        sub = many / f"d{i % 50}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i}.txt").write_bytes(os.urandom(64))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli.main", "data", "put", repo, str(many)],
        cwd=shared_stack.settings.root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    with shared_stack.connect(autocommit=True) as conn:
        while True:  # kill it once some of its files are in the open commit
            row = conn.execute(
                """SELECT count(f.path) FROM data_commits c LEFT JOIN data_files f
                   ON f.commit_id = c.id WHERE c.repo = %s AND c.state = 'open'""",
                [repo],
            ).fetchone()
            if row[0] > 0:
                break
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    states = [c.state for c in repos.log(repo)]
    assert states.count("open") == 1 and states.count("finished") == 1
    assert repos.resolve(repo).id == first.id  # the branch never moved
    assert listing(repos, repo) == {"/keep.txt": 4}
    # The next put on that branch works and discards the dead writer's commit.
    second, _ = repos.put(Ref.parse(repo), [tree(tmp_path / "v2", {"new.txt": b"n"})])
    assert second.parent == first.id
    assert [c.state for c in repos.log(repo)] == ["finished", "finished"]
    assert repos.clean(repo).commits == 0


def test_put_under_a_postgres_kill_commits_nothing_half(project_factory, tmp_path):
    """The postmaster SIGKILLed while `cdl data put` writes thousands of files: the command
    prints the one-line error with a fix and exits 1; once `stack up` has Postgres back the
    branch still points at the previous commit, `cdl data clean` leaves nothing of the dead
    put behind, and the same put then commits every file."""
    stack = project_factory()
    stack.up()
    folder, repos = stack.settings.root, DataRepos(stack)
    repos.create_repo("big")
    first, _ = repos.put(Ref.parse("big"), [tree(tmp_path / "v1", {"keep.txt": b"kept"})])
    many = tmp_path / "many"
    for d in range(50):
        (many / f"d{d}").mkdir(parents=True)
    for i in range(6500):  # 5000 rows are copied in one go, then 1500 more files are stored
        (many / f"d{i % 50}" / f"f{i}.txt").write_bytes(os.urandom(64))
    put = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli.main", "data", "put", "big", str(many)],
        cwd=folder,
        env={k: v for k, v in os.environ.items() if not k.startswith("CDL_")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    with stack.connect(autocommit=True) as conn:
        while True:  # mid-write: the open commit has rows, and the put goes on storing files
            copied = conn.execute(
                """SELECT count(f.path) FROM data_commits c JOIN data_files f
                   ON f.commit_id = c.id WHERE c.repo = 'big' AND c.state = 'open'"""
            ).fetchone()[0]
            if copied:
                break
            assert put.poll() is None, put.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(stack.postgres.running_pid(), signal.SIGKILL)
    out, err = put.communicate(timeout=60)
    assert put.returncode == 1, out
    [line] = err.strip().splitlines()
    assert line.startswith("error: lost the connection to the platform database"), err
    assert "(fix: check 'cdl stack status', run 'cdl stack up'" in line

    stack.up()
    assert repos.resolve("big").id == first.id  # the branch never moved
    assert [c.state for c in repos.log("big")] == ["open", "finished"]  # on no branch
    cleaned = cdl("data", "clean", "big", cwd=folder)
    assert cleaned.returncode == 0, cleaned.stderr
    assert "discarded 1 open commit(s) in big" in cleaned.stdout
    assert not list(repos.store.objects.glob("**/.tmp-*"))
    with stack.connect() as conn:  # the dead put's rows went with its commit
        assert conn.execute(
            "SELECT count(*) FROM data_files WHERE commit_id <> %s", [first.id]
        ).fetchone() == (0,)
    again = cdl("data", "put", "big", str(many), cwd=folder)
    assert again.returncode == 0, again.stderr
    head = repos.resolve("big")
    assert (head.parent, head.file_count) == (first.id, 6501)
    assert [c.state for c in repos.log("big")] == ["finished", "finished"]


def test_clean_discards_a_dead_writers_commit(repos, repo, tmp_path, shared_stack):
    with shared_stack.connect(autocommit=True) as conn:  # what a killed writer leaves
        conn.execute(
            """INSERT INTO data_commits (id, repo, branch, state, origin, author)
               VALUES (%s, %s, 'master', 'open', 'user', 'ghost')""",
            [uuid.uuid4().hex, repo],
        )
    assert [c.state for c in repos.log(repo)] == ["open"]
    assert repos.clean(repo).commits == 1
    assert repos.log(repo) == []


def test_concurrent_puts_to_one_branch_both_land(repos, repo, tmp_path):
    sources = [
        tree(tmp_path / f"s{i}", {f"from-{i}/{n}.txt": os.urandom(256) for n in range(300)})
        for i in range(2)
    ]
    results, errors, waited = [], [], []

    def put(src):
        try:
            results.append(repos.put(Ref.parse(repo), [src], on_wait=lambda: waited.append(1))[0])
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=put, args=(s,)) for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    first, second = sorted(results, key=lambda c: c.finished_at)
    assert second.parent == first.id
    assert second.file_count == 600
    assert len(listing(repos, repo)) == 600


def test_cli_round_trip(shared_stack, tmp_path):
    folder = shared_stack.settings.root
    name = f"cli{uuid.uuid4().hex[:8]}"
    src = tree(tmp_path / "src", {"docs/a.txt": b"alpha\n", "docs/b.txt": b"beta\n"})
    assert cdl("data", "repo", "create", name, cwd=folder).returncode == 0
    put = cdl("data", "put", f"{name}@master", str(src), "-m", "docs", cwd=folder)
    assert put.returncode == 0, put.stderr
    assert "2 files" in put.stdout
    assert cdl("data", "get", f"{name}:/docs/a.txt", cwd=folder).stdout == "alpha\n"
    missing = cdl("data", "get", f"{name}:/docs/zzz.txt", cwd=folder)
    assert missing.returncode == 1 and "has no file or folder /docs/zzz.txt" in missing.stderr
    assert f"see what /docs holds: cdl data ls {name}@" in missing.stderr
    folder_to_stdout = cdl("data", "get", f"{name}:/docs", cwd=folder)
    assert folder_to_stdout.returncode == 1 and ":/docs is a folder" in folder_to_stdout.stderr
    assert "give --output FOLDER" in folder_to_stdout.stderr
    ls = cdl("data", "ls", f"{name}@master:/docs", "-r", cwd=folder)
    assert "/docs/a.txt" in ls.stdout and "/docs/b.txt" in ls.stdout
    (src / "docs" / "a.txt").write_bytes(b"ALPHA\n")
    cdl("data", "put", name, str(src), cwd=folder)
    diff = cdl("data", "diff", f"{name}@master^", name, cwd=folder)
    assert diff.stdout.splitlines() == ["M /docs/a.txt", "0 added, 0 removed, 1 modified"]
    log = cdl("data", "log", name, cwd=folder)
    assert log.stdout.count("finished") == 2
    bad = cdl("data", "put", f"{name}@master", str(tmp_path / "missing"), cwd=folder)
    assert bad.returncode == 1 and "cannot read" in bad.stderr


def test_rm_files_and_folders(repos, repo, tmp_path):
    first, _ = repos.put(Ref.parse(repo), [tree(tmp_path, {"a/1": b"1", "a/2": b"2", "b": b"3"})])
    second = repos.delete(Ref.parse(repo), ["/a"], message="drop a")
    assert listing(repos, repo) == {"/b": 1}
    assert second.parent == first.id and second.message == "drop a"
    assert listing(repos, f"{repo}@master^") == {"/a/1": 1, "/a/2": 1, "/b": 1}
    with pytest.raises(CDLError, match="has no file or folder /zzz"):
        repos.delete(Ref.parse(repo), ["/b", "/zzz"])
    assert repos.resolve(repo).id == second.id  # nothing committed


def test_clean_removes_temporary_objects_of_dead_writers_only(repos, repo):
    """A put killed while it writes an object leaves a temporary file in the object store;
    `clean` removes it, and leaves the one a live writer is filling."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], text=True, capture_output=True
    ).stdout.strip()
    folder = repos.store.objects / "ab"
    folder.mkdir(parents=True, exist_ok=True)
    left = folder / f".tmp-{dead}-k1ll3d"
    writing = folder / f".tmp-{os.getpid()}-busy"
    left.write_bytes(b"")
    writing.write_bytes(b"half")
    cleaned = repos.clean(repo)
    assert cleaned.objects >= 1 and not left.exists() and writing.exists()
    writing.unlink()


def test_put_whose_connection_drops_is_a_one_line_error(shared_stack, repos, repo, tmp_path):
    """Postgres dropping a command's connection in the middle (here: while `put` waits for the
    branch) is the one-line error with a fix, not a traceback, and nothing is committed."""
    src = tree(tmp_path / "src", {"a.txt": b"a"})
    with shared_stack.connect(autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(hashtext(%s))", [f"cdl.data.branch:{repo}@master"])
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli.main", "data", "put", repo, str(src)],
            cwd=shared_stack.settings.root,
            env={k: v for k, v in os.environ.items() if not k.startswith("CDL_")},
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 30
        while True:  # the put waits for the branch lock: end its session from the server side
            ended = holder.execute(
                """SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                   WHERE wait_event_type = 'Lock' AND query LIKE '%pg_advisory_lock%'
                     AND pid <> pg_backend_pid()"""
            ).fetchall()
            if ended:
                break
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == 1
    waiting, line = [line for line in stderr.splitlines() if line.strip()]
    assert waiting == f"waiting for another commit to {repo}"
    assert line.startswith("error: lost the connection to the platform database")
    assert "(fix: check 'cdl stack status'" in line and "Traceback" not in stderr
    assert [c for c in repos.log(repo) if c.state == "finished"] == []
