"""MLflow tracking and the model registry on the stack's Postgres, and the CDL model contract
every registered model follows."""

import io
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pipelines.core.errors import CDLError, StackError
from pipelines.model import tracking
from pipelines.model.registry import CHAMPION, Registry, model_inputs, registered_name
from tests.conftest import REPO, register_model


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
