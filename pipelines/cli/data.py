"""`cdl data`: versioned data repositories (repos, branches, commits, files)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from pipelines.cli.context import cli_context, console, err_console, say, stop_on_signal
from pipelines.core.errors import Invalid, NotFound
from pipelines.data import bbc, fashion, formats
from pipelines.data.backend import (
    Commit,
    DataBackend,
    PipelineBackend,
    Ref,
    data_backend,
    pipeline_backend,
)
from pipelines.data.spec import load_specs

app = typer.Typer(
    rich_markup_mode=None,
    help="Versioned data: repos, branches and immutable commits of files (Pachyderm semantics). "
    "Refs are REPO, REPO@BRANCH or REPO@COMMIT (6+ hex digits), with ^ for a parent and "
    ":PATH for a file or folder, e.g. images@master^:/train.",
    no_args_is_help=True,
)
repo_app = typer.Typer(
    rich_markup_mode=None, help="Create, list and delete repos.", no_args_is_help=True
)
app.add_typer(repo_app, name="repo")


WAIT_HELP = (
    "Wait for every job this triggers, downstream included, running due ones here; exit 1 if "
    "one failed."
)


def repos(ctx: typer.Context) -> DataBackend:
    """The stack's versioned-data backend (local engine or Pachyderm)."""
    return data_backend(cli_context(ctx).stack)


def engine(ctx: typer.Context) -> PipelineBackend:
    """The stack's pipeline backend (local engine or Pachyderm)."""
    return pipeline_backend(cli_context(ctx).stack)


def known(value: int | None) -> str:
    return "-" if value is None else str(value)


def human(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(size)


def when(commit: Commit) -> str:
    return commit.started_at.astimezone().strftime("%m-%d %H:%M:%S")


@repo_app.command("create")
def repo_create(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Repo name: letters, digits, '-' and '_'."),
    description: str = typer.Option("", "--description", "-d", help="What the repo holds."),
) -> None:
    """Create a repo with an empty 'master' branch."""
    repos(ctx).create_repo(name, description)
    console.print(f"created repo {name}")


@repo_app.command("list")
def repo_list(ctx: typer.Context) -> None:
    """List repos with their branches, commits and the size of master."""
    table = Table("repo", "branches", "commits", "files", "size", "created", "description")
    for r in repos(ctx).list_repos():
        table.add_row(
            r.name,
            known(r.branches),
            known(r.commits),
            known(r.files),
            human(r.size),
            r.created_at.astimezone().strftime("%Y-%m-%d %H:%M") if r.created_at else "-",
            r.description,
        )
    console.print(table)


@repo_app.command("delete")
def repo_delete(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The repo to delete."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete a repo with all its branches and commits. Refused while another repo holds
    commits computed from it. File bytes shared with other commits stay in the object store."""
    if not yes and not typer.confirm(f"delete repo {name} and all its commits?"):
        raise typer.Abort()
    repos(ctx).delete_repo(name)
    console.print(f"deleted repo {name}")


@app.command()
def put(
    ctx: typer.Context,
    target: str = typer.Argument(..., metavar="REPO[@BRANCH]", help="Where to commit."),
    paths: List[Path] = typer.Argument(..., help="Files and folders; a folder's contents go in."),
    dest: str = typer.Option("/", "--path", "-p", help="Folder in the repo to put them under."),
    message: str = typer.Option("", "--message", "-m", help="Commit message."),
    author: Optional[str] = typer.Option(None, help="Default: $CDL_AUTHOR, else user@host."),
    wait: bool = typer.Option(False, "--wait", help=WAIT_HELP),
) -> None:
    """Store files in a new commit on a branch (created if missing). Files already on the branch
    stay unless put again; identical bytes are stored once. Symbolic links and special files are
    skipped and listed. The commit appears whole or not at all."""
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task(f"put {target}", total=None)
        commit, scan = repos(ctx).put(
            Ref.parse(target),
            paths,
            dest,
            message,
            author,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            on_wait=lambda: err_console.print(f"waiting for another commit to {target}"),
        )
    for source, reason in scan.skipped:
        err_console.print(f"skipped {source}: {reason}", highlight=False)
    console.print(
        f"committed {commit.ref} on {commit.branch}: {known(commit.file_count)} files, "
        f"{human(commit.size_bytes)}",
        highlight=False,
    )
    if wait:
        run_and_report(ctx, commits=[commit.id])


@app.command()
def rm(
    ctx: typer.Context,
    target: str = typer.Argument(..., metavar="REPO[@BRANCH]", help="Where to commit."),
    paths: List[str] = typer.Argument(..., help="Files or folders in the repo."),
    message: str = typer.Option("", "--message", "-m", help="Commit message."),
    wait: bool = typer.Option(False, "--wait", help=WAIT_HELP),
) -> None:
    """Make a commit without the given files or folders (earlier commits keep them)."""
    commit = repos(ctx).delete(Ref.parse(target), paths, message)
    console.print(
        f"committed {commit.ref} on {commit.branch}: {commit.file_count} files left",
        highlight=False,
    )
    if wait:
        run_and_report(ctx, commits=[commit.id])


@app.command("ls")
def ls(
    ctx: typer.Context,
    ref: str = typer.Argument(..., metavar="REF[:PATH]", help="e.g. images@master:/train"),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Every file below PATH."),
) -> None:
    """List the files and folders at PATH (default: the root) of a commit."""
    parsed = Ref.parse(ref)
    data = repos(ctx)
    commit = data.resolve(parsed)
    if recursive:
        for entry in data.files(commit, parsed.path or "/"):
            print(f"{entry.size:>12}  {entry.sha256[:12]}  {entry.path}")
        return
    table = Table(
        "name",
        "type",
        "size",
        "files",
        title=f"{commit.repo}@{commit.id[:12]}:{parsed.path or '/'}",
    )
    for entry in data.listing(commit, parsed.path or "/"):
        table.add_row(
            entry.name + ("/" if entry.kind == "dir" else ""),
            entry.kind,
            human(entry.size),
            known(entry.files),
        )
    console.print(table)


@app.command()
def get(
    ctx: typer.Context,
    ref: str = typer.Argument(..., metavar="REF:PATH", help="A file or folder of a commit."),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Where to write (a folder needs one); default: stdout."
    ),
) -> None:
    """Write a file of a commit to stdout or a file, or a folder to a local folder."""
    parsed = Ref.parse(ref)
    data = repos(ctx)
    commit = data.resolve(parsed)
    path = parsed.path or "/"
    if output is None:
        first = next(data.files(commit, path), None)
        if first is None:
            parent = path.rsplit("/", 1)[0] or "/"
            raise NotFound(
                f"{commit.ref} has no file or folder {path}",
                f"see what {parent} holds: cdl data ls {commit.repo}@{commit.id[:12]}:{parent}",
            )
        if first.path != path:
            raise Invalid(
                f"{commit.ref}:{path} is a folder", "give --output FOLDER to write its files there"
            )
        with data.open(commit, first) as stream:
            shutil.copyfileobj(stream, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return
    if output.is_dir():
        output = output / (path.rstrip("/").rsplit("/", 1)[-1] or commit.repo)
    count = data.get(commit, path, output)
    err_console.print(f"wrote {count} file(s) to {output}")


@app.command()
def log(
    ctx: typer.Context,
    target: str = typer.Argument(..., metavar="REPO[@BRANCH]", help="A branch, or a whole repo."),
    limit: int = typer.Option(50, "--limit", "-n", min=1, help="How many commits."),
) -> None:
    """Show the commits of a branch from its head back, or with a bare REPO every commit of the
    repo, open ones (being written, or left by a writer that died) included."""
    parsed = Ref.parse(target)
    table = Table("commit", "branch", "state", "started", "files", "size", "author", "message")
    for c in repos(ctx).log(parsed.repo, parsed.name, limit):
        state = "[green]finished[/]" if c.state == "finished" else "[yellow]open[/]"
        table.add_row(
            c.id[:12],
            c.branch,
            state,
            when(c),
            known(c.file_count),
            human(c.size_bytes),
            c.author,
            c.message,
        )
    console.print(table)


@app.command()
def diff(
    ctx: typer.Context,
    old: str = typer.Argument(..., metavar="OLD", help="e.g. images@master^"),
    new: str = typer.Argument(..., metavar="NEW", help="e.g. images@master"),
    stat_only: bool = typer.Option(False, "--stat", help="Only the counts."),
) -> None:
    """Show the files added (+), removed (-) and modified (M) from OLD to NEW."""
    data = repos(ctx)
    a, b = data.resolve(old), data.resolve(new)
    counts = {"added": 0, "removed": 0, "modified": 0}
    marks = {"added": "+", "removed": "-", "modified": "M"}
    for status, path, _, _ in data.diff(a, b):
        counts[status] += 1
        if not stat_only:
            print(f"{marks[status]} {path}")
    print(f"{counts['added']} added, {counts['removed']} removed, {counts['modified']} modified")


@app.command()
def branch(
    ctx: typer.Context,
    repo: str = typer.Argument(..., help="The repo."),
    name: Optional[str] = typer.Argument(None, help="Branch to create (or delete)."),
    source: Optional[str] = typer.Option(
        None, "--from", help="Start at this ref (e.g. repo@a1b2c3)."
    ),
    delete: bool = typer.Option(False, "--delete", "-d", help="Delete the branch NAME."),
) -> None:
    """List a repo's branches, create branch NAME (empty, or at --from), or delete it."""
    data = repos(ctx)
    if name is None:
        table = Table("branch", "head", "files", "size", title=repo)
        for branch_name, head in data.branches(repo):
            table.add_row(
                branch_name,
                head.id[:12] if head else "-",
                str(head.file_count) if head else "0",
                human(head.size_bytes if head else 0),
            )
        console.print(table)
    elif delete:
        data.delete_branch(repo, name)
        console.print(f"deleted branch {repo}@{name}")
    else:
        head = data.create_branch(repo, name, Ref.parse(source) if source else None)
        console.print(f"created branch {repo}@{name}" + (f" at {head.id[:12]}" if head else ""))


@app.command()
def clean(ctx: typer.Context, repo: str = typer.Argument(..., help="The repo.")) -> None:
    """Discard what writers that died (a killed `put`) left: open commits of the repo, and
    temporary object files. What is being written right now is left alone."""
    cleaned = repos(ctx).clean(repo)
    console.print(
        f"discarded {cleaned.commits} open commit(s) in {repo} and {cleaned.objects} temporary "
        "object file(s)"
    )


# -- pipelines and jobs --------------------------------------------------------------------

pipeline_app = typer.Typer(
    rich_markup_mode=None,
    help="Pipelines in the Pachyderm pipeline-spec format (JSON or YAML), run by the local "
    "engine: each commit on an input branch triggers a job.",
    no_args_is_help=True,
)
job_app = typer.Typer(
    rich_markup_mode=None,
    help="Jobs: one run of a pipeline over one set of input commits.",
    no_args_is_help=True,
)
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(job_app, name="job")


def run_and_report(
    ctx: typer.Context, commits: list[str] = (), versions: dict[str, int] | None = None
) -> None:
    """Run due jobs here and wait for those the worker runs; then print every job the commits
    or pipeline versions triggered, downstream included, whoever ran it; exit 1 if one failed,
    naming it and the command that shows its failed datums."""
    pipelines = engine(ctx)
    pipelines.run_pending(progress=lambda line: err_console.print(line, highlight=False))
    jobs = pipelines.triggered_by(commits, versions)
    for job in jobs:
        colour = "green" if job.state == "success" else "red"
        console.print(
            f"job {job.id[:12]} of {job.pipeline}: [{colour}]{job.state}[/] "
            f"({job.datums_processed} run, {job.datums_skipped} reused, "
            f"{job.datums_failed} failed)" + (f": {job.error}" if job.error else ""),
            highlight=False,
        )
    failed = [job for job in jobs if job.state != "success"]
    for job in failed:
        err_console.print(
            f"[bold red]error:[/] job {job.id[:12]} of pipeline {job.pipeline} failed "
            f"(fix: see its failed datums with 'cdl data job logs {job.id[:12]} --failed')",
            highlight=False,
            soft_wrap=True,
        )
    if failed:
        raise typer.Exit(1)


SPEC_OPTION = typer.Option(
    ..., "--file", "-f", help="Pipeline spec (.json, .yaml or .yml).", exists=True, dir_okay=False
)


@pipeline_app.command("create")
def pipeline_create(
    ctx: typer.Context,
    spec: Path = SPEC_OPTION,
    wait: bool = typer.Option(False, "--wait", help=WAIT_HELP),
) -> None:
    """Create each pipeline of the file, in order, and its output repo (named after it). Its
    transform runs locally in the spec's folder; a job starts as soon as every input branch has
    a commit. On a stack whose data engine is pachyderm, the same specs are sent to pachd."""
    pipelines, versions = engine(ctx), {}
    for one in load_specs(spec):
        info = pipelines.create(spec, spec=one)
        versions[info["name"]] = info["version"]
        console.print(f"created pipeline {info['name']} (output repo {info['name']})")
        if info["ignored"]:
            console.print(f"note: cluster-only, ignored here: {', '.join(info['ignored'])}")
    if wait:
        run_and_report(ctx, versions=versions)


@pipeline_app.command("update")
def pipeline_update(
    ctx: typer.Context,
    spec: Path = SPEC_OPTION,
    reprocess: bool = typer.Option(
        False, "--reprocess", help="Run every datum again, even those whose input is unchanged."
    ),
    wait: bool = typer.Option(False, "--wait", help=WAIT_HELP),
) -> None:
    """Update each pipeline of the file. A changed transform or changed code files make a new
    version whose datums run again; otherwise only new or changed datums run. A running job of
    the old version is stopped first."""
    pipelines, versions = engine(ctx), {}
    for one in load_specs(spec):
        info = pipelines.create(spec, update=True, reprocess=reprocess, spec=one)
        versions[info["name"]] = info["version"]
        print_stopped(info["stopped"])
        console.print(f"updated pipeline {info['name']} to version {info['version']}")
    if wait:
        run_and_report(ctx, versions=versions)


@pipeline_app.command("list")
def pipeline_list(ctx: typer.Context) -> None:
    """List pipelines with their inputs and last job."""
    table = Table("pipeline", "version", "inputs", "last job", "started", "description")
    for p in engine(ctx).list():
        state = p["last_state"] or "-"
        colour = {"success": "green", "failure": "red", "running": "yellow"}.get(state, "dim")
        started = (
            p["last_started"].astimezone().strftime("%m-%d %H:%M:%S") if p["last_started"] else "-"
        )
        table.add_row(
            p["name"],
            str(p["version"]),
            p["inputs"] or "-",
            f"[{colour}]{state}[/]",
            started,
            p["description"] or "",
        )
    console.print(table)


@pipeline_app.command("inspect")
def pipeline_inspect(ctx: typer.Context, name: str = typer.Argument(..., help="Pipeline.")) -> None:
    """Show a pipeline's spec, where it runs and its latest jobs."""
    info = engine(ctx).inspect(name)
    console.print(
        f"[bold]{name}[/] version {info['version']}, updated "
        f"{info['updated_at'].astimezone():%Y-%m-%d %H:%M:%S}"
    )
    console.print(f"spec file: {info['spec_path']}\nruns in:   {info['workdir']}")
    console.print_json(json.dumps(info["spec"]))
    print_jobs(info["jobs"])


@pipeline_app.command("delete")
def pipeline_delete(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Pipeline."),
    keep_repo: bool = typer.Option(False, "--keep-repo", help="Keep its output repo."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete a pipeline, its jobs and (unless --keep-repo) its output repo. Its running job is
    stopped first."""
    if not yes and not typer.confirm(f"delete pipeline {name}?"):
        raise typer.Abort()
    print_stopped(engine(ctx).delete(name, keep_repo))
    console.print(f"deleted pipeline {name}")


def print_stopped(jobs) -> None:
    for job in jobs:
        console.print(f"stopped job {job.id[:12]} of {job.pipeline}: {job.error}", highlight=False)


def print_jobs(jobs) -> None:
    table = Table(
        "job", "pipeline", "state", "started", "datums: run/reused/failed", "output", "error"
    )
    table.columns[0].no_wrap = True
    for j in jobs:
        colour = {"success": "green", "failure": "red"}.get(j.state, "yellow")
        table.add_row(
            j.id[:12],
            j.pipeline,
            f"[{colour}]{j.state}[/]",
            j.started_at.astimezone().strftime("%m-%d %H:%M:%S"),
            f"{j.datums_total}: {j.datums_processed}/{j.datums_skipped}/{j.datums_failed}",
            (j.output_commit or "-")[:12],
            j.error or "",
        )
    console.print(table)


@job_app.command("list")
def job_list(
    ctx: typer.Context,
    pipeline: Optional[str] = typer.Option(None, "--pipeline", "-p", help="Only this pipeline."),
    limit: int = typer.Option(20, "--limit", "-n", min=1, help="How many jobs."),
) -> None:
    """List jobs, newest first, with their datum counts, output commit and error."""
    print_jobs(engine(ctx).jobs(pipeline, limit))


@job_app.command("inspect")
def job_inspect(ctx: typer.Context, job_id: str = typer.Argument(..., metavar="JOB")) -> None:
    """Show a job: its input commits, datum counts, output commit and error."""
    job = engine(ctx).job(job_id)
    print_jobs([job])
    for name, commit in job.input_commits.items():
        console.print(f"input  {name}: {commit}")
    if job.output_commit:
        console.print(f"output {job.pipeline}@{job.output_commit}")
    if job.error:
        console.print(f"[red]error:[/] {job.error}", highlight=False)


@job_app.command("wait")
def job_wait(
    ctx: typer.Context,
    refs: List[str] = typer.Argument(..., metavar="REF...", help="Commits, e.g. raw@master."),
) -> None:
    """Wait for every job the commits triggered, downstream included, whoever runs them (due
    ones run here); print each job's outcome and exit 1 if one failed (for CI)."""
    data = repos(ctx)
    run_and_report(ctx, commits=[data.resolve(ref).id for ref in refs])


@job_app.command("stop")
def job_stop(ctx: typer.Context, job_id: str = typer.Argument(..., metavar="JOB")) -> None:
    """Stop a running job: its transforms are killed, nothing is committed, and it ends
    'killed'. Its input commits are not run again until a new commit or a pipeline update."""
    print_stopped([engine(ctx).stop(job_id)])


@job_app.command("logs")
def job_logs(
    ctx: typer.Context,
    job_id: str = typer.Argument(..., metavar="JOB"),
    failed: bool = typer.Option(False, "--failed", help="Only datums that failed."),
) -> None:
    """Print the output of each datum a job ran (the last 32,000 characters of each)."""
    for datum in engine(ctx).job_datums(job_id, "failed" if failed else None):
        if datum["state"] == "skipped":
            continue
        console.rule(
            f"{json.dumps(datum['inputs'])} {datum['state']}, {datum['attempts']} attempt(s)",
            style="dim",
        )
        print(datum["log"], end="" if datum["log"].endswith("\n") else "\n")


@app.command()
def worker(ctx: typer.Context) -> None:
    """Run pipeline jobs as commits arrive. `cdl stack up` runs this in the background as the
    'pipelines' service; run it here to watch."""
    say("running pipeline jobs as commits arrive")
    engine(ctx).serve(stop_on_signal(), say)


@app.command()
def provenance(
    ctx: typer.Context,
    ref: str = typer.Argument(..., metavar="REF", help="e.g. clean@master"),
) -> None:
    """Show every commit a commit was computed from, and the jobs that made them."""
    data = repos(ctx)
    commit = data.resolve(ref)
    console.print(f"[bold]{commit.ref}[/] ({commit.origin}, {commit.file_count} files)")
    for upstream in data.provenance(commit):
        console.print(
            f"  ← {upstream.ref} on {upstream.branch} ({upstream.origin}, "
            f"{upstream.file_count} files, {when(upstream)})",
            highlight=False,
        )
    jobs = [j for j in engine(ctx).jobs(commit.repo, limit=1000) if j.output_commit == commit.id]
    for job in jobs:
        console.print(
            f"  made by job {job.id} of pipeline {job.pipeline} (version {job.pipeline_version})"
        )


@app.command()
def stats(
    ctx: typer.Context,
    ref: str = typer.Argument(..., metavar="REF[:PATH]", help="e.g. fashion-ingest:/images"),
    fmt: Optional[str] = typer.Option(
        None,
        "--format",
        "-f",
        help="folder, idx, csv, txt, voc or coco (default: detected from the files).",
    ),
    label_column: Optional[str] = typer.Option(
        None, help="CSV: the label column (default: 'label', else the last column)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the statistics as JSON."),
) -> None:
    """Count samples and samples per class of a commit's dataset (or of the folder PATH in it),
    with sizes, and store the figures with the commit."""
    data = repos(ctx)
    parsed = Ref.parse(ref)
    commit = data.resolve(parsed)
    result = formats.compute(data, commit, fmt, label_column, parsed.path or "/")
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    console.print(
        f"[bold]{commit.repo}@{commit.id[:12]}[/]: {result.format} format, "
        f"{result.samples} samples, {len(result.classes)} classes, {human(result.bytes)}"
    )
    table = Table("class", "samples", "share")
    total = sum(result.classes.values()) or 1
    for name, count in result.classes.items():
        table.add_row(name, str(count), f"{count / total:.1%}")
    console.print(table)
    for key, value in result.details.items():
        console.print(f"{key}: {json.dumps(value)}", highlight=False, soft_wrap=True)


generate_app = typer.Typer(
    rich_markup_mode=None,
    help="Write datasets for tests and demos, in real raw formats.",
    no_args_is_help=True,
)
app.add_typer(generate_app, name="generate")


@generate_app.command("bbc-like")
def generate_bbc_like(
    out: Path = typer.Argument(..., help="A new or empty folder."),
    docs: int = typer.Option(2225, "--docs", min=5, help="Clean articles (the real corpus: 2225)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same corpus."),
    clean: bool = typer.Option(False, "--clean", help="No dirty files."),
) -> None:
    """Write a synthetic corpus in the raw BBC news layout: business/, entertainment/,
    politics/, sport/, tech/ of numbered .txt articles (title line, blank line, body), plus a
    few dirty files (not UTF-8, title only, .doc, exact duplicates) unless --clean."""
    written = bbc.generate(out, docs, seed, dirty=not clean)
    console.print(
        ", ".join(f"{count} {kind.replace('_', ' ')}" for kind, count in written.items())
        + f" files in {out}",
        highlight=False,
    )


@app.command("idx-to-png")
def idx_to_png(
    out: Path = typer.Argument(..., help="Folder to write class folders and the manifest to."),
    source: Path = typer.Option(fashion.DEFAULT_SOURCE, help="Folder of the IDX files."),
    split: str = typer.Option("train", help="train or t10k."),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N images."),
) -> None:
    """Convert Fashion-MNIST IDX files (gzipped or not) to one PNG per image in folder-per-class
    layout, with manifest-SPLIT.csv (path, label, class, source_index)."""
    count = fashion.export_pngs(source, out, split, limit)
    console.print(f"wrote {count} PNGs and manifest-{split}.csv to {out}")
