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

Trainers are registered per use case in the plugin table (pipelines/plugins.py, concern
`trainer`) and run unchanged inside a Determined trial: this module and the trainers import
nothing that needs the stack.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import numpy as np

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


@dataclass(frozen=True)
class Resources:
    """What one trial may use: CPU threads, and data-parallel processes (slots_per_trial),
    each on a GPU when GPUs exist."""

    threads: int = 1
    slots: int = 1
    gpus: int = 0


class Trainer(ABC):
    use_case: ClassVar[str]  # e.g. bbc_news
    task: ClassVar[str]  # text | image: the model contract's input (registry.py)
    PREPROCESSING_VERSION: ClassVar[str]  # change it whenever featurize changes its output

    @classmethod
    @abstractmethod
    def featurize(cls, files: list[LabeledFile], seed: int, val_fraction: float) -> Features:
        """The train split's features, with a validation split carved out of it (seeded)."""

    @abstractmethod
    def __init__(self, hparams: Mapping[str, Any], features: Features, resources: Resources):
        """A model built from one trial's hyperparameters."""

    @abstractmethod
    def fit(self, max_epochs: int, checkpoints: Path, report: EpochReport) -> int:
        """Train until `max_epochs` epochs are done or `report` says stop, resuming after the
        last epoch checkpointed in `checkpoints` if any; return the number of epochs done."""

    @abstractmethod
    def save_model(self, folder: Path) -> None:
        """The trained model and its preprocessing as an MLflow pyfunc model in `folder`."""
