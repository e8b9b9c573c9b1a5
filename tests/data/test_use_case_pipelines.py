"""The use cases' data pipelines, from raw files to validated data and a report, on the local
engine: the specs and scripts under use_cases/*/data/ exactly as shipped."""

import gzip
import io
import json
import random
import shutil
import struct

import pytest
from PIL import Image

from pipelines.data import bbc, cleaning
from pipelines.data.engine import PipelineEngine
from pipelines.data.repos import DataRepos, Ref
from tests.conftest import REPO


def contents(repos, ref):
    commit = repos.resolve(ref)
    return {f.path: b"".join(repos.store.read_chunks(f.sha256)) for f in repos.files(commit)}


@pytest.fixture
def fresh(project_factory):
    stack = project_factory()
    stack.up()
    return DataRepos(stack), PipelineEngine(stack)


def create_pipelines(engine, use_case: str, *names: str):
    for name in names:
        engine.create(REPO / "use_cases" / use_case / "data" / f"{name}.yaml")


def test_bbc_news_raw_to_validated(fresh, tmp_path):
    repos, engine = fresh
    written = bbc.generate(tmp_path / "bbc", docs=60, seed=5)
    repos.create_repo("bbc-raw")
    repos.put(Ref.parse("bbc-raw"), [tmp_path / "bbc"])
    create_pipelines(engine, "bbc_news", "clean", "validate", "report")
    engine.run_pending()
    assert [j.state for j in engine.jobs()] == ["success"] * 3

    cleaned = contents(repos, "bbc-clean")
    raw_txt = written["clean"] + written["not_utf8"] + written["too_short"] + written["duplicate"]
    assert len([p for p in cleaned if p.endswith(".txt")]) == raw_txt - written["duplicate"]
    for path, data in cleaned.items():
        if path.endswith(".txt"):
            text = data.decode("utf-8")  # every cleaned article is valid UTF-8 now
            assert "  " not in text and "\r" not in text and text.endswith("\n")

    report = json.loads(contents(repos, "bbc-validation-report")["/validation-report.json"])
    assert report["valid"] == written["clean"] + written["not_utf8"]
    assert report["quarantined_per_reason"] == {
        "no body after the title line": 1,
        "wrong file type": 1,
    }
    validated = contents(repos, "bbc-validate")
    reasons = [p for p in validated if p.endswith(".reason")]
    assert len(reasons) == 2 and all(p.startswith("/quarantine/") for p in reasons)
    for reason in reasons:  # each quarantined file is kept beside its reason
        assert reason.removesuffix(".reason") in validated

    # A new drop with one more article runs one datum in each per-file step.
    more = tmp_path / "more" / "tech"
    more.mkdir(parents=True)
    shutil.copyfile(tmp_path / "bbc" / "tech" / "001.txt", more / "900.txt")
    (more / "900.txt").write_text((more / "900.txt").read_text() + "One more sentence.\n")
    repos.put(Ref.parse("bbc-raw"), [tmp_path / "more"], dest="/")
    engine.run_pending()
    clean_job = engine.jobs("bbc-clean", limit=1)[0]
    validate_job = engine.jobs("bbc-validate", limit=1)[0]
    assert (clean_job.datums_processed, validate_job.datums_processed) == (1, 1)
    report = json.loads(contents(repos, "bbc-validation-report")["/validation-report.json"])
    assert report["valid"] == written["clean"] + written["not_utf8"] + 1


def idx(dims, payload: bytes) -> bytes:
    header = b"\0\0\x08" + bytes([len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    return gzip.compress(header + payload)


def test_fashion_mnist_raw_to_validated(fresh, tmp_path):
    repos, engine = fresh
    src = tmp_path / "idx"
    src.mkdir()
    images = bytes(i % 256 for i in range(30 * 784))
    (src / "train-images-idx3-ubyte.gz").write_bytes(idx((30, 28, 28), images))
    (src / "train-labels-idx1-ubyte.gz").write_bytes(idx((30,), bytes(i % 10 for i in range(30))))
    repos.create_repo("fashion-raw")
    repos.put(Ref.parse("fashion-raw"), [src])
    create_pipelines(engine, "fashion_mnist", "ingest", "validate", "report")
    engine.run_pending()
    assert [j.state for j in engine.jobs()] == ["success"] * 3
    ingested = contents(repos, "fashion-ingest")
    assert len([p for p in ingested if p.endswith(".png")]) == 30
    assert "/manifests/manifest-train.csv" in ingested
    assert engine.jobs("fashion-validate", limit=1)[0].datums_total == 10  # one per class
    report = json.loads(contents(repos, "fashion-validation-report")["/validation-report.json"])
    assert report == {
        "valid": 30,
        "quarantined": 0,
        "valid_per_class": {
            name: 3
            for name in (
                "ankle-boot",
                "bag",
                "coat",
                "dress",
                "pullover",
                "sandal",
                "shirt",
                "sneaker",
                "t-shirt-top",
                "trouser",
            )
        },
        "quarantined_per_reason": {},
    }


def png(size, mode="L") -> bytes:
    out = io.BytesIO()
    noise = random.Random(1).randbytes(size[0] * size[1] * len(mode))
    Image.frombytes(mode, size, noise).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize(
    "data, problem",
    [
        (png((28, 28)), None),
        (png((32, 28)), "wrong shape: 32x28, expected 28x28"),
        (png((28, 28), "RGB"), "wrong colour mode: RGB, expected L"),
        (b"\x89PNG\r\n\x1a\nbroken", "does not decode as an image"),
        (png((28, 28))[:400], "does not decode as an image"),  # cut inside the pixel data
    ],
)
def test_image_rules(data, problem):
    found = cleaning.image_problem(data, (28, 28))
    assert (found is None) if problem is None else found.startswith(problem)


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        (b"Title\r\n\r\n\r\n\r\nBody  text\there\x07.\n", "Title\n\nBody text here.\n"),
        (b"Caf\xe9 news\n\nbody", "Caf\ufffd news\n\nbody\n"),
        (b"e\xcc\x81t\xc3\xa9\n\nx", "\u00e9t\u00e9\n\nx\n"),  # NFC
        (b"   \n\n  ", ""),
    ],
)
def test_text_cleaning(raw, cleaned):
    assert cleaning.clean_text(raw) == cleaned


def test_article_rules():
    body = " ".join(["word"] * cleaning.MIN_WORDS)
    assert cleaning.article_problem("a.txt", f"Title\n\n{body}") is None
    assert cleaning.article_problem("a.doc", "x").startswith("wrong file type: .doc")
    assert cleaning.article_problem("a.txt", "Title only\n") == "no body after the title line"
    assert cleaning.article_problem("a.txt", "T\n\nfew words").startswith("too short: 2 words")
