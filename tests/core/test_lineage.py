import json
import uuid

import pytest

from pipelines.core import lineage
from pipelines.core.errors import CDLError
from pipelines.core.lineage import Kind
from tests.conftest import cdl


@pytest.fixture
def chain(conn):
    """raw commit -> clean job -> clean commit -> run (+ labels) -> model -> deployment -> batch,
    with the clean commit read by both the run and the evaluation of the model (a diamond)."""
    tag = uuid.uuid4().hex[:8]
    ids = {
        "raw": lineage.record_node(conn, Kind.DATASET_COMMIT, f"bbc_raw@{tag}", files=12),
        "job": lineage.record_node(conn, Kind.PIPELINE_JOB, f"clean/{tag}"),
        "clean": lineage.record_node(conn, Kind.DATASET_COMMIT, f"bbc_clean@{tag}"),
        "labels": lineage.record_node(conn, Kind.LABEL_SNAPSHOT, f"labels-{tag}"),
        "run": lineage.record_node(conn, Kind.RUN, f"run-{tag}", lr=0.01),
        "eval": lineage.record_node(conn, Kind.RUN, f"eval-{tag}"),
        "model": lineage.record_node(conn, Kind.MODEL_VERSION, f"bbc-{tag}/1"),
        "deploy": lineage.record_node(conn, Kind.DEPLOYMENT, f"bbc-{tag}@1"),
        "batch": lineage.record_node(conn, Kind.PREDICTION_BATCH, f"batch-{tag}"),
    }
    lineage.consumed(conn, ids["job"], ids["raw"])
    lineage.produced(conn, ids["job"], ids["clean"])
    lineage.consumed(conn, ids["run"], ids["clean"], ids["labels"])
    lineage.produced(conn, ids["run"], ids["model"])
    lineage.consumed(conn, ids["eval"], ids["model"], ids["clean"])
    lineage.consumed(conn, ids["deploy"], ids["model"])
    lineage.produced(conn, ids["deploy"], ids["batch"])
    return ids


def flatten(node, depth=0):
    yield depth, node
    for child in node.children:
        yield from flatten(child, depth + 1)


def test_upstream_tree_reaches_the_raw_files(conn, chain):
    root = lineage.tree(conn, chain["batch"])
    found = {n.id: (d, n.relation) for d, n in flatten(root)}
    assert found[chain["deploy"]] == (1, "produced")
    assert found[chain["model"]] == (2, "consumed")
    assert found[chain["run"]] == (3, "produced")
    assert found[chain["labels"]] == (4, "consumed")
    assert found[chain["clean"]] == (4, "consumed")
    assert found[chain["job"]] == (5, "produced")
    assert found[chain["raw"]] == (6, "consumed")
    assert chain["eval"] not in found  # downstream of the model, not upstream of the batch
    assert root.kind == "prediction_batch"


def test_diamond_is_expanded_once(conn, chain):
    root = lineage.tree(conn, chain["eval"])
    clean_nodes = [n for _, n in flatten(root) if n.id == chain["clean"]]
    assert len(clean_nodes) == 2
    assert sum(n.repeated for n in clean_nodes) == 1
    assert [n for n in clean_nodes if not n.repeated][0].children  # the expanded one has its job


def test_downstream_tree(conn, chain):
    root = lineage.tree(conn, chain["raw"], "downstream")
    ids = {n.id for _, n in flatten(root)}
    assert {
        chain["job"],
        chain["clean"],
        chain["run"],
        chain["eval"],
        chain["model"],
        chain["deploy"],
        chain["batch"],
    } <= ids
    assert chain["labels"] not in ids


def test_depth_limit(conn, chain):
    root = lineage.tree(conn, chain["batch"], depth=2)
    assert max(d for d, _ in flatten(root)) == 2


def test_recording_is_idempotent_and_merges_attributes(conn, chain):
    again = lineage.record_node(conn, Kind.DATASET_COMMIT, chain["raw"].split(":", 1)[1], size=99)
    assert again == chain["raw"]
    lineage.consumed(conn, chain["job"], chain["raw"])
    node = lineage.get_node(conn, chain["raw"])
    assert node.attributes == {"files": 12, "size": 99}
    count = conn.execute(
        "SELECT count(*) FROM lineage_edges WHERE upstream = %s", [chain["raw"]]
    ).fetchone()[0]
    assert count == 1


def test_bad_records(conn, chain):
    with pytest.raises(ValueError):
        lineage.record_node(conn, "spreadsheet", "x")
    with pytest.raises(CDLError, match="non-empty key"):
        lineage.record_node(conn, Kind.RUN, "")
    with pytest.raises(CDLError, match="cannot depend on itself"):
        lineage.consumed(conn, chain["run"], chain["run"])
    with pytest.raises(CDLError, match="names an unknown node"):
        lineage.consumed(conn, chain["run"], "dataset_commit:nowhere@0")


def test_unknown_id_suggests_close_ones(conn, chain):
    tag = chain["raw"].split("@")[1]
    with pytest.raises(CDLError) as err:
        lineage.tree(conn, f"dataset_commit:{tag}")
    assert chain["raw"] in err.value.fix


def test_cli_show(shared_stack, chain):
    folder = shared_stack.settings.root
    result = cdl("lineage", "show", chain["batch"], cwd=folder)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for key in ("prediction_batch", "made by:", "input:", chain["raw"].split(":", 1)[1]):
        assert key in out
    as_json = json.loads(cdl("lineage", "show", chain["model"], "--json", cwd=folder).stdout)
    assert as_json["id"] == chain["model"]
    assert as_json["children"][0]["id"] == chain["run"]
    down = cdl("lineage", "show", chain["model"], "--downstream", cwd=folder)
    assert "read by:" in down.stdout and "output:" in down.stdout
    missing = cdl("lineage", "show", "run:does-not-exist", cwd=folder)
    assert missing.returncode == 1 and "no lineage node 'run:does-not-exist'" in missing.stderr
