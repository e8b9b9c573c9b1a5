"""A stand-in pachd for tests: a real gRPC server on 127.0.0.1 that speaks pachd's protocol for
the calls CDL's read path makes, answers from an in-memory repo, and records every request, so a
test sees exactly what pachyderm-sdk sent. No Pachyderm cluster can run on a test machine."""

from __future__ import annotations

import hashlib
from concurrent import futures
from datetime import datetime, timezone

import betterproto.lib.google.protobuf as protobuf
import grpc
from pachyderm_sdk.api import pfs

STARTED = datetime(2026, 11, 20, 9, 30, tzinfo=timezone.utc)


class FakePachd:
    """One user repo with one finished commit on `master`, holding `files` ({path: bytes})."""

    def __init__(self, repo: str, files: dict[str, bytes], commit_id: str = "a1" * 16):
        self.repo, self.files, self.commit_id = repo, dict(sorted(files.items())), commit_id
        self.requests: list[tuple[str, object]] = []
        calls = {
            "InspectCommit": (pfs.InspectCommitRequest, False, self.inspect_commit),
            "ListRepo": (pfs.ListRepoRequest, True, self.list_repo),
            "WalkFile": (pfs.WalkFileRequest, True, self.walk_file),
            "GetFile": (pfs.GetFileRequest, True, self.get_file),
        }
        handlers = {}
        for name, (request_type, streams, answer) in calls.items():
            make = (
                grpc.unary_stream_rpc_method_handler
                if streams
                else grpc.unary_unary_rpc_method_handler
            )
            handlers[name] = make(
                self._recorded(name, answer),
                request_deserializer=request_type.FromString,
                response_serializer=bytes,
            )
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
            self.requests.append((name, request))
            return answer(request, context)

        return handle

    def sent(self, name: str) -> list:
        return [request for call, request in self.requests if call == name]

    # -- answers

    def _commit(self) -> pfs.Commit:
        repo = pfs.Repo(name=self.repo, type="user", project=pfs.Project(name="default"))
        return pfs.Commit(id=self.commit_id, repo=repo, branch=pfs.Branch(repo=repo, name="master"))

    def inspect_commit(self, request, context):
        asked = request.commit
        known = asked.repo.name == self.repo or asked.branch.repo.name == self.repo
        if not known or (asked.id and asked.id != self.commit_id):
            context.abort(
                grpc.StatusCode.NOT_FOUND, f"commit {asked.id or asked.branch.name} not found"
            )
        size = sum(len(data) for data in self.files.values())
        return pfs.CommitInfo(
            commit=self._commit(),
            origin=pfs.CommitOrigin(kind=pfs.OriginKind.USER),
            description="first drop",
            started=STARTED,
            finished=STARTED,
            details=pfs.CommitInfoDetails(size_bytes=size),
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
