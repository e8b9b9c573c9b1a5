"""Pre-annotations from a registered model: the version of a use case's model that carries an
alias (the champion) answers for new files, as labeling's `Predictor`."""

from __future__ import annotations

from pipelines.core.stack import Stack
from pipelines.data.labeling.spec import UseCase
from pipelines.model.registry import RegisteredModel, Registry, registered_name


class ModelPredictor:
    """Implements `pipelines.data.labeling.predictor.Predictor` with a loaded model version."""

    def __init__(self, model: RegisteredModel, task: str):
        self.model = model
        self.task = task

    @property
    def ref(self) -> str:
        return self.model.ref

    def __call__(self, items: list[tuple[str, bytes]]) -> dict[str, dict]:
        answers = self.model.predict(self.task, [data for _, data in items])
        return {
            path: {"label": label, "score": score, "model": self.model.ref}
            for (path, _), (label, score) in zip(items, answers, strict=True)
        }


def model_predictor(stack: Stack, case: UseCase, alias: str) -> ModelPredictor | None:
    """The predictor of the use case's registered model version that carries `alias` (e.g. the
    champion); None when no version carries it."""
    model = Registry(stack).load(registered_name(case.name), alias)
    return None if model is None else ModelPredictor(model, case.spec.task)
