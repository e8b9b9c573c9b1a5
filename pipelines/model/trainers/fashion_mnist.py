"""The Fashion-MNIST trainer: Flatten, Dense(hidden, relu), Dense(10) in TensorFlow Keras.

Preprocessing (`featurize`, once per snapshot): the labeled files are PNGs (how the data pipeline
stores images, see pipelines/data/fashion.py), decoded to uint8 (N, 28, 28) arrays; nothing else.
Scaling pixels to [0, 1] is the model's first layer (`Rescaling(1/255)`), so the saved model
takes raw pixels and serving cannot forget the scaling: the thesis prototype's served model broke
exactly there, fed unscaled pixels by a server that did not know about a scaling done in training.

Training: Adam on sparse cross-entropy over logits, one `model.fit` per epoch on a shuffle fixed by
(seed, epoch), so that a trial resumed from its checkpoint (a `.keras` file with the optimizer's
state) trains exactly as if it had never stopped. With `slots > 1` the model is built and trained
under `tf.distribute.MirroredStrategy` over the devices present (GPUs, else the CPU); `batch_size`
is the global batch. The saved model is `fashion_mnist_model.py` (models-from-code) with the Keras
model and the label set as artifacts.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pipelines.core.errors import Invalid
from pipelines.model.trainer import (
    EpochReport,
    Features,
    Hyperparameter,
    LabeledFile,
    Resources,
    Trainer,
    check_finite,
    checkpoint_name,
    last_checkpoint,
    split_validation,
)

MODEL_CODE = Path(__file__).with_name("fashion_mnist_model.py")
SUFFIX = ".keras"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up lines are noise


def decode(item: LabeledFile) -> np.ndarray:
    """A PNG's pixels as uint8 (height, width), grayscale."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(item.data))
        if image.mode != "L":
            image = image.convert("L")
        return np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise Invalid(f"{item.source} is not an image: {exc}", "validate the files first") from exc


def images(files: list[LabeledFile]) -> np.ndarray:
    arrays = [decode(f) for f in files]
    shape = arrays[0].shape if arrays else (0, 0)
    for item, array in zip(files, arrays, strict=True):
        if array.shape != shape:
            raise Invalid(
                f"{item.source} is {array.shape[1]}x{array.shape[0]}, the others "
                f"{shape[1]}x{shape[0]}",
                "images of one use case must share one size: validate them to it first",
            )
    return np.stack(arrays) if arrays else np.zeros((0, *shape), dtype=np.uint8)


def _threads(count: int) -> None:
    """TensorFlow takes its thread counts only before its runtime starts: later calls fail, and
    the first setting in the process stays."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(count)
        tf.config.threading.set_inter_op_parallelism_threads(count)
    except RuntimeError:
        pass


class FashionMNISTTrainer(Trainer):
    use_case = "fashion_mnist"
    task = "image"
    PREPROCESSING_VERSION = "png-uint8-1"
    HYPERPARAMETERS = {
        "learning_rate": Hyperparameter(1e-3, float, lambda v: v > 0, "> 0"),
        "hidden": Hyperparameter(128, int, lambda v: v >= 1, ">= 1"),
        "batch_size": Hyperparameter(128, int, lambda v: v >= 1, ">= 1"),
    }

    @classmethod
    def featurize(cls, files: list[LabeledFile], seed: int, val_fraction: float) -> Features:
        train, val, validation = split_validation(files, seed, val_fraction)
        labels = sorted({f.label for f in files})
        code = {label: i for i, label in enumerate(labels)}
        x_train, x_val = images(train), images(val)
        if x_train.shape[1:] != x_val.shape[1:]:
            raise Invalid(
                f"validation images are {x_val.shape[1:]}, training images {x_train.shape[1:]}",
                "validate the images to one size first",
            )
        return Features(
            labels=labels,
            x_train=x_train,
            y_train=np.array([code[f.label] for f in train], dtype=np.int64),
            x_val=x_val,
            y_val=np.array([code[f.label] for f in val], dtype=np.int64),
            preprocessing={
                "shape": list(x_train.shape[1:]),
                "pixels": "uint8 0..255, grayscale; the model scales them to [0, 1]",
                "version": cls.PREPROCESSING_VERSION,
            },
            validation=validation,
        )

    def __init__(
        self,
        hparams: Mapping[str, Any],
        features: Features,
        resources: Resources,
        seed: int = 0,
    ):
        super().__init__(hparams, features, resources, seed)
        self.shape = tuple(features.x_train.shape[1:])
        _threads(max(1, resources.threads))
        import keras

        self.strategy = self._strategy()
        keras.utils.set_random_seed(seed)
        with self.strategy.scope():
            self.model = self._build()

    def _strategy(self):
        """MirroredStrategy over the GPUs present (as many as slots), else over the CPU, when
        the trial has more than one slot; the default (no distribution) otherwise."""
        import tensorflow as tf

        if self.resources.slots <= 1:
            return tf.distribute.get_strategy()
        gpus = [d.name for d in tf.config.list_logical_devices("GPU")][: self.resources.slots]
        return tf.distribute.MirroredStrategy(devices=gpus or ["/cpu:0"])

    def _build(self):
        import keras
        from keras import layers

        model = keras.Sequential(
            [
                keras.Input(shape=self.shape, name="pixels"),
                layers.Rescaling(1.0 / 255, name="scale"),  # part of the model, never forgotten
                layers.Flatten(),
                layers.Dense(self.hparams["hidden"], activation="relu"),
                layers.Dense(len(self.features.labels), name="logits"),
            ]
        )
        model.compile(
            optimizer=keras.optimizers.Adam(self.hparams["learning_rate"]),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        return model

    def fit(self, max_epochs: int, checkpoints: Path, report: EpochReport) -> int:
        import keras

        checkpoints.mkdir(parents=True, exist_ok=True)
        done, checkpoint = last_checkpoint(checkpoints, SUFFIX)
        if checkpoint is not None:
            with self.strategy.scope():
                self.model = keras.models.load_model(checkpoint)
        f = self.features
        x_train, x_val = f.x_train.astype(np.float32), f.x_val.astype(np.float32)
        for epoch in range(done + 1, max_epochs + 1):
            started = time.perf_counter()
            order = np.random.default_rng((self.seed, epoch)).permutation(len(x_train))
            history = self.model.fit(
                x_train[order],
                f.y_train[order],
                batch_size=self.hparams["batch_size"],
                epochs=1,
                shuffle=False,
                validation_data=(x_val, f.y_val),
                callbacks=[keras.callbacks.TerminateOnNaN()],
                verbose=0,
            ).history
            metrics = {
                "loss": float(history["loss"][-1]),
                "val_loss": float(history.get("val_loss", [float("nan")])[-1]),
                "val_accuracy": float(history.get("val_accuracy", [float("nan")])[-1]),
                "epoch_seconds": time.perf_counter() - started,
            }
            check_finite(epoch, metrics)
            partial = checkpoints / f".partial-{checkpoint_name(epoch, SUFFIX)}"
            self.model.save(partial)
            partial.replace(checkpoints / checkpoint_name(epoch, SUFFIX))
            for old in checkpoints.glob(f"epoch-*{SUFFIX}"):
                if old.name != checkpoint_name(epoch, SUFFIX):
                    old.unlink(missing_ok=True)
            done = epoch
            if not report(epoch, metrics):
                break
        return done

    def parameter_count(self) -> int:
        return int(self.model.count_params())

    def validation_predictions(self) -> tuple[np.ndarray, np.ndarray]:
        x_val = self.features.x_val.astype(np.float32)
        logits = self.model.predict(x_val, batch_size=1024, verbose=0)
        return np.asarray(self.features.y_val, dtype=np.int64), logits.argmax(axis=1)

    def save_model(self, folder: Path) -> None:
        import keras
        import mlflow
        import tensorflow as tf

        meta = {
            "labels": self.features.labels,
            "shape": list(self.shape),
            "preprocessing_version": self.PREPROCESSING_VERSION,
            "hyperparameters": self.hparams,
        }
        with tempfile.TemporaryDirectory(prefix="cdl-fashion-model-") as scratch:
            meta_file, model_file = (
                Path(scratch) / "preprocessing.json",
                Path(scratch) / "model.keras",
            )
            meta_file.write_text(json.dumps(meta))
            self.model.save(model_file)
            mlflow.pyfunc.save_model(
                path=str(folder),
                python_model=str(MODEL_CODE),
                artifacts={"preprocessing": str(meta_file), "keras": str(model_file)},
                pip_requirements=[
                    f"tensorflow=={tf.__version__}",
                    f"keras=={keras.__version__}",
                    f"mlflow=={mlflow.__version__}",
                    "numpy",
                    "pandas",
                ],
            )
