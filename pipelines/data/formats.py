"""Dataset formats of a commit and their statistics: sample counts, per-class counts, sizes.

Formats: folder-per-class (text or images: the class is the first folder), IDX (MNIST-style,
optionally gzipped image/label files), CSV (a label column), classification TXT (`path label`
lines), Pascal VOC XML (object names per image) and COCO JSON (annotations per category).
Files are read from the object store as streams; IDX labels and CSV rows are counted chunk by chunk.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import struct
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import BinaryIO, Callable

from pipelines.core.errors import Invalid, NotFound
from pipelines.data.backend import Commit, DataBackend, FileEntry, normalize_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass
class Stats:
    format: str
    samples: int
    classes: dict[str, int]
    bytes: int
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class CommitFiles:
    """The files of a commit, readable as streams from the object store."""

    def __init__(self, backend: DataBackend, commit: Commit, prefix: str = "/"):
        self.backend = backend
        self.commit = commit
        self.prefix = prefix.rstrip("/")  # paths are read relative to the prefix
        cut = len(self.prefix)
        self.entries = [
            FileEntry(e.path[cut:], e.sha256, e.size) for e in backend.files(commit, prefix)
        ]

    def open(self, entry: FileEntry) -> BinaryIO:
        stored = FileEntry(self.prefix + entry.path, entry.sha256, entry.size)
        raw = self.backend.open(self.commit, stored)
        return gzip.open(raw) if entry.path.endswith(".gz") else raw

    def text(self, entry: FileEntry) -> str:
        with self.open(entry) as fh:
            return fh.read().decode("utf-8", errors="replace")

    def named(self, *suffixes: str) -> list[FileEntry]:
        return [e for e in self.entries if e.path.lower().endswith(suffixes)]


def _fail(files: CommitFiles, fmt: str, why: str) -> Invalid:
    return Invalid(
        f"{files.commit.ref} is not in {fmt} format: {why}",
        "pick the format with --format, or check the data",
    )


def _png_size(head: bytes) -> tuple[int, int] | None:
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return struct.unpack(">II", head[16:24])
    return None


def folder_per_class(files: CommitFiles) -> Stats:
    classes: Counter = Counter()
    sizes: Counter = Counter()
    shapes: Counter = Counter()
    for entry in files.entries:
        parts = entry.path.strip("/").split("/")
        if len(parts) < 2:
            continue  # files at the root belong to no class
        classes[parts[0]] += 1
        sizes[parts[0]] += entry.size
        if entry.path.lower().endswith(".png"):
            with files.open(entry) as fh:
                shape = _png_size(fh.read(24))
            if shape:
                shapes[f"{shape[0]}x{shape[1]}"] += 1
    if not classes:
        raise _fail(files, "folder-per-class", "no files inside class folders")
    samples = sum(classes.values())
    details = {
        "bytes_per_class": dict(sorted(sizes.items())),
        "mean_bytes": round(sum(sizes.values()) / samples, 1),
    }
    if shapes:
        details["image_sizes"] = dict(shapes.most_common())
    return Stats("folder", samples, dict(sorted(classes.items())), sum(sizes.values()), details)


def _idx_header(fh: BinaryIO) -> tuple[int, tuple[int, ...]]:
    magic = fh.read(4)
    if len(magic) < 4 or magic[:2] != b"\0\0":
        raise ValueError("bad magic number")
    dims = struct.unpack(f">{magic[3]}I", fh.read(4 * magic[3]))
    return magic[2], dims


def idx(files: CommitFiles) -> Stats:
    found = [e for e in files.entries if "idx" in e.path.rsplit("/", 1)[-1]]
    if not found:
        raise _fail(files, "IDX", "no *-idx*-ubyte[.gz] files")
    classes: Counter = Counter()
    details: dict = {"files": {}}
    samples = 0
    for entry in found:
        with files.open(entry) as fh:
            try:
                dtype, dims = _idx_header(fh)
            except (ValueError, struct.error, OSError, EOFError) as exc:
                raise _fail(files, "IDX", f"{entry.path}: {exc}") from exc
            details["files"][entry.path] = {"dims": list(dims), "dtype": dtype}
            if len(dims) == 1:  # a label file: count the labels in chunks
                read = 0
                while chunk := fh.read(1 << 16):
                    classes.update(chunk)
                    read += len(chunk)
                if read != dims[0]:
                    raise _fail(
                        files, "IDX", f"{entry.path} holds {read} labels, header says {dims[0]}"
                    )
            else:
                samples += dims[0]
    if not samples:
        samples = sum(classes.values())
    return Stats(
        "idx",
        samples,
        {str(k): v for k, v in sorted(classes.items())},
        sum(e.size for e in found),
        details,
    )


def csv_rows(files: CommitFiles, label_column: str | None = None) -> Stats:
    found = files.named(".csv", ".csv.gz")
    if not found:
        raise _fail(files, "CSV", "no .csv files")
    classes: Counter = Counter()
    rows = 0
    for entry in found:
        with files.open(entry) as fh:
            reader = csv.reader(
                io.TextIOWrapper(fh, encoding="utf-8", errors="replace", newline="")
            )
            header = next(reader, None)
            if not header:
                continue
            column = label_column or ("label" if "label" in header else header[-1])
            if column not in header:
                raise _fail(
                    files,
                    "CSV",
                    f"{entry.path} has no column '{column}' (columns: {', '.join(header)})",
                )
            index = header.index(column)
            for row in reader:
                if row:
                    rows += 1
                    classes[row[index] if index < len(row) else ""] += 1
    return Stats(
        "csv",
        rows,
        dict(sorted(classes.items())),
        sum(e.size for e in found),
        {"label_column": label_column or "label or the last column"},
    )


def classification_txt(files: CommitFiles) -> Stats:
    lists = files.named(".txt")
    known = {e.path for e in files.entries}
    classes: Counter = Counter()
    missing: list[str] = []
    for entry in lists:
        lines = [ln.split() for ln in files.text(entry).splitlines() if ln.strip()]
        if not lines or any(len(parts) != 2 for parts in lines):
            continue  # not a "path label" list
        for path, label in lines:
            classes[label] += 1
            if "/" + path.lstrip("/") not in known and len(missing) < 20:
                missing.append(path)
    if not classes:
        raise _fail(files, "classification TXT", "no .txt file of 'path label' lines")
    return Stats(
        "txt",
        sum(classes.values()),
        dict(sorted(classes.items())),
        sum(e.size for e in files.entries),
        {"paths_not_in_commit": missing},
    )


def voc(files: CommitFiles) -> Stats:
    classes: Counter = Counter()
    images = 0
    for entry in files.named(".xml"):
        try:
            root = ET.fromstring(files.text(entry))
        except ET.ParseError as exc:
            raise _fail(files, "VOC XML", f"{entry.path}: {exc}") from exc
        if root.tag != "annotation":
            continue
        images += 1
        classes.update(obj.findtext("name", "").strip() for obj in root.iter("object"))
    if not images:
        raise _fail(files, "VOC XML", "no <annotation> XML files")
    return Stats(
        "voc",
        images,
        dict(sorted(classes.items())),
        sum(e.size for e in files.entries),
        {"objects": sum(classes.values())},
    )


def coco(files: CommitFiles) -> Stats:
    for entry in files.named(".json"):
        try:
            data = json.loads(files.text(entry))
        except json.JSONDecodeError:
            continue
        if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= data.keys():
            continue
        names = {c["id"]: c["name"] for c in data["categories"]}
        counts = Counter(names.get(a.get("category_id"), "?") for a in data["annotations"])
        return Stats(
            "coco",
            len(data["images"]),
            dict(sorted(counts.items())),
            sum(e.size for e in files.entries),
            {"annotations": len(data["annotations"]), "file": entry.path},
        )
    raise _fail(files, "COCO JSON", "no .json file with images, annotations and categories")


FORMATS: dict[str, Callable[[CommitFiles], Stats]] = {
    "idx": idx,
    "coco": coco,
    "voc": voc,
    "csv": csv_rows,
    "txt": classification_txt,
    "folder": folder_per_class,
}


def detect(files: CommitFiles) -> str:
    names = [e.path.lower() for e in files.entries]
    if any("-idx" in n and "-ubyte" in n for n in names):
        return "idx"
    if any(n.endswith(".json") for n in names):
        return "coco"
    if any(n.endswith(".xml") for n in names):
        return "voc"
    if any(n.endswith((".csv", ".csv.gz")) for n in names):
        return "csv"
    if any(n.count("/") >= 2 for n in names):
        return "folder"
    return "txt"


def compute(
    backend: DataBackend,
    commit: Commit,
    fmt: str | None = None,
    label_column: str | None = None,
    prefix: str = "/",
) -> Stats:
    """Statistics of the files under `prefix` of `commit`, read as `fmt` (detected when None),
    stored with the commit."""
    prefix = normalize_path(prefix)
    files = CommitFiles(backend, commit, prefix)
    if not files.entries:
        raise NotFound(f"{commit.ref}:{prefix} holds no files", "check the ref and the path")
    fmt = fmt or detect(files)
    if fmt not in FORMATS:
        raise Invalid(f"unknown format '{fmt}'", f"use one of {', '.join(FORMATS)}")
    stats = csv_rows(files, label_column) if fmt == "csv" else FORMATS[fmt](files)
    backend.record_stats(commit, prefix, fmt, stats.to_dict())
    return stats


def stored(backend: DataBackend, commit: Commit) -> list[Stats]:
    """The statistics computed for `commit` so far."""
    return [Stats(**found) for found in backend.stored_stats(commit)]
