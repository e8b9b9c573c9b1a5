"""The DataBackend port's contract, checked on every registered backend: the local engine for
real, Pachyderm through a stand-in pachd that speaks its gRPC protocol (see fake_pachd.py)."""

from __future__ import annotations

import pytest

from pipelines.core.errors import NotFound, Unsupported
from pipelines.data.backend import Commit, Entry, FileEntry, Ref, RepoInfo, data_backend
from pipelines.plugins import backend_class, engines
from tests.data.fake_pachd import FakePachd

FILES = {"/a/1.txt": b"one", "/a/2.txt": b"two!", "/b/3.txt": b"three"}


@pytest.fixture(params=engines("data"))
def backend(request, project_factory, pachyderm_stack, tmp_path):
    """(engine, backend) holding the repo `raw` with FILES on master."""
    if request.param == "local":
        stack = project_factory()
        stack.up()
        local = data_backend(stack)
        local.create_repo("raw", "raw data")
        for path, data in FILES.items():
            (tmp_path / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path.lstrip("/")).write_bytes(data)
        local.put(Ref.parse("raw"), [tmp_path / "a"], dest="/a")
        local.put(Ref.parse("raw"), [tmp_path / "b"], dest="/b")  # head: both folders
        yield "local", local
        return
    server = FakePachd("raw", FILES)
    try:
        yield "pachyderm", data_backend(pachyderm_stack(server.address))
    finally:
        server.stop()


def test_the_table_names_a_backend_per_engine():
    assert set(engines("data")) == {"local", "pachyderm"}
    for engine in engines("data"):
        assert backend_class("data", engine).__name__


def test_backend_is_the_registered_class(backend):
    engine, found = backend
    assert isinstance(found, backend_class("data", engine))


def test_resolve_a_branch_to_its_finished_head(backend):
    _, data = backend
    head = data.resolve("raw")
    assert isinstance(head, Commit)
    assert (head.repo, head.branch, head.state) == ("raw", "master", "finished")
    assert data.resolve(Ref.parse("raw@master")).id == head.id
    assert head.ref == f"raw@{head.id}"


def test_files_stream_in_path_order_and_read_back(backend):
    _, data = backend
    head = data.resolve("raw")
    entries = list(data.files(head))
    assert [e.path for e in entries] == sorted(FILES)
    assert all(isinstance(e, FileEntry) and e.size == len(FILES[e.path]) for e in entries)
    assert [e.path for e in data.files(head, "/a")] == ["/a/1.txt", "/a/2.txt"]
    for entry in entries:
        with data.open(head, entry) as stream:
            assert stream.read() == FILES[entry.path]


def test_get_writes_a_folder(backend, tmp_path):
    _, data = backend
    out = tmp_path / "out"
    assert data.get(data.resolve("raw"), "/a", out) == 2
    assert (out / "2.txt").read_bytes() == b"two!"


def test_list_repos(backend):
    _, data = backend
    [repo] = [r for r in data.list_repos() if r.name == "raw"]
    assert isinstance(repo, RepoInfo) and repo.description == "raw data"


def test_missing_things_are_not_found(backend):
    _, data = backend
    with pytest.raises(NotFound):
        data.resolve("nothing")
    with pytest.raises(NotFound):
        data.get(data.resolve("raw"), "/no/such/file", None)


def test_local_only_operations(backend):
    """diff, provenance, clean and stats need the local engine's tables: elsewhere they say so."""
    engine, data = backend
    head = data.resolve("raw")
    calls = {
        "diff": lambda: list(data.diff(head, head)),
        "provenance": lambda: data.provenance(head),
        "clean": lambda: data.clean("raw"),
        "stats": lambda: data.record_stats(head, "/", "folder", {"samples": 3}),
    }
    for name, call in calls.items():
        if engine == "local":
            call()
        else:
            with pytest.raises(Unsupported, match=f"'cdl data {name}' needs the local data"):
                call()
    if engine == "local":
        assert data.stored_stats(head) == [{"samples": 3}]
        assert data.listing(head) == [Entry("a", "dir", 7, 2), Entry("b", "dir", 5, 1)]


@pytest.fixture
def pachd():
    server = FakePachd("raw", FILES)
    yield server
    server.stop()


def test_pachyderm_reads_are_these_requests(pachd, pachyderm_stack):
    """What pachd receives: the commit asked for by branch, then a walk and a get of that
    commit's files."""
    data = data_backend(pachyderm_stack(pachd.address))
    head = data.resolve("raw")
    entry = next(data.files(head, "/b"))
    data.open(head, entry).read()
    [asked] = pachd.sent("InspectCommit")
    assert (asked.commit.branch.name, asked.commit.branch.repo.name) == ("master", "raw")
    [walk] = pachd.sent("WalkFile")
    assert (walk.file.commit.id, walk.file.path) == (head.id, "/b")
    [get] = pachd.sent("GetFile")
    assert (get.file.commit.id, get.file.path) == (head.id, "/b/3.txt")


def test_writes_make_one_commit_with_exactly_those_changes(backend, tmp_path):
    engine, data = backend
    before = data.resolve("raw")
    carried = data.write("raw", {"/c/4.txt": b"four"}, deletes=["/a/1.txt"], message="edit")
    assert carried.id != before.id and carried.state == "finished"
    after = [e.path for e in data.files(data.resolve("raw"))]
    assert after == ["/a/2.txt", "/b/3.txt", "/c/4.txt"]
    replaced = data.write("raw", {"/only.txt": b"x"}, carry_parent=False)
    assert [e.path for e in data.files(replaced)] == ["/only.txt"]
    (tmp_path / "new.txt").write_bytes(b"new")
    put, scan = data.put(Ref.parse("raw@master"), [tmp_path / "new.txt"], dest="/in")
    assert [e.path for e in data.files(put)] == ["/in/new.txt", "/only.txt"]
    assert [path for _, path in scan.files] == ["/in/new.txt"]
    removed = data.delete(Ref.parse("raw"), ["/in"])
    assert [e.path for e in data.files(removed)] == ["/only.txt"]
