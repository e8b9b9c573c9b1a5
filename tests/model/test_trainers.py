"""The trainers, really training: BBC news (Lightning) on a generated BBC-like corpus, Fashion-MNIST
(Keras) on a few thousand real images from the Debian files. Each learns, stops when the searcher
says so, resumes from its checkpoint where it stopped, trains data-parallel, fails clearly when
the loss diverges, and saves a model that a fresh process (no CDL on its path) loads and scores
raw inputs with, per the model contract."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.core.errors import Invalid, NotFound
from pipelines.data import bbc, fashion
from pipelines.model.registry import RegisteredModel
from pipelines.model.trainer import LabeledFile, Resources, split_validation
from pipelines.plugins import trainer_class

torch.set_num_threads(1)

BBC_HPARAMS = {"hidden": 64, "dropout": 0.2, "batch_size": 32}


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


@pytest.fixture(scope="module")
def fashion_files() -> list[LabeledFile]:
    images, labels = fashion.arrays(fashion.DEFAULT_SOURCE, "train", limit=3000)
    return [
        LabeledFile(
            f"fashion-validate@c0ffee:/valid/{fashion.CLASSES[label]}/train-{i:05d}.png",
            fashion.CLASSES[label],
            fashion.png_bytes(image.tobytes(), 28, 28),
        )
        for i, (image, label) in enumerate(zip(images, labels, strict=True))
    ]


@pytest.fixture(scope="module")
def fashion_features(fashion_files):
    return trainer_class("fashion_mnist").featurize(fashion_files, seed=3, val_fraction=0.2)


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


def test_fashion_learns_and_its_saved_model_scales_raw_pixels(fashion_features, tmp_path):
    features = fashion_features
    assert features.x_train.dtype == np.uint8 and features.x_train.shape[1:] == (28, 28)
    assert features.preprocessing["shape"] == [28, 28]
    assert len(features.labels) == 10
    trainer = trainer_class("fashion_mnist")(
        {"batch_size": 32}, features, Resources(threads=1), seed=1
    )
    reports = Reports()
    assert trainer.fit(3, tmp_path / "checkpoints", reports) == 3
    assert reports.epochs == [1, 2, 3]
    assert set(reports.seen[0][1]) == {"loss", "val_loss", "val_accuracy", "epoch_seconds"}
    assert reports.last("val_accuracy") >= 0.7, reports.seen

    trainer.save_model(tmp_path / "model")
    expected = trainer.model.predict(features.x_val.astype(np.float32), verbose=0).argmax(1)
    np.save(tmp_path / "images.npy", features.x_val)  # raw uint8 pixels, as served
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    served = serve_in_fresh_process(tmp_path / "model", "image", tmp_path / "images.npy", elsewhere)
    assert list(served.columns) == ["label", "score"] and len(served) == len(features.x_val)
    assert list(served["label"]) == [features.labels[i] for i in expected]
    truth, predicted = trainer.validation_predictions()
    assert truth.tolist() == features.y_val.tolist() and predicted.tolist() == expected.tolist()
    assert trainer.parameter_count() == (28 * 28 * 128 + 128) + (128 * 10 + 10)
    assert np.mean(served["label"] == [features.labels[i] for i in features.y_val]) >= 0.7

    import mlflow

    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    with pytest.raises(Exception, match="integer pixels 0..255"):  # pre-scaled input refused
        model.predict(features.x_val[:2].astype(np.float32) / 255)
    with pytest.raises(Exception, match="shape \\(N, 28, 28\\)"):
        model.predict(np.zeros((2, 32, 32), dtype=np.uint8))
    pngs = [fashion.png_bytes(image.tobytes(), 28, 28) for image in features.x_val[:4]]
    answers = RegisteredModel("fashion-mnist", "1", model).predict("image", pngs)
    assert [label for label, _ in answers] == list(served["label"][:4])


def test_fashion_stops_resumes_and_fails_on_divergence(fashion_features, tmp_path):
    make = trainer_class("fashion_mnist")
    stopped = Reports(stop_after=1)
    assert make({}, fashion_features, Resources(), seed=2).fit(5, tmp_path / "ck", stopped) == 1
    assert stopped.epochs == [1]
    resumed = Reports()
    again = make({}, fashion_features, Resources(), seed=2)
    assert again.fit(2, tmp_path / "ck", resumed) == 2
    assert resumed.epochs == [2]
    unbroken = Reports()
    straight = make({}, fashion_features, Resources(), seed=2)
    assert straight.fit(2, tmp_path / "straight", unbroken) == 2
    assert resumed.seen[0][1]["val_loss"] == pytest.approx(
        unbroken.seen[1][1]["val_loss"], rel=1e-4
    )
    for got, want in zip(again.model.get_weights(), straight.model.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)

    diverging = make({"learning_rate": 1e20}, fashion_features, Resources(), seed=2)
    with pytest.raises(Invalid, match="training diverged in epoch 1: loss=nan"):
        diverging.fit(2, tmp_path / "nan", Reports())


# Run in a process of its own, as a Fashion-MNIST worker runs: TensorFlow only (this test
# process has torch loaded too, and TensorFlow's MirroredStrategy there crashed it now and then).
MIRRORED = """
import json, sys
from pathlib import Path
import tensorflow as tf
from pipelines.model.trainer import Features, Resources
from pipelines.plugins import trainer_class

folder = Path(sys.argv[1])
features = Features.load(folder / "features")
trainer = trainer_class("fashion_mnist")({}, features, Resources(slots=2), seed=1)
assert isinstance(trainer.strategy, tf.distribute.MirroredStrategy)
seen = []
report = lambda epoch, metrics: seen.append((epoch, dict(metrics))) or True
done = trainer.fit(1, folder / "checkpoints", report)
trainer.save_model(folder / "model")
print(json.dumps({"done": done, "reports": seen}))
"""


def test_fashion_trains_under_mirrored_strategy(fashion_features, tmp_path):
    fashion_features.save(tmp_path / "features")
    run = subprocess.run(
        [sys.executable, "-c", MIRRORED, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["done"] == 1 and [epoch for epoch, _ in result["reports"]] == [1]
    assert result["reports"][-1][1]["val_accuracy"] >= 0.5
    assert (tmp_path / "model" / "MLmodel").is_file()
