"""The object store: file bytes addressed by their sha256, so identical bytes are stored once,
in a local folder (the default) or an S3 bucket.

The local store is a directory `objects/ab/cdef...` (the first two hex digits fan out). An object
is written to a temporary file (`.tmp-*`) and renamed into place, so a reader never sees half an
object and a crash leaves at most a stray temporary file. Files are hashed while they are copied,
in chunks: nothing is ever read whole into memory except small files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO, Iterator

from pipelines.core.errors import Unavailable, Unsupported
from pipelines.plugins import backend_class

CHUNK = 1 << 20
SMALL = 1 << 20  # read in one go below this size


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class ObjectMissing(Exception):
    pass


class ObjectStore(ABC):
    """The object store port: bytes in, their sha256 out; the same bytes are stored once.

    `put_bytes` / `put_file` / `put_stream` return (sha256, size) and leave an object whole or
    not at all; `has` says whether one is there; `open` and `materialize` raise `ObjectMissing`
    for an unknown sha256; a store that cannot be reached raises `Unavailable`. Backends are
    registered in pipelines/plugins.py under `object_store` and checked by the contract test in
    tests/core/test_objects.py. Small files are read in one go, large ones by the store's own
    streaming path (`_put_large`); objects are read back in chunks.
    """

    @classmethod
    @abstractmethod
    def from_config(cls, config) -> "ObjectStore":
        """The store an `object_store` section of the stack config describes."""

    @abstractmethod
    def has(self, sha256: str) -> bool: ...

    @abstractmethod
    def put_bytes(self, data: bytes) -> tuple[str, int]: ...

    @abstractmethod
    def put_stream(self, src: BinaryIO) -> tuple[str, int]: ...

    @abstractmethod
    def _put_large(self, source: Path, src: BinaryIO, size: int) -> tuple[str, int]: ...

    @abstractmethod
    def open(self, sha256: str) -> BinaryIO: ...

    @abstractmethod
    def materialize(self, sha256: str, target: Path) -> None:
        """Write the object's bytes to `target` (a copy, never a link)."""

    def clean(self) -> int:
        """Remove what writers that died left behind; return how many. (S3 keeps nothing of an
        interrupted upload but its multipart parts, which the bucket's lifecycle rules expire.)"""
        return 0

    def put_file(self, source: Path) -> tuple[str, int]:
        """Store a file's bytes; return (sha256, size). Raises OSError if it cannot be read."""
        with open(source, "rb") as src:
            size = os.fstat(src.fileno()).st_size
            if size < SMALL:
                return self.put_bytes(src.read())
            return self._put_large(source, src, size)

    def read_chunks(self, sha256: str) -> Iterator[bytes]:
        with self.open(sha256) as src:
            while chunk := src.read(CHUNK):
                yield chunk


class LocalObjectStore(ObjectStore):
    @classmethod
    def from_config(cls, config) -> "LocalObjectStore":
        return cls(config.path)

    def __init__(self, root: Path):
        self.root = root
        self.objects = root / "objects"
        self._made: set[str] = set()  # fan-out folders known to exist

    def path(self, sha256: str) -> Path:
        return self.objects / sha256[:2] / sha256[2:]

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def _folder(self, sha256: str) -> str:
        folder = os.path.join(self.objects, sha256[:2])
        if folder not in self._made:
            os.makedirs(folder, exist_ok=True)
            self._made.add(folder)
        return folder

    def _temporary(self, folder: str) -> tuple[int, str]:
        """A new temporary file beside its final place, so the rename stays in one folder; its
        name carries the writer's pid, so that `clean` knows when the writer is gone."""
        return tempfile.mkstemp(dir=folder, prefix=f".tmp-{os.getpid()}-")

    def clean(self) -> int:
        """Remove the temporary files of writers that died (a killed put); return how many."""
        removed = 0
        for path in self.objects.glob("**/.tmp-*"):
            pid = path.name.split("-")[1]
            if pid.isdigit() and _alive(int(pid)):
                continue  # still being written
            path.unlink(missing_ok=True)
            removed += 1
        return removed

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        sha256 = hashlib.sha256(data).hexdigest()
        folder = self._folder(sha256)
        target = os.path.join(folder, sha256[2:])
        if not os.path.exists(target):
            fd, tmp_path = self._temporary(folder)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp_path, target)  # identical bytes: a concurrent writer's copy is equal
        return sha256, len(data)

    def _put_large(self, source: Path, src: BinaryIO, size: int) -> tuple[str, int]:
        return self.put_stream(src)

    def put_stream(self, src: BinaryIO) -> tuple[str, int]:
        self.objects.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        fd, tmp_path = self._temporary(str(self.objects))
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            sha256 = digest.hexdigest()
            os.replace(tmp_path, os.path.join(self._folder(sha256), sha256[2:]))
        except BaseException:
            if os.path.exists(tmp_path):
                os.unlink(tmp_path)
            raise
        return sha256, size

    def open(self, sha256: str) -> BinaryIO:
        try:
            return open(self.path(sha256), "rb")
        except FileNotFoundError as exc:
            raise ObjectMissing(sha256) from exc

    def materialize(self, sha256: str, target: Path) -> None:
        """Write the object's bytes to `target`. A copy, not a link: a transform that wrote to
        its input would otherwise change the stored object for every commit sharing it."""
        source = self.path(sha256)
        if not source.exists():
            raise ObjectMissing(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


class S3ObjectStore(ObjectStore):
    """The same store in an S3 bucket (AWS, MinIO, any S3 endpoint): keys `PREFIX/ab/cdef...`.

    Credentials come from the usual AWS environment or config files, never from cdl.yaml. An
    upload is a single PUT (or a multipart upload completed in one call), so a key is either
    absent or whole. Large files are hashed in one pass and uploaded in a second: the key is the
    hash, and nothing is held in memory.
    """

    @classmethod
    def from_config(cls, config) -> "S3ObjectStore":
        return cls(config.bucket, config.prefix, config.endpoint_url)

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None):
        try:
            import boto3
            from botocore.exceptions import BotoCoreError, ClientError
        except ImportError as exc:
            raise Unsupported(
                "the S3 object store needs boto3", "pip install 'cdl[s3]' in the platform venv"
            ) from exc
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.client = boto3.client("s3", endpoint_url=endpoint_url)
        self._errors = (BotoCoreError, ClientError)

    def key(self, sha256: str) -> str:
        name = f"{sha256[:2]}/{sha256[2:]}"
        return f"{self.prefix}/{name}" if self.prefix else name

    def _fail(self, what: str, exc: Exception) -> Unavailable:
        where = f"s3://{self.bucket}/{self.prefix}" + (
            f" at {self.endpoint_url}" if self.endpoint_url else ""
        )
        return Unavailable(
            f"object store {where}: {what} failed: {exc}",
            "check object_store settings and the AWS credentials in the environment",
        )

    def has(self, sha256: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(sha256))
            return True
        except self._errors as exc:
            if _not_found(exc):
                return False
            raise self._fail("HEAD", exc) from exc

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.has(sha256):
            try:
                self.client.put_object(Bucket=self.bucket, Key=self.key(sha256), Body=data)
            except self._errors as exc:
                raise self._fail("PUT", exc) from exc
        return sha256, len(data)

    def _put_large(self, source: Path, src: BinaryIO, size: int) -> tuple[str, int]:
        digest = hashlib.sha256()
        while chunk := src.read(CHUNK):
            digest.update(chunk)
        sha256 = digest.hexdigest()
        if not self.has(sha256):
            try:
                self.client.upload_file(str(source), self.bucket, self.key(sha256))
            except self._errors as exc:
                raise self._fail("upload", exc) from exc
        return sha256, size

    def put_stream(self, src: BinaryIO) -> tuple[str, int]:
        with tempfile.NamedTemporaryFile() as spool:
            shutil.copyfileobj(src, spool, CHUNK)
            spool.flush()
            return self.put_file(Path(spool.name))

    def open(self, sha256: str) -> BinaryIO:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(sha256))["Body"]
        except self._errors as exc:
            if _not_found(exc):
                raise ObjectMissing(sha256) from exc
            raise self._fail("GET", exc) from exc
        return _Closing(body)

    def materialize(self, sha256: str, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        with self.open(sha256) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)


def _not_found(exc: Exception) -> bool:
    return getattr(exc, "response", {}).get("Error", {}).get("Code") in ("404", "NoSuchKey")


class _Closing:
    """A botocore body as a context manager with read()."""

    def __init__(self, body):
        self.body = body

    def read(self, size: int = -1) -> bytes:
        return self.body.read(size if size >= 0 else None)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.body.close()


def object_store_for(settings) -> ObjectStore:
    """The object store the stack's configuration names (`object_store.kind`, registered in
    pipelines/plugins.py)."""
    config = settings.stack.object_store
    return backend_class("object_store", config.kind).from_config(config)
