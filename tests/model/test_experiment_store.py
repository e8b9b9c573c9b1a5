"""Who runs what, decided by the experiment store on a real Postgres: ASHA's promotions at a rung
(Determined's rule), paused trials resumed once promoted, and the end of a search, driven by hand
without workers."""

from __future__ import annotations

import pytest

from pipelines.core import events
from pipelines.model.experiment_store import ExperimentStore, NewTrial

RUNNER = "host/1/1"


@pytest.fixture
def stack(shared_stack):
    return shared_stack


def experiment(store: ExperimentStore, max_trials: int, smaller_is_better: bool = False) -> int:
    return store.create(
        name="rungs",
        use_case="bbc_news",
        snapshot="first",
        spec={},
        spec_path="/nowhere/rungs.yaml",
        trainer="tests.model.toy_trainer:ToyTrainer",
        features=None,
        searcher="adaptive_asha",
        metric="val_accuracy",
        smaller_is_better=smaller_is_better,
        max_trials=max_trials,
        max_epochs=9,
        max_restarts=0,
        workers=1,
        seed=0,
    )


def claim(store: ExperimentStore, experiment_id: int, bracket: int = 2):
    def draw(number: int) -> NewTrial:
        return NewTrial(number, {"learning_rate": 0.1}, bracket, f"/nowhere/trial-{number}")

    return store.claim(experiment_id, RUNNER, 30.0, lambda runner: False, draw)


def arrive(store: ExperimentStore, experiment_id: int, number: int, metric: float, runner=RUNNER):
    """Trial `number` reports epoch 3, the first rung (of 3 and 9, divisor 3), as a worker does:
    the epoch, then the rung."""
    store.epoch(experiment_id, number, runner, 3, 1, metric, f"epoch 3: metric {metric}")
    return store.reach_rung(experiment_id, number, runner, 3, metric, 3.0)


def states(store: ExperimentStore, experiment_id: int) -> list[str]:
    return [t.state for t in store.trials(experiment_id)]


def test_a_rung_promotes_the_best_third_of_its_arrivals_even_a_paused_one(stack):
    store = ExperimentStore(stack)
    exp = experiment(store, max_trials=4)
    # Rungs at 3 and 9 epochs, divisor 3: nobody goes on until three trials reach epoch 3.
    for number, metric in ((0, 0.5), (1, 0.9)):
        got = claim(store, exp)
        assert (got.kind, got.trial.number, got.resumed) == ("run", number, False)
        assert arrive(store, exp, number, metric) is False
    assert states(store, exp) == ["paused", "paused"]
    # The third arrival is worse than trial 1: trial 1, paused, is promoted; trial 2 pauses.
    assert claim(store, exp).trial.number == 2
    assert arrive(store, exp, 2, 0.7) is False
    assert states(store, exp) == ["paused", "running", "paused"]
    resumed = claim(store, exp)  # the promoted trial comes before a new one
    assert (resumed.trial.number, resumed.resumed, resumed.trial.restarts) == (1, True, 0)
    assert resumed.trial.runner == RUNNER
    # A rung is reached once: a trial resumed after it is not asked again.
    assert arrive(store, exp, 1, 0.9, runner="another/2/2") is None  # not its runner
    store.end_trial(exp, 1, RUNNER, "completed", 0.95, None, "completed after epoch 9")

    # The fourth and last trial is the best at the rung: among the best floor(4/3) = 1, not
    # promoted yet, it goes on too (promoted ones stay promoted, as in Determined and the ASHA
    # paper). Trial 0 and 2 stay paused; nothing runs and nothing may start: the end.
    assert claim(store, exp).trial.number == 3
    assert arrive(store, exp, 3, 0.99) is True
    store.end_trial(exp, 3, RUNNER, "completed", 0.93, None, "completed after epoch 9")
    done = claim(store, exp)
    assert done.kind == "done" and sorted(n for n, _ in done.pruned) == [0, 2]
    assert states(store, exp) == ["pruned", "completed", "pruned", "completed"]
    logs = store.logs(exp)
    assert "promoted: trial 2 reached the rung" in logs[1]
    assert "not promoted before the search ended" in logs[2]
    ended = store.finish(exp)
    assert (ended.state, ended.best_trial, ended.best_metric) == ("completed", 1, 0.95)
    with stack.connect() as conn:
        finished = [
            e.payload["trial"]
            for e in events.recent(conn, 50, [events.TRIAL_FINISHED])
            if e.payload["experiment"] == exp
        ]
    assert sorted(finished) == [0, 1, 2, 3]


def test_a_bracket_whose_trials_all_paused_finishes_its_best(stack):
    store = ExperimentStore(stack)
    exp = experiment(store, max_trials=2, smaller_is_better=True)
    for number, loss in ((0, 0.4), (1, 0.2)):
        assert claim(store, exp).trial.number == number
        assert arrive(store, exp, number, loss) is False
    # Two arrivals never promote anyone at divisor 3; with nothing left, the bracket's best
    # paused trial (the smaller loss) goes on to the end instead of the search ending empty.
    last = claim(store, exp)
    assert (last.kind, last.trial.number, last.resumed) == ("run", 1, True)
    assert "promoted: the best of its bracket left" in store.logs(exp)[1]
    store.end_trial(exp, 1, RUNNER, "completed", 0.5, None, "completed after epoch 9")
    done = claim(store, exp)
    assert done.kind == "done" and [n for n, _ in done.pruned] == [0]
    # The best model found may be one ASHA stopped early: trial 1 overfitted (loss 0.2 at
    # epoch 3, 0.5 at the end), so trial 0 at 0.4 after 3 epochs is the experiment's best.
    ended = store.finish(exp)
    assert (ended.best_trial, ended.best_metric) == (0, 0.4)


def test_kill_ends_paused_trials_too(stack):
    store = ExperimentStore(stack)
    exp = experiment(store, max_trials=3)
    claim(store, exp)
    assert arrive(store, exp, 0, 0.5) is False
    claim(store, exp)
    assert store.kill(exp)
    assert store.end_running(exp, "killed", "killed with the experiment") == [0, 1]
    assert states(store, exp) == ["killed", "killed"]
