"""MLflow tracking and the model registry on the stack's Postgres, and the CDL model contract
every registered model follows."""

import io
import json
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from pipelines.core.errors import CDLError, StackError
from pipelines.data import bbc
from pipelines.model import tracking
from pipelines.model.registry import (
    CHAMPION,
    LATENCY_INPUTS,
    LATENCY_ROUNDS,
    Registry,
    model_inputs,
    registered_name,
)
from tests.conftest import REPO, cdl, register_model


@pytest.fixture(scope="module")
def registry_stack(tmp_path_factory):
    from tests.conftest import destroy, make_project, stack_for

    stack = stack_for(make_project())
    stack.up()
    yield stack
    destroy(stack)


def png(width: int, height: int, value: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), value).save(buffer, format="PNG")
    return buffer.getvalue()


def test_tracking_lives_in_the_stack(registry_stack):
    stack = registry_stack
    uri = tracking.tracking_uri(stack)
    assert uri.startswith("postgresql+psycopg://") and uri.endswith("/mlflow")
    experiment = tracking.experiment_id(stack, "bbc-news")
    assert tracking.experiment_id(stack, "bbc-news") == experiment  # found, not made twice
    location = tracking.client(stack).get_experiment(experiment).artifact_location
    assert location == str(stack.settings.home / "artifacts" / "bbc-news")


def test_first_use_from_two_processes_at_once(project_factory):
    """Two commands that find a fresh tracking database both succeed (one creates MLflow's
    tables and the experiment, the other waits and finds them)."""
    stack = project_factory()
    stack.up()
    script = (
        "import sys; from pipelines.core.config import load_settings; "
        "from pipelines.core.stack import Stack; from pipelines.model import tracking; "
        "print(tracking.experiment_id(Stack(load_settings(cwd=__import__('pathlib')."
        "Path(sys.argv[1]))), 'fashion-mnist'))"
    )
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(stack.settings.root)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert len({out.strip().splitlines()[-1] for out, _ in outputs}) == 1


def test_aliases_pick_the_version(registry_stack):
    stack = registry_stack
    registry = Registry(stack)
    assert registry.load("nothing-registered", CHAMPION) is None
    first = register_model(
        stack, "aliases", "contract", model_config={"behaviour": "constant", "label": "a"}
    )
    assert registry.load("aliases", CHAMPION) is None  # registered, but nobody's champion
    second = register_model(
        stack,
        "aliases",
        "contract",
        alias=CHAMPION,
        model_config={"behaviour": "constant", "label": "b"},
    )
    assert (first, second) == ("1", "2")
    champion = registry.load("aliases", CHAMPION)
    assert champion.ref == "aliases/2"
    assert champion.predict("text", [b"x", b"y"]) == [("b", 0.5), ("b", 0.5)]
    registry.client.set_registered_model_alias("aliases", CHAMPION, first)
    assert registry.load("aliases", CHAMPION).predict("text", [b"x"]) == [("a", 0.5)]


def test_model_inputs_follow_the_contract(registry_stack):
    stack = registry_stack
    register_model(
        stack, "probe", "contract", alias=CHAMPION, model_config={"behaviour": "describe"}
    )
    probe = Registry(stack).load("probe", CHAMPION)
    text = "Markets rally\nShares rose.".encode()
    latin1 = "Café prices\nup".encode("latin-1")
    assert [label for label, _ in probe.predict("text", [text, latin1])] == [
        "text:Markets",
        "text:Caf\ufffd",  # undecodable bytes are replaced, never an error
    ]
    assert probe.predict("image", [png(28, 28), png(28, 28, 255)])[0][0] == "uint8[28, 28]"
    assert probe.predict("image", []) == []
    with pytest.raises(CDLError, match=r"different shapes \[\(28, 28\), \(32, 28\)\]"):
        model_inputs("image", [png(28, 28), png(28, 32)])


def test_models_that_break_the_contract(registry_stack):
    stack = registry_stack
    register_model(stack, "broken", "contract", alias=CHAMPION, model_config={"behaviour": "fail"})
    with pytest.raises(CDLError, match="model broken/1 failed to predict: RuntimeError") as err:
        Registry(stack).load("broken", CHAMPION).predict("text", [b"x"])
    assert "'label' and a 'score'" in err.value.fix
    register_model(
        stack, "no-label", "contract", alias=CHAMPION, model_config={"behaviour": "no-label"}
    )
    with pytest.raises(CDLError, match=r"no-label/1 answered 1 row\(s\) with columns \['class'\]"):
        Registry(stack).load("no-label", CHAMPION).predict("text", [b"x"])


def test_a_champion_whose_artifacts_are_gone(registry_stack):
    stack = registry_stack
    register_model(stack, "lost", "contract", alias=CHAMPION, model_config={"behaviour": "fail"})
    shutil.rmtree(stack.settings.home / "artifacts" / "lost")
    with pytest.raises(CDLError, match=r"cannot load model lost/1 \(lost@champion\)") as err:
        Registry(stack).load("lost", CHAMPION)
    assert "move the alias" in err.value.fix


def test_unreachable_tracking_is_a_clear_error(project_factory):
    stack = project_factory()
    stack.up()
    stack.down()
    with pytest.raises(StackError, match="cannot reach MLflow tracking at postgresql") as err:
        tracking.client(stack)
    assert "***" in str(err.value.problem)  # the password is masked
    assert "cdl stack up" in err.value.fix


def test_registered_names():
    assert registered_name("bbc_news") == "bbc-news"
    assert registered_name("fashion_mnist") == "fashion-mnist"
    assert np.asarray(model_inputs("text", [b"a"])["text"]).tolist() == ["a"]


# -- registration ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labeled(registry_stack, tmp_path_factory):
    """bbc_news labels of 100 generated articles, frozen as snapshot 'first'."""
    from pipelines.data.labeling.spec import use_case
    from pipelines.data.labeling.store import LabelStore
    from tests.model.training_runs import label_corpus

    label_corpus(registry_stack, tmp_path_factory.mktemp("bbc"), 100, 3, "/valid", 1)
    LabelStore(registry_stack, use_case("bbc_news")).snapshot("first")
    return registry_stack


def test_register_an_experiment_registers_its_best_trial(labeled):
    from pipelines.core import events, lineage
    from pipelines.core.errors import AlreadyExists
    from pipelines.model.registry import register
    from tests.model import training_runs as runs

    stack = labeled
    started = time.perf_counter()
    parent = runs.parent_run(stack, "7", "first")
    weak = runs.train_run(stack, "first", epochs=1, parent=parent, experiment="7", trial=0)
    best = runs.train_run(
        stack, "first", epochs=2, hparams={"hidden": 48}, parent=parent, experiment="7", trial=1
    )
    runs.end_experiment(stack, parent, best)
    trained = time.perf_counter() - started

    done = register(stack, parent)
    info = done.version
    print(f"two trials trained in {trained:.1f} s; registered in {done.seconds:.2f} s")
    assert (info.ref, info.run_id, done.run.parent_run) == ("bbc-news/1", best.run_id, parent)
    tags = info.tags
    assert (tags["cdl.run"], tags["cdl.experiment"], tags["cdl.trial"]) == (best.run_id, "7", "1")
    assert tags["cdl.parent_run"] == parent
    assert (tags["cdl.use_case"], tags["cdl.task"]) == ("bbc_news", "text")
    assert tags["cdl.snapshot"] == "bbc_news/first"
    assert re.fullmatch(r"bbc-validate@[0-9a-f]+", tags["cdl.data_commits"])
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", tags["cdl.git_sha"])
    assert tags["cdl.git_sha_from"] == "registration"  # the run records no commit of its own
    assert json.loads(tags["cdl.labels"]) == list(bbc.CLASSES)
    assert int(tags["cdl.parameters"]) == best.parameters  # counted in the loaded network
    assert tags["cdl.parameters_from"] == "measured"
    assert int(tags["cdl.artifact_bytes"]) > 4 * best.parameters  # float32 weights and more
    assert 0 < float(tags["cdl.latency_ms"]) <= float(tags["cdl.latency_p95_ms"]) < 1000
    assert tags["cdl.latency_inputs"] == str(LATENCY_ROUNDS * LATENCY_INPUTS)
    run = tracking.client(stack).get_run(best.run_id)
    for metric in ("val_accuracy", "val_loss", "loss"):
        assert float(tags[f"cdl.metric.{metric}"]) == pytest.approx(run.data.metrics[metric])

    # The registered version loads and answers by the contract.
    model = Registry(stack).load_version(info)
    assert model.predict("text", [b"Shares rose\n\nThe market and bank profit grew"])[0][0] in (
        bbc.CLASSES
    )

    # The same trial again, by its CDL experiment id or its run id: refused, naming the version.
    for ref in ("7", best.run_id):
        with pytest.raises(AlreadyExists, match="registered already, as bbc-news/1"):
            register(stack, ref)
    assert register(stack, weak.run_id).version.ref == "bbc-news/2"  # any trial, by run id

    with stack.connect() as conn:
        tree = lineage.tree(conn, "model_version:bbc-news/1")
        found = events.recent(conn, 10, ["model.registered"])
    assert [(c.kind, c.key, c.relation) for c in tree.children] == [
        ("run", best.run_id, "produced")
    ]
    assert [(c.kind, c.key) for c in tree.children[0].children] == [
        ("label_snapshot", "bbc_news/first")
    ]
    assert [e.subject for e in found] == ["bbc-news/1", "bbc-news/2"]
    assert found[0].payload["run"] == best.run_id and found[0].payload["experiment"] == "7"


def test_register_refuses_runs_without_a_usable_model(labeled):
    from pipelines.core.errors import Invalid, NotFound
    from pipelines.model.registry import register
    from tests.model import training_runs as runs

    stack = labeled
    constant = {"behaviour": "constant", "label": "sport"}
    failed = runs.code_model_run(stack, "first", constant, status="FAILED", tags={"cdl.trial": "3"})
    with pytest.raises(Invalid, match=f"run {failed} \\(trial 3 failed\\) cannot be registered"):
        register(stack, failed)
    empty = runs.code_model_run(stack, "first", constant, with_model=False)
    with pytest.raises(NotFound, match="has no MLflow model at artifact path 'model'") as err:
        register(stack, empty)
    assert "completed or pruned trial" in err.value.fix
    running = runs.parent_run(stack, "8", "first")  # an experiment that has not ended
    runs.code_model_run(
        stack, "first", constant, tags={"mlflow.parentRunId": running, "cdl.trial": "3"}
    )
    with pytest.raises(Invalid, match="experiment 8 .* has no best trial yet"):
        register(stack, "8")
    # The experiment ends naming its best trial by number (`cdl.best_trial`): that trial's run.
    best = runs.code_model_run(
        stack,
        "first",
        {"behaviour": "constant", "label": "tech"},
        tags={"mlflow.parentRunId": running, "cdl.experiment": "8", "cdl.trial": "4"},
    )
    tracking.client(stack).set_tag(running, "cdl.best_trial", "4")
    done = register(stack, "8")
    assert (done.run.run_id, done.run.parent_run, done.version.tags["cdl.trial"]) == (
        best,
        running,
        "4",
    )
    with pytest.raises(NotFound, match="no MLflow run of CDL experiment 99"):
        register(stack, "99")
    with pytest.raises(NotFound, match="no MLflow run or CDL experiment 'f00d'"):
        register(stack, "f00d")
    lost = runs.code_model_run(stack, "gone", constant)
    with pytest.raises(NotFound, match="no snapshot bbc_news/gone"):
        register(stack, lost)

    # A model logged with pyfunc.log_model (MLflow 3 keeps it outside the run's artifacts), whose
    # run logged its parameter count: that count is recorded.
    logged = runs.code_model_run(stack, "first", constant, tags={"cdl.parameters": "1234"})
    info = register(stack, logged).version
    assert (info.tags["cdl.parameters"], info.tags["cdl.parameters_from"]) == ("1234", "run")
    assert int(info.tags["cdl.artifact_bytes"]) > 0
    assert Registry(stack).load_version(info).predict("text", [b"x"]) == [("sport", 0.5)]


def test_cli_register_list_show_compare(labeled):
    from tests.model import training_runs as runs

    stack = labeled
    folder = stack.settings.root
    parent = runs.parent_run(stack, "12", "first")
    best = runs.train_run(stack, "first", epochs=1, parent=parent, experiment="12", trial=0)
    other = runs.train_run(
        stack, "first", epochs=1, hparams={"hidden": 48}, parent=parent, experiment="12", trial=1
    )
    runs.end_experiment(stack, parent, best)
    done = cdl("model", "register", parent, cwd=folder)
    assert done.returncode == 0, done.stderr
    ref = re.search(r"registered (bbc-news/\d+) from run", done.stdout)[1]
    assert f"run {best.run_id} (experiment 12, trial 0)" in done.stdout
    listed = cdl("model", "list", "bbc_news", cwd=folder)
    assert listed.returncode == 0, listed.stderr
    assert "bbc-news:" in listed.stdout and "bbc_news/first" in listed.stdout
    shown = cdl("model", "show", ref, "--json", cwd=folder)
    assert json.loads(shown.stdout)["tags"]["cdl.run"] == best.run_id
    second = cdl("model", "register", other.run_id, cwd=folder)
    assert second.returncode == 0, second.stderr
    other_ref = re.search(r"registered (bbc-news/\d+) from run", second.stdout)[1]
    compared = cdl("model", "compare", ref, other_ref, cwd=folder)
    assert compared.returncode == 0, compared.stderr
    assert "param hidden" in compared.stdout  # 32 vs 48: the hyperparameters that differ
    again = cdl("model", "register", best.run_id, cwd=folder)
    assert again.returncode == 1
    assert again.stderr.startswith("error: run ") and len(again.stderr.strip().splitlines()) == 1
    unknown = cdl("model", "list", "iris", cwd=folder)
    assert unknown.returncode == 1 and "no registered model iris" in unknown.stderr
    # an unknown version through the CLI: tests/model/test_evaluation.py


def test_register_what_the_experiment_engine_left(labeled):
    """A real grid search of the BBC trainer by the local experiment engine (run by a worker in
    this process), registered by its CDL experiment id: the best trial's run, with the
    provenance tags the engine wrote."""
    import yaml

    from pipelines.model.registry import register
    from pipelines.model.search import LocalExperiments

    stack = labeled
    spec = stack.settings.root / "grid.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "grid",
                "entrypoint": "python3 -m pipelines.model.entrypoint",
                "data": {"use_case": "bbc_news", "snapshot": "first"},
                "hyperparameters": {
                    "epochs": 2,
                    "learning_rate": 0.01,
                    "hidden": {"type": "categorical", "vals": [8, 32]},
                },
                "searcher": {
                    "name": "grid",
                    "metric": "val_loss",
                    "smaller_is_better": True,
                    "max_concurrent_trials": 1,
                },
            }
        )
    )
    engine = LocalExperiments(stack)
    experiment_id = engine.record(spec).experiment.id
    engine.worker(experiment_id, print)
    experiment, trials = engine.show(experiment_id)
    assert experiment.state == "completed", [t.error for t in trials]
    best = next(t for t in trials if t.number == experiment.best_trial)

    info = register(stack, str(experiment_id)).version
    assert info.run_id == best.mlflow_run
    run = tracking.client(stack).get_run(best.mlflow_run)
    assert info.tags["cdl.git_sha_from"] == "run"
    assert info.tags["cdl.git_sha"] == run.data.tags["cdl.git_sha"]
    assert info.tags["cdl.data_commits"] == run.data.tags["cdl.data_commits"]
    assert info.tags["cdl.parameters"] == run.data.tags["cdl.parameters"]
    assert info.tags["cdl.parameters_from"] == "run"
    assert info.tags["cdl.experiment"] == str(experiment_id)
