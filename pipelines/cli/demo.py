"""`cdl demo`: the platform end to end on the local stack. Safe to run again: a second run adds
a commit whose content is unchanged, and the pipeline reuses every earlier datum."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import typer

from pipelines.cli.context import cli_context, console
from pipelines.cli.stack import status_table
from pipelines.core.errors import CDLError
from pipelines.data import formats
from pipelines.data.engine import PipelineEngine
from pipelines.data.repos import DataRepos, Ref

EXAMPLES = Path(__file__).resolve().parents[1] / "data" / "examples"
DEMO_REPO = "demo-articles"
TOPICS = {
    "business": "market shares profit company bank growth economy",
    "sport": "match team goal season player coach league",
    "tech": "software phone internet chip users data network",
}


def write_articles(folder: Path, per_class: int = 4) -> None:
    """A few short articles per topic, the same on every run (fixed seed)."""
    rng = random.Random(0)
    for topic, words in TOPICS.items():
        (folder / topic).mkdir(parents=True)
        vocabulary = words.split() + "the a of and to in on".split()
        for i in range(per_class):
            text = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(20, 60)))
            (folder / topic / f"{i:03d}.txt").write_text(f"{topic} story {i}\n{text}\n")


def demo(ctx: typer.Context) -> None:
    """Run the demo on the selected stack: bring the stack up, version a small dataset, compute
    its statistics and run a pipeline over it."""
    stack = cli_context(ctx).stack
    console.rule("CDL demo: the stack")
    with console.status("bringing the stack up"):
        done = stack.up()
    for line in done:
        console.print(f"• {line}")
    console.print(status_table(stack.status()))

    console.rule("versioned data")
    repos, engine = DataRepos(stack), PipelineEngine(stack)
    if DEMO_REPO not in {r["name"] for r in repos.list_repos()}:
        repos.create_repo(DEMO_REPO, "demo news articles, one folder per topic")
    with tempfile.TemporaryDirectory() as tmp:
        write_articles(Path(tmp))
        commit, _ = repos.put(Ref.parse(DEMO_REPO), [Path(tmp)], message="demo articles")
    console.print(f"put {commit.file_count} files into {commit.ref}")
    stats = formats.compute(repos, commit)
    console.print(f"stats: {stats.samples} samples, classes {stats.classes}")

    console.rule("pipeline")
    spec = EXAMPLES / "word_count.yaml"
    existing = {p["name"] for p in engine.list()}
    info = engine.create(spec, update="demo-word-count" in existing)
    console.print(f"pipeline {info['name']} version {info['version']} from {spec.name}")
    engine.run_pending()  # the stack's worker may run the job: wait for it either way
    job = engine.jobs(info["name"], limit=1)[0]
    console.print(
        f"job {job.id[:12]}: {job.state}, {job.datums_processed} datums run, "
        f"{job.datums_skipped} reused"
    )
    if job.state != "success":
        raise CDLError(
            f"the demo pipeline failed: {job.error}",
            f"see 'cdl data job logs {job.id[:12]} --failed'",
        )
    output = repos.resolve(info["name"])
    console.print(
        f"output {output.ref}: {output.file_count} files, computed from "
        f"{', '.join(c.ref for c in repos.provenance(output))}"
    )
    console.print(
        "Next: [bold]cdl data log demo-articles[/], [bold]cdl data ls demo-word-count -r[/], "
        "[bold]cdl lineage show dataset_commit:" + output.ref + "[/], [bold]cdl stack down[/]."
    )
