"""The transformation registry: a use case's features for a label snapshot, computed once.

Preprocessing a snapshot (reading every labeled file and running the trainer's `featurize`) costs
the same for every trial, so it runs once per (use case, snapshot, preprocessing version,
validation carve) and its result is kept: the arrays as one `.npz` object and their description
(labels, the preprocessing state such as the vocabulary, how validation was carved and which
sources it holds) as one JSON object, both in the stack's content-addressed object store, and a
row in the `features` table (migration 0011) pointing at them. A `features` lineage node records
what was computed and is linked to the snapshot it consumed. Every later trial, experiment or
worker loads the stored arrays instead of computing them again. Changing what `featurize` outputs
means bumping the trainer's PREPROCESSING_VERSION: the old features stay, the new ones are
computed once on first use.

Only the train split is read, as `cdl_scientist` (the label store's `train_rows`): test labels
never reach preprocessing. Two workers asking for the same missing features at once do not both
compute them: the first holds an advisory lock while it computes, the second waits for it and
then loads what it stored.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from pipelines.core import db, lineage
from pipelines.core.errors import NotFound
from pipelines.core.objects import ObjectMissing, object_store_for
from pipelines.core.stack import Stack
from pipelines.data.backend import Ref, data_backend
from pipelines.data.labeling.spec import use_case as load_use_case
from pipelines.data.labeling.store import LabelStore
from pipelines.model.trainer import DEFAULT_VAL_FRACTION, Features, LabeledFile
from pipelines.plugins import trainer_class

DEFAULT_SEED = 0
ARRAYS = ("x_train", "y_train", "x_val", "y_val")


@dataclass(frozen=True)
class FeatureRecord:
    """A row of the `features` table."""

    use_case: str
    snapshot: str
    preprocessing: str
    val_seed: int
    val_fraction: float
    arrays_sha256: str
    meta_sha256: str
    train_rows: int
    val_rows: int
    bytes: int
    seconds: float
    created_at: datetime

    @property
    def lineage_key(self) -> str:
        return features_key(
            self.use_case, self.snapshot, self.preprocessing, self.val_seed, self.val_fraction
        )


def features_key(use_case: str, snapshot: str, version: str, seed: int, fraction: float) -> str:
    """The lineage key, e.g. 'bbc_news/first@porter-counts-1/val-0-0.2'."""
    return f"{use_case}/{snapshot}@{version}/val-{seed}-{fraction:g}"


def features_for(
    stack: Stack,
    use_case: str,
    snapshot: str,
    seed: int = DEFAULT_SEED,
    val_fraction: float = DEFAULT_VAL_FRACTION,
) -> Features:
    """The use case's features for `snapshot`: loaded when computed before, else computed from
    the snapshot's train split, stored and recorded (once, however many ask at the same time)."""
    trainer = trainer_class(use_case)
    version = trainer.PREPROCESSING_VERSION
    key = (use_case, snapshot, version, seed, val_fraction)
    found = record(stack, *key)
    if found:
        return load(stack, found)
    lock = f"cdl.features:{features_key(*key)}"
    with stack.connect(autocommit=True) as conn, db.advisory_lock(conn, lock):
        found = record(stack, *key)  # computed by whoever held the lock before us
        if found:
            return load(stack, found)
        return _compute(stack, trainer, use_case, snapshot, seed, val_fraction)


def record(
    stack: Stack, use_case: str, snapshot: str, version: str, seed: int, fraction: float
) -> FeatureRecord | None:
    with stack.connect() as conn:
        return db.fetch_one(
            conn,
            FeatureRecord,
            """SELECT * FROM features WHERE use_case = %s AND snapshot = %s
               AND preprocessing = %s AND val_seed = %s AND val_fraction = %s""",
            [use_case, snapshot, version, seed, fraction],
        )


def records(stack: Stack, use_case: str, snapshot: str | None = None) -> list[FeatureRecord]:
    """The features computed for a use case (one snapshot's, when given), newest first."""
    with stack.connect() as conn:
        return db.fetch_all(
            conn,
            FeatureRecord,
            """SELECT * FROM features WHERE use_case = %s
               AND (%s::text IS NULL OR snapshot = %s) ORDER BY created_at DESC""",
            [use_case, snapshot, snapshot],
        )


def load(stack: Stack, found: FeatureRecord) -> Features:
    store = object_store_for(stack.settings)
    try:
        with store.open(found.arrays_sha256) as stream:
            arrays = np.load(io.BytesIO(stream.read()), allow_pickle=False)
        with store.open(found.meta_sha256) as stream:
            meta = json.loads(stream.read())
    except ObjectMissing as exc:
        raise NotFound(
            f"features {found.lineage_key} are recorded but their objects are missing from the "
            "object store",
            "delete the features row to compute them again",
        ) from exc
    return Features(
        labels=meta["labels"],
        **{name: arrays[name] for name in ARRAYS},
        preprocessing=meta["preprocessing"],
        validation=meta["validation"],
        origin={"key": found.lineage_key, "bytes": found.bytes},
    )


def read_train_files(stack: Stack, use_case: str, snapshot: str) -> list[LabeledFile]:
    """The snapshot's train rows (read as cdl_scientist) with their files' bytes."""
    rows = LabelStore(stack, load_use_case(use_case)).train_rows(snapshot)
    if not rows:
        raise NotFound(f"snapshot {use_case}/{snapshot} has no train rows", "label more files")
    return read_files(stack, f"{use_case}/{snapshot}", rows)


def read_files(stack: Stack, snapshot: str, rows: list[tuple[str, str]]) -> list[LabeledFile]:
    """(source, label) rows of `snapshot` (use_case/name, for messages) with their files' bytes,
    read from the data backend commit by commit, in the order of `rows`."""
    backend = data_backend(stack)
    wanted: dict[str, dict[str, str]] = defaultdict(dict)  # commit ref -> path -> source
    for source, _ in rows:
        ref = Ref.parse(source)
        wanted[f"{ref.repo}@{ref.name}"][ref.path or "/"] = source
    data: dict[str, bytes] = {}
    for commit_ref, paths in wanted.items():
        commit = backend.resolve(commit_ref)
        prefix = os.path.commonpath(list(paths)) if len(paths) > 1 else next(iter(paths))
        for entry in backend.files(commit, prefix):
            if entry.path in paths:
                with backend.open(commit, entry) as stream:
                    data[paths[entry.path]] = stream.read()
        missing = sorted(set(paths.values()) - set(data))
        if missing:
            raise NotFound(
                f"{len(missing)} labeled file(s) of snapshot {snapshot} are not in "
                f"their commit, e.g. {missing[0]}",
                "check the data repo's history (cdl data log)",
            )
    return [LabeledFile(source, label, data[source]) for source, label in rows]


def _compute(stack, trainer, use_case, snapshot, seed, val_fraction) -> Features:
    started = time.perf_counter()
    files = read_train_files(stack, use_case, snapshot)
    features = trainer.featurize(files, seed, val_fraction)
    seconds = time.perf_counter() - started

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{name: getattr(features, name) for name in ARRAYS})
    meta = {
        "use_case": use_case,
        "snapshot": snapshot,
        "preprocessing_version": trainer.PREPROCESSING_VERSION,
        "labels": features.labels,
        "preprocessing": features.preprocessing,
        "validation": features.validation,
    }
    store = object_store_for(stack.settings)
    arrays_sha256, arrays_size = store.put_bytes(buffer.getvalue())
    meta_sha256, meta_size = store.put_bytes(json.dumps(meta, sort_keys=True).encode())

    version = trainer.PREPROCESSING_VERSION
    key = features_key(use_case, snapshot, version, seed, val_fraction)
    with stack.connect() as conn, conn.transaction():
        conn.execute(
            """INSERT INTO features (use_case, snapshot, preprocessing, val_seed, val_fraction,
                                     arrays_sha256, meta_sha256, train_rows, val_rows, bytes,
                                     seconds)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
            [
                use_case,
                snapshot,
                version,
                seed,
                val_fraction,
                arrays_sha256,
                meta_sha256,
                len(features.y_train),
                len(features.y_val),
                arrays_size + meta_size,
                seconds,
            ],
        )
        node = lineage.record_node(
            conn,
            lineage.Kind.FEATURES,
            key,
            use_case=use_case,
            snapshot=snapshot,
            preprocessing=version,
            labels=features.labels,
            train=len(features.y_train),
            val=len(features.y_val),
            val_seed=seed,
            val_fraction=val_fraction,
            arrays=arrays_sha256,
            meta=meta_sha256,
        )
        upstream = lineage.node_id(lineage.Kind.LABEL_SNAPSHOT, f"{use_case}/{snapshot}")
        if lineage.get_node(conn, upstream):
            lineage.consumed(conn, node, upstream)
    features.origin = {"key": key, "bytes": arrays_size + meta_size}
    return features
