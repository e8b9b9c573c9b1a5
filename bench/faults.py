"""Fault injection: the BBC data pipeline and the labeling export, each run killed once.

On one stack with Label Studio, a generated corpus goes through the work a user or CI does:
`cdl data put` into the raw repo, `cdl data job wait` while the worker runs the BBC pipelines
(clean, validate, report), then the labeling steps of a copy of the bbc_news use case (sync the
validated articles to Label Studio, annotate every task as a labeler would, export into the label
store). Each step is a process of its own. The reference run has no fault. Each fault run does the
same work on repos, pipelines and a Label Studio project of its own (names prefixed `rNN-`) and
kills, in turn, the worker, Postgres (the postmaster) or Label Studio with SIGKILL at a random
moment (seeded) of the reference's duration where that component has work: the worker's while
the put and the jobs run, Label Studio's while the labeling steps run, Postgres' throughout. The
stack is then brought up again (`cdl stack up --with label-studio`) and a step that failed is run
again, as CI would re-run it.

A run is compared with the reference: every repo's files and their sha256 at the head (the raw
export JSON of the labels repo without its ids and times), one successful job and one output
commit per pipeline and input commit, the label store's current rows, tasks and row versions, and
Label Studio's tasks and annotations. Leftovers after a run: processes that outlived a killed one
(its descendants, transforms of a dead runner), scratch folders of dead runners, `.tmp-` objects,
open commits, jobs still running. Recovery time: from the kill until the work is done.

Run: .venv/bin/python bench/faults.py [--runs N] [--seed S] [--docs N]
Targets: 0 mismatches, 0 leftovers. Last line: one JSON object of figures and targets.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml
from common import REPO, throwaway_stack, up_with_label_studio

from pipelines.core.config import load_settings
from pipelines.core.stack import Stack
from pipelines.data import bbc
from pipelines.data.engine import PipelineEngine
from pipelines.data.labeling.server import SERVICE as LABEL_STUDIO
from pipelines.data.labeling.service import Labeling
from pipelines.data.labeling.spec import use_case
from pipelines.data.processes import RUNNER_ENV, SCRATCH_PREFIX, Runner
from pipelines.data.repos import DataRepos

KINDS = ("worker", "postgres", "label-studio")
WORKER = "pipelines"  # the worker's service name
PIPELINES = ("bbc-clean", "bbc-validate", "bbc-validation-report")
REPOS = ("bbc-raw", *PIPELINES)
STEPS = ("put", "wait", "sync", "annotate", "export")
ATTEMPTS = 5  # runs of a step before the run is given up
USE_CASE = REPO / "use_cases" / "bbc_news"


# -- one run's work ---------------------------------------------------------------------------


@dataclass
class Work:
    """The repos, pipelines and use case of one run, all named with its prefix."""

    prefix: str
    folder: Path

    def name(self, short: str) -> str:
        return f"{self.prefix}-{short}"

    @property
    def case_folder(self) -> Path:
        return self.folder / "cases" / f"{self.prefix}_bbc"

    def prepare(self, stack: Stack) -> None:
        """The raw repo, the three BBC pipelines reading it and the use case, renamed."""
        self.folder.mkdir(parents=True)
        DataRepos(stack).create_repo(self.name("bbc-raw"))
        engine = PipelineEngine(stack)
        for step in ("clean", "validate", "report"):
            spec = yaml.safe_load((USE_CASE / "data" / f"{step}.yaml").read_text())
            spec["pipeline"]["name"] = self.name(spec["pipeline"]["name"])
            spec["input"]["pfs"]["repo"] = self.name(spec["input"]["pfs"]["repo"])
            if (USE_CASE / "data" / f"{step}.py").exists():
                shutil.copyfile(USE_CASE / "data" / f"{step}.py", self.folder / f"{step}.py")
            path = self.folder / f"{step}.yaml"
            path.write_text(yaml.safe_dump(spec))
            engine.create(path)
        self.case_folder.mkdir(parents=True)
        spec = yaml.safe_load((USE_CASE / "labeling.yaml").read_text())
        spec["project"] = f"CDL fault injection {self.prefix}"
        spec["source"]["repo"] = self.name(spec["source"]["repo"])
        (self.case_folder / "labeling.yaml").write_text(yaml.safe_dump(spec))
        shutil.copyfile(USE_CASE / spec["label_config"], self.case_folder / spec["label_config"])

    def command(self, step: str, corpus: Path) -> list[str]:
        cdl = [sys.executable, "-m", "pipelines.cli.main"]
        if step == "put":
            return [*cdl, "data", "put", self.name("bbc-raw"), str(corpus)]
        if step == "wait":
            return [*cdl, "data", "job", "wait", f"{self.name('bbc-raw')}@master"]
        # The use case is not under use_cases/: its labeling steps run through this file.
        return [sys.executable, __file__, "--step", step, "--case", str(self.case_folder)]

    def labeling(self, stack: Stack) -> Labeling:
        return Labeling(stack, use_case(self.case_folder.name, self.case_folder.parent))


def run_step(step: str, case: Path) -> None:
    """One labeling step of a use case outside use_cases/, as `cdl label` would run it."""
    stack = Stack(load_settings(Path.cwd() / "cdl.yaml", environ=stack_environ()))
    labeling = Labeling(stack, use_case(case.name, case.parent))
    if step == "sync":
        labeling.sync()
    elif step == "annotate":
        labeling.auto_annotate()
    else:
        labeling.export()


def stack_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CDL_")}


# -- faults -----------------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    at_s: float  # after the work started
    killed_at: float | None = None  # monotonic
    recovered_at: float | None = None  # monotonic: when the stack was up again
    step: str | None = None  # the step running when it was killed
    note: str = ""
    survivors: list[psutil.Process] = field(default_factory=list)  # the killed one's descendants
    recovered: threading.Event = field(default_factory=threading.Event)


def target_pid(stack: Stack, kind: str) -> int | None:
    if kind == "postgres":
        return stack.postgres.running_pid()
    return stack.supervisor.pid(WORKER if kind == "worker" else LABEL_STUDIO)


def inject(stack: Stack, fault: Fault, start: float, done: threading.Event, now_step) -> None:
    """At `fault.at_s`, SIGKILL the target; then bring the stack up again."""
    try:
        done.wait(max(0.0, start + fault.at_s - time.monotonic()))
        if done.is_set():
            fault.note = "the work ended before the fault's moment: killed afterwards"
        pid = target_pid(stack, fault.kind)
        if pid is None:
            fault.note = f"{fault.kind} was not running"
            return
        try:
            victim = psutil.Process(pid)
            fault.survivors = victim.children(recursive=True)
            victim.send_signal(signal.SIGKILL)
        except psutil.Error as exc:
            fault.note = f"could not kill {fault.kind}: {exc}"
            return
        fault.killed_at = time.monotonic()
        fault.step = "after the work" if done.is_set() else now_step()
        try:
            victim.wait(10)
        except psutil.Error:
            pass
        up_with_label_studio(stack)
        fault.recovered_at = time.monotonic()
    finally:
        fault.recovered.set()


@dataclass
class Outcome:
    seconds: float
    ended: float  # monotonic
    failures: list[str]  # steps that failed, in order
    steps_s: dict[str, float]  # each step's time, re-runs and waits included
    unexpected: list[str]  # failures of a step that the fault does not explain

    def recovery_s(self, fault: Fault) -> float | None:
        """From the kill until the work was done and the stack up again."""
        if fault.killed_at is None:
            return None
        return max(self.ended, fault.recovered_at or 0.0) - fault.killed_at


def do_work(stack: Stack, work: Work, corpus: Path, fault: Fault | None, pids: set[int]) -> Outcome:
    """Run the steps in order; a step that fails is run again once the stack is back up."""
    start = time.monotonic()
    current = {"step": None}
    done = threading.Event()
    injector = None
    if fault is not None:
        injector = threading.Thread(
            target=inject, args=(stack, fault, start, done, lambda: current["step"]), daemon=True
        )
        injector.start()
    failures, unexpected, steps_s = [], [], {}
    try:
        for step in STEPS:
            current["step"] = step
            step_start = time.monotonic()
            for attempt in range(1, ATTEMPTS + 1):
                began = time.monotonic()
                proc = subprocess.Popen(
                    work.command(step, corpus),
                    cwd=stack.settings.root,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                pids.add(proc.pid)
                _, err = proc.communicate()
                if proc.returncode == 0:
                    break
                why = (err.strip().splitlines() or ["no output"])[-1][:200]
                failures.append(f"{step} (attempt {attempt}): {why}")
                # Explained by the fault: it failed after the kill and started before the
                # stack was up again.
                if fault is None or fault.killed_at is None or began > (fault.recovered_at or 1e18):
                    unexpected.append(f"{step}: {why}")
                if fault is not None:
                    fault.recovered.wait()
                if attempt == ATTEMPTS:
                    raise SystemExit(f"{work.prefix}: {step} failed {ATTEMPTS} times: {why}")
                time.sleep(0.5)
            steps_s[step] = round(time.monotonic() - step_start, 1)
        ended = time.monotonic()
    finally:
        done.set()
        if injector is not None:
            injector.join()
    return Outcome(ended - start, ended, failures, steps_s, unexpected)


# -- the end state ------------------------------------------------------------------------------


def final_state(stack: Stack, work: Work) -> dict:
    """What a run produced, without what legitimately differs between runs (names, ids,
    times): comparable with the reference's."""
    repos = DataRepos(stack)
    state: dict = {}
    for short in REPOS:
        head = repos.resolve(work.name(short))
        state[f"files of {short}"] = {e.path: e.sha256 for e in repos.files(head)}
    labeling = work.labeling(stack)
    labels_repo = repos.resolve(labeling.case.labels_repo)
    exported = []
    for entry in repos.files(labels_repo):
        task = json.loads(labeling._read(labels_repo, entry))
        choices = sorted(
            tuple(r["value"]["choices"])
            for a in task.get("annotations", [])
            if not a.get("was_cancelled")
            for r in a["result"]
        )
        exported.append([task["meta"]["sha256"], choices])
    state["exported tasks"] = sorted(exported)
    with stack.connect() as conn:
        for short in PIPELINES:
            name = work.name(short)
            jobs = conn.execute(
                "SELECT state, input_commits::text FROM pipeline_jobs WHERE pipeline = %s", [name]
            ).fetchall()
            outputs = conn.execute(
                """SELECT count(*) FROM data_commits WHERE repo = %s AND origin = 'pipeline'
                   AND state = 'finished'""",
                [name],
            ).fetchone()[0]
            inputs = Counter(commits for _, commits in jobs)
            state[f"jobs of {short}"] = {
                "states": dict(Counter(s for s, _ in jobs)),
                "jobs per input commit": sorted(set(inputs.values())),
                "output commits per job": round(outputs / max(1, len(jobs)), 3),
            }
        case = labeling.case.name
        state["current labels"] = [
            list(r)
            for r in conn.execute(
                """SELECT split_part(source, ':', 2), label, labeler, split, version
                   FROM labels_current WHERE use_case = %s ORDER BY 1, 2""",
                [case],
            )
        ]
        state["label row versions"] = conn.execute(
            """SELECT count(*), count(*) FILTER (WHERE deleted) FROM label_rows
               WHERE use_case = %s""",
            [case],
        ).fetchone()
        state["label tasks"] = sorted(
            [
                list(r)
                for r in conn.execute(
                    """SELECT path, sha256, count(*) FROM label_tasks WHERE use_case = %s
                       GROUP BY 1, 2""",
                    [case],
                )
            ]
        )
    tasks = labeling.client.tasks(labeling.project())
    state["Label Studio tasks by annotations"] = dict(
        sorted(Counter(t["annotations"] for t in tasks).items())
    )
    return json.loads(json.dumps(state, default=list))


def differences(reference: dict, found: dict) -> list[str]:
    """One line per part of the state that differs from the reference."""
    lines = []
    for key, expected in reference.items():
        got = found.get(key)
        if got == expected:
            continue
        if isinstance(expected, dict) and key.startswith("files of"):
            missing = len(expected.keys() - got.keys())
            extra = len(got.keys() - expected.keys())
            changed = sum(1 for p in expected.keys() & got.keys() if expected[p] != got[p])
            lines.append(f"{key}: {missing} missing, {extra} extra, {changed} changed")
        elif isinstance(expected, list) and len(str(expected)) > 200:
            lines.append(f"{key}: {len(got)} entries, {len(expected)} expected, contents differ")
        else:
            lines.append(f"{key}: {got}, expected {expected}")
    return lines


def leftovers(stack: Stack, work: Work, fault: Fault | None, pids: set[int]) -> list[str]:
    """What the run left behind: one line each."""
    found = []
    for proc in fault.survivors if fault else []:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(f"orphan process {proc.pid} ({' '.join(proc.cmdline())[:80]})")
        except psutil.Error:
            pass
    for proc in psutil.process_iter():
        try:
            runner = Runner.parse(proc.environ().get(RUNNER_ENV))
        except psutil.Error:
            continue
        if runner is not None and runner.pid in pids and runner.alive() is False:
            if proc.pid not in {p.pid for p in (fault.survivors if fault else [])}:
                found.append(f"orphan transform {proc.pid} of runner {runner.pid}")
    for folder in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"):
        pid = folder.name.removeprefix(SCRATCH_PREFIX).split("-")[0]
        if pid.isdigit() and int(pid) in pids and not psutil.pid_exists(int(pid)):
            found.append(f"scratch folder {folder}")
    objects = stack.settings.stack.object_store.path
    found += [f"temp object {p}" for p in Path(objects).glob("**/.tmp-*")]
    with stack.connect() as conn:
        prefix = f"{work.prefix}-%"
        for repo, commit in conn.execute(
            "SELECT repo, id FROM data_commits WHERE state = 'open' AND repo LIKE %s", [prefix]
        ):
            found.append(f"open commit {repo}@{commit}")
        for pipeline, job in conn.execute(
            "SELECT pipeline, id FROM pipeline_jobs WHERE state = 'running' AND pipeline LIKE %s",
            [prefix],
        ):
            found.append(f"running job {job[:12]} of {pipeline}")
    return found


def known_runners(stack: Stack, pids: set[int]) -> None:
    """The worker is a runner: remember its pid, whose transforms and scratch are checked."""
    pid = stack.supervisor.pid(WORKER)
    if pid:
        pids.add(pid)


# -- the benchmark ----------------------------------------------------------------------------


def fault_windows(steps_s: dict[str, float]) -> dict[str, tuple[float, float]]:
    """When each component has work, in seconds from the start of the reference's work."""
    data = steps_s["put"] + steps_s["wait"]
    total = sum(steps_s.values())
    return {"worker": (0.0, data), "postgres": (0.0, total), "label-studio": (data, total)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="fault runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--docs", type=int, default=200, help="articles of the corpus")
    parser.add_argument("--step", choices=STEPS[2:], help=argparse.SUPPRESS)
    parser.add_argument("--case", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        run_step(args.step, args.case)
        return
    rng = random.Random(args.seed)
    began = time.monotonic()
    work_dir = Path(tempfile.mkdtemp(prefix="cdl-bench-faults-"))
    results = []
    try:
        corpus = work_dir / "corpus"
        bbc.generate(corpus, args.docs, seed=args.seed, dirty=True)
        with throwaway_stack() as stack:
            up_with_label_studio(stack)
            pids: set[int] = set()
            known_runners(stack, pids)
            work = Work("ref", work_dir / "ref")
            work.prepare(stack)
            outcome = do_work(stack, work, corpus, None, pids)
            reference = final_state(stack, work)
            ref_left = leftovers(stack, work, None, pids)
            ref_s = outcome.seconds
            print(
                f"reference run: {ref_s:.1f} s ({outcome.steps_s}), leftovers: {len(ref_left)}",
                flush=True,
            )
            windows = fault_windows(outcome.steps_s)
            for i in range(args.runs):
                kind = KINDS[i % len(KINDS)]
                fault = Fault(kind, rng.uniform(*windows[kind]))
                work = Work(f"r{i:02d}", work_dir / f"r{i:02d}")
                work.prepare(stack)
                known_runners(stack, pids)
                outcome = do_work(stack, work, corpus, fault, pids)
                known_runners(stack, pids)
                mismatches = [f"unexpected failure of {u}" for u in outcome.unexpected]
                mismatches += differences(reference, final_state(stack, work))
                left = leftovers(stack, work, fault, pids)
                recovery = outcome.recovery_s(fault)
                results.append((fault, outcome, mismatches, left, recovery))
                print(
                    f"run {i + 1}: killed {fault.kind} at {fault.at_s:.1f} s"
                    f" during {fault.step or '-'}{' (' + fault.note + ')' if fault.note else ''};"
                    f" steps re-run: {len(outcome.failures)}; work {outcome.seconds:.1f} s;"
                    f" mismatches {len(mismatches)}, leftovers {len(left)}",
                    flush=True,
                )
                for line in mismatches + left + [f"  failed: {f}" for f in outcome.failures]:
                    print(f"    {line}", flush=True)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    report(args, ref_s, ref_left, results, time.monotonic() - began)


def report(args, ref_s: float, ref_left: list[str], results: list, wall_s: float) -> None:
    """Print the figures; the last line is one JSON object."""
    injected = Counter(f.kind for f, *_ in results if f.killed_at is not None)
    missed = Counter(f.kind for f, *_ in results if f.killed_at is None)
    during = Counter(f"{f.kind} during {f.step}" for f, *_ in results if f.killed_at is not None)
    mismatches = [f"run {i + 1}: {m}" for i, (_, _, ms, _, _) in enumerate(results) for m in ms]
    left = [*ref_left, *(line for _, _, _, lines, _ in results for line in lines)]
    left_kinds = Counter(" ".join(line.split()[:2]) for line in left)
    recoveries = [r for *_, r in results if r is not None]
    reruns = sum(len(o.failures) for _, o, *_ in results)
    figures = {
        "runs": len(results),
        "docs": args.docs,
        "seed": args.seed,
        "faults_injected": dict(sorted(injected.items())),
        "faults_not_injected": dict(sorted(missed.items())),
        "faults_by_step": dict(sorted(during.items())),
        "steps_rerun": reruns,
        "mismatches": len(mismatches),
        "mismatch_list": mismatches[:20],
        "leftovers": len(left),
        "leftovers_by_kind": dict(sorted(left_kinds.items())),
        "reference_work_s": round(ref_s, 1),
        "recovery_median_s": round(statistics.median(recoveries), 1) if recoveries else None,
        "recovery_max_s": round(max(recoveries), 1) if recoveries else None,
        "wall_s": round(wall_s),
        "target_mismatches": 0,
        "target_leftovers": 0,
        "met": not mismatches and not left and len(recoveries) == len(results),
    }
    print(
        f"{len(results)} fault runs ({args.docs} articles each; reference work {ref_s:.1f} s): "
        f"killed {', '.join(f'{k} x{n}' for k, n in sorted(injected.items())) or 'nothing'}"
        + (f" (not running when due: {dict(missed)})" if missed else "")
        + f"; {reruns} step(s) re-run"
    )
    print(f"mismatches: {len(mismatches)} (target 0)")
    for line in mismatches:
        print(f"  {line}")
    print(
        f"leftovers: {len(left)} (target 0)"
        + (f": {', '.join(f'{k} x{n}' for k, n in sorted(left_kinds.items()))}" if left else "")
    )
    if recoveries:
        print(
            f"recovery (kill to work done): median {figures['recovery_median_s']} s, "
            f"max {figures['recovery_max_s']} s; wall time {wall_s / 60:.1f} min"
        )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
