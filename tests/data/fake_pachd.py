"""A stand-in pachd for tests: a real gRPC server on 127.0.0.1 that speaks pachd's protocol for
the calls CDL makes to read a repo and write commits, keeps one repo in memory, and records every
request, so a test sees exactly what pachyderm-sdk sent. No Pachyderm cluster runs on a test
machine."""

from __future__ import annotations

import hashlib
import itertools
from concurrent import futures
from datetime import datetime, timezone

import betterproto
import betterproto.lib.google.protobuf as protobuf
import grpc
from pachyderm_sdk.api import pfs

STARTED = datetime(2026, 11, 20, 9, 30, tzinfo=timezone.utc)


class FakePachd:
    """One user repo whose `master` head holds `files` ({path: bytes}); a commit made through
    StartCommit, ModifyFile and FinishCommit becomes the new head."""

    def __init__(self, repo: str, files: dict[str, bytes], commit_id: str = "a1" * 16):
        self.repo, self.files, self.commit_id = repo, dict(sorted(files.items())), commit_id
        self.requests: list[tuple[str, object]] = []
        self._ids = (f"{n:032x}" for n in itertools.count(1))
        self._open: dict[str, dict[str, bytes]] = {}  # commit id -> its files while open
        unary, stream = grpc.unary_unary_rpc_method_handler, grpc.unary_stream_rpc_method_handler
        calls = {
            "InspectCommit": (pfs.InspectCommitRequest, unary, self.inspect_commit),
            "ListRepo": (pfs.ListRepoRequest, stream, self.list_repo),
            "WalkFile": (pfs.WalkFileRequest, stream, self.walk_file),
            "GetFile": (pfs.GetFileRequest, stream, self.get_file),
            "StartCommit": (pfs.StartCommitRequest, unary, self.start_commit),
            "ModifyFile": (
                pfs.ModifyFileRequest,
                grpc.stream_unary_rpc_method_handler,
                self.modify,
            ),
            "FinishCommit": (pfs.FinishCommitRequest, unary, self.finish_commit),
        }
        handlers = {
            name: make(
                self._recorded(name, answer),
                request_deserializer=request_type.FromString,
                response_serializer=bytes,
            )
            for name, (request_type, make, answer) in calls.items()
        }
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("pfs_v2.API", handlers)]
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"grpc://127.0.0.1:{self.port}"
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=None)

    def _recorded(self, name, answer):
        def handle(request, context):
            if name == "ModifyFile":  # a stream of requests
                request = list(request)
                self.requests += [(name, r) for r in request]
            else:
                self.requests.append((name, request))
            return answer(request, context)

        return handle

    def sent(self, name: str) -> list:
        return [request for call, request in self.requests if call == name]

    # -- reading

    def _commit(self) -> pfs.Commit:
        repo = pfs.Repo(name=self.repo, type="user", project=pfs.Project(name="default"))
        return pfs.Commit(id=self.commit_id, repo=repo, branch=pfs.Branch(repo=repo, name="master"))

    def inspect_commit(self, request, context):
        asked = request.commit
        known = self.repo in (asked.repo.name, asked.branch.repo.name)
        if not known or (asked.id and asked.id != self.commit_id):
            context.abort(
                grpc.StatusCode.NOT_FOUND, f"commit {asked.id or asked.branch.name} not found"
            )
        return pfs.CommitInfo(
            commit=self._commit(),
            origin=pfs.CommitOrigin(kind=pfs.OriginKind.USER),
            description="first drop",
            started=STARTED,
            finished=STARTED,
            details=pfs.CommitInfoDetails(size_bytes=sum(map(len, self.files.values()))),
            created_by="robot:ingest",
        )

    def list_repo(self, request, context):
        yield pfs.RepoInfo(
            repo=pfs.Repo(name=self.repo, type="user"),
            created=STARTED,
            description="raw data",
            branches=[pfs.Branch(name="master")],
        )

    def walk_file(self, request, context):
        prefix = request.file.path.rstrip("/")
        for path, data in self.files.items():
            if path == prefix or path.startswith(prefix + "/"):
                yield pfs.FileInfo(
                    file=pfs.File(commit=self._commit(), path=path),
                    file_type=pfs.FileType.FILE,
                    size_bytes=len(data),
                    hash=hashlib.sha256(data).digest(),
                )

    def get_file(self, request, context):
        data = self.files.get(request.file.path)
        if data is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"file {request.file.path} not found")
        yield protobuf.BytesValue(value=data)

    # -- writing

    def start_commit(self, request, context):
        commit_id = next(self._ids)
        self._open[commit_id] = dict(self.files)  # the parent's files, as pachd does
        return pfs.Commit(id=commit_id, repo=request.branch.repo, branch=request.branch)

    def modify(self, requests, context):
        files: dict[str, bytes] = {}
        written: set[str] = set()  # a file's later chunks in the same stream are appended
        for request in requests:
            kind, body = betterproto.which_one_of(request, "body")
            if kind == "set_commit":
                files = self._open[body.id]
            elif kind == "add_file":
                chunk = body.raw if isinstance(body.raw, bytes) else body.raw.value
                files[body.path] = (files[body.path] if body.path in written else b"") + chunk
                written.add(body.path)
            elif kind == "delete_file":
                prefix = body.path.rstrip("/")
                for path in [p for p in files if p == body.path or p.startswith(prefix + "/")]:
                    del files[path]
        return protobuf.Empty()

    def finish_commit(self, request, context):
        self.files = dict(sorted(self._open.pop(request.commit.id).items()))
        self.commit_id = request.commit.id
        return protobuf.Empty()
