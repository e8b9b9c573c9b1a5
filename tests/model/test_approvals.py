"""Approval and promotion on a real stack: the champion alias moves only to versions that passed
the gate (or with --force), every approval is kept in Postgres with who, when, why, the previous
champion and both versions' test scores, approving an older version is a rollback, and labeling's
pre-annotation follows the champion."""

import psycopg
import pytest

from pipelines.core import events
from pipelines.core.errors import Invalid, NotFound
from pipelines.data.labeling.spec import use_case
from pipelines.data.labeling.store import LabelStore
from pipelines.model import approvals, evaluation
from pipelines.model.predictor import model_predictor
from pipelines.model.registry import CHAMPION, Registry, register
from tests.conftest import cdl, destroy, make_project, stack_for
from tests.model import training_runs as runs


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """bbc-news/1 and /3 trained on snapshot 'first' and passed the gate; bbc-news/2 answers
    'sport' to everything and failed it; bbc-news/4 was never evaluated."""
    stack = stack_for(make_project())
    stack.up()
    runs.label_corpus(stack, tmp_path_factory.mktemp("bbc"), 100, 3, "/valid", 1)
    LabelStore(stack, use_case("bbc_news")).snapshot("first")
    register(stack, runs.train_run(stack, "first", epochs=2).run_id)
    register(
        stack, runs.code_model_run(stack, "first", {"behaviour": "constant", "label": "sport"})
    )
    register(stack, runs.train_run(stack, "first", epochs=2, hparams={"hidden": 40}).run_id)
    register(stack, runs.code_model_run(stack, "first", {"behaviour": "constant", "label": "tech"}))
    reports = tmp_path_factory.mktemp("reports")
    for version in (1, 2, 3):
        junit, report = reports / f"{version}.xml", reports / f"{version}.md"
        evaluation.evaluate(stack, f"bbc-news/{version}", 0.6, junit, report)
    yield stack
    destroy(stack)


def champion(stack) -> str | None:
    found = Registry(stack).version("bbc-news", CHAMPION)
    return None if found is None else str(found.version)


def test_promote_refuse_force_and_roll_back(models):
    stack = models
    first = approvals.approve(stack, "bbc-news/1", "alice@example.com", "first model")
    assert champion(stack) == "1"
    assert (first.approval.action, first.approval.previous_version) == ("promoted", None)
    assert first.comparison.champion is None and first.comparison.champion_scores is None
    assert first.comparison.snapshot == "bbc_news/first"
    assert CHAMPION in first.comparison.challenger.aliases

    with pytest.raises(Invalid, match=r"bbc-news/2 has not passed the evaluation gate: it failed"):
        approvals.approve(stack, "bbc-news/2", "bob", "looks fine")
    with pytest.raises(Invalid, match="bbc-news/4 has not passed .*: it has never been evaluated"):
        approvals.approve(stack, "bbc-news/4", "bob", "looks fine")
    assert champion(stack) == "1"
    forced = approvals.approve(stack, "bbc-news/2", "bob", "demo of a forced approval", True)
    assert forced.approval.forced and forced.approval.previous_version == 1
    assert champion(stack) == "2"
    # both on the same test split: the champion's scores from its evaluation on that snapshot
    assert forced.comparison.champion.ref == "bbc-news/1"
    assert forced.comparison.champion_scores.rows == forced.comparison.challenger_scores.rows
    assert forced.comparison.champion_scores.accuracy > forced.comparison.challenger_scores.accuracy

    third = approvals.approve(stack, "bbc-news/3", "carol", "better than 2")
    assert (third.approval.action, third.approval.previous_version) == ("promoted", 2)
    back = approvals.approve(stack, "bbc-news/1", "alice@example.com", "3 misbehaves in prod")
    assert (back.approval.action, back.approval.previous_version) == ("rolled_back", 3)
    assert champion(stack) == "1"
    with pytest.raises(Invalid, match="bbc-news/1 is the champion already"):
        approvals.approve(stack, "bbc-news/1", "alice", "again")
    with pytest.raises(NotFound, match="model bbc-news has no version 9"):
        approvals.approve(stack, "bbc-news/9", "alice", "typo")
    with pytest.raises(Invalid, match="needs who approves it and why"):
        approvals.approve(stack, "bbc-news/3", "alice", "  ")

    rows = approvals.history(stack, "bbc_news")
    assert [(r.version, r.action, r.previous_version, r.forced) for r in rows] == [
        (1, "rolled_back", 3, False),
        (3, "promoted", 2, False),
        (2, "promoted", 1, True),
        (1, "promoted", None, False),
    ]
    assert [r.approved_by for r in rows] == [
        "alice@example.com",
        "carol",
        "bob",
        "alice@example.com",
    ]
    assert rows[0].reason == "3 misbehaves in prod" and rows[0].snapshot == "bbc_news/first"
    assert rows[0].approved_at > rows[-1].approved_at
    assert rows[0].metrics["accuracy"] >= 0.6 and "sport" in rows[0].metrics["per_class"]
    assert rows[1].previous_metrics["accuracy"] < 0.6  # the forced 'sport' model it replaced
    assert rows[-1].previous_metrics is None

    with stack.connect() as conn:
        found = [
            (e.type, e.subject)
            for e in events.recent(conn, 4, ["model.promoted", "model.rolled_back"])
        ]
        with pytest.raises(psycopg.errors.RaiseException, match="never changed or deleted"):
            conn.execute("UPDATE model_approvals SET reason = 'edited'")
    assert found == [
        ("model.promoted", "bbc-news/1"),
        ("model.promoted", "bbc-news/2"),
        ("model.promoted", "bbc-news/3"),
        ("model.rolled_back", "bbc-news/1"),
    ]

    # Labeling's pre-annotation uses whichever version is the champion now.
    predictor = model_predictor(stack, use_case("bbc_news"), CHAMPION)
    assert predictor.ref == "bbc-news/1"
    [answer] = predictor(
        [("/a.txt", b"Match\n\nThe team won the cup final, the coach said")]
    ).values()
    assert answer["label"] == "sport" and answer["model"] == "bbc-news/1"


def test_approve_and_history_through_the_cli(models):
    stack = models
    folder = stack.settings.root
    unsigned = cdl("model", "approve", "bbc-news/3", "--reason", "why not", cwd=folder)
    assert unsigned.returncode == 2 and "Missing option '--by'" in unsigned.stderr
    blank = cdl("model", "approve", "bbc-news/3", "--by", "dan", "--reason", "", cwd=folder)
    assert blank.returncode == 1 and len(blank.stderr.strip().splitlines()) == 1
    assert "give --by WHO and --reason TEXT" in blank.stderr
    refused = cdl("model", "approve", "bbc-news/2", "--by", "dan", "--reason", "x", cwd=folder)
    assert refused.returncode == 1 and "--force" in refused.stderr

    before = champion(stack)
    approved = cdl(
        "model", "approve", "bbc-news/3", "--by", "dan", "--reason", "weekly release", cwd=folder
    )
    assert approved.returncode == 0, approved.stderr
    assert "(champion)" in approved.stdout and "accuracy" in approved.stdout
    assert champion(stack) == "3"
    assert f"previous champion: bbc-news/{before}" in approved.stdout
    shown = cdl("model", "history", "bbc-news", cwd=folder)
    assert shown.returncode == 0, shown.stderr
    assert "weekly release" in shown.stdout and "dan" in shown.stdout
    listed = cdl("model", "list", cwd=folder)
    assert "champion" in listed.stdout and "candidate" in listed.stdout


def test_the_champion_is_scored_on_the_challengers_test_split(models, tmp_path):
    """A challenger trained on a newer snapshot: the champion (evaluated on an older one) is
    scored now on the challenger's test split, so both are compared on the same files."""
    stack = models
    store = LabelStore(stack, use_case("bbc_news"))
    runs.label_corpus(stack, tmp_path, 50, 9, "/more", 1000)
    store.snapshot("second")
    info = register(stack, runs.train_run(stack, "second", epochs=2).run_id).version
    evaluation.evaluate(stack, info.ref, 0.6, tmp_path / "j.xml", tmp_path / "r.md")
    previous = Registry(stack).champion("bbc-news")
    assert previous.tags["cdl.eval.snapshot"] == "bbc_news/first"
    done = approvals.approve(stack, info.ref, "erin", "trained on more labels")
    comparison = done.comparison
    rows = len(store.test_rows("second"))
    assert comparison.snapshot == "bbc_news/second"
    assert comparison.champion.ref == previous.ref
    assert comparison.challenger_scores.rows == comparison.champion_scores.rows == rows
    assert rows > len(store.test_rows("first"))
    assert done.approval.previous_metrics["rows"] == rows
    # the champion's own evaluation (on its snapshot) is left as it was
    assert Registry(stack).get(previous.ref).tags["cdl.eval.snapshot"] == "bbc_news/first"
