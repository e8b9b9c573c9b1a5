"""The trainers, really training: BBC news (Lightning) on a generated BBC-like corpus, Fashion-MNIST
(Keras) on a few thousand real images from the Debian files (tests/model/keras_cases.py, run in a
process of its own). Each learns, stops when the searcher says so, resumes from its checkpoint
where it stopped, trains data-parallel, fails clearly when the loss diverges, and saves a model
that a fresh process (no CDL on its path) loads and scores raw inputs with, per the model
contract."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.core.errors import Invalid, NotFound
from pipelines.data import bbc
from pipelines.model.registry import RegisteredModel
from pipelines.model.trainer import LabeledFile, Resources, split_validation
from pipelines.plugins import trainer_class
from tests.conftest import REPO
from tests.model.trainer_checks import Reports, serve_in_fresh_process

torch.set_num_threads(1)

BBC_HPARAMS = {"hidden": 64, "dropout": 0.2, "batch_size": 32}
KERAS_CASES = Path(__file__).with_name("keras_cases.py")


@pytest.fixture(scope="module")
def bbc_files(tmp_path_factory) -> list[LabeledFile]:
    corpus = tmp_path_factory.mktemp("bbc") / "corpus"
    bbc.generate(corpus, docs=300, seed=5, dirty=False)
    return [
        LabeledFile(
            f"bbc-validate@c0ffee:/valid/{p.parent.name}/{p.name}", p.parent.name, p.read_bytes()
        )
        for p in sorted(corpus.glob("*/*.txt"))
    ]


@pytest.fixture(scope="module")
def bbc_features(bbc_files):
    return trainer_class("bbc_news").featurize(bbc_files, seed=3, val_fraction=0.2)


# -- the port's shared parts -------------------------------------------------------------------


def test_hyperparameters_defaults_and_refusals():
    bbc_trainer = trainer_class("bbc_news")
    assert bbc_trainer.hyperparameters({"hidden": 128.0}) == {
        "learning_rate": 1e-3,
        "hidden": 128,
        "dropout": 0.3,
        "vocabulary": 5000,
        "batch_size": 32,
        "weight_decay": 0.0,
    }
    with pytest.raises(Invalid, match="no hyperparameter.*hiden.*use learning_rate, hidden"):
        bbc_trainer.hyperparameters({"hiden": 64})
    with pytest.raises(Invalid, match="dropout=1.5 is out of range.*in \\[0, 1\\)"):
        bbc_trainer.hyperparameters({"dropout": 1.5})
    with pytest.raises(Invalid, match="hidden=64.5 is not an integer"):
        bbc_trainer.hyperparameters({"hidden": 64.5})
    with pytest.raises(Invalid, match="no hyperparameter.*dropout"):
        trainer_class("fashion_mnist").hyperparameters({"dropout": 0.1})
    with pytest.raises(NotFound, match="no trainer for use case 'iris'"):
        trainer_class("iris")


def test_an_epoch_counted_in_batches_of_the_global_batch(bbc_features):
    bbc_trainer = trainer_class("bbc_news")
    train = len(bbc_features.y_train)  # 240
    assert bbc_trainer.batches_per_epoch(bbc_features, {"batch_size": 64}) == -(-train // 64)
    assert bbc_trainer.batches_per_epoch(bbc_features, {}) == -(-train // 32)  # the default
    with pytest.raises(Invalid, match="batch_size=0 is out of range"):
        bbc_trainer.batches_per_epoch(bbc_features, {"batch_size": 0})


def test_validation_carve_is_seeded_and_stratified(bbc_files):
    train, val, record = split_validation(bbc_files, seed=3, fraction=0.2)
    again = split_validation(list(reversed(bbc_files)), seed=3, fraction=0.2)
    assert [f.source for f in again[1]] == [f.source for f in val]  # input order is irrelevant
    other = split_validation(bbc_files, seed=4, fraction=0.2)
    assert {f.source for f in other[1]} != {f.source for f in val}
    assert record["val_sources"] == sorted(f.source for f in val)
    assert (record["train"], record["val"]) == (len(train), len(val)) == (240, 60)
    for label in bbc.CLASSES:
        in_class = [f for f in bbc_files if f.label == label]
        assert sum(f.label == label for f in val) == round(0.2 * len(in_class))


# -- BBC news (Lightning) ----------------------------------------------------------------------


def test_bbc_learns_and_its_saved_model_serves_raw_text(bbc_features, bbc_files, tmp_path):
    features = bbc_features
    vocabulary = features.preprocessing["vocabulary"]
    assert len(vocabulary) == features.x_train.shape[1] and "market" in vocabulary
    assert "compani" in vocabulary  # Porter stems: company, companies -> compani
    trainer = trainer_class("bbc_news")(BBC_HPARAMS, features, Resources(threads=1), seed=1)
    reports = Reports()
    assert trainer.fit(4, tmp_path / "checkpoints", reports) == 4
    assert reports.epochs == [1, 2, 3, 4]
    assert set(reports.seen[0][1]) == {"loss", "val_loss", "val_accuracy", "epoch_seconds"}
    assert reports.last("val_accuracy") >= 0.9, reports.seen
    assert reports.seen[-1][1]["loss"] < reports.seen[0][1]["loss"]

    trainer.save_model(tmp_path / "model")
    trainer.net.eval()
    with torch.no_grad():
        expected = trainer.net(torch.from_numpy(features.x_val.astype(np.float32))).argmax(1)
    _, val, _ = split_validation(bbc_files, seed=3, fraction=0.2)  # the rows of x_val, in order
    texts_file = tmp_path / "texts.json"
    texts_file.write_text(json.dumps([f.data.decode() for f in val]))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    served = serve_in_fresh_process(tmp_path / "model", "text", texts_file, elsewhere)
    assert list(served.columns) == ["label", "score"] and len(served) == len(val)
    assert served["score"].between(0, 1).all()
    assert np.mean(served["label"] == [f.label for f in val]) >= 0.9
    # The same answers as the network in training, from raw text: the artifact's own
    # vocabulary and stemmer rebuild exactly the training features.
    assert list(served["label"]) == [features.labels[i] for i in expected.tolist()]
    # What tracking logs: the validation predictions (confusion matrix) and the parameter count.
    truth, predicted = trainer.validation_predictions()
    assert truth.tolist() == features.y_val.tolist() and predicted.tolist() == expected.tolist()
    n = trainer.inputs  # Linear+LayerNorm (64), Linear+LayerNorm (16), Linear (5 classes)
    assert trainer.parameter_count() == (n * 64 + 64) + 128 + (64 * 16 + 16) + 32 + (16 * 5 + 5)

    import mlflow

    loaded = RegisteredModel("bbc-news", "1", mlflow.pyfunc.load_model(str(tmp_path / "model")))
    answers = loaded.predict("text", [f.data for f in val[:5]])  # the registry's own call
    assert [label for label, _ in answers] == list(served["label"][:5])
    assert [s for _, s in answers] == pytest.approx(list(served["score"][:5]), abs=1e-6)


def test_bbc_stops_when_the_searcher_says_so_and_resumes_where_it_stopped(bbc_features, tmp_path):
    make = trainer_class("bbc_news")
    stopped = Reports(stop_after=2)
    first = make(BBC_HPARAMS, bbc_features, Resources(), seed=1)
    assert first.fit(6, tmp_path / "resumed", stopped) == 2
    assert stopped.epochs == [1, 2]
    assert [p.name for p in (tmp_path / "resumed").glob("epoch-*")] == ["epoch-0002.ckpt"]

    resumed = Reports()
    again = make(BBC_HPARAMS, bbc_features, Resources(), seed=1)  # a new process would do this
    assert again.fit(4, tmp_path / "resumed", resumed) == 4
    assert resumed.epochs == [3, 4]  # not from scratch

    unbroken = Reports()
    straight = make(BBC_HPARAMS, bbc_features, Resources(), seed=1)
    assert straight.fit(4, tmp_path / "unbroken", unbroken) == 4
    # Restored weights, optimizer and epoch: the resumed run is the unbroken run.
    for epoch in (3, 4):
        got, want = resumed.seen[epoch - 3][1], unbroken.seen[epoch - 1][1]
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    for name, tensor in straight.net.state_dict().items():
        assert torch.allclose(tensor, again.net.state_dict()[name], atol=1e-6), name

    done = make(BBC_HPARAMS, bbc_features, Resources(), seed=1)  # nothing left to do: weights
    assert done.fit(4, tmp_path / "resumed", Reports()) == 4  # come from the checkpoint
    for name, tensor in straight.net.state_dict().items():
        assert torch.allclose(tensor, done.net.state_dict()[name], atol=1e-6), name


def test_bbc_trains_data_parallel_on_two_processes(bbc_features, tmp_path):
    trainer = trainer_class("bbc_news")(BBC_HPARAMS, bbc_features, Resources(slots=2), seed=1)
    reports = Reports()
    assert trainer.fit(2, tmp_path / "checkpoints", reports) == 2
    assert reports.epochs == [1, 2]  # only rank 0 reports
    assert reports.last("val_accuracy") >= 0.6
    assert (tmp_path / "checkpoints" / "epoch-0002.ckpt").is_file()
    trainer.save_model(tmp_path / "model")

    import mlflow

    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    answer = model.predict(pd.DataFrame({"text": ["Market shares profit\n\nThe bank said"]}))
    assert list(answer["label"]) == ["business"]

    again = Reports(stop_after=3)  # a second data-parallel fit in the same process resumes
    resumed = trainer_class("bbc_news")(BBC_HPARAMS, bbc_features, Resources(slots=2), seed=1)
    assert resumed.fit(5, tmp_path / "checkpoints", again) == 3
    assert again.epochs == [3]


def test_bbc_divergence_fails_the_trial(bbc_features, tmp_path):
    with pytest.raises(Invalid, match="bbc_news has no hyperparameter\\(s\\) layers"):
        trainer_class("bbc_news")({"layers": 3}, bbc_features, Resources())
    trainer = trainer_class("bbc_news")(
        {**BBC_HPARAMS, "learning_rate": 1e10}, bbc_features, Resources(), seed=1
    )
    with pytest.raises(Invalid, match="training diverged in epoch 1: loss=nan.*learning_rate"):
        trainer.fit(3, tmp_path / "checkpoints", Reports())
    assert not list((tmp_path / "checkpoints").glob("epoch-*"))  # no NaN checkpoint


# -- Fashion-MNIST (Keras) ---------------------------------------------------------------------


def test_fashion_in_a_tensorflow_only_process():
    """tests/model/keras_cases.py, in a pytest of its own: TensorFlow without torch."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", str(KERAS_CASES), "-q", "-p", "no:cacheprovider"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert "5 passed" in run.stdout, run.stdout[-3000:]
