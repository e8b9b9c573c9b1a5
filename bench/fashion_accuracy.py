"""Fashion-MNIST accuracy of the CDL trainer on the full Debian set, through the saved model.

The whole path a served model takes: the 60,000 training images as PNGs (as the data repos hold
them) through the trainer's `featurize` (10% carved out for validation), `fit` epoch by epoch,
`save_model`, then the saved pyfunc model loaded by MLflow and scoring the 10,000 test images as
raw uint8 pixels (the scaling is inside the model). The baseline is the same network trained by
plain Keras on pixels scaled by hand, scored on the same test images, in the same run.

Run: .venv/bin/python bench/fashion_accuracy.py [--epochs 5] [--hidden 128] [--threads 1]
Figures only (accuracy after each epoch on validation, test accuracy at the end). Last line: one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from pipelines.data import fashion  # noqa: E402
from pipelines.model.trainer import LabeledFile, Resources  # noqa: E402
from pipelines.plugins import trainer_class  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    images, labels = fashion.arrays(fashion.DEFAULT_SOURCE, "train")
    test_images, test_labels = fashion.arrays(fashion.DEFAULT_SOURCE, "t10k")
    started = time.perf_counter()
    files = [
        LabeledFile(
            f"fashion-validate@bench:/valid/{fashion.CLASSES[label]}/train-{i:05d}.png",
            fashion.CLASSES[label],
            fashion.png_bytes(image.tobytes(), 28, 28),
        )
        for i, (image, label) in enumerate(zip(images, labels, strict=True))
    ]
    encode_s = time.perf_counter() - started
    trainer_type = trainer_class("fashion_mnist")
    started = time.perf_counter()
    features = trainer_type.featurize(files, seed=0, val_fraction=0.1)
    featurize_s = time.perf_counter() - started
    print(f"{len(files)} PNGs encoded in {encode_s:.1f} s, featurized in {featurize_s:.1f} s")

    hparams = {"hidden": args.hidden, "batch_size": args.batch_size}
    trainer = trainer_type(hparams, features, Resources(threads=args.threads), seed=0)
    curve: list[dict] = []

    def report(epoch, metrics) -> bool:
        curve.append({"epoch": epoch, **{k: round(v, 4) for k, v in metrics.items()}})
        print(json.dumps(curve[-1]))
        return True

    with tempfile.TemporaryDirectory(prefix="cdl-bench-fashion-") as scratch:
        started = time.perf_counter()
        trainer.fit(args.epochs, Path(scratch) / "checkpoints", report)
        fit_s = time.perf_counter() - started
        trainer.save_model(Path(scratch) / "model")
        import mlflow

        model = mlflow.pyfunc.load_model(str(Path(scratch) / "model"))
        started = time.perf_counter()
        served = model.predict(test_images)
        predict_s = time.perf_counter() - started
    names = np.array(fashion.CLASSES)
    test_accuracy = float(np.mean(np.asarray(served["label"]) == names[test_labels]))
    print(f"CDL model, served: test accuracy {test_accuracy:.4f} after {args.epochs} epochs")

    baseline = baseline_accuracy(images, labels, test_images, test_labels, args)
    print(f"plain Keras baseline: test accuracy {baseline:.4f}")
    print(
        json.dumps(
            {
                "benchmark": "fashion_accuracy",
                "epochs": args.epochs,
                "hidden": args.hidden,
                "train_images": int(len(features.y_train)),
                "val_images": int(len(features.y_val)),
                "test_images": int(len(test_labels)),
                "val_accuracy": curve[-1]["val_accuracy"],
                "test_accuracy": round(test_accuracy, 4),
                "baseline_test_accuracy": round(baseline, 4),
                "fit_s": round(fit_s, 1),
                "seconds_per_epoch": round(fit_s / args.epochs, 2),
                "featurize_s": round(featurize_s, 1),
                "predict_10k_s": round(predict_s, 2),
            }
        )
    )


def baseline_accuracy(images, labels, test_images, test_labels, args) -> float:
    """The same network by hand: pixels scaled before the model, all 60,000 images."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input(shape=(28, 28)),
            keras.layers.Flatten(),
            keras.layers.Dense(args.hidden, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(images / 255.0, labels, batch_size=args.batch_size, epochs=args.epochs, verbose=0)
    return float(model.evaluate(test_images / 255.0, test_labels, verbose=0)[1])


if __name__ == "__main__":
    main()
