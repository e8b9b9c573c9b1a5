"""Test helpers for the registry, evaluation and approval tests: labeled BBC snapshots without
Label Studio, and MLflow training runs in the shape the experiment engine leaves them (a parent
run tagged `cdl.experiment` and, once it ends, `cdl.best_trial_run`; nested trial runs tagged
`cdl.experiment`, `cdl.trial`, `cdl.snapshot`, with the hyperparameters as params, per-epoch
`loss`/`val_loss`/`val_accuracy` and the trainer's saved model as the artifact `model`)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import mlflow

from pipelines.data import bbc, fashion
from pipelines.data.labeling.spec import use_case
from pipelines.data.labeling.store import LabelStore
from pipelines.data.repos import DataRepos, Ref
from pipelines.model import tracking
from pipelines.model.features import features_for
from pipelines.model.registry import registered_name
from pipelines.model.trainer import Resources
from pipelines.plugins import trainer_class
from tests.conftest import MODEL_CODE

REPO = "bbc-validate"
SMALL = {"hidden": 32, "dropout": 0.1, "batch_size": 16, "learning_rate": 0.01}


def label_corpus(stack, folder: Path, docs: int, seed: int, dest: str, first_id: int) -> int:
    """Generate `docs` BBC-like articles, commit them under `dest` of the data repo and load
    their true classes as labels (the label store assigns train/test splits); return the next
    free annotation id."""
    corpus = folder / f"corpus-{seed}"
    bbc.generate(corpus, docs=docs, seed=seed, dirty=False)
    return _label_folder(stack, "bbc_news", "bbc-validate", corpus, dest, first_id)


def placeholder_snapshots(stack, *names: str) -> None:
    """Snapshots of two labels per bbc_news class whose files do not exist: enough for an
    experiment's snapshot to resolve, with the use case's label set, when its trainer makes its
    own data (tests/model/toy_trainer.py)."""
    rows = [
        {
            "path": f"/{label}/{i}.txt",
            "source": f"bbc-news-validated@c0ffee:/{label}/{i}.txt",
            "label": label,
            "labeler": "tester@example.com",
            "labeled_at": datetime.now(timezone.utc),
            "task_id": i,
            "annotation_id": i,
            "export_commit": "export-1",
        }
        for i, label in enumerate(sorted(bbc.CLASSES * 2))
    ]
    store = LabelStore(stack, use_case("bbc_news"))
    store.load(rows, [r["annotation_id"] for r in rows], "export-1", None)
    for name in names:
        store.snapshot(name)


def label_fashion(stack, folder: Path, images: int) -> None:
    """The first `images` Fashion-MNIST training images as PNG files in fashion-validate:/valid,
    labeled with their classes."""
    pixels, labels = fashion.arrays(fashion.DEFAULT_SOURCE, "train", limit=images)
    corpus = folder / "fashion"
    for i, (image, label) in enumerate(zip(pixels, labels, strict=True)):
        path = corpus / fashion.CLASSES[label] / f"train-{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(fashion.png_bytes(image.tobytes(), 28, 28))
    _label_folder(stack, "fashion_mnist", "fashion-validate", corpus, "/valid", 1)


def _label_folder(stack, case: str, repo: str, corpus: Path, dest: str, first_id: int) -> int:
    repos = DataRepos(stack)
    if repo not in {r.name for r in repos.list_repos()}:
        repos.create_repo(repo)
    commit, _ = repos.put(Ref.parse(repo), [corpus], dest=dest)
    now = datetime.now(timezone.utc)
    store = LabelStore(stack, use_case(case))
    rows = [
        {
            "path": entry.path,
            "source": f"{commit.ref}:{entry.path}",
            "label": entry.path.split("/")[2],
            "labeler": "truth@cdl.local",
            "labeled_at": now,
            "task_id": number,
            "annotation_id": number,
            "export_commit": "none",
        }
        for number, entry in enumerate(repos.files(commit, dest), start=first_id)
    ]
    present = list(range(1, first_id + len(rows)))  # every annotation so far stays live
    store.load(rows, present, "none", None)
    return first_id + len(rows)


@dataclass
class Trial:
    run_id: str
    parameters: int  # the trained network's weights


def experiment_id(stack, case: str = "bbc_news") -> str:
    return tracking.experiment_id(stack, registered_name(case))


def train_run(
    stack,
    snapshot: str,
    *,
    epochs: int = 2,
    hparams: dict | None = None,
    parent: str | None = None,
    experiment: str | None = None,
    trial: int | None = None,
    seed: int = 0,
    case: str = "bbc_news",
) -> Trial:
    """Train the real trainer of use case `case` on `snapshot` and log it as a (trial) run."""
    if case == "bbc_news":
        import torch  # not at the top: Keras cases run in a process without torch

        torch.set_num_threads(1)
    hparams = {**(SMALL if case == "bbc_news" else {}), **(hparams or {})}
    features = features_for(stack, case, snapshot)
    trainer = trainer_class(case)(hparams, features, Resources(threads=1), seed=seed)
    client = tracking.client(stack)
    tags = {"cdl.snapshot": f"{case}/{snapshot}"}
    if parent:
        tags["mlflow.parentRunId"] = parent
    if experiment is not None:
        tags["cdl.experiment"] = experiment
    if trial is not None:
        tags["cdl.trial"] = str(trial)
    run = client.create_run(experiment_id(stack, case), run_name=f"trial-{trial}", tags=tags)
    run_id = run.info.run_id
    for key, value in trainer.hparams.items():
        client.log_param(run_id, key, value)

    def report(epoch, metrics):
        for key in ("loss", "val_loss", "val_accuracy"):
            client.log_metric(run_id, key, metrics[key], step=epoch)
        return True

    with tempfile.TemporaryDirectory(prefix="cdl-test-run-") as scratch:
        trainer.fit(epochs, Path(scratch) / "checkpoints", report)
        trainer.save_model(Path(scratch) / "model")
        client.log_artifacts(run_id, str(Path(scratch) / "model"), "model")
    client.set_terminated(run_id, "FINISHED")
    if case == "bbc_news":
        return Trial(run_id, sum(p.numel() for p in trainer.net.parameters()))
    return Trial(run_id, trainer.model.count_params())


def parent_run(stack, experiment: str, snapshot: str) -> str:
    client = tracking.client(stack)
    run = client.create_run(
        experiment_id(stack),
        run_name=f"experiment-{experiment}",
        tags={"cdl.experiment": experiment, "cdl.snapshot": f"bbc_news/{snapshot}"},
    )
    return run.info.run_id


def end_experiment(stack, parent: str, best: Trial) -> None:
    client = tracking.client(stack)
    client.set_tag(parent, "cdl.best_trial_run", best.run_id)
    client.set_terminated(parent, "FINISHED")


def code_model_run(
    stack,
    snapshot: str,
    model_config: dict,
    *,
    status: str = "FINISHED",
    tags: dict | None = None,
    with_model: bool = True,
) -> str:
    """A run holding a models-from-code test model (tests/model/models/contract.py), logged with
    `pyfunc.log_model`; or no model, or ended with another status."""
    client = tracking.client(stack)
    with mlflow.start_run(
        experiment_id=experiment_id(stack),
        tags={"cdl.snapshot": f"bbc_news/{snapshot}", **(tags or {})},
    ) as run:
        mlflow.log_metric("val_accuracy", 0.2)
        if with_model:
            mlflow.pyfunc.log_model(
                name="model",
                python_model=str(MODEL_CODE / "contract.py"),
                model_config=model_config,
                pip_requirements=["mlflow", "numpy", "pandas"],
            )
    if status != "FINISHED":
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id
