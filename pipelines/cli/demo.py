"""`cdl demo`: the platform end to end on the local stack, for the BBC news use case. Safe to
run again: the same corpus makes a commit with unchanged content, the pipelines reuse every
datum, no task is imported twice and no label loaded twice; unchanged labels reuse the last
snapshot, and a snapshot already searched reuses its experiment, version and champion."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import typer
import yaml

from pipelines.cli.context import cli_context, console
from pipelines.cli.lineage import render
from pipelines.cli.stack import status_table
from pipelines.core import lineage
from pipelines.core.errors import CDLError
from pipelines.data import bbc, formats
from pipelines.data.backend import Ref, data_backend, pipeline_backend
from pipelines.data.labeling.service import Labeling
from pipelines.data.labeling.spec import USE_CASES, use_case
from pipelines.model.approvals import approve
from pipelines.model.evaluation import evaluate
from pipelines.model.experiments import experiment_engine
from pipelines.model.registry import Registry, register, registered_name

RAW_REPO = "bbc-raw"
DEMO_EXPERIMENT = "bbc-news-demo"
DEMO_GATE = 0.8  # test accuracy the demo's model must reach
STEPS = ("clean", "validate", "report")


def demo(
    ctx: typer.Context,
    docs: int = typer.Option(100, min=5, help="Articles in the generated BBC-like corpus."),
) -> None:
    """Run the demo on the selected stack: bring the stack up with Label Studio, version a
    generated BBC-like corpus, run the BBC data pipeline (clean, validate, report), label the
    validated articles in Label Studio, export the labels to Postgres and freeze a snapshot; then
    a small ASHA search on it, register the best trial, evaluate it on the test split and
    approve it as champion, with its lineage."""
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
    latest = labeling.snapshots()[:1]
    if latest and labeling.unchanged_since(latest[0]["name"]):
        name = latest[0]["name"]
        console.print(f"snapshot bbc_news/{name}: the labels are unchanged since, reused")
    else:
        name = time.strftime("demo-%Y%m%d-%H%M%S")
        console.print(f"snapshot bbc_news/{name}: {labeling.snapshot(name)} labels")
    console.print(render(lineage.show(stack, f"label_snapshot:bbc_news/{name}", depth=6)))

    console.rule("model pipeline: ASHA search, registry, evaluation gate, approval")
    experiment = _search(stack, name)
    champion = _promote(stack, experiment)
    console.print(
        f"champion [bold]{champion.ref}[/]: test accuracy {champion.tags.get('cdl.eval.accuracy')}"
        f", {champion.tags.get('cdl.parameters')} parameters, "
        f"{champion.tags.get('cdl.latency_ms')} ms per article"
    )
    console.print(render(lineage.show(stack, f"model_version:{champion.ref}", depth=8)))
    console.print(
        "Next: [bold]cdl experiment show " + str(experiment.id) + "[/], "
        "[bold]cdl model show " + champion.ref + "[/], [bold]cdl ui[/], "
        "[bold]cdl stack down[/]."
    )


def _search(stack, snapshot: str):
    """The demo's small ASHA search on `snapshot`: the one that already completed on it, or a
    new one (its workers run here, as with 'cdl experiment submit --wait')."""
    experiments = experiment_engine(stack)
    for experiment in experiments.list():
        if (experiment.name, experiment.snapshot, experiment.state) == (
            DEMO_EXPERIMENT,
            snapshot,
            "completed",
        ):
            console.print(f"experiment {experiment.id} already searched this snapshot, reused")
            return experiment
    spec = yaml.safe_load((USE_CASES / "bbc_news" / "model" / "search.yaml").read_text())
    spec["name"] = DEMO_EXPERIMENT
    spec["data"]["snapshot"] = snapshot
    spec["searcher"].update(max_trials=4, max_time=4, divisor=2, max_rungs=2)
    path = stack.settings.home / "demo" / "search.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    submitted = experiments.submit(path, attached=True).experiment
    console.print(
        f"experiment {submitted.id}: ASHA over {submitted.max_trials} trials of up to "
        f"{submitted.max_epochs} epochs, {submitted.workers} workers"
    )
    with console.status("training"):
        experiment = experiments.wait(submitted.id)
    if experiment.state != "completed":
        raise CDLError(
            f"the demo experiment {experiment.id} ended {experiment.state}: {experiment.error}",
            f"see 'cdl experiment logs {experiment.id}'",
        )
    console.print(
        f"best trial {experiment.best_trial}: {experiment.metric} {experiment.best_metric:.3f}"
    )
    return experiment


def _promote(stack, experiment):
    """Register the experiment's best trial (unless it was), evaluate it and approve it; the
    champion."""
    registry = Registry(stack)
    name = registered_name("bbc_news")
    versions = registry.versions(name)
    mine = [v for v in versions if v.tags.get("cdl.experiment") == str(experiment.id)]
    if mine:
        version = mine[0]
        console.print(f"{version.ref} was registered from experiment {experiment.id}, reused")
    else:
        version = register(stack, str(experiment.id)).version
        console.print(f"registered {version.ref} from experiment {experiment.id}")
    if not version.passed:
        gate = evaluate(stack, version.ref, min_accuracy=DEMO_GATE)
        console.print(
            f"evaluated {version.ref} on its snapshot's test split: accuracy "
            f"{gate.scores.accuracy:.3f} (gate {DEMO_GATE}) -> "
            + ("passed: candidate" if gate.passed else "failed")
            + f"; report {gate.report}"
        )
        if not gate.passed:
            raise CDLError(
                f"{version.ref} did not pass the demo's gate",
                f"see {gate.report}",
            )
    champion = registry.champion(name)
    if champion is None or champion.version != version.version:
        approve(stack, version.ref, by="cdl demo", reason="passed the evaluation gate")
        console.print(f"approved {version.ref}: champion")
    return registry.champion(name)
