"""Fashion-MNIST accuracy trained by the platform and gated by `cdl model evaluate`: full set.

The path a user takes, on a throwaway stack: all 70,000 images of Debian's
`dataset-fashion-mnist` (the 60,000 training and the 10,000 test images) as PNGs in
fashion-validate:/valid, labeled with their classes (as if exported from Label Studio) and frozen
in a label snapshot, which splits them into train and test (`test_fraction` of
use_cases/fashion_mnist/labeling.yaml); then the shipped training spec
(use_cases/fashion_mnist/model/train.yaml) with `cdl experiment submit --wait`, `cdl model
register`, and `cdl model evaluate fashion-mnist/1 --min-accuracy 0.88`, which scores the saved
model (scaling inside it) on the snapshot's test split as the `cdl_evaluator` role.

The same registered model is also scored on the images of the test split that come from Debian's
own test set (t10k), about a fifth of it.

The baseline, in the same run: the same network trained by plain Keras on the same train split
(with the same share held out for validation, pixels scaled by hand), scored on the same test
split.

Run: .venv/bin/python bench/fashion_accuracy.py [--epochs N (default: the spec's)]
Target (the issue's): test accuracy >= 0.88 through the gate. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np  # noqa: E402
import yaml
from common import REPO, label_folder, throwaway_stack

from pipelines.data import fashion  # noqa: E402
from pipelines.data.labeling.spec import use_case  # noqa: E402
from pipelines.data.labeling.store import LabelStore  # noqa: E402
from pipelines.model.registry import Registry  # noqa: E402
from pipelines.model.trainer import DEFAULT_VAL_FRACTION  # noqa: E402

GATE = 0.88
SPEC = REPO / "use_cases/fashion_mnist/model/train.yaml"
SNAPSHOT = "full"


def cdl(folder: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli.main", *args],
        cwd=folder,
        capture_output=True,
        text=True,
    )
    print(f"cdl {' '.join(args)}: exit {done.returncode} in {time.perf_counter() - started:.1f} s")
    if check and done.returncode != 0:
        raise SystemExit(
            f"cdl {' '.join(args)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    return done


def write_pngs(out: Path) -> dict[str, tuple[np.ndarray, int]]:
    """Every image as out/<class>/<split>-<index>.png; {file name: (pixels, class index)}."""
    images = {}
    for split, prefix in (("train", "train"), ("t10k", "test")):
        pixels, labels = fashion.arrays(fashion.DEFAULT_SOURCE, split)
        for i, (image, label) in enumerate(zip(pixels, labels, strict=True)):
            name = f"{prefix}-{i:05d}.png"
            path = out / fashion.CLASSES[label] / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(fashion.png_bytes(image.tobytes(), 28, 28))
            images[name] = (image, int(label))
    return images


def platform(work: Path, spec: dict):
    """Everything through CDL on a throwaway stack: (gated accuracy, the gate's process, the
    images by file name, the train and test file names, seconds from submit to the end, and the
    accuracy on the test split's images from Debian's t10k with their count)."""
    started = time.perf_counter()
    images = write_pngs(work / "images")
    print(f"{len(images)} PNGs written in {time.perf_counter() - started:.1f} s")
    with throwaway_stack() as stack:
        started = time.perf_counter()
        label_folder(stack, "fashion_mnist", "fashion-validate", work / "images", [SNAPSHOT])
        labeled_s = time.perf_counter() - started
        store = LabelStore(stack, use_case("fashion_mnist"))
        train = [source.rsplit("/", 1)[1] for source, _ in store.train_rows(SNAPSHOT)]
        test = [source.rsplit("/", 1)[1] for source, _ in store.test_rows(SNAPSHOT)]
        print(
            f"committed, labeled and snapshotted in {labeled_s:.1f} s: {len(train)} train, "
            f"{len(test)} test"
        )

        folder = stack.settings.root
        (work / "train.yaml").write_text(yaml.safe_dump(spec))
        started = time.perf_counter()
        cdl(folder, "experiment", "submit", str(work / "train.yaml"), "--wait")
        train_s = time.perf_counter() - started
        cdl(folder, "model", "register", "1")
        gate = cdl(
            folder,
            "model",
            "evaluate",
            "fashion-mnist/1",
            "--min-accuracy",
            str(GATE),
            check=False,
        )
        print(gate.stdout.strip())
        tags = json.loads(cdl(folder, "model", "show", "fashion-mnist/1", "--json").stdout)["tags"]
        accuracy = float(tags["cdl.eval.accuracy"])
        # Of the gate's test split, the images of Debian's own test set (t10k), by the same model.
        registry = Registry(stack)
        model = registry.load_version(registry.get("fashion-mnist/1"))
        t10k = [name for name in test if name.startswith("test-")]
        truth = [fashion.CLASSES[images[name][1]] for name in t10k]
        pngs = [
            (work / "images" / label / name).read_bytes()
            for label, name in zip(truth, t10k, strict=True)
        ]
        answers = model.predict("image", pngs)
        t10k_accuracy = sum(a == t for (a, _), t in zip(answers, truth, strict=True)) / len(t10k)
        print(f"of them, the {len(t10k)} images of Debian's t10k: accuracy {t10k_accuracy:.4f}")

    return accuracy, gate, images, train, test, train_s, (t10k_accuracy, len(t10k))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, help="default: the shipped spec's")
    args = parser.parse_args()
    spec = yaml.safe_load(SPEC.read_text())
    spec["data"]["snapshot"] = SNAPSHOT
    if args.epochs:
        spec["hyperparameters"]["epochs"] = args.epochs
    hparams = spec["hyperparameters"]

    with tempfile.TemporaryDirectory(prefix="cdl-bench-fashion-") as scratch:
        accuracy, gate, images, train, test, train_s, (t10k_accuracy, t10k) = platform(
            Path(scratch), spec
        )
    val_fraction = spec["data"].get("val_fraction", DEFAULT_VAL_FRACTION)
    baseline = baseline_accuracy(images, train, test, hparams, val_fraction)
    print(f"through the gate: test accuracy {accuracy:.4f} (gate {GATE}, exit {gate.returncode})")
    print(f"plain Keras on the same split: test accuracy {baseline:.4f}")
    print(
        json.dumps(
            {
                "benchmark": "fashion_accuracy",
                "epochs": hparams["epochs"],
                "hidden": hparams["hidden"],
                "train_images": len(train),
                "test_images": len(test),
                "test_accuracy": round(accuracy, 4),
                "t10k_images_in_test": t10k,
                "t10k_accuracy": round(t10k_accuracy, 4),
                "gate_exit": gate.returncode,
                "baseline_test_accuracy": round(baseline, 4),
                "submit_to_end_s": round(train_s, 1),
                "target": f"test accuracy >= {GATE} through cdl model evaluate",
                "met": accuracy >= GATE and gate.returncode == 0,
            }
        )
    )


def baseline_accuracy(images, train, test, hparams: dict, val_fraction: float) -> float:
    """The same network by hand: pixels scaled before the model, the same train split (the same
    share of it held out for validation), scored on the same test split."""
    import keras

    def arrays(names):
        return (
            np.stack([images[n][0] for n in names]) / 255.0,
            np.array([images[n][1] for n in names]),
        )

    order = np.random.default_rng(0).permutation(len(train))  # rows come sorted by class
    x_train, y_train = arrays([train[i] for i in order])
    x_test, y_test = arrays(test)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input(shape=(28, 28)),
            keras.layers.Flatten(),
            keras.layers.Dense(hparams["hidden"], activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(hparams["learning_rate"]),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(
        x_train,
        y_train,
        batch_size=hparams["batch_size"],
        epochs=hparams["epochs"],
        validation_split=val_fraction,
        verbose=0,
    )
    return float(model.evaluate(x_test, y_test, verbose=0)[1])


if __name__ == "__main__":
    main()
