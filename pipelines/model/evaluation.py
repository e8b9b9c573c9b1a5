"""The evaluation gate: a model version scored on the test split of its own label snapshot.

`evaluate` loads the version, reads the test split of the snapshot it was trained on (the
`cdl.snapshot` tag; never another snapshot's) as the `cdl_evaluator` role (the label store's
`test_rows`: training's `cdl_scientist` cannot see these labels), scores every test file through
the model contract, and compares the accuracy with the gate. A file keeps its split for ever
(the label store fixes it when first labeled), so a test file of one snapshot is never a train
file of another: comparing two versions on one snapshot's test split is fair to both.

Where the results live:

- on the version, as model version tags: `cdl.eval.accuracy`, `cdl.eval.macro_f1`,
  `cdl.eval.passed` (`true`/`false`), `cdl.eval.min_accuracy`, `cdl.eval.snapshot`,
  `cdl.eval.rows`, `cdl.eval.at`, `cdl.eval.run` and `cdl.eval.scores` (JSON: labels,
  per-class precision/recall/F1/support, the confusion matrix); the last evaluation wins;
- in an evaluation run of its own (each evaluation is one; the training run stays as it
  ended), in the use case's MLflow experiment, named `evaluate-<name>-<version>` and tagged
  `cdl.evaluation_of` = `<name>/<version>`: the metrics (`test_accuracy`, `test_macro_f1`,
  `test_<label>_precision|recall|f1`), the gate as a param, and as artifacts under `evaluation/`
  the confusion matrix PNG, the markdown report and the JUnit XML (as written) and
  `scores.json`;
- for CI, files: a JUnit XML (one test case, the gate; the metrics as properties) and a markdown
  report with the confusion matrix PNG beside it (`<report stem>-confusion.png`), by default
  `reports/<name>-<version>-evaluation.{xml,md}` under the current folder, where a CI job
  collects its artifacts.

A passing version gets the alias `candidate`; a failing one loses it if it had it. The event
`model.evaluation.passed` or `model.evaluation.failed` is emitted, and the evaluation run is
recorded in lineage as `run:<id>`, consuming the version and the label snapshot, in one
transaction.
"""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipelines.core import events, lineage
from pipelines.core.errors import NotFound
from pipelines.core.stack import Stack
from pipelines.model import tracking
from pipelines.model.registry import CANDIDATE, Registry, VersionInfo

BATCH = 256
REPORTS = Path("reports")


@dataclass
class Scores:
    """A model's answers on a snapshot's test split, measured against its labels."""

    snapshot: str  # use_case/name
    rows: int
    labels: list[str]  # the order of the confusion matrix's rows (truth) and columns
    accuracy: float
    macro_f1: float
    per_class: dict[str, dict[str, float]]  # label -> precision, recall, f1, support
    confusion: list[list[int]]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Scores":
        return cls(**data)


@dataclass
class Evaluation:
    version: VersionInfo
    scores: Scores
    min_accuracy: float
    passed: bool
    run_id: str
    junit: Path
    report: Path
    figure: Path
    seconds: float


def compute_scores(
    snapshot: str, truth: list[str], predicted: list[str], labels: list[str]
) -> Scores:
    """Accuracy, per-class precision/recall/F1 and the confusion matrix. Labels outside
    `labels` (a model answering something else) get rows and columns of their own."""
    order = list(labels) + sorted((set(truth) | set(predicted)) - set(labels))
    index = {label: i for i, label in enumerate(order)}
    matrix = np.zeros((len(order), len(order)), dtype=np.int64)
    for t, p in zip(truth, predicted, strict=True):
        matrix[index[t], index[p]] += 1
    per_class = {}
    for i, label in enumerate(order):
        hits, said, real = matrix[i, i], matrix[:, i].sum(), matrix[i, :].sum()
        precision = float(hits / said) if said else 0.0
        recall = float(hits / real) if real else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": int(real),
        }
    present = [label for label in order if per_class[label]["support"]]
    return Scores(
        snapshot=snapshot,
        rows=len(truth),
        labels=order,
        accuracy=float(np.trace(matrix) / len(truth)) if truth else 0.0,
        macro_f1=float(np.mean([per_class[label]["f1"] for label in present])) if present else 0.0,
        per_class=per_class,
        confusion=matrix.tolist(),
    )


def score(
    stack: Stack, registry: Registry, info: VersionInfo, snapshot: str | None = None
) -> Scores:
    """`info` scored on the test split of `snapshot` (a name of its use case's snapshots;
    default: the version's own)."""
    from pipelines.data.labeling.spec import use_case as load_use_case
    from pipelines.data.labeling.store import LabelStore
    from pipelines.model.features import read_files

    own = info.snapshot
    snapshot = snapshot or own
    if not snapshot:
        raise NotFound(
            f"{info.ref} has no cdl.snapshot tag: its test split is unknown",
            "register versions with 'cdl model register', which tags them",
        )
    case = load_use_case(info.use_case)
    try:
        rows = LabelStore(stack, case).test_rows(snapshot)
    except NotFound:
        whose = "its training snapshot" if snapshot == own else "snapshot"
        raise NotFound(
            f"{whose} {case.name}/{snapshot} of {info.ref} no longer exists",
            f"see 'cdl label snapshot list {case.name}'; evaluate a version trained on an "
            "existing snapshot",
        ) from None
    if not rows:
        raise NotFound(
            f"snapshot {case.name}/{snapshot} has no test rows to evaluate {info.ref} on",
            "label more files: the label store puts a share of them in the test split",
        )
    model = registry.load_version(info)
    task = info.task or case.spec.task
    predicted: list[str] = []
    for start in range(0, len(rows), BATCH):
        batch = rows[start : start + BATCH]
        files = read_files(stack, f"{case.name}/{snapshot}", batch)
        predicted += [label for label, _ in model.predict(task, [f.data for f in files])]
    labels = json.loads(info.tags.get("cdl.labels") or "null") or case.labels
    return compute_scores(
        f"{case.name}/{snapshot}", [label for _, label in rows], predicted, labels
    )


def stored_scores(info: VersionInfo, snapshot: str) -> Scores | None:
    """The scores of the version's last evaluation when it was on `snapshot` (use_case/name)."""
    if info.tags.get("cdl.eval.snapshot") != snapshot or "cdl.eval.scores" not in info.tags:
        return None
    return Scores.from_dict(json.loads(info.tags["cdl.eval.scores"]))


def default_paths(info: VersionInfo) -> tuple[Path, Path]:
    stem = REPORTS / f"{info.name}-{info.version}-evaluation"
    return stem.with_suffix(".xml"), stem.with_suffix(".md")


def evaluate(
    stack: Stack,
    ref: str,
    min_accuracy: float,
    junit: Path | None = None,
    report: Path | None = None,
) -> Evaluation:
    """Score version `ref` on its own snapshot's test split, record the results (tags, an
    evaluation run, files for CI), and move `candidate` to it when it passes the gate."""
    started = time.perf_counter()
    registry = Registry(stack)
    info = registry.get(ref)
    scores = score(stack, registry, info)
    passed = scores.accuracy >= min_accuracy
    default_junit, default_report = default_paths(info)
    junit, report = junit or default_junit, report or default_report
    figure = report.with_name(f"{report.stem}-confusion.png")
    for path in (junit, report, figure):
        path.parent.mkdir(parents=True, exist_ok=True)
    seconds = time.perf_counter() - started
    confusion_png(scores, f"{info.ref} on {scores.snapshot} (test)", figure)
    report.write_text(markdown(info, scores, min_accuracy, passed, figure.name))
    write_junit(info, scores, min_accuracy, passed, seconds, junit)

    run_id = _evaluation_run(
        stack, registry, info, scores, min_accuracy, passed, [figure, report, junit]
    )
    with stack.connect() as conn, conn.transaction():
        version_node = lineage.record_node(
            conn,
            lineage.Kind.MODEL_VERSION,
            info.ref,
            evaluation={"accuracy": scores.accuracy, "passed": passed, "run": run_id},
        )
        run_node = lineage.record_node(
            conn,
            lineage.Kind.RUN,
            run_id,
            evaluation_of=info.ref,
            snapshot=scores.snapshot,
            split="test",
            accuracy=scores.accuracy,
            min_accuracy=min_accuracy,
            passed=passed,
        )
        lineage.consumed(conn, run_node, version_node)
        snapshot_node = lineage.node_id(lineage.Kind.LABEL_SNAPSHOT, scores.snapshot)
        if lineage.get_node(conn, snapshot_node):
            lineage.consumed(conn, run_node, snapshot_node)
        events.emit(
            conn,
            events.EVALUATION_PASSED if passed else events.EVALUATION_FAILED,
            info.ref,
            {
                "model": info.name,
                "version": info.version,
                "snapshot": scores.snapshot,
                "accuracy": scores.accuracy,
                "macro_f1": scores.macro_f1,
                "min_accuracy": min_accuracy,
                "rows": scores.rows,
                "run": run_id,
            },
        )
        # The event and lineage commit only once the version carries the result.
        registry.set_tags(
            info,
            {
                "cdl.eval.accuracy": f"{scores.accuracy:.6g}",
                "cdl.eval.macro_f1": f"{scores.macro_f1:.6g}",
                "cdl.eval.passed": "true" if passed else "false",
                "cdl.eval.min_accuracy": f"{min_accuracy:g}",
                "cdl.eval.snapshot": scores.snapshot,
                "cdl.eval.rows": str(scores.rows),
                "cdl.eval.at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "cdl.eval.run": run_id,
                "cdl.eval.scores": json.dumps(scores.to_dict(), separators=(",", ":")),
            },
        )
        if passed:
            registry.set_alias(info, CANDIDATE)
        elif CANDIDATE in info.aliases:
            registry.delete_alias(info.name, CANDIDATE)
    info = registry.get(info.ref)
    return Evaluation(
        info,
        scores,
        min_accuracy,
        passed,
        run_id,
        junit,
        report,
        figure,
        time.perf_counter() - started,
    )


def _evaluation_run(stack, registry, info, scores, min_accuracy, passed, files) -> str:
    """An MLflow run holding this evaluation's metrics and files."""
    from mlflow.entities import Metric, Param

    client = registry.client
    experiment = tracking.experiment_id(stack, info.name)
    run = client.create_run(
        experiment,
        run_name=f"evaluate-{info.name}-{info.version}",
        tags={
            "cdl.evaluation_of": info.ref,
            "cdl.snapshot": scores.snapshot,
            "cdl.split": "test",
            "cdl.passed": "true" if passed else "false",
            **({"cdl.training_run": info.run_id} if info.run_id else {}),
        },
    )
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    metrics = {"test_accuracy": scores.accuracy, "test_macro_f1": scores.macro_f1}
    for label, values in scores.per_class.items():
        for key in ("precision", "recall", "f1"):
            metrics[f"test_{_metric_name(label)}_{key}"] = values[key]
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in sorted(metrics.items())],
        params=[
            Param("min_accuracy", f"{min_accuracy:g}"),
            Param("model_version", info.ref),
            Param("test_rows", str(scores.rows)),
        ],
    )
    for path in files:
        client.log_artifact(run_id, str(path), "evaluation")
    client.log_text(run_id, json.dumps(scores.to_dict(), indent=1), "evaluation/scores.json")
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _metric_name(label: str) -> str:
    """A label as a part of an MLflow metric name (letters, digits, _ - . / and space only)."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in label)


# -- what people and CI read ---------------------------------------------------------------------


def confusion_png(scores: Scores, title: str, path: Path) -> None:
    """The confusion matrix as a picture: counts in the cells, rows normalised for colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(scores.confusion, dtype=float)
    totals = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    size = max(4.0, 0.6 * len(scores.labels) + 2.5)
    figure, axes = plt.subplots(figsize=(size + 1, size))
    try:
        image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        ticks = range(len(scores.labels))
        axes.set_xticks(ticks, scores.labels, rotation=45, ha="right")
        axes.set_yticks(ticks, scores.labels)
        axes.set_xlabel("predicted")
        axes.set_ylabel("labeled (test split)")
        axes.set_title(f"{title}\naccuracy {scores.accuracy:.3f}, {scores.rows} files")
        for i in ticks:
            for j in ticks:
                colour = "white" if shares[i, j] > 0.5 else "black"
                axes.text(j, i, int(matrix[i, j]), ha="center", va="center", color=colour)
        figure.colorbar(image, ax=axes, fraction=0.046, label="share of the row")
        figure.tight_layout()
        figure.savefig(path, dpi=100)
    finally:
        plt.close(figure)


def markdown(
    info: VersionInfo, scores: Scores, min_accuracy: float, passed: bool, figure: str
) -> str:
    verdict = "PASSED" if passed else "FAILED"
    relation = ">=" if passed else "<"
    lines = [
        f"# Evaluation of {info.ref}: {verdict}",
        "",
        f"Accuracy **{scores.accuracy:.4f}** {relation} gate {min_accuracy:g} on the test split "
        f"of snapshot `{scores.snapshot}` ({scores.rows} files); macro F1 {scores.macro_f1:.4f}.",
        "",
        f"- training run: `{info.run_id}`",
        f"- validation accuracy in training: {info.tags.get('cdl.metric.val_accuracy', 'n/a')}",
        f"- parameters: {info.tags.get('cdl.parameters', 'n/a')}; artifact "
        f"{info.tags.get('cdl.artifact_bytes', 'n/a')} bytes; latency "
        f"{info.tags.get('cdl.latency_ms', 'n/a')} ms per sample (CPU)",
        "",
        "| label | precision | recall | F1 | support |",
        "|---|---:|---:|---:|---:|",
    ]
    for label in scores.labels:
        v = scores.per_class[label]
        lines.append(
            f"| {label} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} "
            f"| {v['support']} |"
        )
    lines += [
        "",
        "Confusion matrix (rows: label, columns: prediction):",
        "",
        "| | " + " | ".join(scores.labels) + " |",
        "|---|" + "---:|" * len(scores.labels),
    ]
    for label, row in zip(scores.labels, scores.confusion, strict=True):
        lines.append(f"| **{label}** | " + " | ".join(str(n) for n in row) + " |")
    lines += ["", f"![confusion matrix]({figure})", ""]
    return "\n".join(lines)


def write_junit(
    info: VersionInfo,
    scores: Scores,
    min_accuracy: float,
    passed: bool,
    seconds: float,
    path: Path,
) -> None:
    """One test suite with one test case, the gate; the metrics as the suite's properties."""
    suites = ET.Element("testsuites")
    suite = ET.SubElement(
        suites,
        "testsuite",
        name=f"cdl model evaluate {info.ref}",
        tests="1",
        failures="0" if passed else "1",
        errors="0",
        time=f"{seconds:.3f}",
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    properties = ET.SubElement(suite, "properties")
    values = {
        "model_version": info.ref,
        "snapshot": scores.snapshot,
        "rows": scores.rows,
        "accuracy": f"{scores.accuracy:.6g}",
        "macro_f1": f"{scores.macro_f1:.6g}",
        "min_accuracy": f"{min_accuracy:g}",
    }
    for label, v in scores.per_class.items():
        for key in ("precision", "recall", "f1"):
            values[f"{label}.{key}"] = f"{v[key]:.6g}"
    for name, value in values.items():
        ET.SubElement(properties, "property", name=name, value=str(value))
    case = ET.SubElement(
        suite,
        "testcase",
        classname=f"cdl.model.{info.name}",
        name=f"{info.ref} test accuracy >= {min_accuracy:g}",
        time=f"{seconds:.3f}",
    )
    if not passed:
        failure = ET.SubElement(
            case,
            "failure",
            message=f"accuracy {scores.accuracy:.4f} < {min_accuracy:g}",
            type="EvaluationGate",
        )
        failure.text = (
            f"{info.ref} scored {scores.accuracy:.4f} on {scores.rows} test files of "
            f"{scores.snapshot}, below the gate {min_accuracy:g}"
        )
    ET.indent(suites)
    path.write_text(ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n")
