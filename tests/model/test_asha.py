"""Determined's searchers on Optuna, without a stack: brackets, rungs and trial allocation as
Determined 0.38 plans them, the promotion rule, and the grid."""

import optuna
import pytest

from pipelines.model import asha
from pipelines.model.spec import parse_experiment, search_space

optuna.logging.set_verbosity(optuna.logging.WARNING)


def spec_of(searcher: dict, hyperparameters: dict | None = None):
    return parse_experiment(
        {
            "entrypoint": "python3 train.py",
            "hyperparameters": hyperparameters
            or {"learning_rate": {"type": "double", "minval": 0.0, "maxval": 1.0}},
            "searcher": {"metric": "val_accuracy", "smaller_is_better": False, **searcher},
        }
    )


def asha_spec(
    mode: str = "standard",
    max_rungs: int = 5,
    max_time: int = 81,
    max_trials: int = 100,
    divisor: float = 3,
    **more,
):
    return spec_of(
        {
            "name": "adaptive_asha",
            "mode": mode,
            "max_rungs": max_rungs,
            "max_time": max_time,
            "time_metric": "epochs",
            "max_trials": max_trials,
            "divisor": divisor,
            **more,
        }
    )


def test_the_three_modes_pick_determineds_brackets():
    assert asha.bracket_rungs(asha_spec("aggressive"), 81) == [5]
    assert asha.bracket_rungs(asha_spec("standard"), 81) == [5, 4, 3]
    assert asha.bracket_rungs(asha_spec("conservative"), 81) == [5, 4, 3, 2, 1]
    assert asha.bracket_rungs(asha_spec("standard", max_rungs=4), 81) == [4, 3, 2]
    assert asha.bracket_rungs(asha_spec("standard", bracket_rungs=[2, 4]), 81) == [4, 2]
    # Capped as Determined caps max_rungs: by max_time (9 epochs: 3 rungs of 1, 3, 9) and by
    # max_trials (8 trials: log3(8) + 1 = 2 rungs).
    assert asha.bracket_rungs(asha_spec("aggressive", max_time=9), 9) == [3]
    assert asha.bracket_rungs(asha_spec("conservative", max_trials=8), 81) == [2, 1]
    async_halving = spec_of(
        {
            "name": "async_halving",
            "num_rungs": 3,
            "max_time": 12,
            "time_metric": "epochs",
            "max_trials": 9,
        }
    )
    assert asha.bracket_rungs(async_halving, 12) == [3]
    assert asha.bracket_rungs(spec_of({"name": "random", "max_trials": 4}), 12) is None


def test_rungs_and_trials_per_bracket():
    plan = asha.brackets(asha_spec("standard", max_rungs=3, max_time=12, max_trials=16), 12, 16)
    assert plan.rungs == (3, 2)
    # Rungs at max_time / divisor**k, floored as Determined does (12 / 9 = 1.33 -> 1).
    assert plan.milestones(0) == [1, 4, 12]
    assert plan.milestones(1) == [4, 12]
    # Trials in proportion to divisor**(rungs-1)/rungs (3 : 1.5), the rest to the first.
    assert plan.trials == (11, 5)
    order = plan.schedule()
    assert len(order) == 16 and order.count(0) == 11 and order.count(1) == 5
    # Interleaved: every bracket starts early, not after the other's trials.
    assert 1 in order[:4]
    assert [plan.rung_of(0, e) for e in (0, 1, 3, 4, 11, 12)] == [0, 1, 1, 2, 2, 3]
    conservative = asha.brackets(
        asha_spec("conservative", max_rungs=3, max_time=9, max_trials=30), 9, 30
    )
    assert conservative.rungs == (3, 2, 1)
    assert [conservative.milestones(b) for b in range(3)] == [[1, 3, 9], [3, 9], [9]]
    assert sum(conservative.trials) == 30
    # A float divisor, which Optuna's pruners cannot take.
    half = asha.brackets(
        asha_spec("aggressive", max_rungs=3, max_time=10, divisor=2.5, max_trials=10), 10, 10
    )
    assert half.milestones(0) == [1, 4, 10]


def test_promotion_follows_determined():
    maximize = True
    # While fewer than `divisor` trials reached the rung, none goes on: they wait.
    assert asha.promotions([(0, 0.9, False)], 3, maximize) == []
    assert asha.promotions([(0, 0.9, False), (1, 0.5, False)], 3, maximize) == []
    # The third arrival promotes the best of the three, whichever arrived first.
    three = [(0, 0.5, False), (1, 0.9, False), (2, 0.7, False)]
    assert asha.promotions(three, 3, maximize) == [1]
    # One promoted stays promoted; at six arrivals the next best goes too, even an early one.
    six = [(0, 0.8, False), (1, 0.9, True), (2, 0.7, False), (3, 0.1, False), (4, 0.2, False)]
    assert asha.promotions([*six, (5, 0.3, False)], 3, maximize) == [0]
    # Smaller is better; a float divisor keeps floor(n / divisor); ties go to the earlier trial.
    assert asha.promotions([(0, 0.3, False), (1, 0.1, False), (2, 0.2, False)], 1.5, False) == [
        1,
        2,
    ]
    assert asha.promotions([(4, 0.5, False), (2, 0.5, False), (9, 0.1, False)], 3, True) == [2]


def test_grid_values_follow_determined():
    spec = spec_of(
        {"name": "grid"},
        {
            "layers": {"type": "int", "minval": 1, "maxval": 10, "count": 4},
            "small": {"type": "int", "minval": 1, "maxval": 2, "count": 5},
            "dropout": {"type": "double", "minval": 0.0, "maxval": 0.5, "count": 3},
            "lr": {"type": "log", "base": 10, "minval": -3, "maxval": -1, "count": 3},
            "middle": {"type": "double", "minval": 0.0, "maxval": 1.0, "count": 1},
            "act": {"type": "categorical", "vals": ["relu", "tanh"]},
            "shape": {"type": "categorical", "vals": [[1, 2], [3]]},
            "epochs": 2,
        },
    )
    space = {name: asha.grid_values(leaf) for name, leaf in search_space(spec).items()}
    assert space["layers"] == [1, 4, 7, 10]
    assert space["small"] == [1, 2]
    assert space["dropout"] == [0.0, 0.25, 0.5]
    assert space["lr"] == pytest.approx([0.001, 0.01, 0.1])
    assert space["middle"] == [0.5]
    assert asha.grid_size(spec) == 4 * 2 * 3 * 3 * 1 * 2 * 2  # epochs is the budget, not a point
    # The grid sampler walks every point once, lists included (Optuna takes their indexes).
    study = optuna.create_study()
    seen = set()
    for number in range(asha.grid_size(spec)):
        study.sampler = asha.sampler(spec, 7, number)
        trial = study.ask()
        values = asha.suggest(trial, spec)
        assert "epochs" not in values
        seen.add(repr(sorted(values.items())))
        study.sampler = optuna.samplers.RandomSampler()  # as the engine tells (search.py)
        study.tell(trial, 0.0)
    assert len(seen) == asha.grid_size(spec)
    assert any("[1, 2]" in point for point in seen) and any("[3]" in point for point in seen)


def test_random_draws_differ_per_trial_and_repeat_per_seed():
    spec = asha_spec("standard", max_rungs=3, max_time=9, max_trials=8)

    def draws(seed):
        study = optuna.create_study(direction="maximize")
        found = []
        for number in range(4):
            study.sampler = asha.sampler(spec, seed, number)
            trial = study.ask()
            found.append(asha.suggest(trial, spec)["learning_rate"])
            study.tell(trial, 0.0)
        return found

    first = draws(11)
    assert len(set(first)) == 4 and draws(11) == first and draws(12) != first
    assert asha.nested({"a.b": 1, "a.c": 2, "d": 3}) == {"a": {"b": 1, "c": 2}, "d": 3}
