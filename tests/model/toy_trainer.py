"""A tiny real Trainer for the experiment tests: logistic regression in numpy on generated,
linearly separable data. Its weights start far from the answer, so that the validation accuracy
after a few epochs depends on the learning rate (1e-4: stays poor; 0.5: near 1.0). Checkpoints are
real files; each `fit` appends the epoch it starts after to `fits.log` beside them.

Test knobs (const hyperparameters): `sleep` seconds per epoch, `fail_at` (raise at that epoch),
`nan_at` (report NaN at that epoch).
"""

from __future__ import annotations

import time
import warnings
import zlib
from pathlib import Path

import numpy as np

from pipelines.model.trainer import Features, Trainer

DIMENSIONS = 10
STEPS_PER_EPOCH = 5


class ToyTrainer(Trainer):
    use_case = "bbc_news"
    task = "text"
    PREPROCESSING_VERSION = "toy-1"

    @classmethod
    def featurize(cls, files, seed: int, val_fraction: float) -> Features:
        rng = np.random.default_rng(seed)
        truth = rng.normal(size=DIMENSIONS)
        x = rng.normal(size=(400, DIMENSIONS))
        y = (x @ truth > 0).astype(int)
        cut = int(len(x) * (1 - val_fraction))
        return Features(
            labels=["no", "yes"],
            x_train=x[:cut],
            y_train=y[:cut],
            x_val=x[cut:],
            y_val=y[cut:],
            preprocessing={"truth": truth.tolist()},
            validation={"seed": seed},
        )

    def __init__(self, hparams, features, resources, seed: int = 0):
        self.hparams = dict(hparams)
        self.lr = float(hparams["learning_rate"])
        self.features = features
        start = -np.asarray(features.preprocessing["truth"])  # the wrong way round
        self.w = 2.0 * start / np.linalg.norm(start) * np.sqrt(DIMENSIONS)
        self.b = 0.0

    def _loss_accuracy(self, x, y):
        p = 1 / (1 + np.exp(-(x @ self.w + self.b)))
        loss = -np.mean(y * np.log(p + 1e-9) + (1 - y) * np.log(1 - p + 1e-9))
        return float(loss), float(np.mean((p > 0.5) == y))

    @classmethod
    def batches_per_epoch(cls, features, hparams) -> int:
        return STEPS_PER_EPOCH  # full-batch gradient steps

    def fit(self, max_epochs: int, checkpoints: Path, report) -> int:
        last = checkpoints / "last.npz"
        done = 0
        if last.exists():
            saved = np.load(last)
            self.w, self.b, done = saved["w"], float(saved["b"]), int(saved["epoch"])
        with open(checkpoints / "fits.log", "a") as log:
            log.write(f"{done}\n")
        x, y = self.features.x_train, self.features.y_train
        for epoch in range(done + 1, max_epochs + 1):
            time.sleep(float(self.hparams.get("sleep", 0)))
            if self.hparams.get("fail_at") == epoch:
                raise RuntimeError(f"toy trainer fails on purpose at epoch {epoch}")
            for _ in range(STEPS_PER_EPOCH):
                p = 1 / (1 + np.exp(-(x @ self.w + self.b)))
                self.w = self.w - self.lr * x.T @ (p - y) / len(y)
                self.b -= self.lr * float(np.mean(p - y))
            tmp = checkpoints / "last.tmp.npz"
            np.savez(tmp, w=self.w, b=self.b, epoch=epoch)
            tmp.replace(last)
            loss, accuracy = self._loss_accuracy(self.features.x_val, self.features.y_val)
            if self.hparams.get("nan_at") == epoch:
                accuracy = float("nan")
            if not report(epoch, {"val_accuracy": accuracy, "val_loss": loss}):
                return epoch
        return max_epochs

    def parameter_count(self) -> int:
        return DIMENSIONS + 1

    def validation_predictions(self):
        p = 1 / (1 + np.exp(-(self.features.x_val @ self.w + self.b)))
        return np.asarray(self.features.y_val), (p > 0.5).astype(int)

    def save_model(self, folder: Path) -> None:
        import mlflow.pyfunc

        with warnings.catch_warnings():  # MLflow asks for type hints on `predict`
            warnings.simplefilter("ignore")

            class ToyModel(mlflow.pyfunc.PythonModel):
                def __init__(self, w, b):
                    self.w, self.b = np.asarray(w), float(b)

                def predict(self, context, model_input, params=None):
                    x = np.asarray(model_input, dtype=float)
                    p = 1 / (1 + np.exp(-(x @ self.w + self.b)))
                    return {"label": np.where(p > 0.5, "yes", "no").tolist(), "score": p.tolist()}

        mlflow.pyfunc.save_model(
            str(folder), python_model=ToyModel(self.w, self.b), pip_requirements=["numpy"]
        )


def toy_features(stack, use_case: str, snapshot: str, val_fraction: float) -> Features:
    """The features of a snapshot, generated from its name (no label files needed)."""
    return ToyTrainer.featurize([], zlib.crc32(snapshot.encode()), val_fraction)
