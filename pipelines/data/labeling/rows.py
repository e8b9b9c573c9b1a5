"""Pure translations between Label Studio's JSON and CDL's label rows: a file's task data, the
choice result of an annotation or prediction, and exported tasks as label rows plus the problems
that keep some out. No server, no database: testable alone."""

from __future__ import annotations

import base64

from pipelines.core.errors import Invalid
from pipelines.data.labeling.spec import UseCase


def class_of(path: str, root: str) -> str:
    """The class folder of a file: the first folder below the source path."""
    return path[len(root.rstrip("/")) :].strip("/").split("/")[0]


def task_data(case: UseCase, data: bytes) -> dict:
    """A file's bytes as the data of its task: an inline PNG, or a text's title and body."""
    if case.spec.task == "image":
        return {"image": "data:image/png;base64," + base64.b64encode(data).decode()}
    text = data.decode("utf-8", errors="replace")
    title, _, body = text.partition("\n")
    return {"title": title.strip(), "text": body.strip()}


def choice_result(case: UseCase, labels: list[str]) -> list[dict]:
    """An annotation's or prediction's result that picks `labels` (none: an empty one)."""
    if not labels:
        return []
    return [
        {
            "from_name": case.spec.choices,
            "to_name": "image" if case.spec.task == "image" else "text",
            "type": "choices",
            "value": {"choices": labels},
        }
    ]


def prediction(case: UseCase, path: str, found: dict | None) -> list[dict]:
    """A model's answer for a file, in Label Studio's prediction form (a pre-annotation)."""
    if not found:
        return []
    if found["label"] not in case.labels:
        raise Invalid(
            f"prediction of {found.get('model', 'unknown')} for {path}: label "
            f"'{found['label']}' is not in the labeling config",
            "predict one of " + ", ".join(case.labels),
        )
    return [
        {
            "model_version": str(found.get("model", "unknown")),
            "score": float(found.get("score", 0.0)),
            "result": choice_result(case, [found["label"]]),
        }
    ]


def export_rows(
    case: UseCase,
    tasks: list[dict],
    present: set[tuple[str, str]],
    emails: dict[int, str],
    export_commit: str,
) -> tuple[list[dict], list[str]]:
    """The label rows of exported tasks, and why the others are left out. `present`: the
    (path, sha256) of the source's current files; `emails`: labelers by user id."""
    labels = set(case.labels)
    rows, problems = [], []
    for task in tasks:
        meta = task.get("meta") or {}
        source = meta.get("source", "")
        path = source.partition(":")[2]
        where = f"task {task.get('id')} ({source or 'no source'})"
        if not source:
            problems.append(f"{where}: not imported by CDL (no meta.source)")
            continue
        if (path, meta.get("sha256")) not in present:
            problems.append(f"{where}: its file is no longer in {case.spec.source.repo}@master")
            continue
        for annotation in task.get("annotations", []):
            if annotation.get("was_cancelled"):
                continue
            chosen = [
                c
                for r in annotation.get("result", [])
                if r.get("from_name") == case.spec.choices
                for c in r.get("value", {}).get("choices", [])
            ]
            label_where = f"{where} annotation {annotation.get('id')}"
            if not chosen:
                problems.append(f"{label_where}: no choice")
                continue
            if len(chosen) > 1:
                problems.append(f"{label_where}: {len(chosen)} choices {chosen}, expected one")
                continue
            if chosen[0] not in labels:
                problems.append(f"{label_where}: label '{chosen[0]}' is not in the labeling config")
                continue
            labeler = annotation.get("completed_by")
            if isinstance(labeler, dict):
                labeler = labeler.get("id")
            rows.append(
                {
                    "path": path,
                    "source": source,
                    "label": chosen[0],
                    "labeler": str(emails.get(labeler, labeler)),
                    "task_id": task["id"],
                    "labeled_at": annotation.get("updated_at") or annotation.get("created_at"),
                    "annotation_id": annotation["id"],
                    "export_commit": export_commit,
                }
            )
    return rows, problems
