"""The experiment store: all SQL of the `experiments` and `trials` tables (migration 0012).

Optuna keeps the search (its study, in the `optuna` database); these tables keep what CDL shows
and resumes. Who runs what is decided here, under one advisory lock per experiment: `claim`
hands a worker either a trial whose runner is gone (to resume from its checkpoints), or a new
trial while fewer than max_trials were started, so that however many workers join, on whatever
machines, no more than max_trials ever run. Every state change of a trial is one transaction
with its log line and, when it ends, its `model.trial.finished` event; the experiment's end is
one transaction with its `model.training.finished` event.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import psycopg
from psycopg.types.json import Jsonb

from pipelines.core import db, events
from pipelines.core.errors import NotFound
from pipelines.core.stack import Stack
from pipelines.model.experiments import Experiment, Trial

_EXPERIMENT = """e.id, e.name, e.use_case, e.snapshot, e.state, e.searcher, e.metric,
    e.smaller_is_better, e.max_trials, e.max_epochs, e.max_restarts, e.workers, e.spec_path,
    e.trainer, e.best_trial, e.best_metric, e.mlflow_run, e.error, e.created_at, e.finished_at,
    (SELECT count(*) FROM trials t WHERE t.experiment = e.id)::int AS trials_started,
    (SELECT count(*) FROM trials t WHERE t.experiment = e.id AND t.state = 'running')::int
        AS trials_running"""
_TRIAL = """experiment, number, state, hparams, epochs, bracket, rung, metric, restarts,
    mlflow_run, checkpoints, runner, error, started_at, finished_at"""


def line(text: str) -> str:
    """A timestamped line of a trial's log."""
    return f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n"


@dataclass(frozen=True)
class Recipe:
    """What a worker needs to run an experiment's trials, as submit resolved it."""

    spec: dict[str, Any]
    seed: int
    features: str | None


@dataclass(frozen=True)
class NewTrial:
    """A trial to start, as the engine drew it from the searcher while holding the lock."""

    optuna_number: int
    hparams: dict[str, Any]
    bracket: int
    checkpoints: str


@dataclass(frozen=True)
class Claim:
    """What `claim` gave a worker: a trial to run (`resumed` from its checkpoints or new),
    `wait` (others run the last trials: one may need resuming), or `done` (nothing left)."""

    kind: str  # run | wait | done
    trial: Trial | None = None
    resumed: bool = False
    optuna_number: int | None = None
    failed: tuple[int, ...] = ()  # optuna numbers of trials failed now for want of restarts
    # (optuna number, MLflow run) of paused trials pruned now that the search has ended
    pruned: tuple[tuple[int, str | None], ...] = ()


class ExperimentStore:
    def __init__(self, stack: Stack):
        self.stack = stack

    # -- experiments --------------------------------------------------------------------------

    def create(self, **fields: Any) -> int:
        fields = {k: Jsonb(v) if k == "spec" else v for k, v in fields.items()}
        names = ", ".join(fields)
        values = ", ".join(f"%({k})s" for k in fields)
        with self.stack.connect() as conn:
            return conn.execute(
                f"INSERT INTO experiments ({names}) VALUES ({values}) RETURNING id", fields
            ).fetchone()[0]

    def set_mlflow_run(self, experiment_id: int, run_id: str) -> None:
        with self.stack.connect() as conn:
            conn.execute(
                "UPDATE experiments SET mlflow_run = %s WHERE id = %s", [run_id, experiment_id]
            )

    def get(self, experiment_id: int) -> Experiment:
        with self.stack.connect() as conn:
            found = db.fetch_one(
                conn,
                Experiment,
                f"SELECT {_EXPERIMENT} FROM experiments e WHERE e.id = %s",
                [experiment_id],
            )
        if found is None:
            raise NotFound(f"no experiment {experiment_id}", "see cdl experiment list")
        return found

    def all(self) -> list[Experiment]:
        with self.stack.connect() as conn:
            return db.fetch_all(
                conn, Experiment, f"SELECT {_EXPERIMENT} FROM experiments e ORDER BY e.id DESC"
            )

    def recipe(self, experiment_id: int) -> Recipe:
        with self.stack.connect() as conn:
            row = conn.execute(
                "SELECT spec, seed, features FROM experiments WHERE id = %s", [experiment_id]
            ).fetchone()
        if row is None:
            raise NotFound(f"no experiment {experiment_id}", "see cdl experiment list")
        return Recipe(*row)

    def trials(self, experiment_id: int) -> list[Trial]:
        with self.stack.connect() as conn:
            return db.fetch_all(
                conn,
                Trial,
                f"SELECT {_TRIAL} FROM trials WHERE experiment = %s ORDER BY number",
                [experiment_id],
            )

    def logs(self, experiment_id: int) -> dict[int, str]:
        with self.stack.connect() as conn:
            return dict(
                conn.execute(
                    "SELECT number, log FROM trials WHERE experiment = %s", [experiment_id]
                ).fetchall()
            )

    def fail(self, experiment_id: int, error: str) -> None:
        """End an experiment that cannot run (e.g. its tracking run could not be made)."""
        with self.stack.connect() as conn:
            conn.execute(
                """UPDATE experiments SET state = 'failed', error = %s, finished_at = now()
                   WHERE id = %s AND state = 'active'""",
                [error, experiment_id],
            )

    # -- who runs what ------------------------------------------------------------------------

    def claim(
        self,
        experiment_id: int,
        runner: str,
        lease_s: float,
        gone: Callable[[str | None], bool],
        draw: Callable[[int], NewTrial],
    ) -> Claim:
        """Give `runner` a trial to run: first a running trial whose runner is `gone` (or did
        not beat for `lease_s`) and has restarts left (one that has none fails now), else a new
        one drawn by `draw(number)` while fewer than max_trials were started."""
        with self.stack.connect() as conn, conn.transaction():
            db.transaction_lock(conn, f"cdl.experiment:{experiment_id}")
            state, max_trials, max_restarts, smaller = conn.execute(
                """SELECT state, max_trials, max_restarts, smaller_is_better FROM experiments
                   WHERE id = %s""",
                [experiment_id],
            ).fetchone()
            if state != "active":
                return Claim("done")
            running = conn.execute(
                """SELECT number, optuna_number, runner, restarts,
                          heartbeat_at < now() - %s * interval '1 second' AS stale
                   FROM trials WHERE experiment = %s AND state = 'running' ORDER BY number""",
                [lease_s, experiment_id],
            ).fetchall()
            failed, others = [], 0
            for number, optuna_number, owner, restarts, stale in running:
                # A worker claims between trials: a trial still held by `runner` is one it could
                # not end (the database was away) and resumes like a released one.
                died = owner is not None and owner != runner
                if died and not stale and not gone(owner):
                    others += 1
                    continue
                if died and restarts >= max_restarts:
                    self._end_trial(
                        conn,
                        experiment_id,
                        number,
                        "failed",
                        None,
                        f"its worker ({owner}) stopped and max_restarts ({max_restarts}) is "
                        "reached",
                        "failed: its worker stopped, no restarts left",
                    )
                    failed.append(optuna_number)
                    continue
                # A runner that released the trial (stopped gracefully) costs no restart.
                text = f"resumed by {runner}" + (f" ({owner} stopped)" if died else "")
                return self._resume(
                    conn, experiment_id, number, runner, died, text, optuna_number, failed
                )
            started = conn.execute(
                "SELECT count(*) FROM trials WHERE experiment = %s", [experiment_id]
            ).fetchone()[0]
            if started < max_trials:
                new = draw(started)
                conn.execute(
                    """INSERT INTO trials (experiment, number, optuna_number, bracket, state,
                           hparams, checkpoints, runner, heartbeat_at, log)
                       VALUES (%s, %s, %s, %s, 'running', %s, %s, %s, now(), %s)""",
                    [
                        experiment_id,
                        started,
                        new.optuna_number,
                        new.bracket,
                        Jsonb(new.hparams),
                        new.checkpoints,
                        runner,
                        line(f"started by {runner}"),
                    ],
                )
                return Claim(
                    "run",
                    self._trial(conn, experiment_id, started),
                    False,
                    new.optuna_number,
                    tuple(failed),
                )
            if others:
                return Claim("wait", failed=tuple(failed))
            # Nothing runs and nothing new may start: the paused trials' turn (module docstring
            # of asha.py).
            promoted = conn.execute(
                """SELECT DISTINCT ON (p.bracket) p.number, p.optuna_number
                   FROM trials p JOIN trial_rungs r
                        ON r.experiment = p.experiment AND r.number = p.number
                       AND r.epochs = p.epochs
                   WHERE p.experiment = %(id)s AND p.state = 'paused'
                     AND NOT EXISTS (SELECT 1 FROM trials c WHERE c.experiment = p.experiment
                                     AND c.bracket = p.bracket AND c.state = 'completed')
                   ORDER BY p.bracket, p.epochs DESC, r.metric """
                + ("ASC" if smaller else "DESC")
                + ", p.number",
                {"id": experiment_id},
            ).fetchone()
            if promoted is not None:
                number, optuna_number = promoted
                self._promote(conn, experiment_id, number, "the best of its bracket left")
                text = f"resumed by {runner}"
                return self._resume(
                    conn, experiment_id, number, runner, False, text, optuna_number, failed
                )
            pruned = []
            for number, optuna_number, run, epochs in conn.execute(
                """SELECT number, optuna_number, mlflow_run, epochs FROM trials
                   WHERE experiment = %s AND state = 'paused' ORDER BY number""",
                [experiment_id],
            ).fetchall():
                self._end_trial(
                    conn,
                    experiment_id,
                    number,
                    "pruned",
                    None,
                    None,
                    f"pruned after epoch {epochs}: not promoted before the search ended",
                )
                pruned.append((optuna_number, run))
            return Claim("done", failed=tuple(failed), pruned=tuple(pruned))

    def _resume(self, conn, experiment_id, number, runner, died, text, optuna_number, failed):
        """Hand trial `number` to `runner`, to resume from its checkpoints (a restart counted when
        its previous runner `died`)."""
        conn.execute(
            """UPDATE trials SET runner = %s, heartbeat_at = now(),
                      restarts = restarts + %s, log = log || %s
               WHERE experiment = %s AND number = %s""",
            [runner, int(died), line(text), experiment_id, number],
        )
        trial = self._trial(conn, experiment_id, number)
        return Claim("run", trial, True, optuna_number, tuple(failed))

    def reach_rung(
        self,
        experiment_id: int,
        number: int,
        runner: str,
        epochs: int,
        metric: float,
        divisor: float,
    ) -> bool | None:
        """Trial `number` reached the rung at `epochs` epochs with `metric`: record it and apply
        the promotion rule (asha.promotions) to the trials of its bracket there. True when this
        trial goes on; False when it pauses (`paused`, its runner released); None when `runner`
        no longer owns it. Paused trials promoted now become `running` with no runner, for the
        next claim to resume."""
        from pipelines.model import asha

        with self.stack.connect() as conn, conn.transaction():
            db.transaction_lock(conn, f"cdl.experiment:{experiment_id}")
            bracket = conn.execute(
                """SELECT t.bracket FROM trials t
                   WHERE t.experiment = %s AND t.number = %s AND t.runner = %s
                     AND t.state = 'running'""",
                [experiment_id, number, runner],
            ).fetchone()
            if bracket is None:
                return None
            conn.execute(
                """INSERT INTO trial_rungs (experiment, number, bracket, epochs, metric)
                   VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING""",
                [experiment_id, number, bracket[0], epochs, metric],
            )
            smaller = conn.execute(
                "SELECT smaller_is_better FROM experiments WHERE id = %s", [experiment_id]
            ).fetchone()[0]
            rung = conn.execute(
                """SELECT number, metric, promoted FROM trial_rungs
                   WHERE experiment = %s AND bracket = %s AND epochs = %s""",
                [experiment_id, bracket[0], epochs],
            ).fetchall()
            goes_on = any(n == number and promoted for n, _, promoted in rung)
            for chosen in asha.promotions(rung, divisor, maximize=not smaller):
                conn.execute(
                    """UPDATE trial_rungs SET promoted = true
                       WHERE experiment = %s AND number = %s AND epochs = %s""",
                    [experiment_id, chosen, epochs],
                )
                if chosen == number:
                    goes_on = True
                else:
                    self._promote(conn, experiment_id, chosen, f"trial {number} reached the rung")
            if not goes_on:
                conn.execute(
                    """UPDATE trials SET state = 'paused', runner = NULL, log = log || %s
                       WHERE experiment = %s AND number = %s""",
                    [
                        line(f"paused at the rung of epoch {epochs}: not among the best yet"),
                        experiment_id,
                        number,
                    ],
                )
            return goes_on

    def _promote(self, conn, experiment_id: int, number: int, why: str) -> None:
        """A paused trial goes on: `running` with no runner, for the next claim to resume."""
        conn.execute(
            """UPDATE trials SET state = 'running', runner = NULL, log = log || %s
               WHERE experiment = %s AND number = %s AND state = 'paused'""",
            [line(f"promoted: {why}"), experiment_id, number],
        )

    def _trial(self, conn: psycopg.Connection, experiment_id: int, number: int) -> Trial:
        return db.fetch_one(
            conn,
            Trial,
            f"SELECT {_TRIAL} FROM trials WHERE experiment = %s AND number = %s",
            [experiment_id, number],
        )

    def beat(self, experiment_id: int, number: int, runner: str) -> tuple[bool, str]:
        """Mark the trial's runner alive; return whether `runner` still owns the trial and the
        experiment's state."""
        with self.stack.connect(autocommit=True) as conn:
            owned = conn.execute(
                """UPDATE trials SET heartbeat_at = now()
                   WHERE experiment = %s AND number = %s AND runner = %s AND state = 'running'""",
                [experiment_id, number, runner],
            ).rowcount
            state = conn.execute(
                "SELECT state FROM experiments WHERE id = %s", [experiment_id]
            ).fetchone()[0]
        return bool(owned), state

    def set_trial_run(self, experiment_id: int, number: int, run_id: str) -> None:
        with self.stack.connect() as conn:
            conn.execute(
                "UPDATE trials SET mlflow_run = %s WHERE experiment = %s AND number = %s",
                [run_id, experiment_id, number],
            )

    def epoch(
        self,
        experiment_id: int,
        number: int,
        runner: str,
        epochs: int,
        rung: int,
        metric: float,
        text: str,
    ) -> bool:
        """Record an epoch reported; False when `runner` no longer owns the trial."""
        with self.stack.connect() as conn:
            return bool(
                conn.execute(
                    """UPDATE trials SET epochs = %s, rung = %s, metric = %s,
                              heartbeat_at = now(), log = log || %s
                       WHERE experiment = %s AND number = %s AND runner = %s
                         AND state = 'running'""",
                    [epochs, rung, metric, line(text), experiment_id, number, runner],
                ).rowcount
            )

    def note(self, experiment_id: int, number: int, text: str) -> None:
        with self.stack.connect() as conn:
            conn.execute(
                "UPDATE trials SET log = log || %s WHERE experiment = %s AND number = %s",
                [line(text), experiment_id, number],
            )

    def release(self, experiment_id: int, number: int, runner: str, text: str) -> None:
        """Give a running trial back (its worker was asked to stop): the next worker resumes it
        without counting a restart."""
        with self.stack.connect() as conn:
            conn.execute(
                """UPDATE trials SET runner = NULL, log = log || %s
                   WHERE experiment = %s AND number = %s AND runner = %s AND state = 'running'""",
                [line(text), experiment_id, number, runner],
            )

    def end_trial(
        self,
        experiment_id: int,
        number: int,
        runner: str,
        state: str,
        metric: float | None,
        error: str | None,
        text: str,
    ) -> bool:
        """End a trial `runner` owns; False when it no longer does (someone else ended it)."""
        with self.stack.connect() as conn, conn.transaction():
            owner = conn.execute(
                """SELECT runner FROM trials WHERE experiment = %s AND number = %s
                   AND state = 'running' FOR UPDATE""",
                [experiment_id, number],
            ).fetchone()
            if owner is None or owner[0] != runner:
                return False
            self._end_trial(conn, experiment_id, number, state, metric, error, text)
            return True

    def _end_trial(self, conn, experiment_id, number, state, metric, error, text) -> None:
        row = conn.execute(
            """UPDATE trials SET state = %s, metric = coalesce(%s, metric), error = %s,
                      runner = NULL, finished_at = now(), log = log || %s
               WHERE experiment = %s AND number = %s
               RETURNING epochs, metric, restarts""",
            [state, metric, error, line(text), experiment_id, number],
        ).fetchone()
        events.emit(
            conn,
            events.TRIAL_FINISHED,
            f"experiment/{experiment_id}/trial/{number}",
            {
                "experiment": experiment_id,
                "trial": number,
                "state": state,
                "epochs": row[0],
                "metric": row[1],
                "restarts": row[2],
            },
        )

    # -- the end ------------------------------------------------------------------------------

    def finish(self, experiment_id: int) -> Experiment | None:
        """End an active experiment whose trials have all ended: `completed` with its best
        trial (completed, or pruned by ASHA), or `failed` when none did. None when it is not (or
        no longer) for this call to end."""
        with self.stack.connect() as conn, conn.transaction():
            db.transaction_lock(conn, f"cdl.experiment:{experiment_id}")
            head = conn.execute(
                """SELECT state, max_trials, smaller_is_better, metric FROM experiments
                   WHERE id = %s""",
                [experiment_id],
            ).fetchone()
            if head is None or head[0] != "active":
                return None
            _, max_trials, smaller, metric = head
            started, running = conn.execute(
                """SELECT count(*), count(*) FILTER (WHERE state IN ('running', 'paused'))
                   FROM trials WHERE experiment = %s""",
                [experiment_id],
            ).fetchone()
            if running or started < max_trials:
                return None
            # The best model the search found, by the searcher's metric at each trial's last
            # epoch: a trial ASHA stopped early may beat every one that went the whole length
            # (each keeps its model), as Determined's best checkpoint may come from any trial.
            best = conn.execute(
                f"""SELECT number, metric FROM trials
                    WHERE experiment = %s AND state IN ('completed', 'pruned')
                      AND metric IS NOT NULL
                    ORDER BY metric {"ASC" if smaller else "DESC"}, number LIMIT 1""",
                [experiment_id],
            ).fetchone()
            state = "completed" if best else "failed"
            error = None if best else "no trial completed or was pruned (see cdl experiment logs)"
            conn.execute(
                """UPDATE experiments SET state = %s, best_trial = %s, best_metric = %s,
                          error = %s, finished_at = now() WHERE id = %s""",
                [state, best and best[0], best and best[1], error, experiment_id],
            )
            self._emit_finished(conn, experiment_id, state, metric, best)
        return self.get(experiment_id)

    def kill(self, experiment_id: int) -> bool:
        """Mark an active experiment killed; False when it had ended already."""
        with self.stack.connect() as conn, conn.transaction():
            db.transaction_lock(conn, f"cdl.experiment:{experiment_id}")
            row = conn.execute(
                """UPDATE experiments SET state = 'killed', finished_at = now(),
                          error = 'killed by cdl experiment kill'
                   WHERE id = %s AND state = 'active' RETURNING metric""",
                [experiment_id],
            ).fetchone()
            if row is None:
                return False
            self._emit_finished(conn, experiment_id, "killed", row[0], None)
            return True

    def end_running(self, experiment_id: int, state: str, text: str) -> list[int]:
        """End every trial still running (their workers are gone) or paused; return their
        numbers."""
        with self.stack.connect() as conn, conn.transaction():
            numbers = [
                n
                for (n,) in conn.execute(
                    """SELECT number FROM trials WHERE experiment = %s
                       AND state IN ('running', 'paused') FOR UPDATE""",
                    [experiment_id],
                )
            ]
            for number in numbers:
                self._end_trial(conn, experiment_id, number, state, None, None, text)
        return numbers

    @staticmethod
    def _emit_finished(conn, experiment_id, state, metric, best) -> None:
        events.emit(
            conn,
            events.TRAINING_FINISHED,
            f"experiment/{experiment_id}",
            {
                "experiment": experiment_id,
                "state": state,
                "metric": metric,
                "best_trial": best[0] if best else None,
                "best_metric": best[1] if best else None,
            },
        )
