"""The BBC news use case's model pipeline end to end, as a user runs it: the shipped training
spec on a label snapshot of a generated corpus in the BBC raw format, trained by the local
engine, registered, and gated at the issue's accuracy by `cdl model evaluate`."""

from __future__ import annotations

import yaml

from tests.conftest import REPO, cdl
from tests.model.training_runs import label_corpus


def test_bbc_news_trained_by_the_platform_passes_a_095_gate(project_factory, tmp_path):
    stack = project_factory()
    stack.up()
    label_corpus(stack, tmp_path, docs=400, seed=5, dest="/valid", first_id=1)
    from pipelines.data.labeling.spec import use_case
    from pipelines.data.labeling.store import LabelStore

    LabelStore(stack, use_case("bbc_news")).snapshot("accuracy")
    spec = yaml.safe_load((REPO / "use_cases" / "bbc_news" / "model" / "train.yaml").read_text())
    spec["hyperparameters"]["epochs"] = 6
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(spec))  # snapshot: latest
    folder = stack.settings.root

    trained = cdl("experiment", "submit", str(tmp_path / "train.yaml"), "--wait", cwd=folder)
    assert trained.returncode == 0, trained.stderr
    assert "bbc_news/accuracy" in trained.stdout  # `latest` resolved and said
    registered = cdl("model", "register", "1", cwd=folder)
    assert registered.returncode == 0, registered.stderr
    gate = cdl("model", "evaluate", "bbc-news/1", "--min-accuracy", "0.95", cwd=folder)
    assert gate.returncode == 0, gate.stdout + gate.stderr
    shown = cdl("model", "show", "bbc-news/1", "--json", cwd=folder)
    tags = yaml.safe_load(shown.stdout)["tags"]
    assert (
        float(tags["cdl.eval.accuracy"]) >= 0.95
        and tags["cdl.eval.snapshot"] == "bbc_news/accuracy"
    )
