"""The labeling loop: validated files become Label Studio tasks, annotations come back into the
Postgres label store, and named snapshots freeze them for training.

Each use case describes its labeling in `use_cases/<name>/labeling.yaml`: the Label Studio
project, its labeling configuration, which validated files become tasks and which <Choices>
holds the label. Files are keyed by path and content, so a re-sync imports only new files; every
task keeps `repo@commit:path` in its meta.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Collection

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines.core import lineage
from pipelines.core.errors import AlreadyExists, Invalid, NotFound, Unavailable
from pipelines.core.postgres import free_port
from pipelines.core.services import ServiceSpec
from pipelines.core.stack import Stack
from pipelines.data.backend import Commit, DataBackend, FileEntry, data_backend
from pipelines.data.label_studio import LabelStudioClient, LabelStudioServer

USE_CASES = Path(__file__).resolve().parents[2] / "use_cases"
IMPORT_BATCH = 500


class SourceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    repo: str
    path: str = "/"


class LabelingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    project: str
    label_config: str
    source: SourceSpec
    task: str = Field(pattern="^(text|image)$")
    choices: str
    test_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int = 0


@dataclass
class UseCase:
    name: str
    folder: Path
    spec: LabelingSpec

    @property
    def label_config(self) -> str:
        return (self.folder / self.spec.label_config).read_text(encoding="utf-8")

    @property
    def labels(self) -> list[str]:
        """The choice values of the labeling configuration's <Choices>."""
        root = ET.fromstring(self.label_config)
        for choices in root.iter("Choices"):
            if choices.get("name") == self.spec.choices:
                return [c.get("value") for c in choices.iter("Choice")]
        raise Invalid(
            f'{self.folder / self.spec.label_config} has no <Choices name="{self.spec.choices}">',
            "fix 'choices' in labeling.yaml",
        )

    @property
    def labels_repo(self) -> str:
        return f"{self.name.replace('_', '-')}-labels"


def use_case(name: str, root: Path = USE_CASES) -> UseCase:
    folder = root / name
    spec_file = folder / "labeling.yaml"
    if not spec_file.is_file():
        known = sorted(p.parent.name for p in root.glob("*/labeling.yaml"))
        raise NotFound(
            f"no use case '{name}' with a labeling.yaml", f"use one of: {', '.join(known)}"
        )
    try:
        spec = LabelingSpec.model_validate(yaml.safe_load(spec_file.read_text()))
    except (ValidationError, yaml.YAMLError) as exc:
        raise Invalid(f"{spec_file}: {exc}", "fix the file") from exc
    return UseCase(name, folder, spec)


# Pre-annotations: given new files as (path, bytes), a model's answers by path:
# {path: {"label": ..., "score": ..., "model": ...}}; files it has no answer for get none.
Predictor = Callable[[list[tuple[str, bytes]]], dict[str, dict]]


def file_predictor(path: Path) -> Predictor:
    """Predictions written by a model elsewhere, as JSON lines: {"path": "/valid/tech/x.txt",
    "label": "tech", "score": 0.93, "model": "bbc-news/3"}, one per file; a line that does not
    parse is an error naming it."""
    found = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise Invalid(
            f"cannot read predictions {path}: {exc}", "give a UTF-8 JSON-lines file"
        ) from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            found[item["path"]] = {
                "label": item["label"],
                "score": item.get("score", 0.0),
                "model": item.get("model", "unknown"),
            }
        except (ValueError, KeyError, TypeError) as exc:
            raise Invalid(
                f"{path} line {number}: not a prediction ({exc})",
                'write {"path": ..., "label": ..., "score": ...} per line',
            ) from exc
    return lambda items: {p: found[p] for p, _ in items if p in found}


def model_predictor(stack: Stack, case: UseCase, alias: str) -> tuple[Predictor, str] | None:
    """The predictions of the use case's registered model version that carries `alias` (e.g.
    the champion), and that version's name/version; None when no version carries it."""
    from pipelines.model.registry import Registry, registered_name

    model = Registry(stack).load(registered_name(case.name), alias)
    if model is None:
        return None

    def predict(items: list[tuple[str, bytes]]) -> dict[str, dict]:
        answers = model.predict(case.spec.task, [data for _, data in items])
        return {
            path: {"label": label, "score": score, "model": model.ref}
            for (path, _), (label, score) in zip(items, answers, strict=True)
        }

    return predict, model.ref


def class_of(path: str, root: str) -> str:
    """The class folder of a file: the first folder below the source path."""
    return path[len(root.rstrip("/")) :].strip("/").split("/")[0]


class Labeling:
    def __init__(
        self,
        stack: Stack,
        case: UseCase,
        client: LabelStudioClient | None = None,
        data: DataBackend | None = None,
    ):
        self.stack = stack
        self.case = case
        self.repos = data or data_backend(stack)
        self._client = client

    def _read(self, commit: Commit, entry: FileEntry) -> bytes:
        with self.repos.open(commit, entry) as stream:
            return stream.read()

    @property
    def client(self) -> LabelStudioClient:
        if self._client is None:
            self._client = LabelStudioServer(self.stack).client()
        return self._client

    # -- the project ---------------------------------------------------------------------

    def project(self) -> int:
        """The use case's project, created on first use; its labeling config kept up to date."""
        config = self.case.label_config
        for project in self.client.projects():
            if project["title"] == self.case.spec.project:
                if (project.get("label_config") or "").strip() != config.strip():
                    self._check_labels_in_use()
                    self.client.request(
                        "PATCH", f"/api/projects/{project['id']}", json={"label_config": config}
                    )
                return project["id"]
        created = self.client.request(
            "POST",
            "/api/projects",
            json={
                "title": self.case.spec.project,
                "label_config": config,
                "description": f"CDL use case {self.case.name}",
            },
        )
        return created["id"]

    def _check_labels_in_use(self) -> None:
        """A labeling config may add labels, not drop ones the current labels use: Label Studio
        would take it, and those labels would silently stop loading."""
        with self.stack.connect() as conn:
            used = conn.execute(
                """SELECT label, count(*) FROM labels_current
                   WHERE use_case = %s AND NOT label = ANY(%s) GROUP BY label ORDER BY label""",
                [self.case.name, self.case.labels],
            ).fetchall()
        if used:
            dropped = ", ".join(f"'{label}' ({count} label(s))" for label, count in used)
            raise Invalid(
                f"{self.case.folder / self.case.spec.label_config} drops labels the label store "
                f"uses: {dropped}",
                "keep them in the config, or relabel those tasks in Label Studio and export "
                "before removing them",
            )

    def _register_webhook(self, project_id: int) -> None:
        """Point the project's annotation webhooks at the stack's receiver, when it runs."""
        if not self.stack.supervisor.status(WEBHOOK_SERVICE).healthy:
            return
        url = f"http://127.0.0.1:{webhook_port(self.stack)}/hook"
        hooks = self.client.request("GET", "/api/webhooks", params={"project": project_id})
        if any(h.get("url") == url for h in hooks or []):
            return
        self.client.request(
            "POST",
            "/api/webhooks",
            json={
                "project": project_id,
                "url": url,
                "send_payload": True,
                "send_for_all_actions": False,
                "actions": WEBHOOK_ACTIONS,
                "is_active": True,
            },
        )

    # -- sync ----------------------------------------------------------------------------

    def _prediction(self, path: str, found: dict | None) -> list[dict]:
        """A model's answer for a file, in Label Studio's prediction form (a pre-annotation)."""
        if not found:
            return []
        if found["label"] not in self.case.labels:
            raise Invalid(
                f"prediction of {found.get('model', 'unknown')} for {path}: label "
                f"'{found['label']}' is not in the labeling config",
                "predict one of " + ", ".join(self.case.labels),
            )
        return [
            {
                "model_version": str(found.get("model", "unknown")),
                "score": float(found.get("score", 0.0)),
                "result": self._choice_result([found["label"]]),
            }
        ]

    def _choice_result(self, labels: list[str]) -> list[dict]:
        """An annotation's or prediction's result that picks `labels` (none: an empty one)."""
        if not labels:
            return []
        return [
            {
                "from_name": self.case.spec.choices,
                "to_name": "image" if self.case.spec.task == "image" else "text",
                "type": "choices",
                "value": {"choices": labels},
            }
        ]

    def _task_data(self, data: bytes) -> dict:
        if self.case.spec.task == "image":
            return {"image": "data:image/png;base64," + base64.b64encode(data).decode()}
        text = data.decode("utf-8", errors="replace")
        title, _, body = text.partition("\n")
        return {"title": title.strip(), "text": body.strip()}

    def sync(
        self,
        ref: str | None = None,
        progress: Callable[[int, int], None] | None = None,
        predict: Predictor | None = None,
    ) -> tuple[int, int]:
        """Import the source commit's files that have no task yet; return (new, already).
        `predict`'s answers for the new files become their pre-annotations."""
        source = self.case.spec.source
        project_id = self.project()
        self._register_webhook(project_id)
        try:
            commit = self.repos.resolve(ref or source.repo)
        except NotFound as exc:
            if ref:
                raise NotFound(
                    f"cannot label {ref}: {exc.problem}",
                    f"give a commit of {source.repo} ('cdl data log {source.repo}' lists them)",
                ) from exc
            raise NotFound(
                f"no validated data to label for {self.case.name}: {exc.problem}",
                f"run the data pipeline in {self.case.folder / 'data'} first",
            ) from exc
        with self.stack.connect() as conn:
            known = {
                (p, s)
                for p, s in conn.execute(
                    "SELECT path, sha256 FROM label_tasks WHERE use_case = %s", [self.case.name]
                )
            }
        entries = [
            e for e in self.repos.files(commit, source.path) if not e.path.endswith(".reason")
        ]
        new = [e for e in entries if (e.path, e.sha256) not in known]
        for start in range(0, len(new), IMPORT_BATCH):
            batch = new[start : start + IMPORT_BATCH]
            blobs = [self._read(commit, e) for e in batch]
            answers = (
                predict([(e.path, b) for e, b in zip(batch, blobs, strict=True)]) if predict else {}
            )
            tasks = [
                {
                    "data": self._task_data(data),
                    "meta": {"source": f"{commit.ref}:{e.path}", "sha256": e.sha256},
                    "predictions": self._prediction(e.path, answers.get(e.path)),
                }
                for e, data in zip(batch, blobs, strict=True)
            ]
            reply = self.client.request(
                "POST",
                f"/api/projects/{project_id}/import",
                params={"return_task_ids": "true"},
                json=tasks,
            )
            ids = reply.get("task_ids") or []
            if len(ids) != len(batch):
                raise Unavailable(
                    f"Label Studio returned {len(ids)} task ids for {len(batch)} imported tasks",
                    "re-run the sync: imported files are skipped",
                )
            with (
                self.stack.connect() as conn,
                conn.cursor().copy(
                    "COPY label_tasks (use_case, path, sha256, source, project_id, task_id) "
                    "FROM STDIN"
                ) as copy,
            ):
                for entry, task_id in zip(batch, ids, strict=True):
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
            if progress:
                progress(start + len(batch), len(new))
        return len(new), len(entries) - len(new)

    # -- annotate (demos and tests) --------------------------------------------------------

    def auto_annotate(self, limit: int | None = None) -> int:
        """Annotate unlabelled tasks through the API with the class folder of their file, as a
        labeler would; return how many."""
        project_id = self.project()
        with self.stack.connect() as conn:
            rows = conn.execute(
                "SELECT task_id, path FROM label_tasks WHERE use_case = %s ORDER BY task_id",
                [self.case.name],
            ).fetchall()
        done = {t["id"] for t in self._tasks(project_id) if t.get("total_annotations")}
        count = 0
        for task_id, path in rows:
            if task_id in done or (limit is not None and count >= limit):
                continue
            self.annotate(task_id, class_of(path, self.case.spec.source.path))
            count += 1
        return count

    def annotate(self, task_id: int, *labels: str) -> dict:
        return self.client.request(
            "POST",
            f"/api/tasks/{task_id}/annotations",
            json={"result": self._choice_result(list(labels)), "lead_time": 1.0},
        )

    def _tasks(self, project_id: int) -> list[dict]:
        tasks, page = [], 1
        while True:
            reply = self.client.request(
                "GET", "/api/tasks", params={"project": project_id, "page": page, "page_size": 1000}
            )
            batch = reply["tasks"] if isinstance(reply, dict) else reply
            tasks += batch
            if len(batch) < 1000:
                return tasks
            page += 1

    # -- export into the label store -------------------------------------------------------

    def tasks_of(self, scope: set[tuple[str, int]]) -> set[int]:
        """The task ids of a webhook scope: its tasks, and the tasks of its annotations (deleted
        ones included: the label store knows their task)."""
        tasks = {i for kind, i in scope if kind == "task"}
        annotations = [i for kind, i in scope if kind == "annotation"]
        if annotations:
            with self.stack.connect() as conn:
                tasks |= {
                    r[0]
                    for r in conn.execute(
                        "SELECT DISTINCT task_id FROM label_rows "
                        "WHERE use_case = %s AND annotation_id = ANY(%s)",
                        [self.case.name, annotations],
                    )
                }
        return tasks

    def export(self, tasks: Collection[int] | None = None) -> "ExportResult":
        """Pull the project's annotated tasks from Label Studio, commit their raw export JSON to
        the labels repo (one file per task, `/tasks/<id>.json`), and load new or changed
        annotations into the label store in one transaction; annotations that are gone get a
        version marked deleted.

        With `tasks` (task ids, as a webhook names them) only those tasks are exported and
        compared: an incremental export. Exports of a use case run one at a time, so an older
        export is never loaded after a newer one."""
        scope = None if tasks is None else sorted(set(tasks))
        if scope is not None and not scope:
            return ExportResult(None, 0, 0, 0, 0, [])
        project_id = self.project()
        params: dict = {"exportType": "JSON"}
        if scope is not None:
            params["ids[]"] = scope
        with self.stack.connect(autocommit=True) as lock:
            lock.execute("SELECT pg_advisory_lock(hashtext(%s))", [f"cdl.labels:{self.case.name}"])
            raw = self.client.request_bytes(
                "GET", f"/api/projects/{project_id}/export", params=params
            )
            try:
                exported = json.loads(raw)
                ids = [t["id"] for t in exported]
            except (ValueError, TypeError, KeyError) as exc:
                raise Invalid(
                    f"Label Studio's export of project {project_id} is not a JSON list of "
                    f"tasks: {exc}",
                    "retry the export",
                ) from exc
            commit = self._commit_export(exported, project_id, scope)
            users = self.client.request("GET", "/api/users")
            emails = {u["id"]: u.get("email") or u.get("username") for u in users}
            rows, problems = self._rows(exported, commit, emails)
            present = [a["id"] for t in exported for a in t.get("annotations", [])]
            loaded, deleted = self._load(rows, present, commit.id, scope)
        return ExportResult(commit, len(ids), len(rows), loaded, deleted, problems)

    def _commit_export(self, exported: list[dict], project_id: int, scope: list[int] | None):
        """A commit of the labels repo: every exported task as `/tasks/<id>.json`. A full
        export's commit holds exactly the annotated tasks; an incremental one changes the
        files of the tasks in scope, removing those that have no annotation any more."""
        repo = self.case.labels_repo
        if repo not in {r.name for r in self.repos.list_repos()}:
            try:
                self.repos.create_repo(repo, f"raw Label Studio exports of {self.case.name}")
            except AlreadyExists:
                pass  # created concurrently
        what = "export" if scope is None else f"incremental export ({len(scope)} task(s))"
        return self.repos.write(
            repo,
            {
                f"/tasks/{task['id']}.json": json.dumps(
                    task, ensure_ascii=False, sort_keys=True
                ).encode()
                for task in exported
            },
            deletes=[
                f"/tasks/{task_id}.json"
                for task_id in set(scope or ()) - {t["id"] for t in exported}
            ],
            carry_parent=scope is not None,
            message=f"{what} of Label Studio project {project_id}",
            author="cdl label export",
        )

    def _current_files(self) -> set[tuple[str, str]]:
        source = self.case.spec.source
        commit = self.repos.resolve(source.repo)
        return {(e.path, e.sha256) for e in self.repos.files(commit, source.path)}

    def _rows(
        self, tasks: list[dict], export: Commit, emails: dict[int, str]
    ) -> tuple[list[dict], list[str]]:
        labels = set(self.case.labels)
        present = self._current_files()
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
                problems.append(
                    f"{where}: its file is no longer in {self.case.spec.source.repo}@master"
                )
                continue
            for annotation in task.get("annotations", []):
                if annotation.get("was_cancelled"):
                    continue
                chosen = [
                    c
                    for r in annotation.get("result", [])
                    if r.get("from_name") == self.case.spec.choices
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
                    problems.append(
                        f"{label_where}: label '{chosen[0]}' is not in the labeling config"
                    )
                    continue
                labeler = annotation.get("completed_by")
                if isinstance(labeler, dict):
                    labeler = labeler.get("id")
                labeler = emails.get(labeler, labeler)
                rows.append(
                    {
                        "path": path,
                        "source": source,
                        "label": chosen[0],
                        "labeler": str(labeler),
                        "task_id": task["id"],
                        "labeled_at": annotation.get("updated_at") or annotation.get("created_at"),
                        "annotation_id": annotation["id"],
                        "export_commit": export.id,
                    }
                )
        return rows, problems

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

    def _load(
        self, rows: list[dict], present: list[int], export_commit: str, scope: list[int] | None
    ) -> tuple[int, int]:
        """Load new and changed annotations, and mark deleted the annotations of the tasks in
        `scope` (all tasks when None) that the export no longer holds (`present`: every
        annotation id in it); return (rows loaded, deleted)."""
        with self.stack.connect() as conn, conn.transaction():
            conn.execute("SET LOCAL work_mem = '64MB'")  # sorts of big exports stay in memory
            conn.execute(
                """CREATE TEMP TABLE incoming (path text, source text, label text, labeler text,
                       labeled_at timestamptz, task_id integer, annotation_id integer,
                       export_commit text) ON COMMIT DROP"""
            )
            with conn.cursor().copy(
                "COPY incoming (path, source, label, labeler, labeled_at, task_id, "
                "annotation_id, export_commit) FROM STDIN"
            ) as copy:
                for r in rows:
                    copy.write_row(
                        [
                            r["path"],
                            r["source"],
                            r["label"],
                            r["labeler"],
                            r["labeled_at"],
                            r["task_id"],
                            r["annotation_id"],
                            r["export_commit"],
                        ]
                    )
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

    # -- snapshots -------------------------------------------------------------------------

    def snapshot(self, name: str) -> int:
        """Freeze the current labels as snapshot `name`; return its row count."""
        if not re.fullmatch(r"[a-zA-Z0-9_.-]{1,63}", name):
            raise Invalid(
                f"'{name}' is not a valid snapshot name", "use letters, digits, '.', '-' or '_'"
            )
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
            commits = [
                r[0]
                for r in conn.execute(
                    """SELECT DISTINCT split_part(source, ':', 1) FROM label_snapshot_rows
                   WHERE use_case = %s AND snapshot = %s""",
                    [self.case.name, name],
                )
            ]
            for ref in commits:
                upstream = lineage.node_id(lineage.Kind.DATASET_COMMIT, ref)
                if lineage.get_node(conn, upstream):
                    lineage.consumed(conn, node, upstream)
        return count

    def snapshot_rows(self, name: str, split: str | None = None) -> list[dict]:
        with self.stack.connect() as conn:
            cursor = conn.execute(
                """SELECT split, source, label, labeler, labeled_at, annotation_id, version
                   FROM label_snapshot_rows WHERE use_case = %s AND snapshot = %s
                   AND (%s::text IS NULL OR split = %s) ORDER BY source""",
                [self.case.name, name, split, split],
            )
            columns = [c.name for c in cursor.description]
            return [dict(zip(columns, row, strict=True)) for row in cursor]


@dataclass
class ExportResult:
    commit: Commit | None  # None: nothing was in scope
    tasks: int
    rows: int
    loaded: int  # new rows: new annotations or new versions of changed ones
    deleted: int  # annotations gone from Label Studio, now marked deleted
    problems: list[str]


# -- the webhook receiver: annotations trigger incremental exports ------------------------------

WEBHOOK_SERVICE = "label-webhooks"
WEBHOOK_ACTIONS = ["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"]
DEBOUNCE_S = 1.0  # a burst of annotations becomes one export
RETRY_S, RETRY_MAX_S = 2.0, 60.0  # a failed export is retried after 2, 4, 8, ... 60 s


def webhook_port(stack: Stack) -> int:
    state = stack.settings.home / "label-studio" / "webhooks.json"
    try:
        return json.loads(state.read_text())["port"]
    except (OSError, ValueError, KeyError):
        port = free_port()
        state.parent.mkdir(parents=True, exist_ok=True)
        state.write_text(json.dumps({"port": port}))
        return port


def webhook_spec(stack: Stack) -> ServiceSpec:
    port = webhook_port(stack)
    spec = stack.cli_service(WEBHOOK_SERVICE, "label", "webhooks", "--port", str(port))
    return replace(
        spec, health_url=f"http://127.0.0.1:{port}/", address=f"http://127.0.0.1:{port}/hook"
    )


# What a burst of events asks to export: ("task", id) and ("annotation", id) keys, or None for
# the whole project (an event that names neither, or too many to name in one request).
Scope = set[tuple[str, int]] | None
MAX_SCOPE = 1000


def event_scope(payload: dict) -> Scope:
    """The task an annotation event concerns, or the annotations it deleted."""
    try:
        if payload.get("action") == "ANNOTATIONS_DELETED":
            keys = {("annotation", int(a["id"])) for a in payload.get("annotations") or []}
        else:
            task = (payload.get("task") or {}).get("id") or payload["annotation"]["task"]
            keys = {("task", int(task))}
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return keys or None


def merge_scopes(a: Scope, b: Scope) -> Scope:
    if a is None or b is None or len(a | b) > MAX_SCOPE:
        return None
    return a | b


def serve_webhooks(
    stack: Stack, port: int, stop: threading.Event, say: Callable[[str], None]
) -> None:
    """Receive Label Studio's annotation webhooks and run an incremental export of the tasks
    they concern; a failed export is retried with backoff."""
    projects = {
        use_case(p.parent.name).spec.project: p.parent.name
        for p in USE_CASES.glob("*/labeling.yaml")
    }
    pending: dict[str, Scope] = {}  # use case -> what to export
    retry: dict[str, tuple[float, float]] = {}  # use case -> (when, backoff) after a failure
    wake = threading.Condition()

    def add(name: str, scope: Scope) -> None:
        with wake:
            pending[name] = merge_scopes(pending[name], scope) if name in pending else scope
            wake.notify()

    def ready() -> list[str]:
        now = time.monotonic()
        return sorted(n for n in pending if retry.get(n, (0.0, 0.0))[0] <= now)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # health
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                payload = json.loads(body or b"{}")
                name = projects.get((payload.get("project") or {}).get("title"))
            except (ValueError, AttributeError):
                payload, name = {}, None
            self.send_response(200 if name else 202)
            self.end_headers()
            if name and payload.get("action") in WEBHOOK_ACTIONS:
                add(name, event_scope(payload))

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    say(f"receiving Label Studio webhooks on http://127.0.0.1:{port}/hook")
    try:
        while not stop.is_set():
            with wake:
                retries = [retry[n][0] for n in pending if n in retry]
                wait_s = min([1.0] + [when - time.monotonic() for when in retries])
                if not wake.wait_for(lambda: ready() or stop.is_set(), timeout=max(0.0, wait_s)):
                    continue
            if stop.wait(DEBOUNCE_S):  # a burst of events becomes one export
                break
            with wake:
                work = {n: pending.pop(n) for n in ready()}
            for name, scope in work.items():
                try:
                    labeling = Labeling(stack, use_case(name))
                    tasks = None if scope is None else labeling.tasks_of(scope)
                    result = labeling.export(tasks)
                except Exception as exc:  # the receiver outlives a failed export and retries it
                    backoff = min(2 * retry.get(name, (0.0, RETRY_S / 2))[1], RETRY_MAX_S)
                    retry[name] = (time.monotonic() + backoff, backoff)
                    add(name, scope)
                    say(f"{name}: export failed, retrying in {backoff:g} s: {exc}")
                    continue
                retry.pop(name, None)
                say(
                    f"{name}: exported {result.tasks} task(s)"
                    + (" (incremental)" if tasks is not None else "")
                    + f", {result.loaded} new label row(s)"
                    + (f", {result.deleted} deleted" if result.deleted else "")
                    + (f", {len(result.problems)} skipped" if result.problems else "")
                )
    finally:
        server.shutdown()
