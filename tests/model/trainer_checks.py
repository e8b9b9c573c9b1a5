"""What the trainer tests share: a searcher's report callback that records and can stop, and
serving a saved model in a fresh interpreter where CDL cannot be imported."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd


class Reports:
    """A searcher's report callback that records what it is told and stops at `stop_after`."""

    def __init__(self, stop_after: int | None = None):
        self.seen: list[tuple[int, dict]] = []
        self.stop_after = stop_after

    def __call__(self, epoch, metrics) -> bool:
        self.seen.append((epoch, dict(metrics)))
        return self.stop_after is None or epoch < self.stop_after

    @property
    def epochs(self) -> list[int]:
        return [epoch for epoch, _ in self.seen]

    def last(self, name: str) -> float:
        return self.seen[-1][1][name]


def serve_in_fresh_process(model: Path, task: str, inputs_file: Path, cwd: Path) -> pd.DataFrame:
    """Load the saved model with mlflow.pyfunc in a new interpreter started elsewhere, where CDL
    cannot be imported, and predict the inputs (a JSON list of texts, or .npy uint8 images)."""
    script = f"""
import json, sys
sys.modules["pipelines"] = None  # CDL cannot be imported (the venv has it installed editable)
import numpy as np, pandas as pd, mlflow
model = mlflow.pyfunc.load_model({str(model)!r})
if {task!r} == "text":
    inputs = pd.DataFrame({{"text": json.load(open({str(inputs_file)!r}))}})
else:
    inputs = np.load({str(inputs_file)!r})
answer = pd.DataFrame(model.predict(inputs))
print(answer.to_json(orient="records"))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return pd.DataFrame(json.loads(run.stdout.strip().splitlines()[-1]))
