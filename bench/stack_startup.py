"""Embedded stack start-up times: cold (initdb, databases, migrations, dispatcher) and warm
(restart of an existing cluster), each measured on a throwaway project under /tmp.

Run: .venv/bin/python bench/stack_startup.py [--repeat N]
The last line printed is one JSON object with the figures (seconds).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.core.config import load_settings  # noqa: E402
from pipelines.core.stack import Stack  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="cold and warm starts to time")
    args = parser.parse_args()

    cold, initdb, warm, stop = [], [], [], []
    for _ in range(args.repeat):
        base = Path(tempfile.mkdtemp(prefix="cdl-bench-"))
        (base / "cdl.yaml").write_text("stacks:\n  local:\n    home: .cdl\n")
        stack = Stack(load_settings(base / "cdl.yaml", environ={}))
        try:
            initdb.append(timed(stack.postgres.init))
            cold.append(initdb[-1] + timed(stack.up))
            for _ in range(args.repeat):
                stop.append(timed(stack.down))
                warm.append(timed(stack.up))
        finally:
            stack.purge()
            shutil.rmtree(base, ignore_errors=True)

    figures = {
        "cold_start_s": round(statistics.median(cold), 3),
        "initdb_s": round(statistics.median(initdb), 3),
        "warm_start_s": round(statistics.median(warm), 3),
        "stop_s": round(statistics.median(stop), 3),
        "cold_over_warm": round(statistics.median(cold) / statistics.median(warm), 2),
        "runs": args.repeat,
    }
    print(
        f"cold start (initdb + start + databases + migrations + dispatcher): "
        f"{figures['cold_start_s']:.2f} s (initdb {figures['initdb_s']:.2f} s)"
    )
    print(
        f"warm start (existing cluster): {figures['warm_start_s']:.2f} s; "
        f"stop: {figures['stop_s']:.2f} s"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
