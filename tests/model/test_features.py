"""The transformation registry on a real stack: a BBC-like corpus in a data repo, labels loaded
into the label store and frozen in a snapshot; features computed from the snapshot's train split
once, then loaded by every later caller."""

import threading
import time

import numpy as np
import psycopg
import pytest

from pipelines.core import lineage
from pipelines.core.errors import NotFound
from pipelines.data.labeling.spec import use_case
from pipelines.data.labeling.store import LabelStore
from pipelines.model import features as registry
from pipelines.plugins import trainer_class
from tests.conftest import destroy, make_project, stack_for
from tests.model.training_runs import label_corpus


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    """A stack whose bbc_news labels (ground truth of a generated corpus) are in snapshots
    'first' and 'second'; yields the stack and {source: split}."""
    stack = stack_for(make_project())
    stack.up()
    label_corpus(stack, tmp_path_factory.mktemp("bbc"), docs=150, seed=7, dest="/valid", first_id=1)
    store = LabelStore(stack, use_case("bbc_news"))
    store.snapshot("first")
    store.snapshot("second")
    splits = {r["source"]: r["split"] for r in store.snapshot_rows("first")}
    yield stack, splits
    destroy(stack)


@pytest.fixture
def featurized(monkeypatch):
    """Counts the BBC trainer's featurize calls (the real one runs) and keeps their inputs."""
    trainer = trainer_class("bbc_news")
    real = trainer.featurize.__func__
    calls: list[list] = []

    def counting(cls, files, seed, val_fraction):
        calls.append(files)
        time.sleep(0.3)  # a slower featurize: concurrent callers overlap for sure
        return real(cls, files, seed, val_fraction)

    monkeypatch.setattr(trainer, "featurize", classmethod(counting))
    return calls


def test_computed_once_from_the_train_split_then_loaded(labeled, featurized):
    stack, splits = labeled
    started = time.perf_counter()
    first = registry.features_for(stack, "bbc_news", "first")
    computing = time.perf_counter() - started
    assert len(featurized) == 1
    read = {f.source for f in featurized[0]}
    train = {source for source, split in splits.items() if split == "train"}
    assert read == train and len(first.y_train) + len(first.y_val) == len(train)
    assert not read & {source for source, split in splits.items() if split == "test"}
    assert all(f.label == f.source.split("/")[2] for f in featurized[0])  # labels with files

    started = time.perf_counter()
    again = registry.features_for(stack, "bbc_news", "first")
    loading = time.perf_counter() - started
    print(f"features: computed in {computing:.2f} s, loaded in {loading:.3f} s")
    assert len(featurized) == 1  # loaded, not computed
    assert loading < computing
    for name in registry.ARRAYS:
        assert np.array_equal(getattr(first, name), getattr(again, name)), name
        assert getattr(first, name).dtype == getattr(again, name).dtype
    assert (again.labels, again.preprocessing, again.validation) == (
        first.labels,
        first.preprocessing,
        first.validation,
    )

    [row] = registry.records(stack, "bbc_news", "first")
    assert (row.train_rows, row.val_rows) == (len(first.y_train), len(first.y_val))
    assert row.preprocessing == trainer_class("bbc_news").PREPROCESSING_VERSION
    origin = {"key": row.lineage_key, "bytes": row.bytes}  # what runs tag (cdl.features)
    assert first.origin == again.origin == origin
    with stack.connect() as conn:
        node = lineage.tree(conn, lineage.node_id(lineage.Kind.FEATURES, row.lineage_key))
    assert node.attributes["arrays"] == row.arrays_sha256
    assert [(c.kind, c.key) for c in node.children] == [("label_snapshot", "bbc_news/first")]


def test_validation_carve_is_seeded_and_recorded(labeled, featurized):
    stack, splits = labeled
    default = registry.features_for(stack, "bbc_news", "first")
    assert default.validation["seed"] == registry.DEFAULT_SEED
    assert default.validation["fraction"] == registry.DEFAULT_VAL_FRACTION
    val = set(default.validation["val_sources"])
    assert len(val) == len(default.y_val) and all(splits[s] == "train" for s in val)

    other = registry.features_for(stack, "bbc_news", "first", seed=1)
    assert set(other.validation["val_sources"]) != val  # another carve, computed and kept
    assert registry.features_for(stack, "bbc_news", "first", seed=1).validation == (
        other.validation
    )
    assert len(featurized) <= 2  # the default carve may be stored already
    seeds = sorted(r.val_seed for r in registry.records(stack, "bbc_news", "first"))
    assert seeds == [0, 1]


def test_two_workers_at_once_compute_once(labeled, featurized):
    stack, _ = labeled
    results: list = []
    errors: list = []

    def worker():
        try:
            results.append(registry.features_for(stack, "bbc_news", "second"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert len(featurized) == 1
    assert len(results) == 2
    assert np.array_equal(results[0].x_train, results[1].x_train)
    assert len(registry.records(stack, "bbc_news", "second")) == 1


def test_train_rows_are_read_as_cdl_scientist(labeled):
    stack, splits = labeled
    store = LabelStore(stack, use_case("bbc_news"))
    rows = store.train_rows("first")
    assert {source for source, _ in rows} == {s for s, split in splits.items() if split == "train"}
    with stack.connect(autocommit=True) as conn:
        conn.execute("REVOKE SELECT ON snapshot_train FROM cdl_scientist")
    try:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            store.train_rows("first")  # the owner could read it: the role is in use
    finally:
        with stack.connect(autocommit=True) as conn:
            conn.execute("GRANT SELECT ON snapshot_train TO cdl_scientist")
    with pytest.raises(NotFound, match="no snapshot bbc_news/nothing"):
        registry.features_for(stack, "bbc_news", "nothing")
