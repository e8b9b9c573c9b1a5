"""The data backend ports: versioned data (repos, branches, commits, files) and pipelines (specs,
jobs), with the entities both backends share. The local engine (`repos.DataRepos`,
`engine.PipelineEngine`) and Pachyderm (`pachyderm.PachydermRepos`, `pachyderm.PachydermPipelines`)
implement them; `pipelines/plugins.py` registers them under the concerns `data` and `pipelines`,
and `data_backend(stack)` / `pipeline_backend(stack)` pick the one the stack's `data.engine` names.

Adding a backend: a class taking the `Stack`, subclassing the port below and implementing each of
its abstract methods with the same arguments and return types (an operation the engine cannot do
raises `Unsupported` naming the command and what to use instead), one line in the plugin table,
and the contract tests in tests/data/test_backend_contract.py passing for it.

Errors, for every method: `NotFound` (repo, branch, commit, file, pipeline, job), `AlreadyExists`,
`Invalid` (names, paths, specs), `Unavailable` (the engine does not answer), `Unsupported`.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import socket
import stat
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Callable, Iterator, Mapping

from pipelines.core import lineage
from pipelines.core.errors import Invalid, NotFound
from pipelines.plugins import backend_class

if TYPE_CHECKING:
    from pipelines.core.stack import Stack
    from pipelines.data.spec import PipelineSpec

DEFAULT_BRANCH = "master"
REPO_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,63}$")
BRANCH_NAME = re.compile(r"^[a-zA-Z0-9_.-]{1,63}$")


@dataclass
class Commit:
    id: str
    repo: str
    branch: str
    parent: str | None
    state: str
    origin: str
    message: str
    author: str
    started_at: datetime
    finished_at: datetime | None
    size_bytes: int | None
    file_count: int | None

    @property
    def ref(self) -> str:
        return f"{self.repo}@{self.id}"

    @property
    def lineage_id(self) -> str:
        return lineage.node_id(lineage.Kind.DATASET_COMMIT, self.ref)


@dataclass(frozen=True)
class FileEntry:
    """A file of a commit. `sha256` identifies its content: the sha256 of its bytes on the
    local engine, pachd's own content hash on Pachyderm."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class RepoInfo:
    name: str
    description: str
    created_at: datetime | None
    branches: int | None
    commits: int | None  # finished commits
    size: int | None  # of the default branch's head
    files: int | None


@dataclass(frozen=True)
class Entry:
    """A name directly under a folder of a commit, as `ls` shows it."""

    name: str
    kind: str  # file | dir
    size: int
    files: int | None  # files at or below it (None: the backend does not count them)


@dataclass(frozen=True)
class Ref:
    """`repo`, `repo@branch`, `repo@commit` (a prefix of 6+ hex digits), each with optional `^`s
    for parents, then optionally `:path`."""

    repo: str
    name: str | None = None  # branch or commit; None: the default branch
    parents: int = 0
    path: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Ref":
        spec, _, path = text.partition(":")
        repo, _, name = spec.partition("@")
        stripped = name.rstrip("^")
        parents = len(name) - len(stripped)
        if not REPO_NAME.match(repo):
            raise Invalid(
                f"'{text}': '{repo}' is not a repo name",
                "use REPO, REPO@BRANCH or REPO@COMMIT, optionally followed by :PATH",
            )
        if name and not stripped:
            raise Invalid(f"'{text}': '^' must follow a branch or commit", "e.g. images@master^")
        return cls(repo, stripped or None, parents, normalize_path(path) if path else None)

    def __str__(self) -> str:
        name = f"@{self.name}" if self.name else ""
        return f"{self.repo}{name}{'^' * self.parents}{':' + self.path if self.path else ''}"


def normalize_path(path: str) -> str:
    """'a/b/' -> '/a/b'; refuses '..' and names that are not portable."""
    if "\n" in path or "\r" in path or "\0" in path:
        raise Invalid(f"file path {path!r} contains a line break or NUL", "rename the file")
    parts = [p for p in PurePosixPath("/" + path).parts[1:] if p not in ("", ".")]
    if ".." in parts:
        raise Invalid(f"file path {path!r} leaves the repo with '..'", "use a path inside it")
    return "/" + "/".join(parts)


def default_author() -> str:
    return os.environ.get("CDL_AUTHOR") or f"{getpass.getuser()}@{socket.gethostname()}"


@dataclass
class ScanResult:
    files: list[tuple[Path, str]] = field(default_factory=list)  # (source, repo path)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (source, reason)


def files_to_put(target: Ref, sources: list[Path], dest: str = "/") -> ScanResult:
    """What a put of `sources` to the branch `target` stores (see `scan_sources`); `Invalid` when
    the target is not a branch or nothing is left to store."""
    if target.parents or target.path:
        raise Invalid(f"put needs REPO@BRANCH, got '{target}'", "drop the ^ and :path parts")
    scan = scan_sources(sources, dest)
    if not scan.files:
        raise Invalid(
            f"nothing to put: {', '.join(map(str, sources))} holds no regular files",
            "check the paths (empty folders are not stored)",
        )
    return scan


def scan_sources(sources: list[Path], dest: str = "/") -> ScanResult:
    """What `put` would store: a file goes to DEST/its name, a folder's contents under DEST.

    Symbolic links and special files are skipped with a reason (a link may point outside the
    data or loop); names that are not valid UTF-8 are an error naming the file.
    """
    result = ScanResult()
    dest = normalize_path(dest)

    def repo_path(*parts: str) -> str:
        return normalize_path("/".join([dest, *parts]))

    def check_name(path: Path) -> None:
        try:
            str(path).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise Invalid(
                f"file name {os.fsencode(path)!r} is not valid UTF-8", "rename the file"
            ) from exc

    def walk(folder: Path, rel: list[str]) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            raise Invalid(
                f"cannot read folder {folder}: {exc.strerror}", "fix its permissions"
            ) from exc
        for entry in entries:
            path = Path(entry.path)
            check_name(path)
            if entry.is_symlink():
                result.skipped.append((path, "symbolic link"))
            elif entry.is_dir(follow_symlinks=False):
                walk(path, [*rel, entry.name])
            elif entry.is_file(follow_symlinks=False):
                result.files.append((path, repo_path(*rel, entry.name)))
            else:
                result.skipped.append((path, "not a regular file"))

    for source in sources:
        check_name(source)
        try:
            mode = os.lstat(source).st_mode
        except OSError as exc:
            raise Invalid(f"cannot read {source}: {exc.strerror}", "check the path") from exc
        if stat.S_ISLNK(mode):
            result.skipped.append((source, "symbolic link"))
        elif stat.S_ISDIR(mode):
            walk(source, [])
        elif stat.S_ISREG(mode):
            result.files.append((source, repo_path(source.name)))
        else:
            result.skipped.append((source, "not a regular file"))

    seen: dict[str, Path] = {}
    for source, path in result.files:
        if path in seen:
            raise Invalid(
                f"{seen[path]} and {source} would both be stored as {path}",
                "put them in separate commits or use different --path destinations",
            )
        seen[path] = source
    return result


@dataclass
class Job:
    """One run of a pipeline over one set of input commits."""

    id: str
    pipeline: str
    pipeline_version: int
    version_hash: str
    input_commits: dict
    state: str  # running | success | failure | killed
    output_commit: str | None
    datums_total: int
    datums_processed: int
    datums_skipped: int
    datums_failed: int
    error: str | None
    started_at: datetime
    finished_at: datetime | None

    @property
    def lineage_id(self) -> str:
        return lineage.node_id(lineage.Kind.PIPELINE_JOB, self.id)


Progress = Callable[[int, int], None]  # (bytes done, bytes in all)


@dataclass(frozen=True)
class Cleaned:
    commits: int  # open commits discarded
    objects: int  # temporary object files removed


CHUNK = 1 << 20


class DataBackend(ABC):
    """Versioned data with Pachyderm semantics. Refs name a branch or a commit (see `Ref`);
    commits are immutable and appear whole or not at all."""

    @abstractmethod
    def check(self) -> str:
        """What the backend is and where, e.g. 'pachd 2.12.2 at grpc://...'; `Unavailable` when
        it does not answer."""

    # -- repos and branches
    @abstractmethod
    def create_repo(self, name: str, description: str = "") -> None:
        """A repo with an empty default branch. `Invalid` name, `AlreadyExists`."""

    @abstractmethod
    def list_repos(self) -> list[RepoInfo]:
        """Every repo, by name; figures the backend does not know are None."""

    @abstractmethod
    def delete_repo(self, name: str) -> None:
        """The repo, its branches and commits. `NotFound`; `Invalid` while other repos hold
        commits computed from it."""

    @abstractmethod
    def branches(self, repo: str) -> list[tuple[str, Commit | None]]:
        """(branch, head commit or None when empty), by name."""

    @abstractmethod
    def create_branch(self, repo: str, name: str, source: Ref | None = None) -> Commit | None:
        """A branch, empty or at `source`; returns its head."""

    @abstractmethod
    def delete_branch(self, repo: str, name: str) -> None:
        """Only the branch: its commits stay."""

    # -- commits
    @abstractmethod
    def resolve(self, ref: Ref | str) -> Commit:
        """The finished commit a ref names (`NotFound` with a hint when it names none)."""

    @abstractmethod
    def log(self, repo: str, branch: str | None = None, limit: int = 50) -> list[Commit]:
        """A branch's commits from its head back, or with no branch the repo's, newest first."""

    @abstractmethod
    def put(
        self,
        target: Ref,
        sources: list[Path],
        dest: str = "/",
        message: str = "",
        author: str | None = None,
        progress: Progress | None = None,
        on_wait: Callable[[], None] | None = None,
    ) -> tuple[Commit, ScanResult]:
        """Local files and folders (a folder's contents go in) under `dest` in one new commit on
        the branch `target` (created if missing); the branch's other files stay. Returns the
        commit and the scan (what was skipped and why). `on_wait` is called if another writer
        holds the branch."""

    @abstractmethod
    def write(
        self,
        repo: str,
        files: Mapping[str, bytes],
        deletes: list[str] = (),
        carry_parent: bool = True,
        message: str = "",
        author: str | None = None,
        branch: str = DEFAULT_BRANCH,
    ) -> Commit:
        """One commit of in-memory files: with `carry_parent` the parent's files stay unless
        written or in `deletes`; without, the commit holds exactly `files`."""

    def delete(
        self, target: Ref, paths: list[str], message: str = "", author: str | None = None
    ) -> Commit:
        """A new commit on the branch without the given files or folders (`NotFound` if one
        matches nothing; then nothing is committed). (Shared by the backends: it finds the
        files through `files` and commits through `write`.)"""
        head = self.resolve(Ref(target.repo, target.name))
        doomed: list[str] = []
        for path in paths:
            found = [entry.path for entry in self.files(head, path)]
            if not found:
                raise NotFound(
                    f"{head.ref} has no file or folder {normalize_path(path)}", "see 'cdl data ls'"
                )
            doomed += found
        branch = target.name or DEFAULT_BRANCH
        return self.write(target.repo, {}, doomed, message=message, author=author, branch=branch)

    @abstractmethod
    def clean(self, repo: str) -> Cleaned:
        """Discard the open commits of `repo`, and the temporary objects of any repo, that writers
        which died left behind (what is being written now stays)."""

    @abstractmethod
    def provenance(self, commit: Commit) -> list[Commit]:
        """Every commit upstream of `commit`, nearest first."""

    # -- files
    @abstractmethod
    def files(self, commit: Commit, prefix: str = "/") -> Iterator[FileEntry]:
        """The commit's files at or under `prefix`, in path order, streamed."""

    @abstractmethod
    def listing(self, commit: Commit, prefix: str = "/") -> list[Entry]:
        """The names directly under `prefix` (or the file `prefix` itself)."""

    @abstractmethod
    def open(self, commit: Commit, entry: FileEntry) -> IO[bytes]:
        """A file's bytes as a stream (a context manager)."""

    def get(self, commit: Commit, path: str, output: Path) -> int:
        """A file, or every file under a folder, written to `output`; returns the count. No
        half-written files: each is written under a temporary name and renamed. (Shared by the
        backends: it reads through `files` and `open`.)"""
        path = normalize_path(path)
        written = 0
        for entry in self.files(commit, path):
            target = output if entry.path == path else output / entry.path[len(path) :].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.partial")
            with self.open(commit, entry) as stream, open(partial, "wb") as out:
                shutil.copyfileobj(stream, out, CHUNK)
            partial.replace(target)
            written += 1
        if not written:
            raise NotFound(f"{commit.ref} has no file or folder {path}", "see 'cdl data ls'")
        return written

    @abstractmethod
    def diff(self, old: Commit, new: Commit) -> Iterator[tuple[str, str, int | None, int | None]]:
        """(added|removed|modified, path, old size, new size) per differing path, in order."""

    @abstractmethod
    def record_stats(self, commit: Commit, path: str, fmt: str, stats: dict) -> None:
        """Keep a dataset's statistics (`cdl data stats`) with the commit."""

    @abstractmethod
    def stored_stats(self, commit: Commit) -> list[dict]:
        """The statistics recorded for `commit` so far."""


class PipelineBackend(ABC):
    """Pipelines in the Pachyderm spec format and the jobs they run."""

    @abstractmethod
    def create(
        self,
        spec_path: Path,
        update: bool = False,
        reprocess: bool = False,
        spec: PipelineSpec | None = None,
    ) -> dict:
        """Create (or update) the pipeline of a spec file (or `spec`, one of several in that file:
        the file's folder is where it runs) and its output repo; returns at least {'name',
        'version', 'ignored'} (fields the backend ignores) and 'stopped' (the running jobs an
        update stopped). `AlreadyExists` / `NotFound` for create / update, `Invalid` spec."""

    @abstractmethod
    def delete(self, name: str, keep_repo: bool = False) -> list[Job]:
        """The pipeline, its jobs and (unless `keep_repo`) its output repo; its running job is
        stopped first. Returns the jobs stopped."""

    @abstractmethod
    def list(self) -> list[dict]:
        """Pipelines with name, version, inputs, description, last job state and start."""

    @abstractmethod
    def inspect(self, name: str) -> dict:
        """A pipeline's spec, version, where it runs and its latest jobs."""

    @abstractmethod
    def run_pending(self, progress: Callable[[str], None] | None = None) -> list[Job]:
        """Run every due job here, following the chain downstream, and wait for those another
        process (the worker) runs; returns the jobs run here."""

    @abstractmethod
    def triggered_by(
        self, commits: list[str] = (), versions: Mapping[str, int] | None = None
    ) -> list[Job]:
        """The jobs that read one of `commits` (commit ids), or ran a version of a pipeline in
        `versions` ({pipeline: version}), and every job downstream of them, whoever ran them;
        oldest first."""

    @abstractmethod
    def jobs(self, pipeline: str | None = None, limit: int = 20) -> list[Job]:
        """Jobs, newest first."""

    @abstractmethod
    def job(self, job_id: str) -> Job:
        """A job by id or unique id prefix."""

    @abstractmethod
    def job_datums(self, job_id: str, state: str | None = None) -> list[dict]:
        """A job's datums: inputs, state, attempts, seconds, log."""

    @abstractmethod
    def stop(self, job_id: str) -> Job:
        """Stop a running job: its datums killed, nothing committed; it ends `killed`."""

    @abstractmethod
    def serve(self, stop: threading.Event, say: Callable[[str], None]) -> None:
        """Run jobs as commits arrive until `stop` is set (the stack's worker service)."""


def data_backend(stack: "Stack") -> DataBackend:
    """The versioned-data backend the stack's `data.engine` names."""
    return backend_class("data", stack.settings.stack.data.engine)(stack)


def pipeline_backend(stack: "Stack") -> PipelineBackend:
    """The pipeline backend the stack's `data.engine` names."""
    return backend_class("pipelines", stack.settings.stack.data.engine)(stack)
