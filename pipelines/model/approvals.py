"""Approval and promotion: a person moves a registered model's `champion` alias, on the record.

`approve` puts the challenger (the version to approve) beside the current champion on the same
test split (the challenger's own snapshot's: files keep their split for ever, so neither model
trained on it), then moves `champion` to the challenger and appends an approval to the history
(`model_approvals`, migration 0013; this module owns it): who, when, why, the previous
champion, both versions' scores, and whether the gate was skipped. Scores come from a version's
last evaluation when it was on that split, else the version is scored there now.

Only a version that passed the evaluation gate (its last `cdl model evaluate` passed:
`cdl.eval.passed`) is approved, unless `force` (the reason says why; the row is marked forced).
Approving a version older than the current champion's is a rollback: recorded as
`rolled_back` and announced as `model.rolled_back`, any other approval as `model.promoted`. The
row and the event are written in one transaction, which commits only after MLflow moved the
alias; approvals of one model are serialised by an advisory lock, so two people approving at
once cannot both record the same previous champion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from psycopg.types.json import Jsonb

from pipelines.core import db, events, lineage
from pipelines.core.errors import CDLError, Invalid
from pipelines.core.stack import Stack
from pipelines.model.evaluation import Scores, score, stored_scores
from pipelines.model.registry import CHAMPION, Registry, VersionInfo, registered_name

PROMOTED = "promoted"
ROLLED_BACK = "rolled_back"


@dataclass(frozen=True)
class Approval:
    """A row of `model_approvals`."""

    id: int
    model: str
    version: int
    action: str
    approved_by: str
    reason: str
    forced: bool
    previous_version: int | None
    snapshot: str
    metrics: dict
    previous_metrics: dict | None
    approved_at: datetime

    @property
    def ref(self) -> str:
        return f"{self.model}/{self.version}"


@dataclass
class Comparison:
    """The challenger against the champion on one snapshot's test split."""

    snapshot: str  # use_case/name
    challenger: VersionInfo
    challenger_scores: Scores
    champion: VersionInfo | None
    champion_scores: Scores | None
    notes: list[str] = field(default_factory=list)


@dataclass
class Promotion:
    approval: Approval
    comparison: Comparison


class ApprovalStore:
    """All SQL on `model_approvals`."""

    COLUMNS = (
        "id, model, version, action, approved_by, reason, forced, previous_version, snapshot, "
        "metrics, previous_metrics, approved_at"
    )

    def __init__(self, stack: Stack):
        self.stack = stack

    def add(self, conn, **row) -> Approval:
        return db.fetch_one(
            conn,
            Approval,
            f"""INSERT INTO model_approvals (model, version, action, approved_by, reason, forced,
                                            previous_version, snapshot, metrics, previous_metrics)
                VALUES (%(model)s, %(version)s, %(action)s, %(approved_by)s, %(reason)s,
                        %(forced)s, %(previous_version)s, %(snapshot)s, %(metrics)s,
                        %(previous_metrics)s)
                RETURNING {self.COLUMNS}""",
            {
                **row,
                "metrics": Jsonb(row["metrics"]),
                "previous_metrics": (
                    Jsonb(row["previous_metrics"]) if row["previous_metrics"] else None
                ),
            },
        )

    def history(self, model: str) -> list[Approval]:
        """A model's approvals, newest first."""
        with self.stack.connect() as conn:
            return db.fetch_all(
                conn,
                Approval,
                f"""SELECT {self.COLUMNS} FROM model_approvals WHERE model = %s
                    ORDER BY approved_at DESC, id DESC""",
                [model],
            )


def history(stack: Stack, name: str) -> list[Approval]:
    return ApprovalStore(stack).history(registered_name(name))


def compare(stack: Stack, registry: Registry, challenger: VersionInfo) -> Comparison:
    """The challenger and the current champion scored on the challenger's snapshot's test
    split."""
    snapshot = f"{challenger.use_case}/{challenger.snapshot}"
    mine = stored_scores(challenger, snapshot) or score(stack, registry, challenger)
    champion = registry.champion(challenger.name)
    theirs, notes = None, []
    if champion is not None and champion.version != challenger.version:
        try:
            theirs = stored_scores(champion, snapshot) or score(
                stack, registry, champion, challenger.snapshot
            )
        except CDLError as exc:  # a broken champion must not block its replacement
            notes.append(f"the champion {champion.ref} could not be scored: {exc}")
    return Comparison(snapshot, challenger, mine, champion, theirs, notes)


def approve(stack: Stack, ref: str, by: str, reason: str, force: bool = False) -> Promotion:
    """Move `champion` to version `ref` and record who approved it, why, and what it replaced."""
    by, reason = (by or "").strip(), (reason or "").strip()
    if not by or not reason:
        raise Invalid(
            "an approval needs who approves it and why",
            "give --by WHO and --reason TEXT",
        )
    registry = Registry(stack)
    challenger = registry.get(ref)
    if not challenger.passed and not force:
        last = challenger.tags.get("cdl.eval.passed")
        state = (
            "has never been evaluated"
            if last is None
            else f"failed its last evaluation (accuracy {challenger.tags.get('cdl.eval.accuracy')}"
            f" < {challenger.tags.get('cdl.eval.min_accuracy')})"
        )
        raise Invalid(
            f"{challenger.ref} has not passed the evaluation gate: it {state}",
            f"run 'cdl model evaluate {challenger.ref} --min-accuracy X' first, or approve it "
            "with --force (the reason is recorded)",
        )
    name = challenger.name
    with (
        stack.connect(autocommit=True) as lock_conn,
        db.advisory_lock(lock_conn, f"cdl.model.champion:{name}"),
    ):
        comparison = compare(stack, registry, challenger)
        champion = comparison.champion
        if champion is not None and champion.version == challenger.version:
            raise Invalid(
                f"{challenger.ref} is the champion already",
                f"see 'cdl model history {name}'",
            )
        rollback = champion is not None and challenger.number < champion.number
        action = ROLLED_BACK if rollback else PROMOTED
        store = ApprovalStore(stack)
        with stack.connect() as conn, conn.transaction():
            approval = store.add(
                conn,
                model=name,
                version=challenger.number,
                action=action,
                approved_by=by,
                reason=reason,
                forced=bool(force and not challenger.passed),
                previous_version=champion.number if champion else None,
                snapshot=comparison.snapshot,
                metrics=_summary(comparison.challenger_scores),
                previous_metrics=(
                    _summary(comparison.champion_scores) if comparison.champion_scores else None
                ),
            )
            lineage.record_node(
                conn,
                lineage.Kind.MODEL_VERSION,
                challenger.ref,
                approved={"by": by, "at": approval.approved_at.isoformat(), "action": action},
            )
            events.emit(
                conn,
                events.MODEL_ROLLED_BACK if rollback else events.MODEL_PROMOTED,
                challenger.ref,
                {
                    "model": name,
                    "version": challenger.version,
                    "previous": champion.version if champion else None,
                    "by": by,
                    "reason": reason,
                    "forced": approval.forced,
                    "snapshot": comparison.snapshot,
                    "accuracy": comparison.challenger_scores.accuracy,
                    "previous_accuracy": (
                        comparison.champion_scores.accuracy if comparison.champion_scores else None
                    ),
                },
            )
            registry.set_alias(challenger, CHAMPION)  # the row commits only once this is done
    comparison.challenger = registry.get(challenger.ref)
    return Promotion(approval, comparison)


def _summary(scores: Scores) -> dict:
    return {
        "accuracy": scores.accuracy,
        "macro_f1": scores.macro_f1,
        "rows": scores.rows,
        "per_class": scores.per_class,
    }
