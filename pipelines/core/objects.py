"""The object store: file bytes addressed by their sha256, so identical bytes are stored once.

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
from pathlib import Path
from typing import BinaryIO, Iterator

CHUNK = 1 << 20
SMALL = 1 << 20  # read in one go below this size


class ObjectMissing(Exception):
    pass


class LocalObjectStore:
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
        """A new temporary file beside its final place, so the rename stays in one folder."""
        return tempfile.mkstemp(dir=folder, prefix=".tmp-")

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

    def put_file(self, source: Path) -> tuple[str, int]:
        """Store a file's bytes; return (sha256, size). Raises OSError if it cannot be read."""
        with open(source, "rb") as src:
            size = os.fstat(src.fileno()).st_size
            if size < SMALL:
                return self.put_bytes(src.read())
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

    def read_chunks(self, sha256: str) -> Iterator[bytes]:
        with self.open(sha256) as src:
            while chunk := src.read(CHUNK):
                yield chunk

    def materialize(self, sha256: str, target: Path) -> None:
        """Write the object's bytes to `target`. A copy, not a link: a transform that wrote to
        its input would otherwise change the stored object for every commit sharing it."""
        source = self.path(sha256)
        if not source.exists():
            raise ObjectMissing(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
