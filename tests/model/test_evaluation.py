"""The evaluation gate on a real stack: registered BBC models scored on the test split of their
own label snapshot (read as cdl_evaluator), results on the version, in an evaluation run and in
files for CI, the `candidate` alias only for a pass."""

import json
import xml.etree.ElementTree as ET

import pytest

from pipelines.core import events, lineage
from pipelines.core.errors import NotFound
from pipelines.data.labeling.spec import use_case
from pipelines.data.labeling.store import LabelStore
from pipelines.model import evaluation, tracking
from pipelines.model.registry import CANDIDATE, Registry, register
from tests.conftest import cdl, destroy, make_project, stack_for
from tests.model import training_runs as runs


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Snapshots 'first' (100 articles) and 'second' (60 more: other test rows too); bbc-news/1
    trained on 'first' for 2 epochs, bbc-news/2 a model that answers 'sport' to everything, also
    registered from 'first'."""
    stack = stack_for(make_project())
    stack.up()
    folder = tmp_path_factory.mktemp("bbc")
    store = LabelStore(stack, use_case("bbc_news"))
    next_id = runs.label_corpus(stack, folder, 100, 3, "/valid", 1)
    store.snapshot("first")
    runs.label_corpus(stack, folder, 60, 4, "/more", next_id)
    store.snapshot("second")
    trained = runs.train_run(stack, "first", epochs=3)
    assert register(stack, trained.run_id).version.ref == "bbc-news/1"
    constant = runs.code_model_run(stack, "first", {"behaviour": "constant", "label": "sport"})
    assert register(stack, constant).version.ref == "bbc-news/2"
    yield stack, store
    destroy(stack)


def test_test_rows_are_the_test_split_read_as_evaluator(models):
    _, store = models
    test, train = store.test_rows("first"), store.train_rows("first")
    everything = {(r["source"], r["label"], r["split"]) for r in store.snapshot_rows("first")}
    assert {(s, label, "test") for s, label in test} | {(s, label, "train") for s, label in train}
    assert {(s, label) for s, label, _ in everything} == set(test) | set(train)
    assert not {s for s, _ in test} & {s for s, _ in train}
    assert 0 < len(test) < len(store.test_rows("second"))  # the second snapshot has more
    assert set(test) < set(store.test_rows("second"))  # a file keeps its split
    with pytest.raises(NotFound, match="no snapshot bbc_news/nothing"):
        store.test_rows("nothing")


def test_a_passing_version_is_scored_on_its_own_snapshot_and_becomes_candidate(models, tmp_path):
    stack, store = models
    junit, report = tmp_path / "ci" / "junit.xml", tmp_path / "ci" / "report.md"
    result = evaluation.evaluate(stack, "bbc-news/1", 0.6, junit, report)
    print(f"evaluated in {result.seconds:.2f} s: accuracy {result.scores.accuracy:.3f}")
    scores = result.scores
    first_test = store.test_rows("first")
    assert scores.snapshot == "bbc_news/first"
    assert scores.rows == len(first_test) != len(store.test_rows("second"))
    assert sum(map(sum, scores.confusion)) == scores.rows
    assert [sum(row) for row in scores.confusion] == [
        sum(label == name for _, label in first_test) for name in scores.labels
    ]
    assert result.passed and scores.accuracy >= 0.6
    assert set(scores.per_class) == {"business", "entertainment", "politics", "sport", "tech"}

    info = result.version
    assert CANDIDATE in info.aliases
    assert info.tags["cdl.eval.passed"] == "true"
    assert float(info.tags["cdl.eval.accuracy"]) == pytest.approx(scores.accuracy, rel=1e-5)
    assert info.tags["cdl.eval.snapshot"] == "bbc_news/first"
    assert info.tags["cdl.eval.rows"] == str(scores.rows)
    assert json.loads(info.tags["cdl.eval.scores"])["confusion"] == scores.confusion

    suite = ET.parse(junit).getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("1", "0")
    properties = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert float(properties["accuracy"]) == pytest.approx(scores.accuracy, rel=1e-5)
    assert "sport.f1" in properties
    [case] = suite.iter("testcase")
    assert case.get("name") == "bbc-news/1 test accuracy >= 0.6" and case.find("failure") is None
    text = report.read_text()
    assert text.startswith("# Evaluation of bbc-news/1: PASSED")
    assert "| sport |" in text and "![confusion matrix](report-confusion.png)" in text
    assert result.figure == tmp_path / "ci" / "report-confusion.png"
    assert result.figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    client = tracking.client(stack)
    run = client.get_run(result.run_id)
    assert run.data.tags["cdl.evaluation_of"] == "bbc-news/1"
    assert run.data.metrics["test_accuracy"] == pytest.approx(scores.accuracy)
    assert "test_sport_f1" in run.data.metrics
    files = {f.path for f in client.list_artifacts(result.run_id, "evaluation")}
    assert files == {
        "evaluation/report-confusion.png",
        "evaluation/report.md",
        "evaluation/junit.xml",
        "evaluation/scores.json",
    }
    with stack.connect() as conn:
        tree = lineage.tree(conn, f"run:{result.run_id}")
        [event] = events.recent(conn, 1, ["model.evaluation.*"])
    assert {(c.kind, c.key) for c in tree.children} == {
        ("model_version", "bbc-news/1"),
        ("label_snapshot", "bbc_news/first"),
    }
    assert (event.type, event.subject) == ("model.evaluation.passed", "bbc-news/1")
    assert event.payload["rows"] == scores.rows and event.payload["min_accuracy"] == 0.6


def test_the_gate_through_the_cli(models, tmp_path):
    stack, _ = models
    folder = stack.settings.root
    registry = Registry(stack)
    registry.set_alias(registry.get("bbc-news/2"), CANDIDATE)  # as if it had passed before
    junit, report = tmp_path / "junit.xml", tmp_path / "report.md"
    failed = cdl(
        "model",
        "evaluate",
        "bbc-news/2",
        "--min-accuracy",
        "0.6",
        "--junit",
        str(junit),
        "--report",
        str(report),
        cwd=folder,
    )
    assert failed.returncode == 1, failed.stderr
    assert "bbc-news/2: FAILED accuracy" in failed.stdout
    failure = ET.parse(junit).getroot().find("testsuite/testcase/failure")
    assert failure is not None and failure.get("message").endswith("< 0.6")
    assert report.read_text().startswith("# Evaluation of bbc-news/2: FAILED")
    info = registry.get("bbc-news/2")
    assert CANDIDATE not in info.aliases and info.tags["cdl.eval.passed"] == "false"
    assert float(info.tags["cdl.eval.accuracy"]) < 0.6  # 'sport' for everything

    passed = cdl("model", "evaluate", "bbc_news/1", "--min-accuracy", "0.5", cwd=folder)
    assert passed.returncode == 0, passed.stderr
    assert "bbc-news/1: PASSED" in passed.stdout and "alias candidate set" in passed.stdout
    defaults = folder / "reports"
    assert sorted(p.name for p in defaults.iterdir()) == [
        "bbc-news-1-evaluation-confusion.png",
        "bbc-news-1-evaluation.md",
        "bbc-news-1-evaluation.xml",
    ]
    with stack.connect() as conn:
        found = [(e.type, e.subject) for e in events.recent(conn, 2, ["model.evaluation.*"])]
    assert found == [
        ("model.evaluation.failed", "bbc-news/2"),
        ("model.evaluation.passed", "bbc-news/1"),
    ]
    shown = cdl("model", "show", "bbc-news/1", cwd=folder)
    assert "on the test split of bbc_news/first" in shown.stdout


def test_versions_and_snapshots_that_do_not_exist(models):
    stack, _ = models
    with pytest.raises(NotFound, match="model bbc-news has no version 42") as err:
        evaluation.evaluate(stack, "bbc-news/42", 0.5)
    assert "cdl model list bbc-news" in err.value.fix
    with pytest.raises(NotFound, match="no registered model iris"):
        evaluation.evaluate(stack, "iris/1", 0.5)
    registry = Registry(stack)
    constant = runs.code_model_run(stack, "first", {"behaviour": "constant", "label": "tech"})
    info = register(stack, constant).version
    registry.set_tags(info, {"cdl.snapshot": "bbc_news/gone"})  # its snapshot was lost
    with pytest.raises(NotFound, match=f"snapshot bbc_news/gone of {info.ref} no longer exists"):
        evaluation.evaluate(stack, info.ref, 0.5)
    evaluated = cdl(
        "model", "evaluate", "bbc-news/42", "--min-accuracy", "0.5", cwd=stack.settings.root
    )
    assert evaluated.returncode == 1
    assert evaluated.stderr == (
        "error: model bbc-news has no version 42 (versions: 3, 2, 1) "
        "(fix: see 'cdl model list bbc-news')\n"
    )


def test_scores_per_class():
    scores = evaluation.compute_scores(
        "uc/s",
        ["a", "a", "a", "b", "b", "c"],
        ["a", "a", "b", "b", "x", "c"],
        ["a", "b", "c"],
    )
    assert scores.labels == ["a", "b", "c", "x"]  # an answer outside the label set gets a column
    assert scores.accuracy == pytest.approx(4 / 6)
    assert scores.per_class["a"] == pytest.approx(
        {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3}
    )
    assert scores.per_class["b"]["precision"] == 0.5 and scores.per_class["b"]["recall"] == 0.5
    assert scores.confusion == [[2, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert scores.macro_f1 == pytest.approx((0.8 + 0.5 + 1.0) / 3)  # labels with test rows


def test_an_evaluation_that_cannot_be_recorded_leaves_the_version_as_it_was(models, monkeypatch):
    """The version's result (tags, `candidate`) and the evaluation's event and lineage go
    together: when the database refuses the event, the version does not show a pass."""
    stack, _ = models
    constant = runs.code_model_run(stack, "first", {"behaviour": "constant", "label": "sport"})
    info = register(stack, constant).version

    def refused(*args, **kwargs):
        raise ConnectionError("database connection lost")

    monkeypatch.setattr(evaluation.events, "emit", refused)
    with pytest.raises(ConnectionError):
        evaluation.evaluate(stack, info.ref, 0.0)
    monkeypatch.undo()
    after = Registry(stack).get(info.ref)
    assert CANDIDATE not in after.aliases
    assert not {tag for tag in after.tags if tag.startswith("cdl.eval.")}
    with stack.connect() as conn:
        node = lineage.get_node(conn, lineage.node_id(lineage.Kind.MODEL_VERSION, info.ref))
        assert "evaluation" not in node.attributes  # the registration's node, untouched
