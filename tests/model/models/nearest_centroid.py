"""A small real model for tests, logged with MLflow's models-from-code: nearest centroid over
word counts (text) or pixels (images), fitted by `fit` below on labeled examples."""

import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd


def features(model_input, vocabulary: list[str]) -> np.ndarray:
    if isinstance(model_input, pd.DataFrame):
        index = {word: i for i, word in enumerate(vocabulary)}
        rows = np.zeros((len(model_input), len(vocabulary)))
        for row, text in enumerate(model_input["text"]):
            for word in re.findall(r"[a-z]+", text.lower()):
                if word in index:
                    rows[row, index[word]] += 1
    else:
        rows = np.asarray(model_input, dtype=float).reshape(len(model_input), -1)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms == 0, 1, norms)


def fit(model_input, labels: list[str], out: Path) -> Path:
    """Centroids of the examples per label, written to `out` (the model's one artifact)."""
    vocabulary = []
    if isinstance(model_input, pd.DataFrame):
        words = {w for text in model_input["text"] for w in re.findall(r"[a-z]+", text.lower())}
        vocabulary = sorted(words)
    x = features(model_input, vocabulary)
    classes = sorted(set(labels))
    centroids = [x[[label == c for label in labels]].mean(axis=0).tolist() for c in classes]
    out.write_text(
        json.dumps({"vocabulary": vocabulary, "labels": classes, "centroids": centroids})
    )
    return out


class NearestCentroid(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        fitted = json.loads(Path(context.artifacts["centroids"]).read_text())
        self.vocabulary, self.labels = fitted["vocabulary"], fitted["labels"]
        self.centroids = np.asarray(fitted["centroids"])

    def predict(self, context, model_input, params=None):
        similarity = features(model_input, self.vocabulary) @ self.centroids.T
        best = similarity.argmax(axis=1)
        return pd.DataFrame(
            {"label": [self.labels[i] for i in best], "score": similarity.max(axis=1)}
        )


mlflow.models.set_model(NearestCentroid())
