"""The pictures a trial leaves in MLflow: its learning curves and its validation confusion matrix.

Drawn on matplotlib `Figure` objects with the Agg canvas (no pyplot, no display, no global state:
workers run on servers and draw from several threads), returned as PNG bytes. Margins are fixed
rather than computed by a layout engine, which would draw each figure twice: a trial waits for
its pictures (bench/tracking_overhead.py).
"""

from __future__ import annotations

import io
from typing import Mapping, Sequence

import numpy as np

LOSSES = ("loss", "val_loss")
ACCURACY = "val_accuracy"
ANNOTATE_UP_TO = 20  # classes; beyond that the cells are too small for their counts


def _png(figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _columns(points: Sequence[tuple[int, float]]) -> tuple[list[int], list[float]]:
    return [epoch for epoch, _ in points], [value for _, value in points]


def learning_curves(history: Mapping[str, Sequence[tuple[int, float]]], title: str) -> bytes:
    """`loss` and `val_loss` (left) and `val_accuracy` (right) against the epoch, from
    {metric: [(epoch, value), ...]}; a metric that is missing is left out."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.6))
    figure.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.84, wspace=0.22)
    losses, accuracy = figure.subplots(1, 2)
    for name in LOSSES:
        points = sorted(history.get(name) or [])
        if points:
            losses.plot(*_columns(points), marker="o", markersize=3, label=name)
    losses.set(title="loss", xlabel="epoch")
    if losses.lines:
        losses.legend()
    points = sorted(history.get(ACCURACY) or [])
    if points:
        accuracy.plot(*_columns(points), marker="o", markersize=3, color="tab:green")
    accuracy.set(title=ACCURACY, xlabel="epoch")
    for axes in (losses, accuracy):
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    figure.suptitle(title)
    return _png(figure)


def confusion_matrix(
    y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str], title: str
) -> bytes:
    """Counts of (true label, predicted label), true in rows, coloured by the row's share."""
    from matplotlib.figure import Figure

    size = len(labels)
    counts = np.zeros((size, size), dtype=np.int64)
    np.add.at(counts, (np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)), 1)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(12.0, 3.6 + 0.4 * size)
    figure = Figure(figsize=(side * 1.1, side))
    figure.subplots_adjust(left=0.2, right=0.97, bottom=0.2, top=0.9)
    axes = figure.subplots()
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, label="share of the true label")
    axes.set_xticks(range(size), labels, rotation=45, ha="right")
    axes.set_yticks(range(size), labels)
    axes.set(xlabel="predicted", ylabel="true")
    if size <= ANNOTATE_UP_TO:
        for row in range(size):
            for column in range(size):
                dark = shares[row, column] > 0.5
                axes.text(
                    column,
                    row,
                    str(counts[row, column]),
                    ha="center",
                    va="center",
                    color="white" if dark else "black",
                    fontsize=8,
                )
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    axes.set_title(f"{title}\nvalidation accuracy {accuracy:.3f} ({counts.sum()} examples)")
    return _png(figure)
