"""ASHA against random search on BBC-like data: epochs trained and the best model found.

One throwaway stack, a generated BBC-like corpus made hard enough that models differ (12% of an
article's words from its class's vocabulary instead of the generator's default 37%: with the
default every trial reaches validation accuracy 1.0 and no searcher can be told apart), its true
labels frozen in one label snapshot. Two experiments on it, one after the other, from the shipped
search spec (use_cases/bbc_news/model/search.yaml: its search space, max_trials 16, max_time 12,
divisor 3, max_rungs 3, mode standard, two trials at a time): `adaptive_asha` as shipped, and
`random` with the same max_trials and seed, whose trials all run the full 12 epochs (the
baseline). With the same seed both draw the same 16 hyperparameter sets (trial n's sampler is
seeded with seed + n), so the comparison is of early stopping alone.

Figures, for each of several seeds (which trials a search draws, and so how it fares, is luck):
total epochs trained (the sum of the trials' epochs, from the experiment store), the best
validation accuracy (the experiment's best completed trial), wall time. Targets, over the seeds:
ASHA <= 40% of random's epochs (summed), its best accuracy within 1 point of random's (the mean
gap).

Run: .venv/bin/python bench/asha_vs_random.py [--docs 2225] [--own-share 0.12] [--mode standard]
     [--seeds 7 8 9]
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

from pipelines.model.search import LocalExperiments

TARGET_EPOCHS_RATIO = 0.40
TARGET_ACCURACY_POINTS = 1.0
SHIPPED = REPO / "use_cases" / "bbc_news" / "model" / "search.yaml"


def specs(folder: Path, seed: int, mode: str) -> dict[str, Path]:
    """The shipped ASHA spec (mode as asked) and its random twin, with a fixed seed."""
    asha = yaml.safe_load(SHIPPED.read_text())
    asha["searcher"]["mode"] = mode
    asha["reproducibility"] = {"experiment_seed": seed}
    searcher = asha["searcher"]
    random = {
        **asha,
        "name": "bbc-news-random",
        # Determined's random searcher has no max_time: the length is the epochs hyperparameter.
        "hyperparameters": {**asha["hyperparameters"], "epochs": searcher["max_time"]},
        "searcher": {
            "name": "random",
            "metric": searcher["metric"],
            "smaller_is_better": searcher["smaller_is_better"],
            "max_trials": searcher["max_trials"],
            "max_concurrent_trials": searcher["max_concurrent_trials"],
        },
    }
    paths = {}
    for name, spec in (("asha", asha), ("random", random)):
        paths[name] = folder / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(spec, sort_keys=False))
    return paths


def run(engine: LocalExperiments, spec: Path) -> dict:
    started = time.perf_counter()
    submission = engine.submit(spec, attached=True)
    ended = engine.wait(submission.experiment.id, poll_s=0.5)
    wall = time.perf_counter() - started
    experiment, trials = engine.show(ended.id)
    if experiment.state != "completed" or any(t.state == "failed" for t in trials):
        errors = [t.error for t in trials if t.error]
        raise SystemExit(f"{spec.name}: experiment {experiment.state}: {experiment.error} {errors}")
    states = [t.state for t in trials]
    return {
        "trials": len(trials),
        "completed": states.count("completed"),
        "pruned": states.count("pruned"),
        "epochs": sum(t.epochs for t in trials),
        "epochs_per_trial": [t.epochs for t in trials],
        "best_trial": experiment.best_trial,
        "best_val_accuracy": round(experiment.best_metric, 4),
        "final_val_accuracy": [round(t.metric, 3) for t in trials],
        "wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=2225)
    parser.add_argument("--own-share", type=float, default=0.12)
    parser.add_argument("--mode", default="standard", choices=["standard", "aggressive"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[7, 8, 9])
    args = parser.parse_args()

    rounds = []
    with (
        tempfile.TemporaryDirectory(prefix="cdl-bench-asha-") as scratch,
        throwaway_stack() as stack,
    ):
        work = Path(scratch)
        bbc_snapshots(stack, work / "corpus", args.docs, ["bench"], own_share=args.own_share)
        engine = LocalExperiments(stack)
        for seed in args.seeds:
            (work / str(seed)).mkdir()
            paths = specs(work / str(seed), seed, args.mode)
            figures = {}
            for name in ("asha", "random"):
                figures[name] = run(engine, paths[name])
                f = figures[name]
                print(
                    f"seed {seed}, {name}: {f['trials']} trials ({f['completed']} completed, "
                    f"{f['pruned']} pruned), {f['epochs']} epochs, best val accuracy "
                    f"{f['best_val_accuracy']:.4f} (trial {f['best_trial']}), {f['wall_s']:.0f} s"
                )
                print(f"  epochs per trial: {f['epochs_per_trial']}")
                print(f"  last val accuracy per trial: {f['final_val_accuracy']}")
            asha, random = figures["asha"], figures["random"]
            rounds.append(
                {
                    "seed": seed,
                    "asha_epochs": asha["epochs"],
                    "random_epochs": random["epochs"],
                    "asha_best_val_accuracy": asha["best_val_accuracy"],
                    "random_best_val_accuracy": random["best_val_accuracy"],
                    "points_below_random": round(
                        100 * (random["best_val_accuracy"] - asha["best_val_accuracy"]), 2
                    ),
                    "asha_wall_s": asha["wall_s"],
                    "random_wall_s": random["wall_s"],
                }
            )

    ratio = sum(r["asha_epochs"] for r in rounds) / sum(r["random_epochs"] for r in rounds)
    points = sum(r["points_below_random"] for r in rounds) / len(rounds)
    print(
        f"over {len(rounds)} seeds, ASHA trained {ratio:.0%} of random's epochs; its best is "
        f"{points:+.2f} points below random's on average "
        f"(per seed: {[r['points_below_random'] for r in rounds]})"
    )
    print(
        json.dumps(
            {
                "benchmark": "asha_vs_random",
                "docs": args.docs,
                "own_share": args.own_share,
                "mode": args.mode,
                "max_trials": figures["asha"]["trials"],
                "rounds": rounds,
                "epochs_ratio": round(ratio, 3),
                "accuracy_points_below_random": round(points, 2),
                "target_epochs_ratio": TARGET_EPOCHS_RATIO,
                "target_accuracy_points": TARGET_ACCURACY_POINTS,
                "epochs_target_met": ratio <= TARGET_EPOCHS_RATIO,
                "accuracy_target_met": points <= TARGET_ACCURACY_POINTS,
            }
        )
    )


if __name__ == "__main__":
    main()
