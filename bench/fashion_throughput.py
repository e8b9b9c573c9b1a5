"""Fashion-MNIST training throughput of the CDL trainer: samples per second per epoch, on CPU,
and on GPU where the machine has one.

The trainer (pipelines/model/trainers/fashion_mnist.py, its default hyperparameters: Dense 128,
batch 128) fits the full 60,000-image Debian training set, the 10,000 test images as its
validation data, for `--epochs` epochs; an epoch's time is the trainer's own `epoch_seconds`
(the shuffle, the fit, the validation pass), its throughput 60,000 / that. The baseline is the
same network in plain Keras (`model.fit` on pixels scaled by hand, no validation), timed per
epoch in the same process, so the ratio says what the trainer's per-epoch work (shuffle copy,
validation, checkpoint) costs. Each device runs in a process of its own: the CPU one with no GPU
visible, the GPU one only when TensorFlow sees a GPU (else it prints "no GPU").

Run: .venv/bin/python bench/fashion_throughput.py [--epochs 3] [--threads N]
Figures only. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(device: str, epochs: int, threads: int) -> dict | None:
    """Runs in the child: the trainer's and plain Keras' samples/s on `device`."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    from pipelines.data import fashion
    from pipelines.model.trainer import Features, Resources
    from pipelines.plugins import trainer_class

    gpus = tf.config.list_physical_devices("GPU")
    if device == "gpu" and not gpus:
        print("no GPU")
        return None
    images, labels = fashion.arrays(fashion.DEFAULT_SOURCE, "train")
    test_images, test_labels = fashion.arrays(fashion.DEFAULT_SOURCE, "t10k")
    features = Features(
        labels=list(fashion.CLASSES),
        x_train=images,
        y_train=labels.astype(np.int64),
        x_val=test_images,
        y_val=test_labels.astype(np.int64),
    )
    trainer_type = trainer_class("fashion_mnist")
    trainer = trainer_type({}, features, Resources(threads=threads, gpus=len(gpus)), seed=0)
    seconds: list[float] = []

    def report(epoch, metrics) -> bool:
        seconds.append(metrics["epoch_seconds"])
        print(
            f"{device}: epoch {epoch}: {metrics['epoch_seconds']:.2f} s, "
            f"{len(images) / metrics['epoch_seconds']:,.0f} samples/s, "
            f"val accuracy {metrics['val_accuracy']:.4f}"
        )
        return True

    with tempfile.TemporaryDirectory(prefix="cdl-bench-fashion-") as scratch:
        trainer.fit(epochs, Path(scratch) / "checkpoints", report)

    import keras

    hparams = trainer.hparams
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
    scaled = images.astype(np.float32) / 255.0
    baseline: list[float] = []
    for epoch in range(epochs):
        started = time.perf_counter()
        model.fit(scaled, labels, batch_size=hparams["batch_size"], epochs=1, verbose=0)
        baseline.append(time.perf_counter() - started)
        print(
            f"{device}: plain Keras epoch {epoch + 1}: {baseline[-1]:.2f} s, "
            f"{len(images) / baseline[-1]:,.0f} samples/s"
        )
    # The first epoch includes tracing the training function: the best epoch is the steady rate.
    return {
        "device": device,
        "gpu_name": gpus[0].name if device == "gpu" else None,
        "threads": threads,
        "samples_per_epoch": int(len(images)),
        "epoch_s": [round(s, 2) for s in seconds],
        "samples_per_s": [round(len(images) / s) for s in seconds],
        "best_samples_per_s": round(len(images) / min(seconds)),
        "baseline_samples_per_s": [round(len(images) / s) for s in baseline],
        "baseline_best_samples_per_s": round(len(images) / min(baseline)),
    }


def child(device: str, epochs: int, threads: int) -> dict | None:
    env = dict(os.environ)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = "-1"
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, __file__, "--device", device, "--epochs", str(epochs)]
        command += ["--threads", str(threads), "--out", out.name]
        subprocess.run(command, env=env, check=True)
        text = Path(out.name).read_text()
    return json.loads(text) if text else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", choices=["cpu", "gpu"])  # set in the child processes
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.device:
        figures = measure(args.device, args.epochs, args.threads)
        Path(args.out).write_text(json.dumps(figures) if figures else "")
        return

    results = {device: child(device, args.epochs, args.threads) for device in ("cpu", "gpu")}
    summary: dict = {"benchmark": "fashion_throughput", "epochs": args.epochs}
    for device, figures in results.items():
        if figures is None:
            summary[device] = "no GPU"
            continue
        ratio = figures["best_samples_per_s"] / figures["baseline_best_samples_per_s"]
        print(
            f"{device}: trainer {figures['best_samples_per_s']:,} samples/s at best "
            f"(per epoch: {figures['samples_per_s']}), plain Keras "
            f"{figures['baseline_best_samples_per_s']:,} ({ratio:.2f}x)"
        )
        summary[device] = {**figures, "ratio_to_plain_keras": round(ratio, 2)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
