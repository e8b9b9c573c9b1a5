"""The Pachyderm backend: the same repos and pipeline specs on a real Pachyderm cluster, through
pachyderm-sdk (the `pachyderm` extra). Selected with `data.engine: pachyderm` in the stack.

Pipeline specs are the files the local engine runs; they go to pachd as they are, in Pachyderm's
own JSON form (`create_pipeline_v2`), after the same validation. `request_for` builds the typed
protobuf request from a spec, which shows what pachd will receive without a cluster at hand.
Commands that need the local engine's own tables (diff, stats, jobs, provenance) say so.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Iterator

from pipelines.core.errors import Invalid, Unavailable, Unsupported
from pipelines.data.repos import normalize_path, scan_sources
from pipelines.data.schedule import parse_duration
from pipelines.data.spec import PipelineSpec

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


class PachydermData:
    """Repos, commits and pipelines on a pachd at `address` (grpc://host:30650)."""

    def __init__(self, address: str):
        sdk, self.pfs, self.pps = _sdk()
        self.address = address
        try:
            self.client = sdk.Client.from_pachd_address(address)
        except ValueError as exc:
            raise Invalid(
                f"data.pachd_address {address!r}: {exc}", "write it as grpc://HOST:30650"
            ) from exc

    def _call(self, what: str, fn, *args, **kwargs):
        import grpc

        unreachable = Unavailable(
            f"cannot reach pachd at {self.address} ({what})",
            "check data.pachd_address / CDL_DATA__PACHD_ADDRESS, or port-forward pachd",
        )
        try:
            result = fn(*args, **kwargs)
            # Streaming calls fail while they are read: read them here.
            return list(result) if hasattr(result, "__next__") else result
        except ConnectionError as exc:  # how pachyderm-sdk reports a pachd that does not answer
            raise unreachable from exc
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise unreachable from exc
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise Invalid(f"pachd refused {what}: {details}") from exc

    def check(self) -> str:
        """The pachd version, or a clear error when it cannot be reached."""
        version = self._call("version", self.client.get_version)
        return f"{version.major}.{version.minor}.{version.micro}"

    def create_repo(self, name: str, description: str = "") -> None:
        repo = self.pfs.Repo(name=name, type="user")
        self._call(
            f"create repo {name}", self.client.pfs.create_repo, repo=repo, description=description
        )

    def list_repos(self) -> list[str]:
        return [r.repo.name for r in self._call("list repos", self.client.pfs.list_repo)]

    def delete_repo(self, name: str) -> None:
        self._call(
            f"delete repo {name}",
            self.client.pfs.delete_repo,
            repo=self.pfs.Repo(name=name, type="user"),
        )

    def put(
        self, repo: str, branch: str, sources: list[Path], dest: str = "/", message: str = ""
    ) -> str:
        """Put files in one commit (scanned as the local engine scans them); return its id."""
        scan = scan_sources(sources, dest)
        if not scan.files:
            raise Invalid("nothing to put", "check the paths")
        target = self.pfs.Branch.from_uri(f"{repo}@{branch}")

        def upload() -> str:
            with self.client.pfs.commit(branch=target, description=message) as commit:
                for source, path in scan.files:
                    with open(source, "rb") as fh:
                        commit.put_file_from_file(path=path, file=fh)
            return commit.id

        return self._call(f"put to {repo}@{branch}", upload)

    def log(self, repo: str, branch: str | None = None, limit: int = 50) -> list[dict]:
        """Commits of a repo (or of one branch), newest first."""
        if branch:
            infos = self._call(
                "list commits",
                self.client.pfs.list_commit,
                to=self.pfs.Commit.from_uri(f"{repo}@{branch}"),
                number=limit,
            )
        else:
            infos = self._call(
                "list commits",
                self.client.pfs.list_commit,
                repo=self.pfs.Repo(name=repo, type="user"),
                number=limit,
            )
        return [
            {
                "id": i.commit.id,
                "branch": i.commit.branch.name if i.commit.branch else "",
                "started": i.started,
                "finished": i.finished,
                "description": i.description,
                "size": i.details.size_bytes if i.details else None,
            }
            for i in infos
        ]

    def files(self, repo: str, ref: str, path: str = "/") -> Iterator[tuple[str, int]]:
        commit = self.pfs.Commit.from_uri(f"{repo}@{ref}")
        file = self.pfs.File(commit=commit, path=normalize_path(path))
        for info in self._call("list files", self.client.pfs.walk_file, file=file):
            if info.file_type == self.pfs.FileType.FILE:
                yield info.file.path, info.size_bytes

    def get(self, repo: str, ref: str, path: str, output: Path) -> None:
        commit = self.pfs.Commit.from_uri(f"{repo}@{ref}")
        file = self.pfs.File(commit=commit, path=normalize_path(path))

        def download() -> None:
            with self.client.pfs.pfs_file(file) as remote, open(output, "wb") as out:
                while chunk := remote.read(io.DEFAULT_BUFFER_SIZE * 64):
                    out.write(chunk)

        self._call(f"get {repo}@{ref}:{path}", download)

    def create_pipeline(
        self, spec: PipelineSpec, update: bool = False, reprocess: bool = False
    ) -> None:
        request_for(spec)  # fails here, naming the field, rather than on the cluster
        self._call(
            f"create pipeline {spec.name}",
            self.client.pps.create_pipeline_v2,
            create_pipeline_request_json=json.dumps(spec_json(spec)),
            update=update,
            reprocess=reprocess,
        )

    def delete_pipeline(self, name: str) -> None:
        self._call(
            f"delete pipeline {name}",
            self.client.pps.delete_pipeline,
            pipeline=self.pps.Pipeline(name=name),
        )
