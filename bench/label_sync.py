"""Label Studio round trip at the size of the real BBC corpus: `cdl label sync` of 2,225 text
tasks, then `cdl label export` of 2,225 annotations into the label store, each timed as the
whole command (process start included).

The validated articles are put straight into `bbc-validate` (the data pipeline has its own
benchmark); the annotations are made through the API before the export is timed.

Run: .venv/bin/python bench/label_sync.py [--docs N]
Targets: sync <= 30 s, export + load <= 10 s. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor

from common import cdl, labeling_stack

from pipelines.data.labeling.rows import class_of

SYNC_TARGET_S = 30
EXPORT_TARGET_S = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=2225)
    args = parser.parse_args()
    with labeling_stack(args.docs) as (stack, labeling):
        labeling.project()  # created before the clock starts, as in a running project
        sync_s, _ = cdl(stack, "label", "sync", "bbc_news")
        with stack.connect() as conn:
            tasks = conn.execute("SELECT task_id, path FROM label_tasks").fetchall()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda t: labeling.annotate(t[0], class_of(t[1], "/valid")), tasks))
        export_s, _ = cdl(stack, "label", "export", "bbc_news")
        with stack.connect() as conn:
            loaded = conn.execute("SELECT count(*) FROM labels_current").fetchone()[0]
    figures = {
        "tasks": len(tasks),
        "sync_s": round(sync_s, 2),
        "sync_tasks_per_s": round(len(tasks) / sync_s),
        "rows_loaded": loaded,
        "export_load_s": round(export_s, 2),
        "target_sync_s": SYNC_TARGET_S,
        "target_export_load_s": EXPORT_TARGET_S,
        "met": sync_s <= SYNC_TARGET_S
        and export_s <= EXPORT_TARGET_S
        and loaded == len(tasks) == args.docs,
    }
    print(
        f"cdl label sync of {len(tasks)} tasks: {sync_s:.1f} s (target <= {SYNC_TARGET_S} s); "
        f"cdl label export of {loaded} annotations: {export_s:.1f} s (target <= "
        f"{EXPORT_TARGET_S} s)"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
