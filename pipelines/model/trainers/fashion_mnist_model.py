"""The served Fashion-MNIST model: a Keras network over raw pixels, as an MLflow pyfunc model.

This file is the model's code in every artifact the Fashion-MNIST trainer saves (MLflow
models-from-code): MLflow copies it into the model folder and runs it at load time, so it imports
nothing from CDL, only numpy, pandas, keras (TensorFlow) and mlflow. The Keras model itself scales
pixels to [0, 1] (its first layer), so whoever serves it passes the image bytes as they are and
cannot forget the scaling, nor apply it twice: this wrapper refuses anything but integer pixels
0..255. The label set and image shape come from the artifact's `preprocessing.json`.

Input and output follow the CDL model contract (pipelines/model/registry.py): a uint8 array
(N, height, width[, 1]) in; a `label` and a `score` (softmax probability of the label) per image
out.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd


def pixels(model_input, shape: tuple[int, int]) -> np.ndarray:
    """The input as float32 (N, height, width) pixel values 0..255, or a ValueError saying what
    is wrong with it."""
    array = np.asarray(model_input)
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2 and array.shape[1:] == (shape[0] * shape[1],):
        array = array.reshape(-1, *shape)  # flattened rows, as some clients send them
    if array.ndim != 3 or tuple(array.shape[1:]) != tuple(shape):
        raise ValueError(
            f"expected grayscale images of shape (N, {shape[0]}, {shape[1]}), got {array.shape}"
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"expected integer pixels 0..255 (uint8), got {array.dtype}: the model scales "
            "pixels itself, do not scale them before"
        )
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"pixels must be 0..255, got {array.min()}..{array.max()}")
    return array.astype(np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class FashionMNISTModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import keras

        meta = json.loads(Path(context.artifacts["preprocessing"]).read_text())
        self.labels = meta["labels"]
        self.shape = tuple(meta["shape"])
        self.model = keras.models.load_model(context.artifacts["keras"])

    def predict(self, context, model_input: np.ndarray, params=None):
        x = pixels(model_input, self.shape)
        if not len(x):
            return pd.DataFrame({"label": [], "score": []})
        probabilities = softmax(np.asarray(self.model.predict(x, batch_size=1024, verbose=0)))
        best = probabilities.argmax(axis=1)
        return pd.DataFrame(
            {
                "label": [self.labels[i] for i in best],
                "score": probabilities[np.arange(len(best)), best].astype(float),
            }
        )


mlflow.models.set_model(FashionMNISTModel())
