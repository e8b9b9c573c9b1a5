"""`cdl data`: versioned data repositories (repos, branches, commits, files)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from pipelines.cli.context import cli_context, console, err_console
from pipelines.core.errors import CDLError
from pipelines.data.repos import Commit, DataRepos, Ref

app = typer.Typer(
    help="Versioned data: repos, branches and immutable commits of files (Pachyderm semantics). "
    "Refs are REPO, REPO@BRANCH or REPO@COMMIT (6+ hex digits), with ^ for a parent and "
    ":PATH for a file or folder, e.g. images@master^:/train.",
    no_args_is_help=True,
)
repo_app = typer.Typer(help="Create, list and delete repos.", no_args_is_help=True)
app.add_typer(repo_app, name="repo")


def repos(ctx: typer.Context) -> DataRepos:
    return DataRepos(cli_context(ctx).stack)


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
            r["name"],
            str(r["branches"]),
            str(r["commits"]),
            str(r["files"] if r["files"] is not None else "-"),
            human(r["size"]),
            r["created_at"].astimezone().strftime("%Y-%m-%d %H:%M"),
            r["description"],
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
        f"committed {commit.ref} on {commit.branch}: {commit.file_count} files, "
        f"{human(commit.size_bytes)}",
        highlight=False,
    )


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
    for name, kind, size, count in data.listing(commit, parsed.path or "/"):
        table.add_row(name + ("/" if kind == "dir" else ""), kind, human(size), str(count))
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
        entries = data.files(commit, path)
        first = next(entries, None)
        if first is None or first.path != path:
            raise CDLError(f"{commit.ref}:{path} is a folder or missing", "give --output FOLDER")
        for chunk in data.store.read_chunks(first.sha256):
            sys.stdout.buffer.write(chunk)
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
            str(c.file_count if c.file_count is not None else "-"),
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
    """Discard open commits left by writers that died (a killed `put`). Commits being written
    right now are left alone."""
    removed = repos(ctx).clean(repo)
    console.print(f"discarded {removed} open commit(s) in {repo}")
