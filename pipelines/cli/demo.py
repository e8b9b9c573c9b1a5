"""`cdl demo`: the platform end to end on the local stack, for the BBC news use case. Safe to
run again: the same corpus makes a commit with unchanged content, the pipelines reuse every
datum, no task is imported twice and no label loaded twice."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import typer

from pipelines.cli.context import cli_context, console
from pipelines.cli.lineage import render
from pipelines.cli.stack import status_table
from pipelines.core import lineage
from pipelines.core.errors import CDLError
from pipelines.data import bbc, formats
from pipelines.data.backend import Ref, data_backend, pipeline_backend
from pipelines.data.labeling.service import Labeling
from pipelines.data.labeling.spec import USE_CASES, use_case

RAW_REPO = "bbc-raw"
STEPS = ("clean", "validate", "report")


def demo(
    ctx: typer.Context,
    docs: int = typer.Option(100, min=5, help="Articles in the generated BBC-like corpus."),
) -> None:
    """Run the demo on the selected stack: bring the stack up with Label Studio, version a
    generated BBC-like corpus, run the BBC data pipeline (clean, validate, report), label the
    validated articles in Label Studio, export the labels to Postgres and freeze a snapshot."""
    stack = cli_context(ctx).stack
    console.rule("CDL demo: the stack")
    with console.status("bringing the stack up (Label Studio's first start takes a minute)"):
        done = stack.up(["label-studio"])
    for line in done:
        console.print(f"• {line}")
    console.print(status_table(stack.status()))

    console.rule("data pipeline: raw articles to validated data")
    repos, engine = data_backend(stack), pipeline_backend(stack)
    if RAW_REPO not in {r.name for r in repos.list_repos()}:
        repos.create_repo(RAW_REPO, "raw BBC-like articles, one folder per topic")
    with tempfile.TemporaryDirectory() as tmp:
        written = bbc.generate(Path(tmp) / "bbc", docs, seed=0)
        commit, _ = repos.put(Ref.parse(RAW_REPO), [Path(tmp) / "bbc"], message="demo corpus")
    console.print(f"put {commit.file_count} files into {commit.ref} ({written})")
    stats = formats.compute(repos, commit, "folder")
    console.print(f"stats: {stats.samples} files, classes {stats.classes}")
    existing = {p["name"] for p in engine.list()}
    for step in STEPS:
        spec = USE_CASES / "bbc_news" / "data" / f"{step}.yaml"
        name = f"bbc-{step}" if step != "report" else "bbc-validation-report"
        engine.create(spec, update=name in existing)
    engine.run_pending()  # the stack's worker may run some jobs: wait for all either way
    for name in ("bbc-clean", "bbc-validate", "bbc-validation-report"):
        job = engine.jobs(name, limit=1)[0]
        console.print(
            f"{name}: job {job.id[:12]} {job.state}, {job.datums_processed} datums "
            f"run, {job.datums_skipped} reused"
        )
        if job.state != "success":
            raise CDLError(
                f"the demo pipeline {name} failed: {job.error}",
                f"see 'cdl data job logs {job.id[:12]} --failed'",
            )
    reports = repos.resolve("bbc-validation-report")
    with repos.open(reports, next(repos.files(reports, "/validation-report.json"))) as stream:
        report = json.load(stream)
    console.print(
        f"validation: {report['valid']} valid, {report['quarantined']} quarantined "
        f"{report['quarantined_per_reason']}"
    )

    console.rule("labeling: Label Studio to the Postgres label store")
    labeling = Labeling(stack, use_case("bbc_news"))
    new, known = labeling.sync()
    console.print(
        f"Label Studio at {labeling.client.url}: {new} new task(s), {known} already "
        f"there (admin: see .cdl/secrets)"
    )
    console.print(f"annotated {labeling.auto_annotate()} task(s) as a labeler would")
    result = labeling.export()
    console.print(
        f"export: {result.rows} labels, {result.loaded} new row(s) loaded; raw export "
        f"in {result.commit.ref}"
    )
    name = time.strftime("demo-%Y%m%d-%H%M%S")
    rows = labeling.snapshot(name)
    console.print(f"snapshot bbc_news/{name}: {rows} labels")
    console.print(render(lineage.show(stack, f"label_snapshot:bbc_news/{name}", depth=6)))
    console.print(
        "Next: [bold]cdl label snapshot show bbc_news " + name + "[/], "
        "[bold]cdl data job list[/], [bold]cdl stack down[/]."
    )
