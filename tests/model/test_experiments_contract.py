"""The experiments port's contract over both engines (the local one and Determined): a spec is
checked against the stack in one way before anything runs or is sent (search.prepare), with the
same error for the same mistake, and a refused spec leaves nothing behind."""

from __future__ import annotations

import pytest
import yaml

from pipelines.core.errors import Invalid, NotFound, Unavailable
from pipelines.core.postgres import free_port
from pipelines.plugins import backend_class
from tests.conftest import destroy, make_project, stack_for
from tests.model.training_runs import placeholder_snapshots

TOY = {
    "use_case": "bbc_news",
    "snapshot": "latest",
    "trainer": "tests.model.toy_trainer:ToyTrainer",
    "features": "tests.model.toy_trainer:toy_features",
}
ASHA = {
    "name": "adaptive_asha",
    "max_trials": 4,
    "max_time": 45,
    "time_metric": "batches",
    "metric": "val_accuracy",
    "smaller_is_better": False,
}


@pytest.fixture(scope="module")
def stack():
    stack = stack_for(
        make_project(
            {
                "stacks": {
                    "local": {
                        "home": ".cdl",
                        "experiments": {"determined_master": f"http://127.0.0.1:{free_port()}"},
                    }
                }
            }
        )
    )
    stack.up()
    placeholder_snapshots(stack, "first")
    yield stack
    destroy(stack)


@pytest.fixture(params=["local", "determined"])
def engine(request, stack, monkeypatch):
    """The backend, and a function that says what it has started or sent so far."""
    engine = backend_class("experiments", request.param)(stack)
    if request.param == "local":
        return engine, lambda: [e.name for e in engine.list()]
    sent = []

    def call(op, timeout_s=120, **request):
        sent.append(op)
        raise Unavailable("the test's master takes nothing")

    monkeypatch.setattr(engine, "call", call)
    return engine, lambda: sent


def spec(stack, name: str, hyperparameters: dict, searcher=None, **data) -> str:
    path = stack.settings.root / f"{name}.yaml"
    document = {
        "name": name,
        "entrypoint": "python3 -m pipelines.model.entrypoint",
        "data": {**TOY, **data},
        "hyperparameters": hyperparameters,
        "searcher": searcher or {"name": "single", "metric": "val_accuracy"},
    }
    path.write_text(yaml.safe_dump(document))
    return path


REFUSED = [
    ("no-snapshot", {"epochs": 2}, None, {"snapshot": "nope"}, NotFound, "no label snapshot"),
    (
        "other-labels",
        {"epochs": 2},
        None,
        {"labels": ["business", "sport"]},
        Invalid,
        "label snapshot bbc_news/first is with entertainment, politics, tech that data.labels",
    ),
    (
        "more-labels",
        {"epochs": 2},
        None,
        {"labels": ["business", "entertainment", "politics", "sport", "tech", "weather"]},
        Invalid,
        "label snapshot bbc_news/first is without weather",
    ),
    ("no-length", {"learning_rate": 0.5}, None, {}, Invalid, "sets no training length"),
    (
        "searched-batches",
        {"batch_size": {"type": "categorical", "vals": [16, 32]}},
        ASHA,
        {},
        Invalid,
        "time_metric: batches with a searched batch_size",
    ),
    (
        "no-trainer",
        {"epochs": 2},
        None,
        {"trainer": "tests.model.nowhere:Trainer"},
        Unavailable,
        "data.trainer: the trainer tests.model.nowhere:Trainer cannot be loaded",
    ),
]


@pytest.mark.parametrize(("name", "hyper", "searcher", "data", "kind", "message"), REFUSED)
def test_a_bad_spec_is_refused_alike_before_anything_starts(
    engine, stack, name, hyper, searcher, data, kind, message
):
    backend, started = engine
    before = started()
    with pytest.raises(kind) as caught:
        backend.submit(spec(stack, name, hyper, searcher, **data))
    assert message in caught.value.problem and str(stack.settings.root) in caught.value.problem
    assert started() == before
