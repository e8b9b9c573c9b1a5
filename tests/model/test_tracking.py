"""The pieces of trial tracking that need no stack: provenance, the epoch log, the pictures.
(What a real search logs is checked in test_search.py.)"""

from __future__ import annotations

import io
import subprocess
import threading
from pathlib import Path

import pytest
from PIL import Image

from pipelines import __version__
from pipelines.model import plots, provenance, tracking


def test_code_version_of_a_checkout_and_outside_one(tmp_path):
    outside = provenance.code_version(tmp_path)
    assert outside == provenance.CodeVersion("unknown", None)
    tags = provenance.tags(outside, {"cdl": __version__}, [])
    assert tags["cdl.git_sha"] == tags["cdl.git_dirty"] == "unknown"
    assert "mlflow.source.git.commit" not in tags  # MLflow's tag only for a real commit

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "train.py").write_text("print('v1')\n")
    git("add", "train.py")
    git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "v1")
    head = subprocess.run(
        ["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert provenance.code_version(tmp_path / "train.py") == provenance.CodeVersion(head, False)
    (tmp_path / "notes.txt").write_text("untracked files do not count")
    assert provenance.code_version(tmp_path).dirty is False
    (tmp_path / "train.py").write_text("print('v2')\n")
    assert provenance.code_version(tmp_path) == provenance.CodeVersion(head, True)


def test_package_versions_and_data_commits():
    packages = provenance.package_versions()
    assert packages["cdl"] == __version__ and {"mlflow", "numpy", "optuna"} <= set(packages)
    sources = ["news@c2:/b/1.txt", "news@c1:/a/1.txt", "more@c9:/x.txt", "news@c1:/a/2.txt"]
    assert provenance.data_commits(sources) == ["more@c9", "news@c1", "news@c2"]


def test_epoch_log_sends_in_order_off_the_calling_thread_and_reports_errors():
    sent, threads = [], set()

    def send(metrics, epoch):
        threads.add(threading.current_thread().name)
        sent.append((epoch, metrics["loss"]))

    log = tracking.EpochLog(send)
    for epoch in range(1, 6):
        log.put({"loss": 1 / epoch}, epoch)
    log.close()
    assert sent == [(e, 1 / e) for e in range(1, 6)]
    assert threads == {"epoch-log"}

    def failing(metrics, epoch):
        if epoch == 2:
            raise RuntimeError("database gone")
        sent.append((epoch, metrics["loss"]))

    sent.clear()
    log = tracking.EpochLog(failing)
    for epoch in (1, 2, 3):
        log.put({"loss": 0.5}, epoch)
    with pytest.raises(RuntimeError, match="database gone"):
        log.close()
    assert sent == [(1, 0.5)]  # nothing after the error
    with pytest.raises(RuntimeError, match="database gone"):
        log.put({"loss": 0.1}, 4)


def test_pictures_are_pngs():
    curves = plots.learning_curves(
        {"loss": [(2, 0.5), (1, 0.9)], "val_accuracy": [(1, 0.6), (2, 0.8)]}, "a trial"
    )
    matrix = plots.confusion_matrix([0, 1, 2, 2], [0, 2, 2, 2], ["a", "b", "c"], "a trial")
    for png in (curves, matrix):
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG" and image.size[0] >= 400


def test_log_files_skips_half_written_checkpoints(tmp_path):
    class Recorder:
        logged: list[tuple[str, str]] = []

        def log_artifact(self, run_id, path, artifact_path):
            self.logged.append((Path(path).name, artifact_path))

    (tmp_path / "epoch-0003.ckpt").write_bytes(b"x")
    (tmp_path / ".epoch-0004.ckpt.partial").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    recorder = Recorder()
    assert tracking.log_files(recorder, "run", tmp_path, "checkpoint") == ["epoch-0003.ckpt"]
    assert recorder.logged == [("epoch-0003.ckpt", "checkpoint")]
