"""Incremental pipeline jobs: a pipeline over N datums, then a commit that adds 100 files.

The second job must run exactly the 100 new datums and take at most 10% of the first job's time
(job times from the engine's own records: start to output commit).

Run: .venv/bin/python bench/data_pipeline.py [--datums N]
Last line: one JSON object of figures and targets.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
from pathlib import Path

import yaml
from common import cdl, throwaway_stack

from pipelines.data.engine import PipelineEngine

TARGET_RATIO = 0.10
ADDED = 100


def write_files(folder: Path, start: int, count: int) -> Path:
    rng = random.Random(start)
    folder.mkdir(parents=True)
    for i in range(start, start + count):
        (folder / f"item-{i:06d}.txt").write_bytes(rng.randbytes(rng.randint(200, 2000)))
    return folder


def seconds(job) -> float:
    return (job.finished_at - job.started_at).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datums", type=int, default=10_000, help="datums of the first job")
    parser.add_argument("--parallelism", type=int, default=2, help="parallelism_spec.constant")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cdl-bench-pipeline-"))
    try:
        spec = {
            "pipeline": {"name": "copy"},
            "description": "copies each file: one datum per file",
            "transform": {"cmd": ["sh", "-c", 'cp "$raw" /pfs/out/']},
            "input": {"pfs": {"repo": "raw", "glob": "/*"}},
            "parallelism_spec": {"constant": args.parallelism},
        }
        (work / "copy.yaml").write_text(yaml.safe_dump(spec))
        with throwaway_stack() as stack:
            cdl(stack, "data", "repo", "create", "raw")
            cdl(stack, "data", "put", "raw", str(write_files(work / "v1", 0, args.datums)))
            cdl(stack, "data", "pipeline", "create", "-f", str(work / "copy.yaml"), "--wait")
            cdl(
                stack,
                "data",
                "put",
                "raw",
                str(write_files(work / "v2", args.datums, ADDED)),
                "--wait",
            )
            second, first = PipelineEngine(stack).jobs("copy", limit=2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = seconds(second) / seconds(first)
    figures = {
        "first_job_datums": first.datums_total,
        "first_job_run": first.datums_processed,
        "first_job_s": round(seconds(first), 2),
        "second_job_datums": second.datums_total,
        "second_job_run": second.datums_processed,
        "second_job_reused": second.datums_skipped,
        "second_job_s": round(seconds(second), 2),
        "second_over_first": round(ratio, 4),
        "target_second_job_run": ADDED,
        "target_ratio": TARGET_RATIO,
        "met": second.datums_processed == ADDED
        and ratio <= TARGET_RATIO
        and first.state == second.state == "success",
    }
    print(
        f"first job: {first.datums_processed} datums in {figures['first_job_s']} s; second job: "
        f"{second.datums_processed} run, {second.datums_skipped} reused, in "
        f"{figures['second_job_s']} s = {ratio:.1%} of the first (target <= {TARGET_RATIO:.0%})"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
