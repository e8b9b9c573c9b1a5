"""`Labeling`: the labeling loop of one use case, composed of the Label Studio client, the label
store and the data backend.

Files are keyed by path and content, so a re-sync imports only new files; every task keeps
`repo@commit:path` and the file's sha256 in its meta, by which a re-sync also finds the tasks of
an interrupted one that Label Studio took but the store never recorded. An export commits the
raw Label Studio JSON to the use case's labels repo, then loads the annotations into the label
store in one transaction.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Callable, Collection

from pipelines.core.errors import AlreadyExists, Invalid, NotFound, Unavailable
from pipelines.core.stack import Stack
from pipelines.data.backend import Commit, DataBackend, FileEntry, data_backend
from pipelines.data.labeling import rows
from pipelines.data.labeling.client import LabelStudioClient
from pipelines.data.labeling.predictor import Predictor
from pipelines.data.labeling.server import LabelStudioServer
from pipelines.data.labeling.spec import SNAPSHOT_NAME, UseCase
from pipelines.data.labeling.store import LabelStore
from pipelines.data.labeling.webhooks import (
    WEBHOOK_ACTIONS,
    WEBHOOK_SERVICE,
    Scope,
    webhook_port,
)

IMPORT_BATCH = 500  # tasks a request, with their files' content
# Predictions a request: each request's cost grows with the project's predictions, so few large
# ones (2,225 answers: 2.7 s in one request, 7.6 s in five).
PREDICTIONS_BATCH = 5000


@dataclass
class ExportResult:
    commit: Commit | None  # None: nothing was in scope
    tasks: int
    rows: int
    loaded: int  # new rows: new annotations or new versions of changed ones
    deleted: int  # annotations gone from Label Studio, now marked deleted
    problems: list[str]


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
        self.store = LabelStore(stack, case)
        self._client = client

    @property
    def client(self) -> LabelStudioClient:
        if self._client is None:
            self._client = LabelStudioServer(self.stack).client()
        return self._client

    # -- the project ---------------------------------------------------------------------------

    def project(self) -> int:
        """The use case's project, created on first use; its labeling config kept up to date."""
        config = self.case.label_config
        for project in self.client.projects():
            if project["title"] == self.case.spec.project:
                if (project["label_config"] or "").strip() != config.strip():
                    self._check_labels_in_use()
                    self.client.update_label_config(project["id"], config)
                return project["id"]
        return self.client.create_project(
            self.case.spec.project, config, f"CDL use case {self.case.name}"
        )

    def _check_labels_in_use(self) -> None:
        """A labeling config may add labels, not drop ones the current labels use: Label Studio
        would take it, and those labels would silently stop loading."""
        used = self.store.labels_in_use_outside(self.case.labels)
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
        if url not in self.client.webhook_urls(project_id):
            self.client.create_webhook(project_id, url, WEBHOOK_ACTIONS)

    # -- sync ----------------------------------------------------------------------------------

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
        commit = self._source_commit(ref)
        known = self.store.task_files()
        entries = [
            e for e in self.repos.files(commit, source.path) if not e.path.endswith(".reason")
        ]
        new = [e for e in entries if (e.path, e.sha256) not in known]
        to_import = self._adopt(commit, project_id, new) if new else []
        for start in range(0, len(to_import), IMPORT_BATCH):
            batch = to_import[start : start + IMPORT_BATCH]
            self._import(commit, project_id, batch, predict)
            if progress:
                progress(start + len(batch), len(to_import))
        return len(new), len(entries) - len(new)

    def _adopt(self, commit: Commit, project_id: int, new: list[FileEntry]) -> list[FileEntry]:
        """Record the tasks that Label Studio holds for `new` files without the store knowing
        them (a sync killed, or cut off from the database, after Label Studio took its import):
        importing those files again would give labelers each of them twice. Return the files
        still without a task."""
        wanted = {(e.path, e.sha256): e for e in new}
        adopted = []
        for task in sorted(self.client.tasks(project_id, meta=True), key=lambda t: t["id"]):
            source = str(task["meta"].get("source", ""))
            entry = wanted.pop((source.partition(":")[2], task["meta"].get("sha256")), None)
            if entry is not None:
                adopted.append((entry, task["id"]))
        if adopted:
            self.store.add_tasks(commit, project_id, adopted)
        return list(wanted.values())

    def _source_commit(self, ref: str | None) -> Commit:
        source = self.case.spec.source
        try:
            return self.repos.resolve(ref or source.repo)
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

    def _import(
        self, commit: Commit, project_id: int, batch: list[FileEntry], predict: Predictor | None
    ) -> None:
        blobs = [self._read(commit, e) for e in batch]
        items = [(e.path, b) for e, b in zip(batch, blobs, strict=True)]
        answers = predict(items) if predict else {}
        tasks = [
            {
                "data": rows.task_data(self.case, data),
                "meta": {"source": f"{commit.ref}:{e.path}", "sha256": e.sha256},
                "predictions": rows.prediction(self.case, e.path, answers.get(e.path)),
            }
            for e, data in zip(batch, blobs, strict=True)
        ]
        ids = self.client.import_tasks(project_id, tasks)
        if len(ids) != len(batch):
            raise Unavailable(
                f"Label Studio returned {len(ids)} task ids for {len(batch)} imported tasks",
                "re-run the sync: imported files are skipped",
            )
        self.store.add_tasks(commit, project_id, list(zip(batch, ids, strict=True)))

    def _read(self, commit: Commit, entry: FileEntry) -> bytes:
        with self.repos.open(commit, entry) as stream:
            return stream.read()

    # -- annotate (demos and tests) ------------------------------------------------------------

    def auto_annotate(self, limit: int | None = None) -> int:
        """Annotate unlabelled tasks with the class folder of their file, as a labeler would:
        real annotations by the API's user. Done in two bulk requests, not one per task: the
        answers go in as predictions of a one-off model version, then Label Studio's 'Create
        Annotations From Predictions' action turns them into annotations. Return how many."""
        project_id = self.project()
        done = {t["id"] for t in self.client.tasks(project_id) if t["annotations"]}
        todo = [(task_id, path) for task_id, path in self.store.tasks() if task_id not in done]
        todo = todo[:limit] if limit is not None else todo
        if not todo:
            return 0
        # A version of its own, so that only this run's answers become annotations.
        version = f"cdl label auto {uuid.uuid4().hex[:12]}"
        root = self.case.spec.source.path
        for start in range(0, len(todo), PREDICTIONS_BATCH):
            self.client.import_predictions(
                project_id,
                [
                    {
                        "task": task_id,
                        "model_version": version,
                        "score": 1.0,
                        "result": rows.choice_result(self.case, [rows.class_of(path, root)]),
                    }
                    for task_id, path in todo[start : start + PREDICTIONS_BATCH]
                ],
            )
        self.client.annotations_from_predictions(project_id, [t for t, _ in todo], version)
        return len(todo)

    def annotate(self, task_id: int, *labels: str) -> dict:
        """One annotation choosing `labels`, as a labeler would make it."""
        return self.client.create_annotation(task_id, rows.choice_result(self.case, list(labels)))

    # -- export into the label store -----------------------------------------------------------

    def tasks_of(self, scope: set[tuple[str, int]]) -> set[int]:
        """The task ids of a webhook scope: its tasks, and the tasks of its annotations (deleted
        ones included: the label store knows their task)."""
        tasks = {i for kind, i in scope if kind == "task"}
        annotations = [i for kind, i in scope if kind == "annotation"]
        if annotations:
            tasks |= self.store.tasks_of_annotations(annotations)
        return tasks

    def export_scope(self, scope: Scope) -> ExportResult:
        """An export of what webhooks named (None: the whole project)."""
        return self.export(None if scope is None else self.tasks_of(scope))

    def export(self, tasks: Collection[int] | None = None) -> ExportResult:
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
        with self.store.export_lock():
            exported = self._exported_tasks(project_id, scope)
            commit = self._commit_export(exported, project_id, scope)
            found, problems = self._rows(exported, commit)
            present = [a["id"] for t in exported for a in t.get("annotations", [])]
            loaded, deleted = self.store.load(found, present, commit.id, scope)
        return ExportResult(commit, len(exported), len(found), loaded, deleted, problems)

    def _exported_tasks(self, project_id: int, scope: list[int] | None) -> list[dict]:
        raw = self.client.export(project_id, scope)
        try:
            exported = json.loads(raw)
            [t["id"] for t in exported]
        except (ValueError, TypeError, KeyError) as exc:
            raise Invalid(
                f"Label Studio's export of project {project_id} is not a JSON list of tasks: {exc}",
                "retry the export",
            ) from exc
        return exported

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

    def _rows(self, exported: list[dict], commit: Commit) -> tuple[list[dict], list[str]]:
        source = self.case.spec.source
        files = self.repos.files(self.repos.resolve(source.repo), source.path)
        present = {(e.path, e.sha256) for e in files}
        emails = self.client.user_emails()
        return rows.export_rows(self.case, exported, present, emails, commit.id)

    # -- snapshots -----------------------------------------------------------------------------

    def snapshot(self, name: str) -> int:
        """Freeze the current labels as snapshot `name`; return its row count."""
        if not SNAPSHOT_NAME.fullmatch(name):
            raise Invalid(
                f"'{name}' is not a valid snapshot name", "use letters, digits, '.', '-' or '_'"
            )
        return self.store.snapshot(name)

    def snapshots(self) -> list[dict]:
        return self.store.snapshots()

    def unchanged_since(self, snapshot: str) -> bool:
        return self.store.unchanged_since(snapshot)

    def snapshot_rows(self, name: str, split: str | None = None) -> list[dict]:
        return self.store.snapshot_rows(name, split)
