"""The Fashion-MNIST (Keras) trainer, really training on a few thousand real images from the
Debian files: it learns, stops when the searcher says so, resumes where it stopped, fails clearly
when the loss diverges, trains under MirroredStrategy, and saves a model that scales raw pixels
itself; registered, its version carries the Keras model's parameter count and latency.

Not collected by the test run itself: tests/model/test_trainers.py runs this file in a pytest of
its own, a process with TensorFlow and no torch, as a Fashion-MNIST worker runs (TensorFlow beside
torch in one process crashed now and then in a tf_Compute thread, taking a test worker down)."""

import json
import re
import sys

import numpy as np
import pytest
import tensorflow as tf

from pipelines.core.errors import Invalid
from pipelines.data import fashion
from pipelines.model.registry import RegisteredModel
from pipelines.model.trainer import LabeledFile, Resources
from pipelines.plugins import trainer_class
from tests.model.trainer_checks import Reports, serve_in_fresh_process


@pytest.fixture
def stack(shared_stack):
    return shared_stack


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


def test_fashion_trains_under_mirrored_strategy(fashion_features, tmp_path):
    trainer = trainer_class("fashion_mnist")({}, fashion_features, Resources(slots=2), seed=1)
    assert isinstance(trainer.strategy, tf.distribute.MirroredStrategy)
    reports = Reports()
    assert trainer.fit(1, tmp_path / "checkpoints", reports) == 1
    assert reports.epochs == [1] and reports.last("val_accuracy") >= 0.5
    trainer.save_model(tmp_path / "model")
    assert (tmp_path / "model" / "MLmodel").is_file()


def test_register_an_image_model(stack, tmp_path):
    """Fashion-MNIST (Keras): parameters counted in the loaded Keras model, latency on zero
    images of the model's shape."""
    from pipelines.data.labeling.spec import use_case
    from pipelines.data.labeling.store import LabelStore
    from pipelines.model.registry import register
    from tests.model import training_runs as runs

    runs.label_fashion(stack, tmp_path, 300)
    LabelStore(stack, use_case("fashion_mnist")).snapshot("small")
    trial = runs.train_run(stack, "small", epochs=1, case="fashion_mnist", hparams={"hidden": 16})
    info = register(stack, trial.run_id).version
    tags = info.tags
    assert info.ref == "fashion-mnist/1"
    assert (tags["cdl.task"], tags["cdl.snapshot"]) == ("image", "fashion_mnist/small")
    assert int(tags["cdl.parameters"]) == trial.parameters == 28 * 28 * 16 + 16 + 16 * 10 + 10
    assert len(json.loads(tags["cdl.labels"])) == 10
    assert float(tags["cdl.latency_ms"]) > 0 and int(tags["cdl.artifact_bytes"]) > 0
    assert re.fullmatch(r"fashion-validate@[0-9a-f]+", tags["cdl.data_commits"])


def test_this_process_has_no_torch():
    assert "torch" not in sys.modules
