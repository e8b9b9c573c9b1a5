"""The transformation registry: how much sooner an experiment on an already featurized snapshot
starts training than one that has to extract its features first.

One throwaway stack, a generated BBC-like corpus of 2,225 articles (the real corpus' size) in a
data repo, its true labels frozen in two label snapshots with the same rows. Measured:

- in this process, with the trainer's modules already imported: `features_for` on snapshot
  `first` from scratch (read the train split's files from the data repo, stem, count, store),
  then the trainer's first epoch (the shipped train spec's hyperparameters, 1 thread); then the
  same again, the features now loaded. Figures: `features_for` alone, and from its call to the
  first epoch's start;
- two one-trial experiments (`single`, 1 epoch, the shipped train spec's hyperparameters) on
  snapshot `second`, one after the other: the first extracts the features in its worker, the
  second finds them. For each, the time to its first epoch's start, counted from the trial's
  start (when its worker claimed it: after the worker's start-up, before its features) and from
  submit (the worker process' start-up included, the same for both). The first epoch's start is
  when its metrics were logged to MLflow less the epoch's own `epoch_seconds`.

Target: with features reused, the first epoch starts >= 10x sooner than with features extracted
from scratch, counted from the `features_for` call. The experiments' figures are reported beside
it: there, a fresh worker process' start-up (importing torch, Lightning, MLflow: seconds, whether
features exist or not) comes before the first epoch too, and on this corpus dwarfs the features.

Run: .venv/bin/python bench/feature_reuse.py [--docs 2225]
Last line: one JSON object of figures and targets.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml
from common import REPO, bbc_snapshots, throwaway_stack

from pipelines.model import features as registry
from pipelines.model import tracking
from pipelines.model.search import LocalExperiments
from pipelines.model.trainer import Resources
from pipelines.model.trainers.bbc_news_model import Stems
from pipelines.plugins import trainer_class

TARGET_RATIO = 10.0
SHIPPED = REPO / "use_cases" / "bbc_news" / "model" / "train.yaml"


def spec(folder: Path, name: str, snapshot: str) -> Path:
    data = yaml.safe_load(SHIPPED.read_text())
    data["name"] = name
    data["data"]["snapshot"] = snapshot
    data["hyperparameters"]["epochs"] = 1
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def in_process(stack, snapshot: str, folder: Path) -> dict:
    """`features_for`, then the trainer's first epoch: seconds to each, from the call."""
    hparams = yaml.safe_load(SHIPPED.read_text())["hyperparameters"]
    hparams.pop("epochs")
    started = time.perf_counter()
    features = registry.features_for(stack, "bbc_news", snapshot)
    ready = time.perf_counter()
    trainer = trainer_class("bbc_news")(hparams, features, Resources(threads=1), seed=0)
    ends: list[float] = []

    def report(epoch, metrics) -> bool:
        ends.append(time.perf_counter() - metrics["epoch_seconds"])
        return False

    trainer.fit(1, folder, report)
    return {
        "features_s": ready - started,
        "first_epoch_s": ends[0] - started,
        "shape": features.x_train.shape,
        "val": len(features.y_val),
    }


def first_epoch(stack, path: Path) -> dict:
    """Seconds from submit and from the trial's start to the first epoch's start."""
    engine = LocalExperiments(stack)
    submitted = time.time()
    submission = engine.submit(path, attached=True)
    ended = engine.wait(submission.experiment.id, poll_s=0.2)
    experiment, [trial] = engine.show(ended.id)
    if experiment.state != "completed":
        raise SystemExit(f"{path.name}: experiment {experiment.state}: {trial.error}")
    tracker = tracking.client(stack)
    [seconds] = tracker.get_metric_history(trial.mlflow_run, "epoch_seconds")
    epoch_start = seconds.timestamp / 1000 - seconds.value
    return {
        "from_submit_s": round(epoch_start - submitted, 2),
        "from_trial_start_s": round(epoch_start - trial.started_at.timestamp(), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=2225)
    args = parser.parse_args()

    with (
        tempfile.TemporaryDirectory(prefix="cdl-bench-features-") as scratch,
        throwaway_stack() as stack,
    ):
        work = Path(scratch)
        bbc_snapshots(stack, work / "corpus", args.docs, ["first", "second"])

        trainer_class("bbc_news")  # torch, Lightning
        Stems()("warm up")  # nltk
        scratch_in = in_process(stack, "first", work / "scratch")
        reused_in = in_process(stack, "first", work / "reused")
        shape = scratch_in["shape"]
        compute_s, load_s = scratch_in["features_s"], reused_in["features_s"]
        print(
            f"registry: features of {shape[0]} train + {scratch_in['val']} validation articles "
            f"({shape[1]} stems) computed in {compute_s:.2f} s, loaded in {load_s:.3f} s "
            f"({compute_s / load_s:.0f}x)"
        )
        for name, run in (("from scratch", scratch_in), ("reused", reused_in)):
            print(f"in process, features {name}: first epoch {run['first_epoch_s']:.3f} s after")

        scratch_run = first_epoch(stack, spec(work, "from-scratch", "second"))
        reused_run = first_epoch(stack, spec(work, "reused", "second"))
        rows = registry.records(stack, "bbc_news", "second")
        if len(rows) != 1:
            raise SystemExit(f"snapshot second has {len(rows)} feature records, expected 1")
        for name, run in (("from scratch", scratch_run), ("reused", reused_run)):
            print(
                f"experiment, features {name}: first epoch {run['from_trial_start_s']:.2f} s "
                f"after the trial's start, {run['from_submit_s']:.2f} s after submit"
            )

    ratio = scratch_in["first_epoch_s"] / reused_in["first_epoch_s"]
    trial_ratio = scratch_run["from_trial_start_s"] / reused_run["from_trial_start_s"]
    submit_ratio = scratch_run["from_submit_s"] / reused_run["from_submit_s"]
    print(
        f"reused features: first epoch {ratio:.1f}x sooner in process; in an experiment "
        f"{trial_ratio:.1f}x sooner from the trial's start, {submit_ratio:.1f}x from submit"
    )
    print(
        json.dumps(
            {
                "benchmark": "feature_reuse",
                "docs": args.docs,
                "train_rows": int(shape[0]),
                "stems": int(shape[1]),
                "registry_compute_s": round(compute_s, 3),
                "registry_load_s": round(load_s, 4),
                "registry_ratio": round(compute_s / load_s, 1),
                "scratch_first_epoch_s": round(scratch_in["first_epoch_s"], 3),
                "reused_first_epoch_s": round(reused_in["first_epoch_s"], 3),
                "first_epoch_ratio": round(ratio, 1),
                "scratch_first_epoch_from_trial_start_s": scratch_run["from_trial_start_s"],
                "reused_first_epoch_from_trial_start_s": reused_run["from_trial_start_s"],
                "scratch_first_epoch_from_submit_s": scratch_run["from_submit_s"],
                "reused_first_epoch_from_submit_s": reused_run["from_submit_s"],
                "trial_start_ratio": round(trial_ratio, 1),
                "submit_ratio": round(submit_ratio, 2),
                "target_ratio": TARGET_RATIO,
                "target_met": ratio >= TARGET_RATIO,
            }
        )
    )


if __name__ == "__main__":
    main()
