"""The Label Studio calls CDL makes, one typed method each, through label-studio-sdk.

Every call is retried with backoff while the server does not answer (or answers 5xx), and the
SDK's errors become CDL's kinds here: `Unavailable` when Label Studio is down, `NotFound` for
HTTP 404, `Invalid` for the other 4xx. Nothing above this module sees an SDK exception.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError
from label_studio_sdk.core.request_options import RequestOptions

from pipelines.core.errors import Invalid, NotFound, Unavailable

T = TypeVar("T")
RETRIES = 5
PAGE_SIZE = 1000


class LabelStudioClient:
    def __init__(self, url: str, token: str, retries: int = RETRIES, backoff_s: float = 0.5):
        self.url = url.rstrip("/")
        self.sdk = LabelStudio(base_url=self.url, api_key=token, timeout=60)
        self.retries = retries
        self.backoff_s = backoff_s

    def _call(
        self, what: str, call: Callable[[RequestOptions], T], once: bool = False, **options
    ) -> T:
        """`call(request_options)`, retried with backoff (the SDK's own retries are off: they
        do not cover a server that does not answer). A call that creates things (`once`) is
        retried only while it cannot reach the server: a server that died or failed after taking
        it may have done it, and sending it again would do it twice; its caller finds out."""
        for attempt in range(self.retries + 1):
            try:
                return call(RequestOptions(max_retries=0, **options))
            except httpx.ConnectError as exc:
                failure = f"{type(exc).__name__}"
            except httpx.TransportError as exc:
                failure = f"{type(exc).__name__}"
                if once:
                    raise self._lost(what, failure) from exc
            except ApiError as exc:
                if exc.status_code is None or exc.status_code < 500:
                    raise self._refused(what, exc) from exc
                failure = f"HTTP {exc.status_code}"
                if once:
                    raise self._lost(what, failure) from exc
            if attempt == self.retries:
                raise Unavailable(
                    f"Label Studio at {self.url} does not answer ({what}: {failure}) after "
                    f"{attempt + 1} tries",
                    "run 'cdl stack up --with label-studio' and check .cdl/logs/label-studio.log",
                )
            time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def _lost(self, what: str, failure: str) -> Unavailable:
        return Unavailable(
            f"Label Studio at {self.url} took no answer back ({what}: {failure}): it may or may "
            "not have done it",
            "run the command again once 'cdl stack up --with label-studio' is done: it finds "
            "what was done",
        )

    def _refused(self, what: str, exc: ApiError) -> Exception:
        problem = f"Label Studio refused {what}: HTTP {exc.status_code} {str(exc.body)[:300]}"
        if exc.status_code == 404:
            return NotFound(problem)
        return Invalid(problem)

    # -- projects ------------------------------------------------------------------------------

    def projects(self) -> list[dict]:
        """Every project: {"id", "title", "label_config"}."""
        found = self._call(
            "list projects",
            lambda o: list(self.sdk.projects.list(page_size=PAGE_SIZE, request_options=o)),
        )
        return [{"id": p.id, "title": p.title, "label_config": p.label_config} for p in found]

    def create_project(self, title: str, label_config: str, description: str) -> int:
        created = self._call(
            f"create project {title!r}",
            lambda o: self.sdk.projects.create(
                title=title, label_config=label_config, description=description, request_options=o
            ),
            once=True,
        )
        return created.id

    def update_label_config(self, project_id: int, label_config: str) -> None:
        self._call(
            f"update project {project_id}",
            lambda o: self.sdk.projects.update(
                id=project_id, label_config=label_config, request_options=o
            ),
        )

    def label_config(self, project_id: int) -> str:
        return self._call(
            f"get project {project_id}",
            lambda o: self.sdk.projects.get(id=project_id, request_options=o).label_config,
        )

    # -- tasks, predictions, annotations -------------------------------------------------------

    def import_tasks(self, project_id: int, tasks: list[dict]) -> list[int]:
        """Import tasks ({"data", "meta", "predictions"}); return their ids, in order."""
        reply = self._call(
            f"import {len(tasks)} task(s) into project {project_id}",
            lambda o: self.sdk.projects.import_tasks(
                id=project_id, request=tasks, return_task_ids=True, request_options=o
            ),
            once=True,
        )
        return list(reply.task_ids or [])

    def tasks(self, project_id: int, meta: bool = False) -> list[dict]:
        """Every task of a project: {"id", "annotations"} (how many it has), with `meta` its
        "meta" too. The count is of the annotations themselves, not the task's
        `total_annotations` counter, which lags when Label Studio fails between writing
        annotations and updating it (its database restarting)."""
        found = self._call(
            f"list the tasks of project {project_id}",
            lambda o: list(
                self.sdk.tasks.list(
                    project=project_id,
                    fields="all",  # the annotations themselves; `include` leaves the data out
                    include="id,annotations" + (",meta" if meta else ""),
                    page_size=PAGE_SIZE,
                    request_options=o,
                )
            ),
        )
        return [
            {"id": t.id, "annotations": len(t.annotations or [])}
            | ({"meta": t.meta or {}} if meta else {})
            for t in found
        ]

    def task(self, task_id: int) -> dict:
        """One task with its predictions and annotations, as Label Studio's JSON."""
        found = self._call(
            f"get task {task_id}",
            lambda o: self.sdk.tasks.get(id=str(task_id), request_options=o),
        )
        return found.model_dump(mode="json")

    def create_annotation(self, task_id: int, result: list[dict]) -> dict:
        created = self._call(
            f"annotate task {task_id}",
            lambda o: self.sdk.annotations.create(
                id=task_id, result=result, lead_time=1.0, request_options=o
            ),
            once=True,
        )
        return created.model_dump(mode="json")

    def import_predictions(self, project_id: int, predictions: list[dict]) -> None:
        """Add predictions ({"task", "model_version", "score", "result"}) to existing tasks."""
        self._call(
            f"import {len(predictions)} prediction(s) into project {project_id}",
            lambda o: self.sdk.projects.import_predictions(
                id=project_id, request=predictions, request_options=o
            ),
            once=True,
        )

    def annotations_from_predictions(
        self, project_id: int, task_ids: list[int], model_version: str
    ) -> None:
        """Turn the `model_version` predictions of the tasks into annotations by this client's
        user, in one request: the Data Manager action 'Create Annotations From Predictions'."""
        self._call(
            f"create annotations from predictions in project {project_id}",
            lambda o: self.sdk.actions.create(
                id="predictions_to_annotations",
                project=project_id,
                selected_items={"all": False, "included": task_ids},
                request_options=o,
            ),
            once=True,
            # The action's own parameter, which the SDK has no argument for.
            additional_body_parameters={"model_version": model_version},
        )

    # -- export, users, webhooks ---------------------------------------------------------------

    def export(self, project_id: int, task_ids: list[int] | None = None) -> bytes:
        """The JSON export of the project's annotated tasks, or of the tasks `task_ids`."""
        # The server reads the tasks from `ids[]`; the SDK's `ids` argument sends `ids`.
        query = {} if task_ids is None else {"additional_query_parameters": {"ids[]": task_ids}}
        return self._call(
            f"export project {project_id}",
            lambda o: b"".join(
                self.sdk.projects.exports.download_sync(
                    id=project_id, export_type="JSON", request_options=o
                )
            ),
            **query,
        )

    def user_emails(self) -> dict[int, str]:
        users = self._call("list users", lambda o: self.sdk.users.list(request_options=o))
        return {u.id: u.email or u.username for u in users}

    def create_user(self, email: str) -> None:
        """An account in the organization of this client's user (no password yet)."""
        self._call(
            f"create user {email}",
            lambda o: self.sdk.users.create(email=email, username=email, request_options=o),
        )

    def webhook_urls(self, project_id: int) -> list[str]:
        hooks = self._call(
            f"list the webhooks of project {project_id}",
            lambda o: self.sdk.webhooks.list(project=str(project_id), request_options=o),
        )
        return [h.url for h in hooks]

    def create_webhook(self, project_id: int, url: str, actions: list[str]) -> None:
        self._call(
            f"create a webhook for project {project_id}",
            lambda o: self.sdk.webhooks.create(
                project=project_id,
                url=url,
                send_payload=True,
                send_for_all_actions=False,
                actions=actions,
                is_active=True,
                request_options=o,
            ),
            once=True,
        )
