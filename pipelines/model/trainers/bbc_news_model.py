"""The served BBC news model: Porter-stemmed token counts into an MLP, as an MLflow pyfunc model.

This file is the model's code in every artifact the BBC trainer saves (MLflow models-from-code):
MLflow copies it into the model folder and runs it at load time, so it imports nothing from CDL,
only numpy, pandas, torch, nltk and mlflow. The vocabulary, the label set and the network's shape
come from the artifact's `preprocessing.json`, the weights from `weights.pt`: nothing is rebuilt
from the working directory. The trainer imports the same tokenizer and network from here, so
training and serving cannot drift apart.

Input and output follow the CDL model contract (pipelines/model/registry.py): a DataFrame with a
`text` column (title line, newline, body) in; a `label` and a `score` (softmax probability of the
label) per row out.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from nltk.stem import PorterStemmer
from torch import nn

WORD = re.compile(r"[a-z]+")


class Stems:
    """Porter stems of a text's words (lowercase letters, two or more), cached per word: an
    article repeats most of its words, and the stemmer is slow next to a dict look-up."""

    def __init__(self):
        self.porter = PorterStemmer()
        self.cache: dict[str, str] = {}

    def __call__(self, text: str) -> list[str]:
        out = []
        for word in WORD.findall(text.lower()):
            if len(word) < 2:
                continue
            stem = self.cache.get(word)
            if stem is None:
                stem = self.cache[word] = self.porter.stem(word)
            out.append(stem)
        return out


def counts(documents: list[list[str]], index: dict[str, int]) -> np.ndarray:
    """(documents, vocabulary) counts of each stem of the vocabulary; other stems are dropped."""
    rows = np.zeros((len(documents), len(index)), dtype=np.float32)
    for row, stems in enumerate(documents):
        ids = [index[s] for s in stems if s in index]
        if ids:
            rows[row] = np.bincount(ids, minlength=len(index))
    return rows


class Log1p(nn.Module):
    """Counts to log(1 + count): long articles do not swamp short ones."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log1p(x)


def network(inputs: int, hidden: int, classes: int, dropout: float) -> nn.Sequential:
    """The MLP: two hidden layers (`hidden`, then a quarter of it), each Linear, LayerNorm,
    GELU, Dropout; logits out."""
    second = max(16, hidden // 4)
    return nn.Sequential(
        Log1p(),
        nn.Linear(inputs, hidden),
        nn.LayerNorm(hidden),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, second),
        nn.LayerNorm(second),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(second, classes),
    )


def texts_of(model_input) -> list[str]:
    if isinstance(model_input, pd.DataFrame):
        if "text" not in model_input.columns:
            raise ValueError(
                f"expected a DataFrame with a 'text' column, got columns {list(model_input)}"
            )
        return [str(t) for t in model_input["text"]]
    if isinstance(model_input, (list, tuple, np.ndarray, pd.Series)):
        return [str(t) for t in model_input]
    raise ValueError(f"expected a DataFrame with a 'text' column, got {type(model_input)}")


class BBCNewsModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        meta = json.loads(Path(context.artifacts["preprocessing"]).read_text())
        self.labels = meta["labels"]
        self.index = {stem: i for i, stem in enumerate(meta["vocabulary"])}
        self.stems = Stems()
        self.net = network(**meta["network"])
        self.net.load_state_dict(torch.load(context.artifacts["weights"], weights_only=True))
        self.net.eval()

    def predict(self, context, model_input: pd.DataFrame, params=None):
        texts = texts_of(model_input)
        x = torch.from_numpy(counts([self.stems(t) for t in texts], self.index))
        with torch.no_grad():
            probabilities = torch.softmax(self.net(x), dim=1).numpy()
        best = probabilities.argmax(axis=1)
        return pd.DataFrame(
            {
                "label": [self.labels[i] for i in best],
                "score": probabilities[np.arange(len(best)), best].astype(float),
            }
        )


mlflow.models.set_model(BBCNewsModel())
