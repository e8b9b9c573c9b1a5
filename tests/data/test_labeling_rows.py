"""Label Studio JSON to label rows and back, without a stack."""

import base64

import pytest

from pipelines.core.errors import Invalid
from pipelines.data.labeling import rows
from pipelines.data.labeling.spec import use_case

BBC = use_case("bbc_news")
FASHION = use_case("fashion_mnist")


def test_task_data():
    assert rows.task_data(BBC, b"A title\nThe body.\n") == {"title": "A title", "text": "The body."}
    image = rows.task_data(FASHION, b"\x89PNG")
    assert image == {"image": "data:image/png;base64," + base64.b64encode(b"\x89PNG").decode()}


def test_choice_result_and_prediction():
    assert rows.choice_result(BBC, []) == []
    [result] = rows.choice_result(FASHION, ["bag"])
    assert result["to_name"] == "image" and result["value"] == {"choices": ["bag"]}
    [found] = rows.prediction(
        BBC, "/valid/tech/1.txt", {"label": "tech", "score": 0.9, "model": "m/1"}
    )
    assert (found["model_version"], found["score"]) == ("m/1", 0.9)
    assert found["result"] == rows.choice_result(BBC, ["tech"])
    assert rows.prediction(BBC, "/valid/tech/1.txt", None) == []
    with pytest.raises(Invalid, match="label 'weather' is not in the labeling config"):
        rows.prediction(BBC, "/valid/x.txt", {"label": "weather", "model": "m/1"})


def test_class_of():
    assert rows.class_of("/valid/sport/001.txt", "/valid") == "sport"
    assert rows.class_of("/valid/sport/001.txt", "/valid/") == "sport"


def task(task_id, annotations, path="/valid/tech/1.txt", sha="s1"):
    return {
        "id": task_id,
        "meta": {"source": f"bbc-validate@c1:{path}", "sha256": sha},
        "annotations": annotations,
    }


def annotation(annotation_id, *labels, **fields):
    return {
        "id": annotation_id,
        "result": rows.choice_result(BBC, list(labels)),
        "completed_by": 1,
        "created_at": "2026-11-01T10:00:00Z",
        **fields,
    }


def test_export_rows():
    present = {("/valid/tech/1.txt", "s1"), ("/valid/sport/2.txt", "s2")}
    tasks = [
        task(1, [annotation(10, "tech", updated_at="2026-11-02T10:00:00Z")]),
        task(2, [annotation(20), annotation(21, "sport", "tech")], "/valid/sport/2.txt", "s2"),
        task(3, [annotation(30, "weather")]),
        task(4, [annotation(40, "tech")], "/valid/tech/gone.txt"),
        {"id": 5, "annotations": [annotation(50, "tech")]},
        task(6, [annotation(60, "tech", was_cancelled=True)]),
        task(7, [annotation(70, "tech", completed_by={"id": 2})]),
    ]
    found, problems = rows.export_rows(BBC, tasks, present, {1: "admin@cdl.local"}, "e1")
    assert found == [
        {
            "path": "/valid/tech/1.txt",
            "source": "bbc-validate@c1:/valid/tech/1.txt",
            "label": "tech",
            "labeler": "admin@cdl.local",
            "task_id": 1,
            "labeled_at": "2026-11-02T10:00:00Z",
            "annotation_id": 10,
            "export_commit": "e1",
        },
        {
            "path": "/valid/tech/1.txt",
            "source": "bbc-validate@c1:/valid/tech/1.txt",
            "label": "tech",
            "labeler": "2",
            "task_id": 7,
            "labeled_at": "2026-11-01T10:00:00Z",
            "annotation_id": 70,
            "export_commit": "e1",
        },
    ]
    assert problems == [
        "task 2 (bbc-validate@c1:/valid/sport/2.txt) annotation 20: no choice",
        "task 2 (bbc-validate@c1:/valid/sport/2.txt) annotation 21: 2 choices ['sport', 'tech'], "
        "expected one",
        "task 3 (bbc-validate@c1:/valid/tech/1.txt) annotation 30: label 'weather' is not in the "
        "labeling config",
        "task 4 (bbc-validate@c1:/valid/tech/gone.txt): its file is no longer in "
        "bbc-validate@master",
        "task 5 (no source): not imported by CDL (no meta.source)",
    ]
