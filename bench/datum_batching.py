"""Datum batching on the BBC use case: clean + validate over a 2,225-article corpus, cold and then
after a commit that adds 1% new articles.

The shipped specs (use_cases/bbc_news/data/clean.yaml, validate.yaml: datum_batching, two
workers) run cold, then incrementally; the same cold run without batching (one process per datum)
is the baseline, measured in this run on a stack of its own. Times are the engine's own job
records (start to output commit), clean + validate.

Targets: cold <= 30 s (2 cores), incremental <= 10% of cold.

Run: .venv/bin/python bench/datum_batching.py [--docs N]
Last line: one JSON object of figures and targets.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import yaml
from common import REPO, cdl, throwaway_stack

from pipelines.data.engine import PipelineEngine

TARGET_COLD_S = 30.0
TARGET_RATIO = 0.10
STEPS = ("clean", "validate")
USE_CASE = REPO / "use_cases" / "bbc_news" / "data"


def specs(folder: Path, batching: bool) -> list[Path]:
    """The shipped specs and scripts, copied to `folder`, with datum_batching as asked."""
    folder.mkdir(parents=True)
    paths = []
    for step in STEPS:
        shutil.copyfile(USE_CASE / f"{step}.py", folder / f"{step}.py")
        spec = yaml.safe_load((USE_CASE / f"{step}.yaml").read_text())
        spec["transform"]["datum_batching"] = batching
        paths.append(folder / f"{step}.yaml")
        paths[-1].write_text(yaml.safe_dump(spec))
    return paths


def run_steps(stack, corpus: Path) -> dict:
    """{step: [finished jobs, newest first]} after the corpus is put and the jobs have run."""
    cdl(stack, "data", "put", "bbc-raw", str(corpus), "--wait")
    engine = PipelineEngine(stack)
    jobs = {step: engine.jobs(f"bbc-{step}") for step in STEPS}
    for step, found in jobs.items():
        if found[0].state != "success":
            raise SystemExit(f"bbc-{step}: job {found[0].id} {found[0].state}: {found[0].error}")
    return jobs


def seconds(job) -> float:
    return (job.finished_at - job.started_at).total_seconds()


def figures_of(jobs: dict, index: int) -> tuple[float, dict[str, int]]:
    """Seconds (clean + validate) and datums run per step of the index-th newest jobs."""
    chosen = {step: found[index] for step, found in jobs.items()}
    return (
        round(sum(seconds(j) for j in chosen.values()), 2),
        {step: j.datums_processed for step, j in chosen.items()},
    )


def new_articles(work: Path, stack, count: int) -> Path:
    """`count` new clean articles under new names (new-001.txt ...), in the corpus' layout."""
    generated = work / "generated"
    cdl(
        stack,
        "data",
        "generate",
        "bbc-like",
        str(generated),
        "--docs",
        str(count),
        "--clean",
        "--seed",
        "1",
    )
    added = work / "added"
    for path in sorted(generated.rglob("*.txt")):
        target = added / path.parent.name / f"new-{path.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        path.rename(target)
    return added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=2225, help="articles of the corpus")
    args = parser.parse_args()
    added_count = max(1, round(args.docs / 100))
    work = Path(tempfile.mkdtemp(prefix="cdl-bench-batching-"))
    try:
        with throwaway_stack() as stack:
            corpus = work / "corpus"
            cdl(stack, "data", "generate", "bbc-like", str(corpus), "--docs", str(args.docs))
            cdl(stack, "data", "repo", "create", "bbc-raw")
            for path in specs(work / "batching", batching=True):
                cdl(stack, "data", "pipeline", "create", "-f", str(path))
            run_steps(stack, corpus)
            jobs = run_steps(stack, new_articles(work, stack, added_count))
            cold_s, cold_run = figures_of(jobs, 1)
            incremental_s, incremental_run = figures_of(jobs, 0)
        with throwaway_stack() as stack:
            cdl(stack, "data", "repo", "create", "bbc-raw")
            for path in specs(work / "each", batching=False):
                cdl(stack, "data", "pipeline", "create", "-f", str(path))
            baseline_s, baseline_run = figures_of(run_steps(stack, corpus), 0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = incremental_s / cold_s
    figures = {
        "docs": args.docs,
        "cold_s": cold_s,
        "cold_datums_run": cold_run,
        "incremental_added_files": added_count,
        "incremental_s": incremental_s,
        "incremental_datums_run": incremental_run,
        "incremental_over_cold": round(ratio, 4),
        "baseline_cold_s": baseline_s,
        "baseline_datums_run": baseline_run,
        "speedup_over_baseline": round(baseline_s / cold_s, 2),
        "target_cold_s": TARGET_COLD_S,
        "target_ratio": TARGET_RATIO,
        "met": cold_s <= TARGET_COLD_S
        and ratio <= TARGET_RATIO
        and incremental_run == {step: added_count for step in STEPS},
    }
    print(
        f"cold (datum batching): {cold_s} s for {cold_run} datums run; without batching "
        f"{baseline_s} s ({figures['speedup_over_baseline']}x); after adding {added_count} "
        f"articles: {incremental_s} s for {incremental_run} = {ratio:.1%} of cold "
        f"(targets: cold <= {TARGET_COLD_S:.0f} s, incremental <= {TARGET_RATIO:.0%})"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
