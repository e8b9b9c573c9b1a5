"""Data-parallel training on one machine: the calling process is rank 0, the other ranks are
worker processes of this module, started for one `fit` and gone after it.

Lightning's own DDP launcher re-runs the script that started it (`sys.argv`), which inside a
test runner, a notebook or a search worker is the wrong program, and `ddp_spawn` would carry the
searcher's `report` callback into a child process. Here rank 0 stays in the caller, so `report`
runs where it was made and the trained weights are in the caller's model when `fit` returns;
workers get the trainer's hyperparameters, features and seed through a pickle and train the same
model on their shard of each batch. Lightning is told about the ranks through `FixedEnvironment`
(a cluster environment that "creates processes externally"), so it launches nothing itself.

Under a launcher of its own (Determined's, torchrun) the environment already names the ranks
(`WORLD_SIZE`, `RANK`): then no workers are started and Lightning reads the environment.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lightning.fabric.plugins.environments import ClusterEnvironment

from pipelines.core.errors import Unavailable

if TYPE_CHECKING:
    from pipelines.model.trainer import EpochReport

PACKAGE_ROOT = Path(__file__).resolve().parents[3]  # the folder holding `pipelines`
WORKER_EXIT_S = 120


def launched_externally() -> bool:
    """Whether a launcher (Determined, torchrun) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


class FixedEnvironment(ClusterEnvironment):
    """Ranks on one machine, fixed when the processes are started."""

    def __init__(self, rank: int, world: int, port: int):
        super().__init__()
        self.rank, self.world, self.port = rank, world, port

    @property
    def creates_processes_externally(self) -> bool:
        return True

    @property
    def main_address(self) -> str:
        return "127.0.0.1"

    @property
    def main_port(self) -> int:
        return self.port

    @staticmethod
    def detect() -> bool:
        return False

    def world_size(self) -> int:
        return self.world

    def set_world_size(self, size: int) -> None:
        pass

    def global_rank(self) -> int:
        return self.rank

    def set_global_rank(self, rank: int) -> None:
        pass

    def local_rank(self) -> int:
        return self.rank

    def node_rank(self) -> int:
        return 0


@dataclass
class Job:
    """What a worker needs to build the same trainer and train its share."""

    trainer: str  # module:Class
    hparams: dict
    features: object  # Features
    resources: object  # Resources
    seed: int
    max_epochs: int
    checkpoints: Path
    port: int


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fit_parallel(trainer, max_epochs: int, checkpoints: Path, report: EpochReport) -> int:
    """`trainer._fit` on `trainer.resources.slots` processes: this one (rank 0, which reports)
    and workers started now; returns the epochs done. A worker that fails fails the fit."""
    world = trainer.resources.slots
    port = free_port()
    job = Job(
        f"{type(trainer).__module__}:{type(trainer).__qualname__}",
        dict(trainer.hparams),
        trainer.features,
        trainer.resources,
        trainer.seed,
        max_epochs,
        checkpoints,
        port,
    )
    with tempfile.TemporaryDirectory(prefix="cdl-ddp-") as scratch:
        job_file = Path(scratch) / "job.pickle"
        job_file.write_bytes(pickle.dumps(job))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p
        )
        logs = [Path(scratch) / f"rank-{rank}.log" for rank in range(1, world)]
        workers = []
        try:
            for rank, log in zip(range(1, world), logs, strict=True):
                with open(log, "wb") as out:
                    workers.append(
                        subprocess.Popen(
                            [sys.executable, "-m", __name__, str(job_file), str(rank)],
                            env=env,
                            stdout=out,
                            stderr=subprocess.STDOUT,
                            cwd=scratch,
                        )
                    )
            try:
                done = trainer._fit(
                    max_epochs, checkpoints, report, FixedEnvironment(0, world, port)
                )
            except BaseException as exc:
                failed = _failed_workers(workers, logs, wait=5)
                if failed:
                    raise Unavailable(
                        f"data-parallel training failed: {failed}", "see the worker's log above"
                    ) from exc
                raise
            failed = _failed_workers(workers, logs, wait=WORKER_EXIT_S)
            if failed:
                raise Unavailable(f"data-parallel training failed: {failed}")
            return done
        finally:
            for worker in workers:
                if worker.poll() is None:
                    worker.kill()
                    worker.wait()
            _leave_process_group()


def _failed_workers(workers: list[subprocess.Popen], logs: list[Path], wait: float) -> str:
    """'' when every worker exited 0 within `wait` seconds, else which did not and its log's
    last lines."""
    for rank, (worker, log) in enumerate(zip(workers, logs, strict=True), start=1):
        try:
            code = worker.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            code = None
        if code != 0:
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-5:])
            state = "did not finish" if code is None else f"exited {code}"
            return f"worker rank {rank} {state}: {tail}"
    return ""


def _leave_process_group() -> None:
    """The next data-parallel fit in this process starts a new group (Lightning leaves it)."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _worker(job_file: Path, rank: int) -> None:
    from pipelines.plugins import load

    job: Job = pickle.loads(job_file.read_bytes())
    trainer = load(job.trainer)(job.hparams, job.features, job.resources, job.seed)
    world = job.resources.slots
    trainer._fit(job.max_epochs, job.checkpoints, None, FixedEnvironment(rank, world, job.port))
    _leave_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), int(sys.argv[2]))
