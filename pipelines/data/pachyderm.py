"""The Pachyderm backend: the same repos and pipeline specs on a real Pachyderm cluster, through
pachyderm-sdk (the `pachyderm` extra). Selected with `data.engine: pachyderm` in the stack.

`PachydermRepos` is the `DataBackend` and `PachydermPipelines` the `PipelineBackend` (see
backend.py) on a pachd. Pipeline specs are the files the local engine runs; they go to pachd as
they are, in Pachyderm's own JSON form (`create_pipeline_v2`), after the same validation.
`request_for` builds the typed protobuf request from a spec, which shows what pachd will receive
without a cluster at hand. pachd's gRPC errors become CDL's error kinds here (`_call`); operations
that need the local engine's own tables (diff, stats, jobs, provenance) raise `Unsupported`.
"""

from __future__ import annotations

import io
import json
import os
import threading
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Mapping

from pipelines.core.durations import parse_duration
from pipelines.core.errors import (
    AlreadyExists,
    Invalid,
    NotFound,
    Unavailable,
    Unsupported,
)
from pipelines.core.stack import Stack
from pipelines.data.backend import (
    DEFAULT_BRANCH,
    Cleaned,
    Commit,
    DataBackend,
    Entry,
    FileEntry,
    Job,
    PipelineBackend,
    Progress,
    Ref,
    RepoInfo,
    ScanResult,
    files_to_put,
    normalize_path,
)
from pipelines.data.spec import PipelineSpec, load_spec

# Fields whose local defaults differ from protobuf's zero values: sent explicitly.
EXPLICIT = ("datum_tries", "output_branch", "parallelism_spec")
DURATIONS = ("datum_timeout", "job_timeout", "maximum_expected_uptime")
# Pachyderm 1.x fields that specs still carry and pachd 2 refuses: accepted, not sent.
NOT_SENT = ("max_queue_size",)


def _sdk():
    try:
        import pachyderm_sdk
        from pachyderm_sdk.api import pfs, pps
    except ImportError as exc:  # the extra is optional
        raise Unsupported(
            "the Pachyderm engine needs the pachyderm-sdk package",
            "pip install 'cdl[pachyderm]' in the platform venv",
        ) from exc
    return pachyderm_sdk, pfs, pps


def spec_json(spec: PipelineSpec) -> dict[str, Any]:
    """The spec as pachd's CreatePipelineRequest JSON: durations in seconds ('300s'), the local
    defaults that differ from protobuf's zero values written out, each pfs input named, and
    snake_case keys whichever case the file used."""
    data = spec.model_dump(
        mode="json", exclude_none=True, exclude_defaults=True, exclude=set(NOT_SENT)
    )
    for key in EXPLICIT:
        data[key] = spec.model_dump(mode="json")[key]
    for key in DURATIONS:
        if key in data:
            data[key] = f"{parse_duration(data[key]):g}s"

    def name_inputs(node: dict) -> None:
        if "pfs" in node:
            node["pfs"].setdefault("name", node["pfs"]["repo"])
            node["pfs"].setdefault("branch", "master")
        for kind in ("cross", "union", "join", "group"):
            for child in node.get(kind, []):
                name_inputs(child)

    if "input" in data:  # a spout has none
        name_inputs(data["input"])
    return _without_false(data)


def _without_false(value):
    """`false` is protobuf's default for every bool: leave it out, as pachd's JSON would."""
    if isinstance(value, dict):
        return {k: _without_false(v) for k, v in value.items() if v is not False}
    if isinstance(value, list):
        return [_without_false(v) for v in value]
    return value


def request_for(spec: PipelineSpec):
    """The typed CreatePipelineRequest for a spec (raises if pachd's schema rejects it)."""
    _, _, pps = _sdk()
    return pps.CreatePipelineRequest().from_dict(spec_json(spec))


def request_as_dict(request) -> dict[str, Any]:
    """A request back as the snake_case JSON of a spec file, for round-trip checks."""
    import betterproto

    return request.to_dict(casing=betterproto.Casing.SNAKE, include_default_values=False)


def _unsupported(command: str) -> Unsupported:
    return Unsupported(
        f"'cdl data {command}' needs the local data engine; this stack's data engine is pachyderm",
        "use pachctl for it, or select a stack with data.engine: local",
    )


class _Pachd:
    """A pachd connection whose errors are CDL's: the one place pachyderm-sdk errors are seen."""

    def __init__(self, stack: Stack):
        sdk, self.pfs, self.pps = _sdk()
        self.address = stack.settings.stack.data.pachd_address
        try:
            self.client = sdk.Client.from_pachd_address(self.address)
        except ValueError as exc:
            raise Invalid(
                f"data.pachd_address {self.address!r}: {exc}", "write it as grpc://HOST:30650"
            ) from exc

    def _call(self, what: str, fn: Callable, *args, **kwargs):
        import grpc

        try:
            result = fn(*args, **kwargs)
            # Streaming calls fail while they are read: read them here.
            return list(result) if hasattr(result, "__next__") else result
        except ConnectionError as exc:  # how pachyderm-sdk reports a pachd that does not answer
            raise self._unreachable(what) from exc
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise self._unreachable(what) from exc
            kind = {
                grpc.StatusCode.NOT_FOUND: NotFound,
                grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
            }.get(code)
            if kind is None:  # pachd reports many of these as UNKNOWN, with words
                lowered = (details or "").lower()
                kind = (
                    NotFound
                    if "not found" in lowered
                    else AlreadyExists
                    if "already exists" in lowered
                    else Invalid
                )
            raise kind(f"pachd refused {what}: {details}") from exc

    def _unreachable(self, what: str) -> Unavailable:
        return Unavailable(
            f"cannot reach pachd at {self.address} ({what})",
            "check data.pachd_address / CDL_DATA__PACHD_ADDRESS, or port-forward pachd",
        )

    def check(self) -> str:
        version = self._call("version", self.client.get_version)
        return f"pachd {version.major}.{version.minor}.{version.micro} at {self.address}"


def _time(value: datetime | None) -> datetime | None:
    """Protobuf leaves unset timestamps at the epoch."""
    return value if value and value.year > 1970 else None


class PachydermRepos(_Pachd, DataBackend):
    """Repos, commits and files on a pachd at `data.pachd_address` (grpc://host:30650)."""

    def _repo(self, name: str):
        return self.pfs.Repo(name=name, type="user")

    def _branch(self, repo: str, name: str):
        return self.pfs.Branch(repo=self._repo(repo), name=name)

    def _pfs_commit(self, commit: Commit):
        return self.pfs.Commit(
            id=commit.id,
            repo=self._repo(commit.repo),
            branch=self._branch(commit.repo, commit.branch) if commit.branch else None,
        )

    def _commit(self, info) -> Commit:
        commit = info.commit
        repo = commit.repo.name or (commit.branch.repo.name if commit.branch else "")
        parent = info.parent_commit.id if info.parent_commit and info.parent_commit.id else None
        finished = _time(info.finished)
        return Commit(
            id=commit.id,
            repo=repo,
            branch=commit.branch.name if commit.branch else "",
            parent=parent,
            state="finished" if finished else "open",
            origin="pipeline" if info.origin and info.origin.kind == 2 else "user",
            message=info.description,
            author=info.created_by,
            started_at=_time(info.started),
            finished_at=finished,
            size_bytes=info.details.size_bytes if info.details else None,
            file_count=None,
        )

    # -- repos and branches

    def create_repo(self, name: str, description: str = "") -> None:
        self._call(
            f"create repo {name}",
            self.client.pfs.create_repo,
            repo=self._repo(name),
            description=description,
        )

    def list_repos(self) -> list[RepoInfo]:
        infos = self._call("list repos", self.client.pfs.list_repo)
        return [
            RepoInfo(
                name=i.repo.name,
                description=i.description,
                created_at=_time(i.created),
                branches=len(i.branches),
                commits=None,
                size=i.details.size_bytes if i.details else None,
                files=None,
            )
            for i in sorted(infos, key=lambda i: i.repo.name)
        ]

    def delete_repo(self, name: str) -> None:
        self._call(f"delete repo {name}", self.client.pfs.delete_repo, repo=self._repo(name))

    def branches(self, repo: str) -> list[tuple[str, Commit | None]]:
        infos = self._call(
            f"list branches of {repo}", self.client.pfs.list_branch, repo=self._repo(repo)
        )
        found = []
        for info in sorted(infos, key=lambda i: i.branch.name):
            head = self._try_resolve(Ref(repo, info.branch.name))
            found.append((info.branch.name, head))
        return found

    def _try_resolve(self, ref: Ref) -> Commit | None:
        try:
            return self.resolve(ref)
        except (NotFound, Invalid):
            return None

    def create_branch(self, repo: str, name: str, source: Ref | None = None) -> Commit | None:
        head = self.resolve(source) if source else None
        self._call(
            f"create branch {repo}@{name}",
            self.client.pfs.create_branch,
            branch=self._branch(repo, name),
            head=self._pfs_commit(head) if head else None,
        )
        return head

    def delete_branch(self, repo: str, name: str) -> None:
        self._call(
            f"delete branch {repo}@{name}",
            self.client.pfs.delete_branch,
            branch=self._branch(repo, name),
        )

    # -- commits

    def resolve(self, ref: Ref | str) -> Commit:
        ref = Ref.parse(ref) if isinstance(ref, str) else ref
        uri = f"{ref.repo}@{ref.name or DEFAULT_BRANCH}"
        info = self._call(
            f"inspect commit {uri}",
            self.client.pfs.inspect_commit,
            commit=self.pfs.Commit.from_uri(uri),
        )
        for _ in range(ref.parents):
            if not info.parent_commit or not info.parent_commit.id:
                raise NotFound(f"{ref} goes past the first commit of {ref.repo}")
            info = self._call(
                f"inspect commit {ref}", self.client.pfs.inspect_commit, commit=info.parent_commit
            )
        commit = self._commit(info)
        if commit.state != "finished":
            raise Invalid(f"commit {commit.ref} is still open", "wait for it to finish")
        return commit

    def log(self, repo: str, branch: str | None = None, limit: int = 50) -> list[Commit]:
        if branch:
            request = {"to": self.pfs.Commit.from_uri(f"{repo}@{branch}")}
        else:
            request = {"repo": self._repo(repo)}
        infos = self._call(
            f"list commits of {repo}", self.client.pfs.list_commit, number=limit, **request
        )
        return [self._commit(i) for i in infos]

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
        scan = files_to_put(target, sources, dest)
        total = sum(os.lstat(source).st_size for source, _ in scan.files)

        def upload(commit) -> None:
            done = 0
            for source, path in scan.files:
                with open(source, "rb") as fh:
                    commit.put_file_from_file(path=path, file=fh)
                done += os.lstat(source).st_size
                if progress:
                    progress(done, total)

        branch = target.name or DEFAULT_BRANCH
        return self._commit_with(target.repo, branch, message, upload), scan

    def _commit_with(self, repo: str, branch: str, message: str, fill: Callable) -> Commit:
        """One commit on repo@branch, filled by `fill(open_commit)`, waited for."""

        def run():
            with self.client.pfs.commit(
                branch=self._branch(repo, branch), description=message
            ) as commit:
                fill(commit)
            return commit.wait()

        return self._commit(self._call(f"commit to {repo}@{branch}", run))

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
        def fill(commit) -> None:
            for path in ["/"] if not carry_parent else deletes:
                commit.delete_file(path=normalize_path(path))
            for path, data in files.items():
                commit.put_file_from_bytes(path=normalize_path(path), data=data)

        return self._commit_with(repo, branch, message, fill)

    def clean(self, repo: str) -> Cleaned:
        raise _unsupported("clean")

    def provenance(self, commit: Commit) -> list[Commit]:
        raise _unsupported("provenance")

    # -- files

    def _file(self, commit: Commit, path: str):
        return self.pfs.File(commit=self._pfs_commit(commit), path=normalize_path(path))

    def files(self, commit: Commit, prefix: str = "/") -> Iterator[FileEntry]:
        infos = self._call(
            f"list files of {commit.ref}:{prefix}",
            self.client.pfs.walk_file,
            file=self._file(commit, prefix),
        )
        for info in infos:
            if info.file_type == self.pfs.FileType.FILE:
                yield FileEntry(info.file.path, info.hash.hex(), info.size_bytes)

    def listing(self, commit: Commit, prefix: str = "/") -> list[Entry]:
        infos = self._call(
            f"list files of {commit.ref}:{prefix}",
            self.client.pfs.list_file,
            file=self._file(commit, prefix),
        )
        if not infos:
            raise NotFound(f"{commit.ref} has no file or folder {normalize_path(prefix)}")
        return [
            Entry(
                i.file.path.rstrip("/").rsplit("/", 1)[-1],
                "dir" if i.file_type == self.pfs.FileType.DIR else "file",
                i.size_bytes,
                None,
            )
            for i in infos
        ]

    def open(self, commit: Commit, entry: FileEntry) -> IO[bytes]:
        def read() -> bytes:
            with self.client.pfs.pfs_file(self._file(commit, entry.path)) as remote:
                return remote.read()

        return io.BytesIO(self._call(f"get {commit.ref}:{entry.path}", read))

    def diff(self, old: Commit, new: Commit) -> Iterator[tuple[str, str, int | None, int | None]]:
        raise _unsupported("diff")

    def record_stats(self, commit: Commit, path: str, fmt: str, stats: dict) -> None:
        raise _unsupported("stats")

    def stored_stats(self, commit: Commit) -> list[dict]:
        raise _unsupported("stats")


class PachydermPipelines(_Pachd, PipelineBackend):
    """Pipelines on a pachd: created, updated and deleted there; pachd runs their jobs."""

    def create(
        self,
        spec_path: Path,
        update: bool = False,
        reprocess: bool = False,
        spec: PipelineSpec | None = None,
    ) -> dict:
        spec = spec or load_spec(spec_path)
        request_for(spec)  # fails here, naming the field, rather than on the cluster
        self._call(
            f"create pipeline {spec.name}",
            self.client.pps.create_pipeline_v2,
            create_pipeline_request_json=json.dumps(spec_json(spec)),
            update=update,
            reprocess=reprocess,
        )
        # pachd stops a running job of the old version itself.
        return {"name": spec.name, "version": "on pachd", "ignored": [], "stopped": []}

    def delete(self, name: str, keep_repo: bool = False) -> list[Job]:
        self._call(  # pachd stops the pipeline's running job itself
            f"delete pipeline {name}",
            self.client.pps.delete_pipeline,
            pipeline=self.pps.Pipeline(name=name),
            keep_repo=keep_repo,
        )
        return []

    def list(self) -> list[dict]:
        raise _unsupported("pipeline list")

    def inspect(self, name: str) -> dict:
        raise _unsupported("pipeline inspect")

    def run_pending(self, progress: Callable[[str], None] | None = None) -> list[Job]:
        raise Unsupported(
            "--wait runs jobs on the local engine; on Pachyderm pachd runs them",
            "follow them with 'pachctl list job'",
        )

    def triggered_by(
        self, commits: list[str] = (), versions: Mapping[str, int] | None = None
    ) -> list[Job]:
        raise _unsupported("job wait")

    def jobs(self, pipeline: str | None = None, limit: int = 20) -> list[Job]:
        raise _unsupported("job list")

    def job(self, job_id: str) -> Job:
        raise _unsupported("job inspect")

    def job_datums(self, job_id: str, state: str | None = None) -> list[dict]:
        raise _unsupported("job logs")

    def stop(self, job_id: str) -> Job:
        raise _unsupported("job stop")

    def serve(self, stop: threading.Event, say: Callable[[str], None]) -> None:
        raise _unsupported("worker")
