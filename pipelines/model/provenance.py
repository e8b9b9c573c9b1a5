"""Where a training run came from: the code's git commit, the package versions, the data commits.

Every trial run is tagged with these (search.py), so that a registered model answers "which code,
which libraries, which data" without the machine that trained it:

- `cdl.git_sha` (and MLflow's own `mlflow.source.git.commit`, which its UI shows): `git rev-parse
  HEAD` of the checkout holding the trainer's module; `cdl.git_dirty`: `true` when tracked files
  differ from that commit (untracked files are not counted). Outside a git checkout, or without
  git, `cdl.git_sha` is `unknown` and `cdl.git_dirty` `unknown`: a trial never fails for it.
- `cdl.package.NAME`: the installed version of each of PACKAGES and of CDL itself
  (`cdl.package.cdl`); a package that is not installed gets no tag. Tags rather than a JSON
  artifact, so that runs can be searched by them (`tags."cdl.package.torch" = '2.13.0'`).
- `cdl.data_commits`: the `repo@commit` of every labeled file the snapshot trains on (the part
  of its source before `:`), sorted, comma-separated: a snapshot can span repos and commits.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Iterable

UNKNOWN = "unknown"
PACKAGES = ("torch", "lightning", "tensorflow", "keras", "numpy", "mlflow", "optuna")
GIT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class CodeVersion:
    commit: str  # a full sha, or UNKNOWN
    dirty: bool | None  # None: unknown


def code_version(path: Path) -> CodeVersion:
    """The git commit of the checkout holding `path` (a file or folder), and whether its tracked
    files were changed since; UNKNOWN when it is no checkout or git is missing or hangs."""
    folder = path if path.is_dir() else path.parent

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["git", "-C", str(folder), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0 or not head.stdout.strip():
            return CodeVersion(UNKNOWN, None)
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return CodeVersion(UNKNOWN, None)
    dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    return CodeVersion(head.stdout.strip(), dirty)


def package_versions() -> dict[str, str]:
    """{package: version} of the installed PACKAGES, and `cdl`: this platform's own version."""
    from pipelines import __version__

    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    found["cdl"] = __version__
    return found


def data_commits(sources: Iterable[str]) -> list[str]:
    """The `repo@commit` parts of labeled files' sources (`repo@commit:/path`), each once."""
    return sorted({source.split(":", 1)[0] for source in sources})


def tags(code: CodeVersion, packages: dict[str, str], commits: list[str]) -> dict[str, str]:
    """The run tags for a code version, package versions and data commits (see the top)."""
    found = {
        "cdl.git_sha": code.commit,
        "cdl.git_dirty": UNKNOWN if code.dirty is None else str(code.dirty).lower(),
        "cdl.data_commits": ",".join(commits),
    }
    if code.commit != UNKNOWN:
        found["mlflow.source.git.commit"] = code.commit
    found.update({f"cdl.package.{name}": version for name, version in packages.items()})
    return found
