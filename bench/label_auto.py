"""`cdl label auto` at the size of the real BBC corpus: 2,225 text tasks answered in bulk (a
predictions import and Label Studio's 'Create Annotations From Predictions' action), timed as the
whole command (process start included), against the old loop of one annotation request per task,
measured in the same run on a subset of the tasks and scaled to all of them. The export that
follows must return every annotation.

Run: .venv/bin/python bench/label_auto.py [--docs N] [--baseline-tasks N]
Target: <= 30 s for 2,225 tasks. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

from common import cdl, labeling_stack

from pipelines.data.labeling.rows import class_of

AUTO_TARGET_S = 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=2225)
    parser.add_argument("--baseline-tasks", type=int, default=150)
    args = parser.parse_args()
    with labeling_stack(args.docs) as (stack, labeling):
        labeling.sync()
        tasks = labeling.store.tasks()
        # The old way, one request per task, on the first tasks.
        subset = tasks[: args.baseline_tasks]
        start = time.perf_counter()
        for task_id, path in subset:
            labeling.annotate(task_id, class_of(path, "/valid"))
        loop_s = time.perf_counter() - start
        # `cdl label auto` answers the rest in bulk.
        auto_s, _ = cdl(stack, "label", "auto", "bbc_news")
        bulk = len(tasks) - len(subset)
        result = labeling.export()
    loop_all_s = loop_s / len(subset) * len(tasks)
    auto_all_s = auto_s / bulk * len(tasks)  # start-up scaled too: an overestimate
    figures = {
        "tasks": len(tasks),
        "auto_tasks": bulk,
        "auto_s": round(auto_s, 2),
        "auto_all_tasks_s": round(auto_all_s, 2),
        "baseline_tasks": len(subset),
        "baseline_s": round(loop_s, 2),
        "baseline_all_tasks_s": round(loop_all_s, 1),
        "speedup": round(loop_all_s / auto_all_s, 1),
        "exported_annotations": result.rows,
        "target_s": AUTO_TARGET_S,
        "met": auto_all_s <= AUTO_TARGET_S and result.rows == len(tasks) == args.docs,
    }
    print(
        f"cdl label auto of {bulk} tasks: {auto_s:.1f} s ({auto_all_s:.1f} s scaled to "
        f"{len(tasks)}; target <= {AUTO_TARGET_S} s); one request per task: {loop_s:.1f} s for "
        f"{len(subset)}, {loop_all_s:.0f} s scaled to {len(tasks)}: {figures['speedup']}x; "
        f"export returned {result.rows} annotation(s)"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
