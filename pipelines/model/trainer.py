"""The trainer port: one use case's model, from labeled files to a registered-model artifact.

A trainer has two halves, kept apart so that the expensive one runs once per snapshot:

- preprocessing (`featurize`): labeled files (the train split of a label snapshot) become
  `Features`: numeric arrays for training and validation, the label set, and what the model needs
  to turn a raw input into its numbers (a vocabulary, a scale). Its result depends only on the
  snapshot and `PREPROCESSING_VERSION`, so the transformation registry (features.py) computes it
  once and every trial and later experiment on that snapshot reuses it. It must read nothing but
  the train split: the validation split is carved out of train, seeded.
- training (`fit`): a model built from one trial's hyperparameters, trained epoch by epoch. After
  each epoch it checkpoints and reports its metrics to the searcher, which may stop it (ASHA
  pruning); a trial started again on the same checkpoint folder resumes after the last epoch
  checkpointed. `save_model` writes the trained model with its preprocessing as an MLflow pyfunc
  model that follows the contract in registry.py: serving and evaluation load it from the
  artifact alone, never from the working directory.

Each trainer declares its hyperparameters (`HYPERPARAMETERS`: name, default, what is valid), so
that an experiment spec can be checked against them before anything runs; `hyperparameters`
fills in the defaults and refuses unknown names. After each epoch the searcher gets `loss`,
`val_loss`, `val_accuracy` and `epoch_seconds`, with `epoch` the number of epochs done (1 after the
first); a loss that is not finite fails the trial (`Invalid`) instead of being reported.

Two optional methods feed tracking (search.py): `parameter_count` (the run's `cdl.parameters` tag,
which the registry reads) and `validation_predictions` (the validation confusion matrix logged as a
PNG). A trainer without them still trains; its runs just lack that tag or picture.

Trainers are registered per use case in the plugin table (pipelines/plugins.py, concern
`trainer`) and run unchanged inside a Determined trial: this module and the trainers import
nothing that needs the stack.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import numpy as np

from pipelines.core.errors import Invalid, Unsupported

# The share of a snapshot's train split carved out for validation, unless an experiment's spec
# says otherwise (data.val_fraction).
DEFAULT_VAL_FRACTION = 0.2

# What the searcher is told after each epoch; False from it stops training (the trial is pruned
# or the experiment was killed).
EpochReport = Callable[[int, Mapping[str, float]], bool]


@dataclass(frozen=True)
class LabeledFile:
    """One labeled file of a snapshot's train split."""

    source: str  # repo@commit:/path
    label: str
    data: bytes


@dataclass
class Features:
    """A snapshot's preprocessed train split: arrays, label set and preprocessing state."""

    labels: list[str]  # class names; y holds indexes into this list
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    preprocessing: dict[str, Any] = field(default_factory=dict)  # JSON: saved with the model
    validation: dict[str, Any] = field(default_factory=dict)  # how val was carved: seed, sources
    # Where the transformation registry (features.py) keeps them: {"key": lineage key, "bytes":
    # stored size}; empty when they come from elsewhere. Runs tag it (cdl.features).
    origin: dict[str, Any] = field(default_factory=dict)

    ARRAYS: ClassVar[tuple[str, ...]] = ("x_train", "y_train", "x_val", "y_val")

    def save(self, folder: Path) -> list[Path]:
        """The features as files in `folder`: `arrays.npz` (compressed) and `meta.json` (labels,
        preprocessing, validation carve), e.g. to travel with a Determined experiment's code.
        Returns the files written."""
        folder.mkdir(parents=True, exist_ok=True)
        arrays, meta = folder / "arrays.npz", folder / "meta.json"
        with open(arrays, "wb") as out:
            np.savez_compressed(out, **{name: getattr(self, name) for name in self.ARRAYS})
        meta.write_text(
            json.dumps(
                {
                    "labels": self.labels,
                    "preprocessing": self.preprocessing,
                    "validation": self.validation,
                },
                sort_keys=True,
            )
        )
        return [arrays, meta]

    @classmethod
    def load(cls, folder: Path) -> Features:
        """Features saved by `save`."""
        try:
            meta = json.loads((folder / "meta.json").read_text())
            with np.load(folder / "arrays.npz", allow_pickle=False) as arrays:
                loaded = {name: arrays[name] for name in cls.ARRAYS}
        except (OSError, ValueError, KeyError) as exc:
            raise Invalid(
                f"no readable features in {folder}: {exc}",
                "save them with Features.save (cdl experiment submit does on Determined)",
            ) from exc
        return cls(
            labels=meta["labels"],
            **loaded,
            preprocessing=meta["preprocessing"],
            validation=meta["validation"],
        )


@dataclass(frozen=True)
class Resources:
    """What one trial may use: CPU threads, and data-parallel processes (slots_per_trial),
    each on a GPU when GPUs exist."""

    threads: int = 1
    slots: int = 1
    gpus: int = 0


@dataclass(frozen=True)
class Hyperparameter:
    """One hyperparameter a trainer takes: its default, its type, and which values are valid."""

    default: int | float
    kind: type  # int or float
    valid: Callable[[float], bool]
    rule: str  # what `valid` accepts, for error messages: "> 0", "in [0, 1)"

    def check(self, name: str, value: Any) -> int | float:
        integral = isinstance(value, (int, float)) and not isinstance(value, bool)
        if integral and self.kind is int and float(value).is_integer():
            value = int(value)
        elif integral and self.kind is float:
            value = float(value)
        else:
            wanted = "an integer" if self.kind is int else "a number"
            raise Invalid(
                f"hyperparameter {name}={value!r} is not {wanted}", f"{name} must be {self.rule}"
            )
        if not self.valid(value):
            raise Invalid(
                f"hyperparameter {name}={value} is out of range", f"{name} must be {self.rule}"
            )
        return value


def split_validation(
    files: list[LabeledFile], seed: int, fraction: float
) -> tuple[list[LabeledFile], list[LabeledFile], dict[str, Any]]:
    """(train, validation, record): a validation split carved out of the train split, stratified
    by label and fixed by `seed` (whatever order the files come in); the record says how, and
    which sources went to validation, so that the carve can be checked and repeated."""
    if not 0 < fraction < 1:
        raise Invalid(f"validation fraction {fraction} is not in (0, 1)", "use e.g. 0.2")
    by_label: dict[str, list[LabeledFile]] = {}
    for item in sorted(files, key=lambda f: f.source):
        by_label.setdefault(item.label, []).append(item)
    rng = np.random.default_rng(seed)
    train: list[LabeledFile] = []
    val: list[LabeledFile] = []
    for label in sorted(by_label):
        group = by_label[label]
        order = rng.permutation(len(group))
        held = round(fraction * len(group)) if len(group) > 1 else 0
        val += [group[i] for i in order[:held]]
        train += [group[i] for i in order[held:]]
    if not train or not val:
        raise Invalid(
            f"{len(files)} labeled file(s) are too few to carve a validation split from",
            "label more files before training",
        )
    record = {
        "seed": seed,
        "fraction": fraction,
        "stratified_by": "label",
        "train": len(train),
        "val": len(val),
        "val_sources": sorted(f.source for f in val),
    }
    return train, val, record


def checkpoint_name(epoch: int, suffix: str) -> str:
    """The checkpoint of the state after `epoch` epochs: epoch-0003.ckpt, epoch-0003.keras."""
    return f"epoch-{epoch:04d}{suffix}"


def last_checkpoint(folder: Path, suffix: str) -> tuple[int, Path | None]:
    """(epochs done, its checkpoint) of the newest checkpoint in `folder`; (0, None) if none.
    Checkpoints are written under another name and renamed, so one that is found is whole."""
    found = []
    for path in folder.glob(f"epoch-*{suffix}"):
        number = path.name.removeprefix("epoch-").removesuffix(suffix)
        if number.isdigit():
            found.append((int(number), path))
    return max(found) if found else (0, None)


def check_finite(epoch: int, metrics: Mapping[str, float]) -> None:
    """Refuse an epoch whose metrics are NaN or infinite: training diverged."""
    bad = sorted(name for name, value in metrics.items() if not np.isfinite(value))
    if bad:
        shown = ", ".join(f"{name}={metrics[name]}" for name in bad)
        raise Invalid(
            f"training diverged in epoch {epoch}: {shown}",
            "lower learning_rate (or the search range of it)",
        )


class Trainer(ABC):
    use_case: ClassVar[str]  # e.g. bbc_news
    task: ClassVar[str]  # text | image: the model contract's input (registry.py)
    PREPROCESSING_VERSION: ClassVar[str]  # change it whenever featurize changes its output
    HYPERPARAMETERS: ClassVar[Mapping[str, Hyperparameter]]

    @classmethod
    def hyperparameters(cls, given: Mapping[str, Any]) -> dict[str, int | float]:
        """`given` checked against HYPERPARAMETERS, with defaults for the missing ones."""
        unknown = sorted(set(given) - set(cls.HYPERPARAMETERS))
        if unknown:
            raise Invalid(
                f"{cls.use_case} has no hyperparameter(s) {', '.join(unknown)}",
                f"use {', '.join(cls.HYPERPARAMETERS)}",
            )
        return {
            name: spec.check(name, given[name]) if name in given else spec.default
            for name, spec in cls.HYPERPARAMETERS.items()
        }

    @classmethod
    @abstractmethod
    def featurize(cls, files: list[LabeledFile], seed: int, val_fraction: float) -> Features:
        """The train split's features, with a validation split carved out of it (seeded)."""

    def __init__(
        self,
        hparams: Mapping[str, Any],
        features: Features,
        resources: Resources,
        seed: int = 0,
    ):
        """A model for one trial's hyperparameters (checked by `hyperparameters`: `Invalid` for
        unknown names or bad values), initialised from `seed`. Subclasses build their network
        after calling this."""
        self.hparams = self.hyperparameters(hparams)
        self.features = features
        self.resources = resources
        self.seed = seed

    @classmethod
    def batches_per_epoch(cls, features: Features, hparams: Mapping[str, Any]) -> int:
        """Batches of `batch_size` (the global batch) in one epoch of the train split: what an
        epoch is worth when an experiment's time metric is `batches`."""
        batch = cls.hyperparameters(hparams).get("batch_size")
        if batch is None:
            raise Unsupported(
                f"{cls.__name__} has no batch_size hyperparameter, so its training cannot be "
                "measured in batches",
                "use time_metric: epochs",
            )
        return math.ceil(len(features.y_train) / batch)

    @abstractmethod
    def fit(self, max_epochs: int, checkpoints: Path, report: EpochReport) -> int:
        """Train until `max_epochs` epochs are done or `report` says stop, resuming after the
        last epoch checkpointed in `checkpoints` if any; return the number of epochs done.
        Each epoch is checkpointed before it is reported. With `resources.slots > 1` training is
        data-parallel and only the first process reports; a non-finite loss raises `Invalid`."""

    @abstractmethod
    def save_model(self, folder: Path) -> None:
        """The trained model and its preprocessing as an MLflow pyfunc model in `folder`."""

    def parameter_count(self) -> int | None:
        """How many parameters the model has (trainable or not); None when unknown."""
        return None

    def validation_predictions(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(true, predicted) class indexes into `features.labels` for each validation example,
        predicted with the current weights (after `fit`); None when the trainer cannot tell."""
        return None
