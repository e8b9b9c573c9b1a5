"""The local experiment engine on a real stack: Optuna on Postgres, worker processes, MLflow,
with the toy trainer (tests/model/toy_trainer.py) on a real label snapshot."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import mlflow
import pytest
import yaml
from PIL import Image

from pipelines import __version__
from pipelines.core import events
from pipelines.core.errors import Invalid, NotFound
from pipelines.data.labeling.spec import use_case
from pipelines.data.labeling.store import LabelStore
from pipelines.model import search, tracking
from pipelines.model.experiments import experiment_engine
from pipelines.model.registry import registered_name
from pipelines.model.search import LocalExperiments
from tests.conftest import cdl, destroy, make_project, stack_for
from tests.model.training_runs import placeholder_snapshots

TOY = {
    "use_case": "bbc_news",
    "snapshot": "latest",
    "trainer": "tests.model.toy_trainer:ToyTrainer",
    "features": "tests.model.toy_trainer:toy_features",
}
LEARNING_RATE = {"type": "log", "base": 10, "minval": -3, "maxval": 0.5}


@pytest.fixture(scope="module")
def stack():
    stack = stack_for(make_project())
    stack.up()
    placeholder_snapshots(stack, "first", "second")
    yield stack
    destroy(stack)


def spec_file(stack, name: str, searcher: dict, hyperparameters: dict, **top) -> Path:
    path = stack.settings.root / f"{name}.yaml"
    data = top.pop("data", TOY)
    spec = {
        "name": name,
        "entrypoint": "python3 -m pipelines.model.entrypoint",
        "data": data,
        "hyperparameters": hyperparameters,
        "searcher": {"metric": "val_accuracy", "smaller_is_better": False, **searcher},
        **top,
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def single(stack, name: str, epochs: int, sleep: float, max_restarts: int) -> Path:
    return spec_file(
        stack,
        name,
        {"name": "single"},
        {"epochs": epochs, "learning_rate": 0.5, "sleep": sleep},
        max_restarts=max_restarts,
    )


def quiet(line: str) -> None:
    print(line)


def runs_of(stack, experiment_id: int):
    tracker = tracking.client(stack)
    mlflow_experiment = tracking.experiment_id(stack, registered_name("bbc_news"))
    return tracker, tracker.search_runs(
        [mlflow_experiment], filter_string=f"tags.`cdl.experiment` = '{experiment_id}'"
    )


def test_asha_search_prunes_finds_a_good_trial_and_tracks_every_epoch(stack):
    engine = LocalExperiments(stack)
    spec = spec_file(
        stack,
        "asha",
        {
            "name": "adaptive_asha",
            "max_trials": 12,
            "max_time": 9,
            "time_metric": "epochs",
            "divisor": 3,
            "max_rungs": 3,
            "max_concurrent_trials": 2,
        },
        {"learning_rate": LEARNING_RATE},
        reproducibility={"experiment_seed": 3},
    )
    started = time.monotonic()
    submission = engine.submit(spec, attached=True)
    assert submission.experiment.snapshot == "second"  # latest: the newest snapshot
    assert submission.experiment.workers == 2
    ended = engine.wait(submission.experiment.id, poll_s=0.5)
    print(f"ASHA search: {time.monotonic() - started:.1f} s")
    experiment, trials = engine.show(ended.id)
    assert experiment.state == "completed", [t.error for t in trials]
    # max_trials is a global cap across the two workers.
    assert [t.number for t in trials] == list(range(12))
    states = [t.state for t in trials]
    assert states.count("pruned") >= 3 and "failed" not in states, states
    total = sum(t.epochs for t in trials)
    assert total < 0.6 * 12 * 9, total
    for trial in trials:
        milestones = {"pruned": {1, 3}, "completed": {9}}[trial.state]
        assert trial.epochs in milestones, trial
    # The best model found, whether it went the whole length or ASHA stopped it early.
    best = max((t for t in trials if t.state in ("completed", "pruned")), key=lambda t: t.metric)
    assert experiment.best_trial == best.number and experiment.best_metric > 0.9
    # Trials wait at a rung until later ones promote them (or the search ends): Determined's way.
    logs = {t.number: text for t, text in engine.logs(experiment.id)}
    assert all("paused at the rung" in logs[t.number] for t in trials if t.state == "pruned")
    assert any("promoted: trial" in text for text in logs.values()), logs

    tracker, runs = runs_of(stack, experiment.id)
    parent = tracker.get_run(experiment.mlflow_run)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["cdl.snapshot"] == "bbc_news/second"
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == experiment.mlflow_run]
    assert len(nested) == 12
    by_trial = {int(r.data.tags["cdl.trial"]): r for r in nested}
    for trial in trials:
        run = by_trial[trial.number]
        assert run.info.run_id == trial.mlflow_run
        assert float(run.data.params["learning_rate"]) == pytest.approx(
            trial.hparams["learning_rate"]
        )
        history = tracker.get_metric_history(run.info.run_id, "val_accuracy")
        assert sorted(m.step for m in history) == list(range(1, trial.epochs + 1))
        assert run.info.status == "FINISHED" and run.data.tags["cdl.state"] == trial.state
    for trial in trials:  # each keeps its model, so that the best can be registered
        artifacts = [a.path for a in tracker.list_artifacts(trial.mlflow_run, "model")]
        assert "model/MLmodel" in artifacts, trial
    check_tracking(stack, tracker, trials, by_trial)

    with stack.connect() as conn:
        seen = events.recent(conn, 100, ["model.*"])
    finished = [e for e in seen if e.subject == f"experiment/{experiment.id}"]
    assert [e.payload["state"] for e in finished] == ["completed"]
    assert finished[0].payload["best_trial"] == best.number
    trial_events = [e for e in seen if e.type == events.TRIAL_FINISHED]
    assert len([e for e in trial_events if e.payload["experiment"] == experiment.id]) == 12


def check_tracking(stack, tracker, trials, runs) -> None:
    """What every trial run carries besides params and metrics: provenance tags, the training
    data as dataset inputs, the final checkpoint, its learning curves (and when it completed
    its confusion matrix) as PNGs."""
    train = LabelStore(stack, use_case("bbc_news")).train_rows("second")
    head = subprocess.run(  # the toy trainer's checkout: this one
        ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True
    ).stdout.strip()
    for trial in trials:
        run = tracker.get_run(runs[trial.number].info.run_id)
        tags = run.data.tags
        assert tags["cdl.snapshot"] == "bbc_news/second"
        assert tags["cdl.data_commits"] == "bbc-news-validated@c0ffee"
        assert tags["cdl.git_sha"] == tags["mlflow.source.git.commit"] == head
        assert tags["cdl.git_dirty"] in ("true", "false")
        assert tags["cdl.package.mlflow"] == mlflow.__version__
        assert tags["cdl.package.cdl"] == __version__ and "cdl.package.torch" in tags
        assert tags["cdl.parameters"] == "11"  # the toy's weights and bias
        assert tags["cdl.features.train_rows"] == "320" and "cdl.features" not in tags
        inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
        assert set(inputs) == {"bbc_news/second", "bbc-news-validated@c0ffee"}
        snapshot = inputs["bbc_news/second"]
        assert snapshot.dataset.source_type == "cdl_label_snapshot"
        assert '"num_rows": %d' % len(train) in snapshot.dataset.profile
        assert [(t.key, t.value) for t in snapshot.tags] == [("mlflow.data.context", "training")]
        assert inputs["bbc-news-validated@c0ffee"].dataset.source_type == "cdl_data_commit"
        assert inputs["bbc-news-validated@c0ffee"].dataset.digest == snapshot.dataset.digest
        files = {
            a.path
            for folder in ("checkpoint", "plots")
            for a in tracker.list_artifacts(run.info.run_id, folder)
        }
        expected = {"checkpoint/last.npz", "checkpoint/fits.log", search.LEARNING_CURVES}
        if trial.state == "completed":
            expected.add(search.CONFUSION_MATRIX)
        assert files == expected, (trial.state, files)
    best = max((t for t in trials if t.state == "completed"), key=lambda t: t.metric)
    for name in (search.LEARNING_CURVES, search.CONFUSION_MATRIX):
        local = mlflow.artifacts.download_artifacts(run_id=best.mlflow_run, artifact_path=name)
        image = Image.open(io.BytesIO(Path(local).read_bytes()))
        assert image.format == "PNG" and image.size[0] > 300, (name, image.size)
    [found] = tracker.search_runs(
        [runs[best.number].info.experiment_id],
        filter_string=f"dataset.name = 'bbc_news/second' and tags.`cdl.trial` = '{best.number}'"
        f" and tags.`cdl.experiment` = '{runs[best.number].data.tags['cdl.experiment']}'",
    )
    assert found.info.run_id == best.mlflow_run


def _run_until(engine, experiment_id: int, epochs: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, trials = engine.show(experiment_id)
        if trials and trials[0].epochs >= epochs:
            return
        time.sleep(0.1)
    raise AssertionError(f"trial did not reach epoch {epochs}: {trials}")


def test_a_killed_worker_trial_resumes_from_its_checkpoint(stack):
    engine = LocalExperiments(stack)
    submission = engine.submit(single(stack, "resume", 8, 0.3, max_restarts=1), attached=True)
    experiment_id = submission.experiment.id
    _run_until(engine, experiment_id, 2)
    worker = engine._children[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    _, [killed] = engine.show(experiment_id)
    done_when_killed = killed.epochs

    engine.worker(experiment_id, quiet)  # another worker: the dead one's pid is gone
    experiment, [trial] = engine.show(experiment_id)
    assert experiment.state == "completed" and trial.state == "completed"
    assert trial.restarts == 1 and trial.epochs == 8
    starts = [
        int(n) for n in (Path(trial.checkpoints) / "checkpoints/fits.log").read_text().split()
    ]
    # Resumed after its last checkpoint: at most the epoch it was in is lost.
    assert starts[0] == 0 and starts[1] >= done_when_killed >= 2
    tracker, _ = runs_of(stack, experiment_id)
    steps = [m.step for m in tracker.get_metric_history(trial.mlflow_run, "val_accuracy")]
    assert len(steps) == len(set(steps)) and max(steps) == 8 and len(steps) >= 7
    [text] = [log for _, log in engine.logs(experiment_id, 0)]
    assert "resumed by" in text and "completed after epoch 8" in text


def test_workers_ride_out_a_postgres_restart_mid_search(stack):
    """The postmaster SIGKILLed while two trials train: the workers retry Optuna, MLflow and the
    trial table until `cdl stack up` has Postgres back, then finish the same trials, losing no
    epoch and logging none twice."""
    engine = LocalExperiments(stack)
    spec = spec_file(
        stack,
        "outage",
        {"name": "random", "max_trials": 2, "max_concurrent_trials": 2},
        {"epochs": 8, "learning_rate": LEARNING_RATE, "sleep": 0.4},
        reproducibility={"experiment_seed": 5},
    )
    experiment_id = engine.submit(spec, attached=True).experiment.id
    _run_until(engine, experiment_id, 2)
    os.kill(stack.postgres.running_pid(), signal.SIGKILL)
    time.sleep(4)  # some epochs end while the database is away
    stack.up()
    experiment = engine.wait(experiment_id, poll_s=0.5)
    _, trials = engine.show(experiment_id)
    assert experiment.state == "completed", [t.error for t in trials]
    assert [(t.state, t.epochs, t.restarts) for t in trials] == [("completed", 8, 0)] * 2, [
        t.error for t in trials
    ]
    tracker, _ = runs_of(stack, experiment_id)
    for trial in trials:
        fits = (Path(trial.checkpoints) / "checkpoints/fits.log").read_text().split()
        assert fits == ["0"]  # one fit from the start: no worker died or gave the trial up
        steps = [m.step for m in tracker.get_metric_history(trial.mlflow_run, "val_accuracy")]
        assert sorted(steps) == list(range(1, 9))


def test_without_restarts_left_the_trial_fails(stack):
    engine = LocalExperiments(stack)
    submission = engine.submit(single(stack, "no-restarts", 8, 0.3, max_restarts=0), attached=True)
    experiment_id = submission.experiment.id
    _run_until(engine, experiment_id, 1)
    os.kill(engine._children[0].pid, signal.SIGKILL)
    engine._children[0].wait()
    engine.worker(experiment_id, quiet)
    experiment, [trial] = engine.show(experiment_id)
    assert trial.state == "failed" and "max_restarts (0) is reached" in trial.error
    assert experiment.state == "failed" and "no trial completed" in experiment.error


def test_workers_get_their_thread_share_and_sleeping_openmp_threads(stack):
    engine = LocalExperiments(stack)
    spec = spec_file(
        stack,
        "threads",
        {"name": "random", "max_trials": 2, "max_concurrent_trials": 2},
        {"epochs": 2, "learning_rate": 0.5, "sleep": 0.3},
    )
    submission = engine.submit(spec, attached=True)
    environments = []
    for child in engine._children:
        raw = Path(f"/proc/{child.pid}/environ").read_bytes()
        environments.append(dict(v.split("=", 1) for v in raw.decode().split("\0") if "=" in v))
    assert engine.wait(submission.experiment.id, poll_s=0.2).state == "completed"
    share = str(max(1, (os.cpu_count() or 1) // 2))
    for env in environments:
        # Spinning OpenMP threads slow every worker on a busy machine (search.OMP_ENV).
        assert env["OMP_WAIT_POLICY"] == "PASSIVE"
        assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == share
    assert len(environments) == 2


def test_a_failing_trainer_fails_its_trial_and_the_experiment_goes_on(stack):
    engine = LocalExperiments(stack)
    spec = spec_file(
        stack,
        "failing",
        {"name": "grid"},
        {
            "epochs": 4,
            "learning_rate": 0.5,
            "fail_at": {"type": "categorical", "vals": [0, 2]},
            "nan_at": {"type": "categorical", "vals": [0, 3]},
        },
    )
    experiment_id = engine.record(spec).experiment.id
    engine.worker(experiment_id, quiet)
    experiment, trials = engine.show(experiment_id)
    assert experiment.state == "completed"
    by_knobs = {(t.hparams["fail_at"], t.hparams["nan_at"]): t for t in trials}
    assert by_knobs[0, 0].state == "completed" and experiment.best_trial == by_knobs[0, 0].number
    raised = by_knobs[2, 0]
    assert raised.state == "failed" and raised.epochs == 1
    assert "Traceback" in raised.error and "fails on purpose at epoch 2" in raised.error
    assert "val_accuracy is nan at epoch 3" in by_knobs[0, 3].error
    [(_, text)] = engine.logs(experiment_id, raised.number)
    assert "failed: RuntimeError: toy trainer fails on purpose at epoch 2" in text
    with pytest.raises(NotFound, match="has no trial 9"):
        engine.logs(experiment_id, 9)


def test_kill_ends_everything(stack):
    engine = experiment_engine(stack)
    experiment_id = engine.submit(single(stack, "to-kill", 200, 0.2, max_restarts=1)).experiment.id
    _run_until(engine, experiment_id, 1)
    prefix = f"experiment-{experiment_id}-worker-"
    assert any(n.startswith(prefix) for n in stack.supervisor.names())
    started = time.monotonic()
    experiment = engine.kill(experiment_id)
    assert time.monotonic() - started < 10
    _, [trial] = engine.show(experiment_id)
    assert experiment.state == "killed" and trial.state == "killed" and trial.epochs < 200
    assert not [n for n in stack.supervisor.names() if n.startswith(prefix)]
    tracker, _ = runs_of(stack, experiment_id)
    assert tracker.get_run(experiment.mlflow_run).info.status == "KILLED"
    assert engine.kill(experiment_id).state == "killed"  # again: nothing to do


def test_a_budget_in_batches_is_counted_in_epochs_of_the_snapshot(stack):
    engine = LocalExperiments(stack)
    asha = {
        "name": "adaptive_asha",
        "max_trials": 3,
        "max_time": 45,  # batches: 9 epochs of the toy trainer's 5
        "time_metric": "batches",
        "divisor": 3,
        "max_rungs": 3,
        "mode": "aggressive",
        "max_concurrent_trials": 1,
    }
    spec = spec_file(stack, "in-batches", asha, {"learning_rate": LEARNING_RATE})
    submission = engine.submit(spec, attached=True)
    assert submission.experiment.max_epochs == 9
    experiment, trials = engine.show(engine.wait(submission.experiment.id, poll_s=0.5).id)
    assert experiment.state == "completed", [t.error for t in trials]
    assert {t.epochs for t in trials} <= {1, 3, 9} and 9 in {t.epochs for t in trials}

    bbc = {k: v for k, v in TOY.items() if k not in ("trainer", "features")}
    records = {**asha, "time_metric": "records"}
    with pytest.raises(Invalid, match="records_per_epoch"):
        engine.submit(spec_file(stack, "in-records", records, {"learning_rate": 0.5}, data=bbc))


def test_the_spec_sets_the_validation_share(stack):
    engine = LocalExperiments(stack)
    data = {**TOY, "val_fraction": 0.5}
    hyper = {"epochs": 1, "learning_rate": 0.5}
    spec = spec_file(stack, "half-validation", {"name": "single"}, hyper, data=data)
    experiment = engine.wait(engine.submit(spec, attached=True).experiment.id, poll_s=0.5)
    _, [trial] = engine.show(experiment.id)
    tracker, _ = runs_of(stack, experiment.id)
    tags = tracker.get_run(trial.mlflow_run).data.tags
    assert (tags["cdl.features.train_rows"], tags["cdl.features.val_rows"]) == ("200", "200")


def test_latest_names_no_snapshot_before_the_first(stack):
    # The other refusals at submit, alike on both engines: tests/model/test_experiments_contract.py
    engine = LocalExperiments(stack)
    none_yet = {**TOY, "use_case": "fashion_mnist"}
    hyper = {"epochs": 2, "learning_rate": 0.5}
    with pytest.raises(NotFound, match="data.snapshot: no label snapshot of fashion_mnist yet"):
        engine.submit(spec_file(stack, "none-yet", {"name": "single"}, hyper, data=none_yet))
    assert "none-yet" not in [e.name for e in engine.list()]


def test_the_command_line(stack):
    folder = stack.settings.root
    spec = spec_file(
        stack,
        "cli-grid",
        {"name": "grid", "max_concurrent_trials": 1},
        {"epochs": 3, "learning_rate": {"type": "log", "minval": -3, "maxval": 0, "count": 2}},
        checkpoint_storage={"type": "shared_fs", "host_path": "/tmp"},
    )
    run = cdl("experiment", "submit", str(spec), "--wait", cwd=folder)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ignored by the local engine (cluster-only): checkpoint_storage" in run.stderr
    assert "grid search of up to 2 trial(s) x 3 epoch(s) on bbc_news/second" in run.stdout
    assert "trial 0 completed" in run.stdout and "best trial" in run.stdout
    experiment_id = run.stdout.split("experiment ", 1)[1].split()[0]
    listed = cdl("experiment", "list", cwd=folder)
    assert "cli-grid" in listed.stdout and "completed" in listed.stdout
    shown = cdl("experiment", "show", experiment_id, cwd=folder)
    assert shown.returncode == 0 and "learning_rate=" in shown.stdout and "3/3" in shown.stdout
    logs = cdl("experiment", "logs", experiment_id, "--trial", "1", cwd=folder)
    assert "epoch 3: val_accuracy" in logs.stdout
    bad = cdl("experiment", "show", "999", cwd=folder)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "no experiment 999" in bad.stderr
    missing = spec_file(
        stack,
        "cli-missing",
        {"name": "single"},
        {"epochs": 1, "learning_rate": 1},
        data={**TOY, "snapshot": "nope"},
    )
    refused = cdl("experiment", "submit", str(missing), cwd=folder)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "no label snapshot bbc_news/nope" in refused.stderr
    invalid = folder / "invalid.yaml"
    invalid.write_text("name: x\nsearcher: {name: nope}\n")
    refused = cdl("experiment", "submit", str(invalid), cwd=folder)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr


def test_the_mlflow_ui_serves_the_stacks_runs(stack):
    """One start of the MLflow UI (a heavy server): `stack up --with mlflow-ui`, then `cdl ui`
    finds it running; it lists the stack's experiments; status shows it; it stops."""
    folder = stack.settings.root
    tracking.experiment_id(stack, registered_name("bbc_news"))
    started = time.monotonic()
    up = cdl("stack", "up", "--with", "mlflow-ui", cwd=folder, timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    print(f"mlflow-ui: up in {time.monotonic() - started:.1f} s")
    address = up.stdout.split("started mlflow-ui at ", 1)[1].split()[0]
    shown = cdl("ui", cwd=folder)
    assert shown.returncode == 0 and f"MLflow UI: {address}" in shown.stdout, shown.stderr
    answer = httpx.get(f"{address}/api/2.0/mlflow/experiments/search?max_results=100", timeout=30)
    assert answer.status_code == 200, answer.text
    assert "bbc-news" in [e["name"] for e in answer.json()["experiments"]]
    assert httpx.get(address, timeout=30).status_code == 200  # the UI's page itself
    status = cdl("stack", "status", cwd=folder)
    [row] = [line for line in status.stdout.splitlines() if "mlflow-ui" in line]
    assert "healthy" in row and address in row
    assert stack.supervisor.stop("mlflow-ui")
    assert stack.supervisor.status("mlflow-ui").state == "stopped"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{address}/health", timeout=5)
