"""Fashion-MNIST: the IDX files it ships as, read as a stream, and written out as one PNG per
image in folder-per-class layout with a manifest (the form the data pipeline ingests).

Debian's `dataset-fashion-mnist` installs the files under /usr/share/datasets/fashion-mnist/;
any folder with the same four `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]` files works.
"""

from __future__ import annotations

import csv
import gzip
import struct
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator

from pipelines.core.errors import Invalid, NotFound

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASSES = (
    "t-shirt-top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)
SPLITS = ("train", "t10k")


def _open(path: Path) -> BinaryIO:
    return gzip.open(path) if path.suffix == ".gz" else open(path, "rb")


def _find(source: Path, split: str, kind: str) -> Path:
    for name in (f"{split}-{kind}-ubyte.gz", f"{split}-{kind}-ubyte"):
        if (source / name).is_file():
            return source / name
    raise NotFound(
        f"{source} has no {split}-{kind}-ubyte[.gz]",
        "install dataset-fashion-mnist or point --source to the IDX files",
    )


def read_header(fh: BinaryIO, path: Path, expected_dims: int) -> tuple[int, ...]:
    head = fh.read(4)
    if len(head) < 4 or head[:2] != b"\0\0" or head[2] != 0x08 or head[3] != expected_dims:
        raise Invalid(
            f"{path} is not an IDX file of unsigned bytes with {expected_dims} "
            f"dimension(s) (header {head.hex()})",
            "check the file",
        )
    return struct.unpack(f">{expected_dims}I", fh.read(4 * expected_dims))


def read(
    source: Path, split: str = "train", limit: int | None = None
) -> Iterator[tuple[int, int, bytes, int, int]]:
    """(index, label, pixels, width, height) for each image, read image by image."""
    if split not in SPLITS:
        raise Invalid(f"unknown split '{split}'", f"use one of {', '.join(SPLITS)}")
    images_path, labels_path = (
        _find(source, split, "images-idx3"),
        _find(source, split, "labels-idx1"),
    )
    with _open(images_path) as images, _open(labels_path) as labels:
        count, height, width = read_header(images, images_path, 3)
        (label_count,) = read_header(labels, labels_path, 1)
        if count != label_count:
            raise Invalid(
                f"{images_path.name} has {count} images but {labels_path.name} "
                f"{label_count} labels",
                "use files of the same split",
            )
        size = width * height
        for index in range(min(count, limit) if limit else count):
            pixels, label = images.read(size), labels.read(1)
            if len(pixels) < size or not label:
                raise Invalid(
                    f"{images_path.name} ends at image {index} of {count}",
                    "the file is truncated; reinstall it",
                )
            if label[0] >= len(CLASSES):
                raise Invalid(
                    f"{labels_path.name}: label {label[0]} of image {index} is not "
                    "a Fashion-MNIST class (0-9)"
                )
            yield index, label[0], pixels, width, height


def arrays(source: Path = DEFAULT_SOURCE, split: str = "train", limit: int | None = None):
    """(images, labels) of a split as numpy arrays: uint8 (N, height, width) and uint8 (N,),
    read in one go (for the accuracy check and benchmarks; `read` streams image by image)."""
    import numpy as np

    if split not in SPLITS:
        raise Invalid(f"unknown split '{split}'", f"use one of {', '.join(SPLITS)}")
    images_path, labels_path = (
        _find(source, split, "images-idx3"),
        _find(source, split, "labels-idx1"),
    )
    with _open(images_path) as images, _open(labels_path) as labels:
        count, height, width = read_header(images, images_path, 3)
        (label_count,) = read_header(labels, labels_path, 1)
        if count != label_count:
            raise Invalid(
                f"{images_path.name} has {count} images but {labels_path.name} "
                f"{label_count} labels",
                "use files of the same split",
            )
        count = min(count, limit) if limit else count
        pixels = np.frombuffer(images.read(count * height * width), dtype=np.uint8)
        classes = np.frombuffer(labels.read(count), dtype=np.uint8)
    if len(pixels) < count * height * width or len(classes) < count:
        raise Invalid(f"{images_path.name} ends early", "the file is truncated; reinstall it")
    if classes.size and classes.max() >= len(CLASSES):
        raise Invalid(f"{labels_path.name} has labels outside the Fashion-MNIST classes (0-9)")
    return pixels.reshape(count, height, width), classes


def png_bytes(pixels: bytes, width: int, height: int) -> bytes:
    """An 8-bit grayscale PNG (no imaging library needed)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    rows = b"".join(b"\0" + pixels[y * width : (y + 1) * width] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def export_pngs(source: Path, out: Path, split: str = "train", limit: int | None = None) -> int:
    """Write `out/<class>/<split>-<index>.png` and `out/manifest-<split>.csv`; return the count."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / f"manifest-{split}.csv"
    partial = manifest.with_suffix(".csv.partial")
    written = 0
    with open(partial, "w", newline="") as fh:
        rows = csv.writer(fh)
        rows.writerow(["path", "label", "class", "source_index"])
        for index, label, pixels, width, height in read(source, split, limit):
            relative = f"{CLASSES[label]}/{split}-{index:05d}.png"
            (out / CLASSES[label]).mkdir(exist_ok=True)
            (out / relative).write_bytes(png_bytes(pixels, width, height))
            rows.writerow([relative, label, CLASSES[label], index])
            written += 1
    partial.replace(manifest)  # the manifest appears only once every image is written
    return written
