"""Dataset formats and their statistics, on small files of each real format."""

import gzip
import json
import shutil
import struct
import uuid
from pathlib import Path

import pytest

from pipelines.core.errors import CDLError
from pipelines.data import formats
from pipelines.data.repos import DataRepos, Ref
from tests.conftest import cdl

FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def repos(shared_stack):
    return DataRepos(shared_stack)


def commit_of(repos, tmp_path, files: dict[str, bytes]):
    name = f"fmt{uuid.uuid4().hex[:8]}"
    repos.create_repo(name)
    src = tmp_path / name
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    return repos.put(Ref.parse(name), [src])[0]


def png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + b"\0\0\0\0"


def idx_file(dims: tuple[int, ...], payload: bytes) -> bytes:
    header = b"\0\0\x08" + bytes([len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    return gzip.compress(header + payload)


def test_folder_per_class_text_and_images(repos, tmp_path):
    text = commit_of(
        repos,
        tmp_path,
        {
            "business/001.txt": b"Shares rose\nbody",
            "business/002.txt": b"Profits\nbody",
            "sport/001.txt": b"Match\nreport text",
            "README": b"not a sample",
        },
    )
    stats = formats.compute(repos, text)
    assert (stats.format, stats.samples, stats.classes) == (
        "folder",
        3,
        {"business": 2, "sport": 1},
    )
    assert stats.details["bytes_per_class"]["sport"] == len(b"Match\nreport text")
    images = commit_of(
        repos,
        tmp_path,
        {
            "0/a.png": png_header(28, 28),
            "0/b.png": png_header(28, 28),
            "9/c.png": png_header(32, 28),
        },
    )
    stats = formats.compute(repos, images)
    assert stats.classes == {"0": 2, "9": 1}
    assert stats.details["image_sizes"] == {"28x28": 2, "32x28": 1}


def test_idx_images_and_labels(repos, tmp_path):
    labels = bytes([0, 1, 1, 2, 2, 2])
    commit = commit_of(
        repos,
        tmp_path,
        {
            "train-images-idx3-ubyte.gz": idx_file((6, 2, 2), bytes(24)),
            "train-labels-idx1-ubyte.gz": idx_file((6,), labels),
        },
    )
    stats = formats.compute(repos, commit)
    assert (stats.format, stats.samples, stats.classes) == ("idx", 6, {"0": 1, "1": 2, "2": 3})
    assert stats.details["files"]["/train-images-idx3-ubyte.gz"]["dims"] == [6, 2, 2]


def test_truncated_idx_labels_are_an_error(repos, tmp_path):
    commit = commit_of(repos, tmp_path, {"t-labels-idx1-ubyte.gz": idx_file((10,), bytes(4))})
    with pytest.raises(CDLError, match="holds 4 labels, header says 10"):
        formats.compute(repos, commit)


def test_real_fashion_mnist_test_labels(repos, tmp_path):
    src = tmp_path / "fashion"
    src.mkdir()
    shutil.copy(FASHION / "t10k-labels-idx1-ubyte.gz", src)
    commit = commit_of(
        repos,
        tmp_path,
        {"t10k-labels-idx1-ubyte.gz": (src / "t10k-labels-idx1-ubyte.gz").read_bytes()},
    )
    stats = formats.compute(repos, commit, "idx")
    assert stats.samples == 10_000
    assert stats.classes == {str(c): 1000 for c in range(10)}


def test_csv_label_columns(repos, tmp_path):
    commit = commit_of(
        repos,
        tmp_path,
        {
            "train.csv": b"text,label\nhello,a\nworld,b\nagain,a\n",
            "more.csv": b"text,label\nlast,b\n",
        },
    )
    stats = formats.compute(repos, commit)
    assert (stats.format, stats.samples, stats.classes) == ("csv", 4, {"a": 2, "b": 2})
    by_text = formats.compute(repos, commit, "csv", label_column="text")
    assert by_text.classes["hello"] == 1
    with pytest.raises(CDLError, match="has no column 'topic'"):
        formats.compute(repos, commit, "csv", label_column="topic")


def test_classification_txt(repos, tmp_path):
    commit = commit_of(
        repos,
        tmp_path,
        {
            "images/a.jpg": b"x",
            "images/b.jpg": b"y",
            "train.txt": b"images/a.jpg cat\nimages/b.jpg dog\nimages/gone.jpg dog\n",
        },
    )
    stats = formats.compute(repos, commit, "txt")
    assert stats.classes == {"cat": 1, "dog": 2}
    assert stats.details["paths_not_in_commit"] == ["images/gone.jpg"]


def test_voc_xml(repos, tmp_path):
    def annotation(*names):
        objects = "".join(f"<object><name>{n}</name></object>" for n in names)
        return f"<annotation><filename>x.jpg</filename>{objects}</annotation>".encode()

    commit = commit_of(
        repos,
        tmp_path,
        {"Annotations/1.xml": annotation("dog", "person"), "Annotations/2.xml": annotation("dog")},
    )
    stats = formats.compute(repos, commit)
    assert (stats.format, stats.samples, stats.classes) == ("voc", 2, {"dog": 2, "person": 1})
    broken = commit_of(repos, tmp_path, {"a.xml": b"<annotation><object>"})
    with pytest.raises(CDLError, match="not in VOC XML format: /a.xml"):
        formats.compute(repos, broken)


def test_coco_json(repos, tmp_path):
    coco = {
        "images": [{"id": 1}, {"id": 2}],
        "categories": [{"id": 1, "name": "shirt"}, {"id": 2, "name": "shoe"}],
        "annotations": [
            {"image_id": 1, "category_id": 1},
            {"image_id": 2, "category_id": 2},
            {"image_id": 2, "category_id": 2},
        ],
    }
    commit = commit_of(repos, tmp_path, {"annotations/instances.json": json.dumps(coco).encode()})
    stats = formats.compute(repos, commit)
    assert (stats.format, stats.samples, stats.classes) == ("coco", 2, {"shirt": 1, "shoe": 2})
    assert [s.format for s in formats.stored(repos, commit)] == ["coco"]


def test_wrong_format_and_unknown_format(repos, tmp_path):
    commit = commit_of(repos, tmp_path, {"flat.bin": b"1"})
    with pytest.raises(CDLError, match="not in classification TXT format"):
        formats.compute(repos, commit)
    with pytest.raises(CDLError, match="unknown format 'parquet'"):
        formats.compute(repos, commit, "parquet")
    with pytest.raises(CDLError, match="not in folder-per-class format"):
        formats.compute(repos, commit, "folder")


def test_cli_stats(shared_stack, repos, tmp_path):
    commit = commit_of(repos, tmp_path, {"a/1.txt": b"x", "a/2.txt": b"y", "b/1.txt": b"z"})
    result = cdl("data", "stats", commit.ref, cwd=shared_stack.settings.root)
    assert result.returncode == 0, result.stderr
    assert "folder format, 3 samples, 2 classes" in result.stdout
    as_json = cdl("data", "stats", commit.ref, "--json", cwd=shared_stack.settings.root)
    assert json.loads(as_json.stdout)["classes"] == {"a": 2, "b": 1}


def test_stats_of_a_folder_inside_a_commit(repos, tmp_path):
    commit = commit_of(
        repos,
        tmp_path,
        {
            "valid/a/1.txt": b"x",
            "valid/b/1.txt": b"y",
            "quarantine/a/2.txt": b"z",
            "quarantine/a/2.txt.reason": b"too short",
        },
    )
    stats = formats.compute(repos, commit, "folder", prefix="/valid")
    assert stats.classes == {"a": 1, "b": 1}
    whole = formats.compute(repos, commit, "folder")
    assert whole.classes == {"quarantine": 2, "valid": 2}
    assert len(formats.stored(repos, commit)) == 2
    with pytest.raises(CDLError, match=":/nothing holds no files"):
        formats.compute(repos, commit, prefix="/nothing")
