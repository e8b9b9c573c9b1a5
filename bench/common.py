"""Shared pieces of the benchmarks: a throwaway stack, the `cdl` command, peak memory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.core.config import load_settings  # noqa: E402
from pipelines.core.stack import Stack  # noqa: E402

if TYPE_CHECKING:
    from pipelines.data.labeling.service import Labeling


@contextmanager
def throwaway_stack() -> Iterator[Stack]:
    """A running stack in a fresh folder under /tmp, removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="cdl-bench-"))
    (base / "cdl.yaml").write_text("stacks:\n  local:\n    home: .cdl\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDL_")}
    stack = Stack(load_settings(base / "cdl.yaml", environ=env))
    try:
        stack.up()
        yield stack
    finally:
        stack.purge()
        shutil.rmtree(base, ignore_errors=True)


def up_with_label_studio(stack: Stack) -> None:
    """`cdl stack up --with label-studio`, without the webhook receiver: exports run only when
    the benchmark runs them."""
    from pipelines.data.labeling.webhooks import WEBHOOK_SERVICE

    stack.up(["label-studio"])
    stack.supervisor.stop(WEBHOOK_SERVICE)


@contextmanager
def labeling_stack(docs: int) -> Iterator[tuple[Stack, "Labeling"]]:
    """A throwaway stack with Label Studio and `docs` generated BBC-like articles committed as
    the validated data (bbc-validate:/valid), and the BBC news labeling on it. No webhook
    receiver (see `up_with_label_studio`)."""
    from pipelines.data import bbc
    from pipelines.data.labeling.service import Labeling
    from pipelines.data.labeling.spec import use_case
    from pipelines.data.repos import DataRepos, Ref

    work = Path(tempfile.mkdtemp(prefix="cdl-bench-label-"))
    try:
        bbc.generate(work / "valid", docs, seed=4, dirty=False)
        with throwaway_stack() as stack:
            up_with_label_studio(stack)
            repos = DataRepos(stack)
            repos.create_repo("bbc-validate")
            repos.put(Ref.parse("bbc-validate"), [work / "valid"], dest="/valid")
            yield stack, Labeling(stack, use_case("bbc_news"))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cdl(stack: Stack, *args: str) -> tuple[float, int]:
    """Run `cdl ARGS` in the stack's folder; return (seconds, peak RSS in bytes)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli.main", *args],
        cwd=stack.settings.root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    peak = watch_peak_rss(proc)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"cdl {' '.join(args)} failed: {err.decode()[-2000:]}")
    return time.perf_counter() - start, peak


def watch_peak_rss(proc: subprocess.Popen) -> int:
    peak = 0
    handle = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak = max(peak, handle.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.01)
    return peak


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_shell(command: str) -> float:
    return timed(lambda: subprocess.run(command, shell=True, check=True, stdout=subprocess.DEVNULL))


def bbc_snapshots(
    stack: Stack, corpus: Path, docs: int, names: list[str], seed: int = 1, own_share: float = 0.37
) -> None:
    """`docs` generated BBC-like articles (clean, `own_share` of their words from their class's
    vocabulary: see pipelines.data.bbc.generate), labeled with their true classes in label
    snapshots `names` (see `label_folder`)."""
    from pipelines.data import bbc

    bbc.generate(corpus, docs, seed=seed, dirty=False, own_share=own_share)
    label_folder(stack, "bbc_news", "bbc-validate", corpus, names)


def label_folder(stack: Stack, case: str, repo: str, corpus: Path, names: list[str]) -> int:
    """The files of `corpus` (`<class>/<file>`) committed to `repo`:/valid, their folders' classes
    loaded into the use case's label store as if exported from Label Studio, and frozen in label
    snapshots `names` (what an experiment trains on), without Label Studio. Returns the count."""
    from datetime import datetime, timezone

    from pipelines.data.labeling.spec import use_case
    from pipelines.data.labeling.store import LabelStore
    from pipelines.data.repos import DataRepos, Ref

    repos = DataRepos(stack)
    repos.create_repo(repo)
    commit, _ = repos.put(Ref.parse(repo), [corpus], dest="/valid")
    now = datetime.now(timezone.utc)
    rows = [
        {
            "path": entry.path,
            "source": f"{commit.ref}:{entry.path}",
            "label": entry.path.split("/")[2],
            "labeler": "truth@cdl.local",
            "labeled_at": now,
            "task_id": number,
            "annotation_id": number,
            "export_commit": "bench",
        }
        for number, entry in enumerate(repos.files(commit, "/valid"), start=1)
    ]
    store = LabelStore(stack, use_case(case))
    store.load(rows, [r["annotation_id"] for r in rows], "bench", None)
    for name in names:
        store.snapshot(name)
    return len(rows)
