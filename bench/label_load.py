"""Loading label rows into Postgres: COPY against one INSERT per row, in the same run.

Two comparisons over the same 100,000 rows:
- the load itself: COPY into a table shaped like `label_rows` against a per-row INSERT into
  another such table (the figure the target applies to);
- the label store's whole load, as `cdl label export` runs it (COPY into a staging table, the
  stratified split of new files, versioned rows), against the same work done row by row (the
  split computed in Python, then per row a version lookup and two INSERTs).

Run: .venv/bin/python bench/label_load.py [--rows N]
Target: COPY loads at least 20x the rows/s of per-row INSERT. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from collections import Counter
from datetime import datetime, timezone

from common import throwaway_stack

from pipelines.data.labeling.spec import use_case
from pipelines.data.labeling.store import LabelStore

TARGET_RATIO = 20
COLUMNS = (
    "use_case",
    "split",
    "source",
    "label",
    "labeler",
    "labeled_at",
    "task_id",
    "annotation_id",
    "version",
    "export_commit",
)


def synthetic_rows(count: int) -> list[dict]:
    rng = random.Random(3)
    labels = ["business", "entertainment", "politics", "sport", "tech"]
    now = datetime.now(timezone.utc).isoformat()
    return [
        {
            "path": f"/valid/{labels[i % 5]}/{i:07d}.txt",
            "source": f"bbc-validate@{'0' * 32}:/valid/{labels[i % 5]}/{i:07d}.txt",
            "label": labels[i % 5] if rng.random() > 0.05 else labels[(i + 1) % 5],
            "labeler": f"labeler{i % 7}@example.org",
            "labeled_at": now,
            "task_id": i + 1,
            "annotation_id": i + 1,
            "export_commit": "f" * 32,
        }
        for i in range(count)
    ]


def values(row: dict, split: str = "train") -> list:
    return [
        "bbc_news",
        split,
        row["source"],
        row["label"],
        row["labeler"],
        row["labeled_at"],
        row["task_id"],
        row["annotation_id"],
        1,
        row["export_commit"],
    ]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def raw_copy(conn, rows, table: str = "raw_copy") -> None:
    with (
        conn.transaction(),
        conn.cursor().copy(f"COPY {table} ({', '.join(COLUMNS)}) FROM STDIN") as copy,
    ):
        for row in rows:
            copy.write_row(values(row))


def warm_up(conn, rows) -> None:
    """A load that is thrown away: a new cluster creates its WAL files as the first big write
    goes, which would count against whichever load is timed first."""
    conn.execute("CREATE TABLE warm_up (LIKE label_rows INCLUDING ALL)")
    raw_copy(conn, rows, "warm_up")
    conn.execute("DROP TABLE warm_up")
    conn.execute("CHECKPOINT")  # the WAL files written so far are recycled for the timed loads


def raw_insert(conn, rows) -> None:
    sql = f"INSERT INTO raw_insert ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * 10)})"
    with conn.transaction():
        for row in rows:
            conn.execute(sql, values(row))


def store_row_by_row(conn, rows, fraction: float = 0.2, seed: str = "13:") -> None:
    """The label store's load done naively: splits in Python, then statements per row."""
    by_label: dict[str, list[str]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row["path"])
    split_of = {}
    for paths in by_label.values():
        ordered = sorted(set(paths), key=lambda p: hashlib.md5((seed + p).encode()).hexdigest())
        test = round(fraction * len(ordered))
        split_of.update({p: "test" if i < test else "train" for i, p in enumerate(ordered)})
    with conn.transaction():
        for row in rows:
            version = conn.execute(
                "SELECT coalesce(max(version), 0) + 1 FROM naive_rows "
                "WHERE use_case = %s AND annotation_id = %s",
                ["bbc_news", row["annotation_id"]],
            ).fetchone()[0]
            conn.execute(
                "INSERT INTO naive_splits VALUES ('bbc_news', %s, %s, %s) ON CONFLICT DO NOTHING",
                [row["path"], split_of[row["path"]], row["label"]],
            )
            conn.execute(
                f"INSERT INTO naive_rows ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * 10)})",
                [*values(row, split_of[row["path"]])[:8], version, row["export_commit"]],
            )
    assert Counter(split_of.values())["test"] > 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    rows = synthetic_rows(args.rows)
    with throwaway_stack() as stack:
        with stack.connect(autocommit=True) as conn:
            for table in ("raw_copy", "raw_insert", "naive_rows"):
                conn.execute(f"CREATE TABLE {table} (LIKE label_rows INCLUDING ALL)")
            conn.execute("CREATE TABLE naive_splits (LIKE label_splits INCLUDING ALL)")
            warm_up(conn, rows)
            copy_s = timed(lambda: raw_copy(conn, rows))
            insert_s = timed(lambda: raw_insert(conn, rows))
            naive_s = timed(lambda: store_row_by_row(conn, rows))
        store = LabelStore(stack, use_case("bbc_news"))
        present = [r["annotation_id"] for r in rows]
        store_s = timed(lambda: store.load(rows, present, "f" * 32, None))
    n = len(rows)
    figures = {
        "rows": n,
        "copy_rows_per_s": round(n / copy_s),
        "insert_rows_per_s": round(n / insert_s),
        "ratio": round(insert_s / copy_s, 1),
        "store_load_rows_per_s": round(n / store_s),
        "store_row_by_row_rows_per_s": round(n / naive_s),
        "store_ratio": round(naive_s / store_s, 1),
        "target_ratio": TARGET_RATIO,
        "met": insert_s / copy_s >= TARGET_RATIO,
    }
    print(
        f"{n} label rows: COPY {figures['copy_rows_per_s']} rows/s, per-row INSERT "
        f"{figures['insert_rows_per_s']} rows/s: {figures['ratio']}x (target >= {TARGET_RATIO}x)"
    )
    print(
        f"label store load (splits, versions): {figures['store_load_rows_per_s']} rows/s, the "
        f"same row by row {figures['store_row_by_row_rows_per_s']} rows/s: "
        f"{figures['store_ratio']}x"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
