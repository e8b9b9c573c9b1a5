"""Pre-annotations: a model's answers for new files, imported with their tasks as predictions.

A `Predictor` may come from anywhere (the champion model's lives with the model registry, which
depends on data, not the other way round): labeling only calls it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from pipelines.core.errors import Invalid


class Predictor(Protocol):
    def __call__(self, items: list[tuple[str, bytes]]) -> dict[str, dict]:
        """Answers for files given as (path, bytes), by path: {"label", "score", "model"};
        files it has no answer for are left out."""
        ...


def file_predictor(path: Path) -> Predictor:
    """Predictions written by a model elsewhere, as JSON lines: {"path": "/valid/tech/x.txt",
    "label": "tech", "score": 0.93, "model": "bbc-news/3"}, one per file; a line that does not
    parse is an error naming it."""
    found = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise Invalid(
            f"cannot read predictions {path}: {exc}", "give a UTF-8 JSON-lines file"
        ) from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            found[item["path"]] = {
                "label": item["label"],
                "score": item.get("score", 0.0),
                "model": item.get("model", "unknown"),
            }
        except (ValueError, KeyError, TypeError) as exc:
            raise Invalid(
                f"{path} line {number}: not a prediction ({exc})",
                'write {"path": ..., "label": ..., "score": ...} per line',
            ) from exc
    return lambda items: {p: found[p] for p, _ in items if p in found}
