"""Determined's searchers on Optuna: what to sample, and when to stop a trial early.

Pure functions of a spec, no stack: the local engine (search.py) builds these in every worker.

Sampling: `random`, `single` and the halving searchers draw every hyperparameter at random
(`RandomSampler`), `grid` walks Determined's grid (`GridSampler` over `grid_values`: `count`
evenly spaced values of an int/double/log range, every value of a categorical), trial n taking
point n of the grid as shuffled by the experiment's seed. A random trial's sampler is seeded with
the experiment's seed plus the trial's number, so that workers in other processes draw different
trials and a rerun draws the same ones.

Early stopping: `async_halving` and `adaptive_asha` are asynchronous successive halving (ASHA)
in brackets, as Determined 0.38 plans and runs them (master/pkg/searcher/adaptive_asha.go, asha.go):
- the brackets: `aggressive` one bracket of `max_rungs` rungs; `conservative` every bracket
  (1 ... max_rungs rungs); `standard` the upper half ((max_rungs-1)//2+1 ... max_rungs);
  `bracket_rungs` names them outright; `async_halving` is one bracket of `num_rungs`. max_rungs is
  capped, as Determined does, so that the first rung is at least one unit and the bracket has
  enough trials (log_divisor of max_time and of max_trials, plus one);
- the trials: each bracket gets max_trials in proportion to divisor**(rungs-1)/rungs (about the
  same budget per bracket), the rest to the bracket with most rungs; trial number n runs in the
  n-th bracket of an interleaving of those counts (`Brackets.bracket_of`);
- the rungs of a bracket of r rungs are at max(int(max_time / divisor**(r-1-i)), 1) epochs;
- promotion (`promotions`): a trial that reaches a rung goes on only when it is among the best
  floor(n / divisor) of the n trials of its bracket that reached that rung so far; otherwise it
  pauses, its checkpoint kept, and a later trial's arrival at the rung may promote it (it then
  resumes from that checkpoint). The experiment store applies the rule under the experiment's
  lock (experiment_store.reach_rung); when no trial is left to start or run, each bracket whose
  trials all paused has its best paused trial promoted (so that every bracket yields a trial of
  full length) and the rest are pruned.

Why CDL's own rule rather than Optuna's `SuccessiveHalvingPruner`/`HyperbandPruner`: an Optuna
pruner can only stop a trial, never resume it when later trials turn out worse (which made the
first trials at a rung go on almost always), it has no `standard` mode, takes only whole reduction
factors and first rungs (Determined's divisor is a float; 12 epochs over 3 rungs of divisor 3
start at 1.33), and Hyperband assigns trials to brackets by a hash with its own budget rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import optuna

from pipelines.model.spec import (
    AdaptiveASHASearcher,
    AsyncHalvingSearcher,
    CategoricalHyperparameter,
    ConstHyperparameter,
    DoubleHyperparameter,
    ExperimentSpec,
    GridSearcher,
    IntHyperparameter,
    LogHyperparameter,
    search_space,
)

# Hyperparameters that set the training length (spec.training_budget), not the model.
BUDGET_KEYS = ("epochs",)
_EPSILON = 1e-9  # log(9)/log(3) may come out as 1.9999999999999998


# -- hyperparameters ----------------------------------------------------------------------------


def _primitive(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def grid_values(leaf: Any) -> list[Any]:
    """The values Determined's grid tries for one hyperparameter (master/pkg/searcher/grid.go)."""
    if isinstance(leaf, ConstHyperparameter):
        return [leaf.val]
    if isinstance(leaf, CategoricalHyperparameter):
        return list(leaf.vals)
    count = leaf.count
    if isinstance(leaf, IntHyperparameter):
        count = min(count, leaf.maxval - leaf.minval + 1)
        if count == 1:
            return [int(round((leaf.minval + leaf.maxval) / 2))]
        step = (leaf.maxval - leaf.minval) / (count - 1)
        return [int(round(leaf.minval + i * step)) for i in range(count)]
    if count == 1:
        points = [(leaf.minval + leaf.maxval) / 2]
    else:
        points = [leaf.minval + i * (leaf.maxval - leaf.minval) / (count - 1) for i in range(count)]
    if isinstance(leaf, LogHyperparameter):
        return [leaf.base**p for p in points]
    return points


def grid_size(spec: ExperimentSpec) -> int:
    return math.prod(
        len(grid_values(leaf))
        for name, leaf in search_space(spec).items()
        if name not in BUDGET_KEYS
    )


def _choices(leaf: CategoricalHyperparameter) -> list[Any]:
    """What Optuna is asked to choose from: the values, or their indexes when some value is not
    a plain one (Determined allows lists and mappings; Optuna does not)."""
    vals = list(leaf.vals)
    return vals if all(_primitive(v) for v in vals) else list(range(len(vals)))


def suggest(trial: optuna.Trial, spec: ExperimentSpec) -> dict[str, Any]:
    """A trial's hyperparameters by dotted name, budget keys left out, drawn by the study's
    sampler."""
    chosen: dict[str, Any] = {}
    for name, leaf in search_space(spec).items():
        if name in BUDGET_KEYS:
            continue
        if isinstance(leaf, ConstHyperparameter):
            chosen[name] = leaf.val
        elif isinstance(leaf, IntHyperparameter):
            chosen[name] = trial.suggest_int(name, leaf.minval, leaf.maxval)
        elif isinstance(leaf, DoubleHyperparameter):
            chosen[name] = trial.suggest_float(name, leaf.minval, leaf.maxval)
        elif isinstance(leaf, LogHyperparameter):
            low, high = leaf.base**leaf.minval, leaf.base**leaf.maxval
            chosen[name] = trial.suggest_float(name, low, high, log=True)
        else:
            picked = trial.suggest_categorical(name, _choices(leaf))
            chosen[name] = picked if all(_primitive(v) for v in leaf.vals) else leaf.vals[picked]
    return chosen


def nested(flat: dict[str, Any]) -> dict[str, Any]:
    """Dotted names as the nested mapping the spec wrote (what a trainer receives)."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def sampler(spec: ExperimentSpec, seed: int, trial_number: int) -> optuna.samplers.BaseSampler:
    """The sampler that draws trial `trial_number` (see the module's docstring)."""
    trial_seed = (seed + trial_number) % 2**32
    if isinstance(spec.searcher, GridSearcher):
        space = {
            name: (
                _choices(leaf) if isinstance(leaf, CategoricalHyperparameter) else grid_values(leaf)
            )
            for name, leaf in search_space(spec).items()
            if name not in BUDGET_KEYS and not isinstance(leaf, ConstHyperparameter)
        }
        # Trial n takes point n of the grid as shuffled by the seed: one seed for every trial.
        return optuna.samplers.GridSampler(space, seed=seed % 2**32)
    return optuna.samplers.RandomSampler(seed=trial_seed)


# -- brackets and rungs -------------------------------------------------------------------------


@dataclass(frozen=True)
class Brackets:
    """An ASHA plan: the rungs of each bracket (most first) and how many trials each runs."""

    max_time: int  # epochs of the longest trial
    divisor: float
    rungs: tuple[int, ...]  # rungs per bracket, most first
    trials: tuple[int, ...]  # max trials per bracket

    def milestones(self, bracket: int) -> list[int]:
        """The epochs at which a trial of bracket index `bracket` meets its rungs."""
        count = self.rungs[bracket]
        return [max(int(self.max_time / self.divisor ** (count - 1 - i)), 1) for i in range(count)]

    def schedule(self) -> list[int]:
        """Bracket index of trial 0, 1, ...: each bracket's share, interleaved evenly."""
        total = sum(self.trials)
        given = [0] * len(self.trials)
        order = []
        for n in range(total):
            behind = [share * (n + 1) / total - given[b] for b, share in enumerate(self.trials)]
            pick = max(range(len(behind)), key=lambda b: (behind[b], -b))
            given[pick] += 1
            order.append(pick)
        return order

    def bracket_of(self, trial_number: int) -> int:
        order = self.schedule()
        return order[trial_number % len(order)]

    def rung_of(self, bracket: int, epochs: int) -> int:
        """How many rungs of `bracket` a trial has reached after `epochs` epochs."""
        return sum(1 for m in self.milestones(bracket) if m <= epochs)


def bracket_rungs(spec: ExperimentSpec, max_time: int) -> list[int] | None:
    """The rungs of each bracket, most first; None for searchers that stop no trial early."""
    searcher = spec.searcher
    if isinstance(searcher, AsyncHalvingSearcher):
        return [searcher.num_rungs]
    if not isinstance(searcher, AdaptiveASHASearcher):
        return None
    if searcher.bracket_rungs:
        return sorted(searcher.bracket_rungs, reverse=True)
    divisor = searcher.divisor
    max_rungs = min(
        searcher.max_rungs,
        int(math.log(max_time) / math.log(divisor) + _EPSILON) + 1,
        int(math.log(searcher.max_trials) / math.log(divisor) + _EPSILON) + 1,
    )
    if searcher.mode == "aggressive":
        brackets = [max_rungs]
    elif searcher.mode == "conservative":
        brackets = list(range(1, max_rungs + 1))
    else:  # standard
        brackets = list(range((max_rungs - 1) // 2 + 1, max_rungs + 1))
    return sorted(brackets, reverse=True)


def bracket_trials(max_trials: int, divisor: float, rungs: list[int]) -> list[int]:
    """Determined's getBracketMaxTrials: about the same budget per bracket."""
    weights = [divisor ** (r - 1) / r for r in rungs]
    total = sum(weights)
    trials = [max(int(w / total * max_trials), 1) for w in weights]
    trials[0] += max(max_trials - sum(trials), 0)
    return trials


def brackets(spec: ExperimentSpec, max_time: int, max_trials: int) -> Brackets:
    """The experiment's ASHA plan; searchers that stop no trial early get one bracket of one
    rung (the full length)."""
    rungs = bracket_rungs(spec, max_time)
    if rungs is None:
        return Brackets(max_time, 2.0, (1,), (max_trials,))
    divisor = spec.searcher.divisor
    return Brackets(
        max_time, divisor, tuple(rungs), tuple(bracket_trials(max_trials, divisor, rungs))
    )


def promotions(rung: list[tuple[int, float, bool]], divisor: float, maximize: bool) -> list[int]:
    """Determined's promotion rule at one rung of one bracket: of the n trials that reached it,
    as (trial number, metric, promoted already), the best floor(n / divisor) go on to the next
    rung. Returns those of them not promoted yet, best first (none while n < divisor)."""
    ranked = sorted(rung, key=lambda entry: (-entry[1] if maximize else entry[1], entry[0]))
    keep = int(len(ranked) / divisor + _EPSILON)
    return [number for number, _, promoted in ranked[:keep] if not promoted]


def direction(spec: ExperimentSpec) -> str:
    return "minimize" if spec.searcher.smaller_is_better else "maximize"
