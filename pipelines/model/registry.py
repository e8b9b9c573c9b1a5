"""The model registry: MLflow registered models, one per use case, with aliases.

A use case's models are registered as `<use-case>` with `_` as `-` (bbc_news -> `bbc-news`).
Aliases mark the versions that matter: `candidate` (passed evaluation) and `champion` (approved
for production). Every registered CDL model is an MLflow pyfunc model with one contract, so that
labeling, evaluation and serving can call any of them the same way:

- input, per use-case task: `text` -> a pandas DataFrame with a `text` column (a file's
  content: title line, newline, body); `image` -> a numpy uint8 array (N, height, width[,
  channels]) of decoded images;
- output: one row per input with a `label` (one of the use case's labels) and a `score` (the
  model's confidence, 0..1), as a DataFrame or a dict of columns.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from pipelines.core.errors import CDLError, Invalid, Unavailable
from pipelines.core.stack import Stack
from pipelines.model import tracking

CANDIDATE = "candidate"
CHAMPION = "champion"
CONTRACT = "return a 'label' and a 'score' per input (see pipelines/model/registry.py)"


def registered_name(use_case: str) -> str:
    return use_case.replace("_", "-")


def model_inputs(task: str, blobs: list[bytes]) -> Any:
    """Files' bytes as a CDL model's input for a task (`text` or `image`)."""
    if task == "text":
        import pandas as pd

        return pd.DataFrame({"text": [b.decode("utf-8", errors="replace") for b in blobs]})
    import numpy as np
    from PIL import Image

    arrays = [np.asarray(Image.open(io.BytesIO(b))) for b in blobs]
    shapes = sorted({a.shape for a in arrays})
    if len(shapes) > 1:
        raise Invalid(
            f"images of different shapes {shapes} cannot be scored in one batch",
            "validate the images to one shape first (the use case's validate step)",
        )
    return np.stack(arrays).astype(np.uint8)


@dataclass
class RegisteredModel:
    """One loaded model version."""

    name: str
    version: str
    model: Any  # mlflow.pyfunc.PyFuncModel

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"

    def predict(self, task: str, blobs: list[bytes]) -> list[tuple[str, float]]:
        """(label, score) for each file's bytes."""
        import pandas as pd

        if not blobs:
            return []
        try:
            answer = pd.DataFrame(self.model.predict(model_inputs(task, blobs)))
        except CDLError:
            raise
        except Exception as exc:
            raise Invalid(
                f"model {self.ref} failed to predict: {type(exc).__name__}: {exc}", CONTRACT
            ) from exc
        if "label" not in answer.columns or len(answer) != len(blobs):
            raise Invalid(
                f"model {self.ref} answered {len(answer)} row(s) with columns "
                f"{list(answer.columns)} for {len(blobs)} input(s)",
                CONTRACT,
            )
        scores = answer["score"] if "score" in answer.columns else [0.0] * len(answer)
        return [
            (str(label), float(score)) for label, score in zip(answer["label"], scores, strict=True)
        ]


class Registry:
    def __init__(self, stack: Stack):
        self.client = tracking.client(stack)

    def version(self, name: str, alias: str):
        """The ModelVersion that carries `alias`, or None when the model or alias is unknown."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(name, alias)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise Unavailable(
                f"MLflow could not look up {name}@{alias}: {str(exc).splitlines()[0]}",
                "check the tracking store ('cdl stack status', tracking.uri)",
            ) from exc

    def load(self, name: str, alias: str) -> RegisteredModel | None:
        """The version that carries `alias`, loaded; None when there is none."""
        import mlflow

        found = self.version(name, alias)
        if found is None:
            return None
        try:
            model = mlflow.pyfunc.load_model(f"models:/{name}/{found.version}")
        except Exception as exc:
            raise Unavailable(
                f"cannot load model {name}/{found.version} ({name}@{alias}): {exc}",
                "check the version's artifacts in MLflow, or move the alias to another version",
            ) from exc
        return RegisteredModel(name, found.version, model)
