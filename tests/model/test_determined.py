"""The Determined engine without a master: the trial entrypoint really trains in Determined's
master-less local mode (Core API dummy contexts, checkpoints in a folder) in the Determined
environment, from a context directory built as `cdl experiment submit` builds it; the SDK bridge
reads that context as the SDK would send it, and answers an unreachable master with a clear
`Unavailable`. The environment comes from `make setup`: when it is missing these tests fail
saying so (CI runs make setup first)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipelines.core.config import load_settings
from pipelines.core.errors import ConfigError, Invalid, NotFound, Unavailable, Unsupported
from pipelines.core.postgres import free_port
from pipelines.data import bbc
from pipelines.model.determined import (
    CONFIG_FILE,
    DeterminedExperiments,
    build_context,
    to_experiment,
    to_trial,
)
from pipelines.model.entrypoint import budget_epochs, split_metrics
from pipelines.model.experiments import experiment_engine
from pipelines.model.search import FEATURES, Prepared
from pipelines.model.spec import load_experiment
from pipelines.model.trainer import Features, LabeledFile
from pipelines.plugins import backend_class, trainer_class
from tests.conftest import REPO, cdl, destroy, make_project, stack_for
from tests.model.training_runs import placeholder_snapshots

SPEC = REPO / "use_cases" / "bbc_news" / "model" / "train.yaml"
TRAINER = "pipelines.model.trainers.bbc_news:BBCNewsTrainer"
PREPARED = Prepared(TRAINER, FEATURES, "first", max_epochs=12, batches_per_epoch=None)
VENV = load_settings(REPO / "cdl.yaml", environ={}).venvs / "determined"
REPORT = re.compile(r"report_(training|validation)_metrics\(steps_completed=(\d+), metrics=(.*)\)$")
ENDED = re.compile(r"cdl\.trial: (completed|preempted|stopped) after epoch (\d+), checkpoint (\S+)")


@pytest.fixture(scope="module")
def det_python() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        pytest.fail(f"the Determined environment {VENV} is missing: run make setup")
    return python


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Features:
    corpus = tmp_path_factory.mktemp("bbc") / "corpus"
    bbc.generate(corpus, docs=150, seed=5, dirty=False)
    files = [
        LabeledFile(f"bbc@c0ffee:/valid/{p.parent.name}/{p.name}", p.parent.name, p.read_bytes())
        for p in sorted(corpus.glob("*/*.txt"))
    ]
    return trainer_class("bbc_news").featurize(files, seed=3, val_fraction=0.2)


@pytest.fixture(scope="module")
def context(features, tmp_path_factory):
    folder = tmp_path_factory.mktemp("det") / "context"
    return build_context(load_experiment(SPEC), SPEC, PREPARED, features, folder)


def run_trial(det_python, context, tmp_path, name, **trial) -> tuple[int, str]:
    """A BBC trial of `context` (small hyperparameters), see `run_entrypoint`."""
    hparams = {k: v["val"] for k, v in context.config["hyperparameters"].items()}
    hparams.update(hidden=32, vocabulary=500, batch_size=16)
    hparams.update(trial.pop("hparams", {}))
    config = trial.pop("config", context.config)
    return run_entrypoint(det_python, context.folder, config, hparams, tmp_path, name, **trial)


def run_entrypoint(det_python, folder, config, hparams, tmp_path, name, **trial):
    """The entrypoint as a trial runs it (cwd: the context), described by a local-trial file."""
    described = {
        "config": config,
        "hparams": hparams,
        "checkpoint_storage": str(tmp_path / "storage"),
        "trial_seed": 7,
        **trial,
    }
    file = tmp_path / f"{name}.json"
    file.write_text(json.dumps(described))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(CDL_LOCAL_TRIAL=str(file), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [str(det_python), "-m", "pipelines.model.entrypoint"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, done.stdout + done.stderr


def trained_labels(context) -> set[str]:
    return set(json.loads((context.folder / "features" / "meta.json").read_text())["labels"])


def reports(log: str, kind: str) -> list[tuple[int, dict]]:
    found = []
    for line in log.splitlines():
        match = REPORT.search(line)
        if match and match.group(1) == kind:
            found.append((int(match.group(2)), eval(match.group(3), {"nan": float("nan")})))
    return found


def ended(log: str) -> tuple[str, int, str]:
    match = ENDED.search(log)
    assert match, log[-3000:]
    return match.group(1), int(match.group(2)), match.group(3)


# -- the context directory --------------------------------------------------------------------


def test_context_holds_the_package_the_features_and_the_config(context, features):
    folder = context.folder
    assert (folder / "pipelines" / "model" / "entrypoint.py").is_file()
    assert (folder / "pipelines" / "model" / "trainers" / "bbc_news_model.py").is_file()
    assert not list(folder.rglob("__pycache__")) and not list(folder.rglob("*.pyc"))
    assert not (folder / "tests").exists() and not (folder / ".cdl").exists()
    loaded = Features.load(folder / "features")
    assert loaded.labels == features.labels
    for name in Features.ARRAYS:
        assert np.array_equal(getattr(loaded, name), getattr(features, name))
    assert loaded.preprocessing == features.preprocessing

    config = context.config
    assert yaml.safe_load((folder / CONFIG_FILE).read_text()) == config
    assert config["entrypoint"] == "python3 -m pipelines.model.entrypoint"
    assert config["data"]["use_case"] == "bbc_news"
    assert config["data"]["snapshot"] == "first"  # resolved, where the spec says latest
    assert config["data"]["cdl"] == {"features": "features", "trainer": TRAINER, "spec": str(SPEC)}
    assert "cdl" in config["labels"] and "bbc_news" in config["labels"]
    assert config["hyperparameters"]["epochs"] == {"type": "const", "val": 12}
    assert context.size == sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert context.size < 5 * 2**20


def test_a_context_over_the_limit_is_refused_naming_the_biggest_file(features, tmp_path):
    with pytest.raises(Invalid) as caught:
        build_context(load_experiment(SPEC), SPEC, PREPARED, features, tmp_path / "c", limit=50_000)
    assert "over Determined's 0 MiB (biggest: " in caught.value.problem
    assert "bind_mounts" in caught.value.fix


def test_the_sdk_reads_the_context_as_it_would_send_it(det_python, context, project_factory):
    engine = DeterminedExperiments(project_factory())
    sent = engine.call("request", config=context.config, model_dir=str(context.folder))
    assert {"pipelines/model/entrypoint.py", "features/arrays.npz", "features/meta.json"} <= set(
        sent["files"]
    )
    assert yaml.safe_load(sent["config"]) == context.config
    assert 0 < sent["size"] <= context.size * 1.01


# -- the SDK bridge, with no master -----------------------------------------------------------


@pytest.fixture
def unreachable(det_python, project_factory):
    master = f"http://127.0.0.1:{free_port()}"
    experiments = {"engine": "determined", "determined_master": master}
    stack = project_factory({"stacks": {"local": {"home": ".cdl", "experiments": experiments}}})
    return backend_class("experiments", "determined")(stack), master


def test_an_unreachable_master_is_unavailable_with_a_fix(unreachable, context):
    engine, master = unreachable
    for call in (
        engine.list,
        lambda: engine.show(3),
        lambda: engine.kill(3),
        lambda: engine.logs(3),
        lambda: engine.call("create", config=context.config, model_dir=str(context.folder)),
    ):
        with pytest.raises(Unavailable) as caught:
            call()
        problem = f"Determined master {master} does not answer: Connection refused"
        assert caught.value.problem == problem
        assert "experiments.determined_master" in caught.value.fix


def test_the_cli_says_so_in_one_line(det_python, project_dir):
    master = f"http://127.0.0.1:{free_port()}"
    experiments = {"engine": "determined", "determined_master": master}
    folder = project_dir({"stacks": {"local": {"home": ".cdl", "experiments": experiments}}})
    done = cdl("experiment", "list", cwd=folder, env={"CDL_VENVS": str(VENV.parent)})
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"error: Determined master {master} does not answer: Connection refused (fix: start it, "
        "or point experiments.determined_master (CDL_EXPERIMENTS__DETERMINED_MASTER) at it)"
    )


def test_workers_are_determineds(unreachable):
    engine, _ = unreachable
    with pytest.raises(Unsupported, match="Determined schedules its own trials"):
        engine.worker(1, print)


def test_errors_of_each_kind_become_cdl_errors(unreachable):
    engine, master = unreachable
    auth = engine.translate({"kind": "auth", "message": "Forbidden(bad)"}, "list", {})
    assert isinstance(auth, Unavailable) and "DET_USER and DET_PASS" in auth.fix
    rejected = engine.translate({"kind": "invalid", "message": "bad searcher"}, "create", {})
    assert isinstance(rejected, Invalid)
    assert rejected.problem == f"Determined master {master} refused the experiment: bad searcher"
    missing = engine.translate({"kind": "not_found", "message": "not found"}, "show", {"id": 9})
    assert isinstance(missing, NotFound) and "experiment 9" in missing.problem


def test_a_missing_environment_says_to_run_make_setup(tmp_path, monkeypatch, project_factory):
    monkeypatch.setenv("CDL_VENVS", str(tmp_path))
    engine = DeterminedExperiments(project_factory())
    with pytest.raises(Unavailable) as caught:
        engine.list()
    assert caught.value.fix == "run make setup"


def test_the_master_address_is_a_url_without_credentials(tmp_path):
    (tmp_path / "cdl.yaml").write_text("default_stack: local\nstacks: {local: {}}\n")

    def settings(master):
        env = {
            "CDL_EXPERIMENTS__DETERMINED_MASTER": master,
            "CDL_EXPERIMENTS__ENGINE": "determined",
        }
        return load_settings(tmp_path / "cdl.yaml", environ=env)

    assert settings("https://det.example.com/").stack.experiments.determined_master == (
        "https://det.example.com"
    )
    with pytest.raises(ConfigError, match="must not hold credentials"):
        settings("http://admin:secret@det:8080")
    with pytest.raises(ConfigError, match="http"):
        settings("det:8080")


def test_determineds_json_becomes_cdl_entities(context):
    experiment = {
        "id": 7,
        "name": "bbc-news-search",
        "state": "STATE_ACTIVE",
        "numTrials": 2,
        "startTime": "2026-11-24T05:00:00.123456789Z",
        "bestTrialId": 12,
        "bestTrialSearcherMetric": 0.9,
        "config": {
            **context.config,
            "searcher": {
                "name": "adaptive_asha",
                "metric": "val_accuracy",
                "smaller_is_better": False,
                "max_trials": 16,
                "max_time": 12,
                "time_metric": "epochs",
                "max_concurrent_trials": 2,
            },
        },
    }

    def trial(id, state, epochs, end=None):
        return {
            "id": id,
            "experimentId": 7,
            "state": state,
            "hparams": {"hidden": 64},
            "restarts": 0,
            "startTime": "2026-11-24T05:00:01Z",
            "endTime": end,
            "summaryMetrics": {
                "validation_metrics": {
                    "epochs": {"last": epochs},
                    "val_accuracy": {"last": 0.5 + epochs / 100},
                }
            },
        }

    trials = [
        to_trial(trial(11, "STATE_COMPLETED", 4, "2026-11-24T05:01:00Z"), experiment),
        to_trial(trial(12, "STATE_COMPLETED", 12, "2026-11-24T05:02:00Z"), experiment),
        to_trial(trial(13, "STATE_RUNNING", 2), experiment),
        to_trial(trial(14, "STATE_ERROR", 1), experiment),
    ]
    assert [t.state for t in trials] == ["pruned", "completed", "running", "failed"]
    assert [t.epochs for t in trials] == [4, 12, 2, 1]
    assert trials[1].metric == pytest.approx(0.62)
    exp = to_experiment(experiment, trials)
    assert (exp.state, exp.use_case, exp.snapshot, exp.max_epochs, exp.max_trials) == (
        "active",
        "bbc_news",
        "first",
        12,
        16,
    )
    assert (exp.best_trial, exp.trials_running, exp.trainer) == (12, 1, TRAINER)
    assert exp.created_at.microsecond == 123456 and exp.created_at.tzinfo is not None
    assert to_experiment({**experiment, "state": "STATE_CANCELED"}).state == "killed"


# -- the entrypoint in master-less local mode -------------------------------------------------


def test_a_trial_trains_reports_checkpoints_and_saves_its_model(det_python, context, tmp_path):
    code, log = run_trial(det_python, context, tmp_path, "whole", hparams={"epochs": 3})
    assert code == 0, log[-3000:]
    training, validation = reports(log, "training"), reports(log, "validation")
    assert [step for step, _ in training] == [1, 2, 3]
    assert [step for step, _ in validation] == [1, 2, 3]
    assert all(set(m) == {"loss", "epoch_seconds"} for _, m in training)
    assert all(set(m) == {"val_loss", "val_accuracy", "epochs"} for _, m in validation)
    assert [m["epochs"] for _, m in validation] == [1, 2, 3]  # ASHA's time metric
    assert validation[-1][1]["val_loss"] < validation[0][1]["val_loss"]

    state, epoch, last = ended(log)
    assert (state, epoch) == ("completed", 3)
    storage = tmp_path / "storage"
    stored = {p.name: json.loads((p / "metadata.json").read_text()) for p in storage.iterdir()}
    assert sorted(m["steps_completed"] for m in stored.values()) == [1, 2, 3, 3]
    assert (storage / last / "epoch-0003.ckpt").is_file()
    assert f"model saved in checkpoint {last} (model/)" in log

    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(str(storage / last / "model"))
    texts = ["Striker scores twice\nThe club won the league match.", "Shares fall\nBank profits."]
    out = model.predict(pd.DataFrame({"text": texts}))
    assert len(out) == 2 and set(out["label"]) <= trained_labels(context)
    assert ((out["score"] > 0) & (out["score"] <= 1)).all()


def test_a_preempted_trial_resumes_from_its_latest_checkpoint(det_python, context, tmp_path):
    code, first = run_trial(
        det_python, context, tmp_path, "first", hparams={"epochs": 4}, preempt_after=2
    )
    assert code == 0, first[-3000:]
    state, epoch, checkpoint = ended(first)
    assert (state, epoch) == ("preempted", 2)
    assert "model saved" not in first
    assert [s for s, _ in reports(first, "validation")] == [1, 2]

    code, second = run_trial(
        det_python, context, tmp_path, "second", hparams={"epochs": 4}, latest_checkpoint=checkpoint
    )
    assert code == 0, second[-3000:]
    assert f"resuming from checkpoint {checkpoint}" in second
    assert [s for s, _ in reports(second, "validation")] == [3, 4]  # epochs continue
    state, epoch, last = ended(second)
    assert (state, epoch) == ("completed", 4)
    assert (tmp_path / "storage" / last / "model" / "MLmodel").is_file()


def test_the_entrypoint_fails_clearly_without_a_trial_or_tensorflow(det_python, context, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CDL_LOCAL_TRIAL")}
    done = subprocess.run(
        [str(det_python), "-m", "pipelines.model.entrypoint"],
        cwd=context.folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "not in a Determined trial, and no local trial described" in done.stdout

    fashion = {**context.config, "data": {**context.config["data"], "use_case": "fashion_mnist"}}
    fashion["data"]["cdl"] = {"features": "features"}
    code, log = run_trial(det_python, context, tmp_path, "fashion", config=fashion)
    assert code == 2  # setup/determined-constraints.txt leaves TensorFlow out
    assert "fashion_mnist trains with TensorFlow, which this environment does not have" in log


# -- submit on a real stack -------------------------------------------------------------------

TOY = {
    "use_case": "bbc_news",
    "snapshot": "latest",
    "trainer": "tests.model.toy_trainer:ToyTrainer",
    "features": "tests.model.toy_trainer:toy_features",
}


@pytest.fixture(scope="module")
def toy_stack(det_python):
    """A running stack on the determined engine (at a master that does not answer), with two
    label snapshots of bbc_news."""
    experiments = {"engine": "determined", "determined_master": f"http://127.0.0.1:{free_port()}"}
    stack = stack_for(
        make_project({"stacks": {"local": {"home": ".cdl", "experiments": experiments}}})
    )
    stack.up()
    placeholder_snapshots(stack, "first", "second")
    yield stack
    destroy(stack)


def test_submit_sends_the_spec_features_and_code_a_trial_needs(
    det_python, toy_stack, tmp_path, monkeypatch
):
    spec = toy_stack.settings.root / "toy.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "toy",
                "entrypoint": "python3 -m pipelines.model.entrypoint",
                "data": TOY,
                "hyperparameters": {"epochs": 3, "learning_rate": 0.5},
                "searcher": {
                    "name": "single",
                    "metric": "val_accuracy",
                    "smaller_is_better": False,
                },
            }
        )
    )
    engine = experiment_engine(toy_stack)
    assert isinstance(engine, DeterminedExperiments)
    with pytest.raises(Unavailable, match="does not answer: Connection refused"):
        engine.submit(spec)
    assert not list((toy_stack.settings.home / "determined").iterdir())  # no context left behind

    sent = {}
    bridge = engine.call

    def create(op, timeout_s=120, **request):  # what the SDK would send, then stop
        assert op == "create"
        shutil.copytree(request["model_dir"], tmp_path / "context")
        sent.update(bridge("request", **request), request=request)
        raise Unavailable("stopped before sending")

    monkeypatch.setattr(engine, "call", create)
    with pytest.raises(Unavailable, match="stopped before sending"):
        engine.submit(spec)
    config = sent["request"]["config"]
    assert yaml.safe_load(sent["config"]) == config
    assert config["data"]["snapshot"] == "second"  # latest, resolved
    assert config["data"]["cdl"]["trainer"] == TOY["trainer"]
    assert config["labels"] == ["cdl"]
    assert {"tests/model/toy_trainer.py", "features/arrays.npz", "pipelines/plugins.py"} <= set(
        sent["files"]
    )

    # The trial runs from exactly that context.
    hparams = {"epochs": 3, "learning_rate": 0.5}
    code, log = run_entrypoint(det_python, tmp_path / "context", config, hparams, tmp_path, "toy")
    assert code == 0, log[-3000:]
    assert [s for s, _ in reports(log, "validation")] == [1, 2, 3]
    losses = [m["val_loss"] for _, m in reports(log, "validation")]
    assert losses[-1] < losses[0]  # it learns
    state, epoch, last = ended(log)
    assert (state, epoch) == ("completed", 3)
    assert (tmp_path / "storage" / last / "last.npz").is_file()
    assert (tmp_path / "storage" / last / "model" / "MLmodel").is_file()


def test_a_budget_in_batches_is_recorded_and_counted_by_the_trial(toy_stack, monkeypatch):
    config = {"searcher": {"max_time": 100, "time_metric": "batches"}}
    with pytest.raises(Invalid, match="how many make an epoch is unknown"):
        budget_epochs(config, {})
    assert budget_epochs({**config, "data": {"cdl": {"batches_per_epoch": 30}}}, {}) == 4
    with pytest.raises(Unsupported, match="time_metric 'records'"):
        budget_epochs({"searcher": {"max_time": 9, "time_metric": "records"}}, {})
    _, validation = split_metrics(2, {"loss": 0.3, "val_accuracy": 0.5}, "val_accuracy", 30)
    assert validation == {"val_accuracy": 0.5, "epochs": 2, "batches": 60}

    spec = toy_stack.settings.root / "in-batches.yaml"
    searcher = {"name": "adaptive_asha", "max_trials": 4, "max_time": 45, "time_metric": "batches"}
    spec.write_text(
        yaml.safe_dump(
            {
                "entrypoint": "python3 -m pipelines.model.entrypoint",
                "data": TOY,
                "hyperparameters": {"learning_rate": 0.5},
                "searcher": {**searcher, "metric": "val_accuracy", "smaller_is_better": False},
            }
        )
    )
    engine = experiment_engine(toy_stack)
    sent = {}

    def create(op, timeout_s=120, **request):
        sent.update(request["config"])
        raise Unavailable("stopped before sending")

    monkeypatch.setattr(engine, "call", create)
    with pytest.raises(Unavailable, match="stopped before sending"):
        engine.submit(spec)
    assert sent["data"]["cdl"]["batches_per_epoch"] == 5  # the toy trainer's full-batch steps
    assert budget_epochs(sent, {}) == 9
