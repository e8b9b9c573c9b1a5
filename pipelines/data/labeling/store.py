"""The label store: every table of labeling in Postgres, and all their SQL.

`label_tasks` maps validated files to Label Studio tasks; `label_rows` keeps every version of
every annotation (a deleted one gets a last version marked deleted), `labels_current` is the
latest live version of each; `label_splits` fixes each file's split for ever; snapshots
(`label_snapshots`, `label_snapshot_rows`) are named, immutable copies that training reads.

Training reads a snapshot's train split as `cdl_scientist` (`train_rows`), a role that cannot
read test labels (migrations 0006 and 0009); only evaluation reads the test split, as
`cdl_evaluator` (`test_rows`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import psycopg
from psycopg.rows import dict_row

from pipelines.core import db, lineage
from pipelines.core.errors import AlreadyExists, NotFound, Unavailable
from pipelines.core.stack import Stack
from pipelines.data.backend import Commit, FileEntry
from pipelines.data.labeling.spec import UseCase

ROW_COLUMNS = (
    "path",
    "source",
    "label",
    "labeler",
    "labeled_at",
    "task_id",
    "annotation_id",
    "export_commit",
)


class LabelStore:
    def __init__(self, stack: Stack, case: UseCase):
        self.stack = stack
        self.case = case

    # -- tasks ---------------------------------------------------------------------------------

    def task_files(self) -> set[tuple[str, str]]:
        """(path, sha256) of every file that has a task."""
        with self.stack.connect() as conn:
            return {
                (path, sha256)
                for path, sha256 in conn.execute(
                    "SELECT path, sha256 FROM label_tasks WHERE use_case = %s", [self.case.name]
                )
            }

    def add_tasks(
        self, commit: Commit, project_id: int, tasks: list[tuple[FileEntry, int]]
    ) -> None:
        """Record the tasks imported for files of `commit`: (file, task id) pairs."""
        with (
            self.stack.connect() as conn,
            conn.cursor().copy(
                "COPY label_tasks (use_case, path, sha256, source, project_id, task_id) FROM STDIN"
            ) as copy,
        ):
            for entry, task_id in tasks:
                copy.write_row(
                    [
                        self.case.name,
                        entry.path,
                        entry.sha256,
                        f"{commit.ref}:{entry.path}",
                        project_id,
                        task_id,
                    ]
                )

    def tasks(self) -> list[tuple[int, str]]:
        """(task id, path) of every task, by task id."""
        with self.stack.connect() as conn:
            return conn.execute(
                "SELECT task_id, path FROM label_tasks WHERE use_case = %s ORDER BY task_id",
                [self.case.name],
            ).fetchall()

    def tasks_of_annotations(self, annotation_ids: list[int]) -> set[int]:
        """The tasks of annotations the store has seen (deleted ones included)."""
        with self.stack.connect() as conn:
            return {
                r[0]
                for r in conn.execute(
                    "SELECT DISTINCT task_id FROM label_rows "
                    "WHERE use_case = %s AND annotation_id = ANY(%s)",
                    [self.case.name, annotation_ids],
                )
            }

    def labels_in_use_outside(self, labels: list[str]) -> list[tuple[str, int]]:
        """(label, count) of the current labels that are not in `labels`."""
        with self.stack.connect() as conn:
            return conn.execute(
                """SELECT label, count(*) FROM labels_current
                   WHERE use_case = %s AND NOT label = ANY(%s) GROUP BY label ORDER BY label""",
                [self.case.name, labels],
            ).fetchall()

    # -- loading exports -----------------------------------------------------------------------

    @contextmanager
    def export_lock(self) -> Iterator[None]:
        """Exports of a use case run one at a time, so an older export is never loaded after a
        newer one."""
        with (
            self.stack.connect(autocommit=True) as conn,
            db.advisory_lock(conn, f"cdl.labels:{self.case.name}"),
        ):
            yield

    def load(
        self, rows: list[dict], present: list[int], export_commit: str, scope: list[int] | None
    ) -> tuple[int, int]:
        """Load new and changed annotations, and mark deleted the annotations of the tasks in
        `scope` (all tasks when None) that the export no longer holds (`present`: every
        annotation id in it); return (rows loaded, deleted). All or nothing."""
        with self.stack.connect() as conn, conn.transaction():
            conn.execute("SET LOCAL work_mem = '64MB'")  # sorts of big exports stay in memory
            conn.execute(
                """CREATE TEMP TABLE incoming (path text, source text, label text, labeler text,
                       labeled_at timestamptz, task_id integer, annotation_id integer,
                       export_commit text) ON COMMIT DROP"""
            )
            with conn.cursor().copy(f"COPY incoming ({', '.join(ROW_COLUMNS)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row([row[c] for c in ROW_COLUMNS])
            self._assign_splits(conn)
            conn.execute("SELECT label_tables(%s)", [self.case.name])
            inserted = conn.execute(
                """INSERT INTO label_rows (use_case, split, source, label, labeler, labeled_at,
                                           task_id, annotation_id, version, export_commit)
                   SELECT %(uc)s, s.split, i.source, i.label, i.labeler, i.labeled_at,
                          i.task_id, i.annotation_id, coalesce(c.version, 0) + 1,
                          i.export_commit
                   FROM incoming i
                   JOIN label_splits s ON s.use_case = %(uc)s AND s.path = i.path
                   LEFT JOIN labels_latest c
                     ON c.use_case = %(uc)s AND c.annotation_id = i.annotation_id
                   WHERE c.annotation_id IS NULL OR c.label <> i.label
                      OR c.labeled_at <> i.labeled_at OR c.labeler <> i.labeler""",
                {"uc": self.case.name},
            ).rowcount
            deleted = conn.execute(
                """INSERT INTO label_rows (use_case, split, source, label, labeler, labeled_at,
                                           task_id, annotation_id, version, export_commit,
                                           deleted)
                   SELECT use_case, split, source, label, labeler, now(), task_id,
                          annotation_id, version + 1, %(commit)s, true
                   FROM labels_current
                   WHERE use_case = %(uc)s AND NOT annotation_id = ANY(%(present)s)
                     AND (%(scope)s::integer[] IS NULL OR task_id = ANY(%(scope)s))""",
                {"uc": self.case.name, "commit": export_commit, "present": present, "scope": scope},
            ).rowcount
        return inserted, deleted

    def _assign_splits(self, conn) -> None:
        """Files in `incoming` without a split get one, stratified by label: in an order fixed
        by the seed, each label's new files go to test until that label's test share reaches
        the configured fraction. Files keep their split for ever."""
        conn.execute(
            """INSERT INTO label_splits (use_case, path, split, label)
               SELECT %(uc)s, n.path,
                      CASE WHEN n.rank <= round(%(fraction)s * (coalesce(e.total, 0) + n.new))
                                          - coalesce(e.test, 0)
                           THEN 'test' ELSE 'train' END,
                      n.label
               FROM (SELECT path, label,
                            row_number() OVER (PARTITION BY label
                                               ORDER BY hashtext(%(seed)s || path), path) AS rank,
                            count(*) OVER (PARTITION BY label) AS new
                     FROM (SELECT path, min(label) AS label FROM incoming i
                           WHERE NOT EXISTS (SELECT 1 FROM label_splits s
                                             WHERE s.use_case = %(uc)s AND s.path = i.path)
                           GROUP BY path) unsplit) n
               LEFT JOIN (SELECT label, count(*) AS total,
                                 count(*) FILTER (WHERE split = 'test') AS test
                          FROM label_splits WHERE use_case = %(uc)s GROUP BY label) e
                 ON e.label = n.label""",
            {
                "uc": self.case.name,
                "fraction": self.case.spec.test_fraction,
                "seed": f"{self.case.spec.split_seed}:",
            },
        )

    # -- snapshots -----------------------------------------------------------------------------

    def snapshot(self, name: str) -> int:
        """Freeze the current labels as snapshot `name`, recorded in lineage; return its row
        count."""
        with self.stack.connect() as conn, conn.transaction():
            exists = conn.execute(
                "SELECT 1 FROM label_snapshots WHERE use_case = %s AND name = %s",
                [self.case.name, name],
            ).fetchone()
            if exists:
                raise AlreadyExists(
                    f"snapshot {self.case.name}/{name} already exists",
                    "snapshots are immutable: pick a new name",
                )
            count = conn.execute(
                "SELECT count(*) FROM labels_current WHERE use_case = %s", [self.case.name]
            ).fetchone()[0]
            if not count:
                raise NotFound(
                    f"no labels for {self.case.name} yet",
                    f"run 'cdl label export {self.case.name}' first",
                )
            conn.execute(
                "INSERT INTO label_snapshots (use_case, name, rows) VALUES (%s, %s, %s)",
                [self.case.name, name, count],
            )
            conn.execute(
                """INSERT INTO label_snapshot_rows (use_case, snapshot, split, source, label,
                                                    labeler, labeled_at, annotation_id, version)
                   SELECT use_case, %s, split, source, label, labeler, labeled_at,
                          annotation_id, version
                   FROM labels_current WHERE use_case = %s""",
                [name, self.case.name],
            )
            per_split = dict(
                conn.execute(
                    """SELECT split, count(*) FROM label_snapshot_rows
                       WHERE use_case = %s AND snapshot = %s GROUP BY split""",
                    [self.case.name, name],
                ).fetchall()
            )
            node = lineage.record_node(
                conn,
                lineage.Kind.LABEL_SNAPSHOT,
                f"{self.case.name}/{name}",
                rows=count,
                train=per_split.get("train", 0),
                test=per_split.get("test", 0),
                test_fraction=self.case.spec.test_fraction,
                split_seed=self.case.spec.split_seed,
            )
            commits = conn.execute(
                """SELECT DISTINCT split_part(source, ':', 1) FROM label_snapshot_rows
                   WHERE use_case = %s AND snapshot = %s""",
                [self.case.name, name],
            ).fetchall()
            for (ref,) in commits:
                upstream = lineage.node_id(lineage.Kind.DATASET_COMMIT, ref)
                if lineage.get_node(conn, upstream):
                    lineage.consumed(conn, node, upstream)
        return count

    def unchanged_since(self, snapshot: str) -> bool:
        """Whether the current labels are exactly snapshot `snapshot`'s (same sources, labels
        and splits): a new snapshot would hold nothing new."""
        with self.stack.connect() as conn:
            return conn.execute(
                """SELECT NOT EXISTS (
                       (SELECT source, label, split FROM labels_current WHERE use_case = %(u)s
                        EXCEPT SELECT source, label, split FROM label_snapshot_rows
                               WHERE use_case = %(u)s AND snapshot = %(s)s)
                       UNION ALL
                       (SELECT source, label, split FROM label_snapshot_rows
                        WHERE use_case = %(u)s AND snapshot = %(s)s
                        EXCEPT SELECT source, label, split FROM labels_current
                               WHERE use_case = %(u)s))""",
                {"u": self.case.name, "s": snapshot},
            ).fetchone()[0]

    def snapshots(self) -> list[dict]:
        """The use case's snapshots, newest first: name, rows, created_at."""
        with self.stack.connect() as conn, conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(
                """SELECT name, rows, created_at FROM label_snapshots WHERE use_case = %s
                   ORDER BY created_at DESC""",
                [self.case.name],
            ).fetchall()

    def snapshot_rows(self, name: str, split: str | None = None) -> list[dict]:
        with self.stack.connect() as conn, conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(
                """SELECT split, source, label, labeler, labeled_at, annotation_id, version
                   FROM label_snapshot_rows WHERE use_case = %s AND snapshot = %s
                   AND (%s::text IS NULL OR split = %s) ORDER BY source""",
                [self.case.name, name, split, split],
            ).fetchall()

    def snapshot_labels(self, name: str) -> list[str]:
        """The distinct labels of a snapshot (both splits), sorted."""
        with self.stack.connect() as conn:
            rows = conn.execute(
                """SELECT DISTINCT label FROM label_snapshot_rows
                   WHERE use_case = %s AND snapshot = %s ORDER BY label""",
                [self.case.name, name],
            ).fetchall()
        return [label for (label,) in rows]

    def train_rows(self, snapshot: str) -> list[tuple[str, str]]:
        """(source, label) of each row of a snapshot's train split, by source: read as the
        `cdl_scientist` role, through the `snapshot_train` view, so that training cannot see a
        test label even by mistake."""
        return self._split_rows(snapshot, "cdl_scientist", "snapshot_train")

    def test_rows(self, snapshot: str) -> list[tuple[str, str]]:
        """(source, label) of each row of a snapshot's test split, by source: read as the
        `cdl_evaluator` role (evaluation's), through the `snapshot_test` view."""
        return self._split_rows(snapshot, "cdl_evaluator", "snapshot_test")

    def _split_rows(self, snapshot: str, role: str, view: str) -> list[tuple[str, str]]:
        with self.stack.connect() as conn:
            try:
                conn.execute(f"SET LOCAL ROLE {role}")
            except (
                psycopg.errors.InsufficientPrivilege,
                psycopg.errors.InvalidParameterValue,
            ) as exc:
                raise Unavailable(
                    f"cannot read labels as {role}: {db.first_line(exc)}",
                    "create the role (migration 0006) and grant it to the CDL database user",
                ) from exc
            known = conn.execute(
                "SELECT 1 FROM label_snapshots WHERE use_case = %s AND name = %s",
                [self.case.name, snapshot],
            ).fetchone()
            if not known:
                raise NotFound(
                    f"no snapshot {self.case.name}/{snapshot}",
                    f"see 'cdl label snapshot list {self.case.name}'",
                )
            return conn.execute(
                f"""SELECT source, label FROM {view}
                   WHERE use_case = %s AND snapshot = %s ORDER BY source""",
                [self.case.name, snapshot],
            ).fetchall()
