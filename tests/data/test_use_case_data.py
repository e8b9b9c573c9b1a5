"""The use cases' raw data: the BBC corpus format (generator and loader) and Fashion-MNIST IDX."""

import csv
import gzip
import struct
from pathlib import Path

import pytest

from pipelines.core.errors import CDLError
from pipelines.data import bbc, fashion
from tests.conftest import REPO, cdl


def test_generated_corpus_has_the_raw_bbc_layout(tmp_path):
    written = bbc.generate(tmp_path / "bbc", docs=200, seed=3)
    assert written == {
        "clean": 200,
        "not_utf8": 1,
        "too_short": 1,
        "wrong_extension": 1,
        "duplicate": 1,
    }
    assert sorted(p.name for p in (tmp_path / "bbc").iterdir()) == list(bbc.CLASSES)
    first = (tmp_path / "bbc" / "business" / "001.txt").read_text()
    title, blank, body = first.split("\n", 2)
    assert title and blank == "" and len(body.split()) >= 50


def test_generation_is_reproducible_and_refuses_a_used_folder(tmp_path):
    bbc.generate(tmp_path / "a", docs=50, seed=7)
    bbc.generate(tmp_path / "b", docs=50, seed=7)
    for path in (tmp_path / "a").rglob("*"):
        if path.is_file():
            assert (
                path.read_bytes()
                == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()
            )
    with pytest.raises(CDLError, match="is not empty"):
        bbc.generate(tmp_path / "a", docs=50)
    with pytest.raises(CDLError, match="too few"):
        bbc.generate(tmp_path / "c", docs=2)


def test_own_share_sets_how_many_words_come_from_the_class_vocabulary(tmp_path):
    def own_fraction(folder: Path) -> float:
        own = total = 0
        for path in folder.rglob("*.txt"):
            body = path.read_text().split("\n", 2)[2].lower().replace(".", " ").split()
            vocabulary = set(bbc.VOCABULARY[path.parent.name].split())
            own += sum(word in vocabulary for word in body)
            total += len(body)
        return own / total

    bbc.generate(tmp_path / "easy", docs=50, seed=7, dirty=False)
    bbc.generate(tmp_path / "hard", docs=50, seed=7, dirty=False, own_share=0.1)
    # The shared words overlap a class vocabulary here and there: about, not exactly.
    assert own_fraction(tmp_path / "easy") == pytest.approx(bbc.OWN_SHARE, abs=0.03)
    assert own_fraction(tmp_path / "hard") == pytest.approx(0.1, abs=0.03)


def test_loader_reads_articles_and_rejects_dirty_files_with_reasons(tmp_path):
    bbc.generate(tmp_path / "bbc", docs=400, seed=1)
    result = bbc.load(tmp_path / "bbc")
    # Class proportions follow the real corpus (510 business ... 401 tech of 2225).
    counts = result.counts()
    assert sum(counts.values()) == 400 + 2  # the duplicates are valid articles: dedupe is later
    assert counts["sport"] > counts["entertainment"]
    reasons = sorted(reason.split(" (")[0] for _, reason in result.rejected)
    assert (
        reasons
        == ["no body after the title line"] * 2 + ["not UTF-8"] * 2 + ["not a .txt file"] * 2
    )
    article = result.articles[0]
    assert article.label == "business" and article.title and article.body
    # Class vocabulary shows: sport articles use sport words more than tech ones do.
    sport = " ".join(a.body for a in result.articles if a.label == "sport").split()
    tech = " ".join(a.body for a in result.articles if a.label == "tech").split()
    assert sport.count("match") / len(sport) > 5 * tech.count("match") / len(tech)


def test_loader_errors(tmp_path):
    with pytest.raises(CDLError, match="is not a folder"):
        bbc.load(tmp_path / "missing")
    (tmp_path / "weather").mkdir()
    with pytest.raises(CDLError, match="not BBC classes: weather"):
        bbc.load(tmp_path)
    (tmp_path / "weather").rmdir()
    (tmp_path / "tech").mkdir()
    with pytest.raises(CDLError, match="holds no articles"):
        bbc.load(tmp_path)


def test_loader_handles_windows_line_endings(tmp_path):
    (tmp_path / "tech").mkdir()
    (tmp_path / "tech" / "001.txt").write_bytes(b"Chip news\r\n\r\nA new chip.\r\n")
    [article] = bbc.load(tmp_path).articles
    assert (article.title, article.body) == ("Chip news", "A new chip.")


def idx(path: Path, dims: tuple[int, ...], payload: bytes) -> None:
    header = b"\0\0\x08" + bytes([len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    path.write_bytes(gzip.compress(header + payload))


def test_idx_to_png_with_manifest(tmp_path):
    src = tmp_path / "idx"
    src.mkdir()
    idx(src / "train-images-idx3-ubyte.gz", (3, 2, 2), bytes(range(12)))
    idx(src / "train-labels-idx1-ubyte.gz", (3,), bytes([9, 0, 9]))
    assert fashion.export_pngs(src, tmp_path / "out") == 3
    with open(tmp_path / "out" / "manifest-train.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == [
        "ankle-boot/train-00000.png",
        "t-shirt-top/train-00001.png",
        "ankle-boot/train-00002.png",
    ]
    png = (tmp_path / "out" / "ankle-boot" / "train-00002.png").read_bytes()
    assert png.startswith(b"\x89PNG") and struct.unpack(">II", png[16:24]) == (2, 2)


def test_idx_errors(tmp_path):
    src = tmp_path / "idx"
    src.mkdir()
    with pytest.raises(CDLError, match="has no train-images-idx3-ubyte"):
        list(fashion.read(src))
    idx(src / "train-images-idx3-ubyte.gz", (3, 2, 2), bytes(8))  # truncated
    idx(src / "train-labels-idx1-ubyte.gz", (3,), bytes([1, 2, 3]))
    with pytest.raises(CDLError, match="ends at image 2 of 3"):
        fashion.export_pngs(src, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest-train.csv").exists()  # no manifest for half a job
    idx(src / "train-labels-idx1-ubyte.gz", (2,), bytes([1, 2]))
    with pytest.raises(CDLError, match="has 3 images but train-labels-idx1-ubyte.gz 2 labels"):
        list(fashion.read(src))
    (src / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x03" + bytes(12)))
    with pytest.raises(CDLError, match="is not an IDX file of unsigned bytes with 1 dim"):
        list(fashion.read(src))


def test_real_fashion_mnist_slice(tmp_path):
    assert fashion.export_pngs(fashion.DEFAULT_SOURCE, tmp_path, "t10k", limit=50) == 50
    pngs = list(tmp_path.rglob("*.png"))
    assert len(pngs) == 50
    assert {p.parent.name for p in pngs} <= set(fashion.CLASSES)


def test_cli_generate_and_convert(tmp_path):
    result = cdl(
        "data", "generate", "bbc-like", str(tmp_path / "bbc"), "--docs", "20", "--clean", cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert "20 clean files" in result.stdout
    assert len(list((tmp_path / "bbc").rglob("*.txt"))) == 20
    again = cdl("data", "generate", "bbc-like", str(tmp_path / "bbc"), cwd=REPO)
    assert again.returncode == 1 and "is not empty" in again.stderr
