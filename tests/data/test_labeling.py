"""The labeling loop with a real Label Studio server on the stack's Postgres: validated files
become tasks, annotations come back into the label store, snapshots freeze them."""

import gzip
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest.mock import ANY

import httpx
import psycopg
import pytest
import yaml

from pipelines.core import lineage
from pipelines.core.errors import CDLError
from pipelines.data import bbc
from pipelines.data.engine import PipelineEngine
from pipelines.data.labeling import rows as labeling_rows
from pipelines.data.labeling import webhooks
from pipelines.data.labeling.client import LabelStudioClient
from pipelines.data.labeling.predictor import file_predictor
from pipelines.data.labeling.server import SERVICE, LabelStudioServer
from pipelines.data.labeling.service import ExportResult, Labeling
from pipelines.data.labeling.spec import use_case, use_cases_by_project
from pipelines.data.labeling.store import LabelStore
from pipelines.data.labeling.webhooks import WEBHOOK_SERVICE, webhook_spec
from pipelines.data.repos import DataRepos, Ref
from tests.conftest import REPO, cdl, destroy, make_project, stack_for


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A stack with Label Studio, and the BBC data pipeline run over a small generated corpus."""
    stack = stack_for(make_project())
    stack.up(["label-studio"])
    repos, engine = DataRepos(stack), PipelineEngine(stack)
    corpus = tmp_path_factory.mktemp("corpus") / "bbc"
    bbc.generate(corpus, docs=40, seed=11)
    repos.create_repo("bbc-raw")
    repos.put(Ref.parse("bbc-raw"), [corpus])
    for step in ("clean", "validate", "report"):
        engine.create(REPO / "use_cases" / "bbc_news" / "data" / f"{step}.yaml")
    engine.run_pending()
    yield stack, Labeling(stack, use_case("bbc_news")), corpus
    destroy(stack)


@pytest.fixture
def quiet_lab(lab):
    """The lab with its webhook receiver stopped: the test's own exports are the only ones."""
    stack = lab[0]
    stack.supervisor.stop(WEBHOOK_SERVICE)
    yield lab
    stack.supervisor.start(webhook_spec(stack))


def label_rows(stack, *columns):
    with stack.connect() as conn:
        return conn.execute(
            f"SELECT {', '.join(columns)} FROM label_rows "
            "WHERE use_case = 'bbc_news' ORDER BY annotation_id, version"
        ).fetchall()


def test_sync_auto_export_snapshot(lab, tmp_path):
    stack, labeling, corpus = lab
    repos = DataRepos(stack)
    valid = [e for e in repos.files(repos.resolve("bbc-validate"), "/valid")]
    new, known = labeling.sync()
    assert (new, known) == (len(valid), 0)
    assert labeling.sync() == (0, len(valid))  # idempotent
    with stack.connect() as conn:
        source = conn.execute("SELECT source FROM label_tasks LIMIT 1").fetchone()[0]
    assert source.startswith("bbc-validate@") and ":/valid/" in source

    assert labeling.auto_annotate() == len(valid)
    # Label Studio's per-task counter lags its annotations when its database goes away between
    # the two writes: a second run must still see the annotations and make no more.
    label_studio_db = stack.dsn(stack.settings.stack.postgres.databases.label_studio)
    with psycopg.connect(label_studio_db, autocommit=True) as conn:
        conn.execute("UPDATE task SET total_annotations = 0")
    assert labeling.auto_annotate() == 0
    # The webhook receiver may have exported some already; this export loads the rest.
    result = labeling.export()
    assert (result.rows, result.problems) == (len(valid), [])
    assert result.commit.repo == "bbc-news-labels"
    files = list(repos.files(result.commit))  # the raw export: one file per annotated task
    assert len(files) == len(valid) and all(f.path.startswith("/tasks/") for f in files)
    task = json.loads(b"".join(repos.store.read_chunks(files[0].sha256)))
    assert f"/tasks/{task['id']}.json" == files[0].path and task["annotations"]
    assert labeling.export().loaded == 0  # nothing new: nothing loaded twice
    rows = label_rows(stack, "split", "label", "labeler", "source", "version")
    assert len(rows) == len(valid)
    with stack.connect() as conn:  # a table per use case and split
        for split in ("train", "test"):
            assert {
                r[0] for r in conn.execute(f"SELECT split FROM label_rows_bbc_news_{split}")
            } == {split}
    assert {r[2] for r in rows} == {"admin@cdl.local"}
    assert all(r[4] == 1 for r in rows)
    for label in bbc.CLASSES:  # stratified: about a fifth of each class is held out
        splits = [r[0] for r in rows if r[1] == label]
        assert splits.count("test") == round(0.2 * len(splits))
    assert all(r[1] == r[3].split("/valid/")[1].split("/")[0] for r in rows)  # ground truth

    count = labeling.snapshot("first")
    assert count == len(valid)
    with pytest.raises(CDLError, match="already exists"):
        labeling.snapshot("first")
    with stack.connect() as conn:
        node = lineage.tree(conn, "label_snapshot:bbc_news/first")
        assert node.children and node.children[0].kind == "dataset_commit"
        assert node.attributes["train"] + node.attributes["test"] == count
        assert node.attributes["test_fraction"] == 0.2 and node.attributes["split_seed"] == 13
        with pytest.raises(psycopg.errors.RaiseException, match="immutable"):
            conn.execute("UPDATE label_snapshot_rows SET label = 'tech'")

    # A new file: one new task; a changed annotation: a new version, the current view follows.
    extra = tmp_path / "extra" / "tech"
    extra.mkdir(parents=True)
    shutil.copyfile(corpus / "tech" / "001.txt", extra / "500.txt")
    (extra / "500.txt").write_text((extra / "500.txt").read_text() + "A later paragraph.\n")
    repos.put(Ref.parse("bbc-raw"), [tmp_path / "extra"])
    PipelineEngine(stack).run_pending()
    assert labeling.sync()[0] == 1
    task_id, annotation_id = label_rows(stack, "task_id", "annotation_id")[0]
    labeling.client.sdk.annotations.update(
        id=annotation_id,
        result=[
            {
                "from_name": "topic",
                "to_name": "text",
                "type": "choices",
                "value": {"choices": ["politics"]},
            }
        ],
    )
    labeling.export()  # (or the webhook) adds the changed annotation as version 2
    with stack.connect() as conn:
        versions = conn.execute(
            "SELECT version, label FROM label_rows WHERE annotation_id = %s ORDER BY version",
            [annotation_id],
        ).fetchall()
        current = conn.execute(
            "SELECT label, version FROM labels_current WHERE annotation_id = %s", [annotation_id]
        ).fetchone()
    assert len(versions) == 2 and versions[1][1] == "politics"
    assert current == ("politics", 2)
    assert len(labeling.snapshot_rows("first")) == count  # the snapshot did not move


def test_annotations_reach_the_store_through_the_webhook(lab, tmp_path):
    stack, labeling, _ = lab
    DataRepos(stack).put(Ref.parse("bbc-raw"), [fresh_articles(tmp_path, seed=31, docs=5)])
    PipelineEngine(stack).run_pending()
    labeling.sync()  # imports the new files and points the project's webhooks at the receiver
    labeling.export()  # the labels repo's head before the webhook's incremental export
    with stack.connect() as conn:
        [task_id] = conn.execute(
            """SELECT t.task_id FROM label_tasks t WHERE t.use_case = 'bbc_news' AND NOT EXISTS
               (SELECT 1 FROM label_rows r WHERE r.task_id = t.task_id)
               ORDER BY t.task_id LIMIT 1"""
        ).fetchone()
    log = stack.supervisor.log_path("label-webhooks")
    seen = len(log.read_text())
    annotation = labeling.annotate(task_id, "tech")
    deadline = time.monotonic() + 30
    while not label_rows_for(stack, annotation["id"]):
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    assert label_rows_for(stack, annotation["id"])[0][0] == "tech"
    assert (
        "bbc_news: exported 1 task(s) (incremental), 1 new label row(s)" in log.read_text()[seen:]
    )
    repos = DataRepos(stack)
    head = repos.resolve("bbc-news-labels")
    project = labeling.project()
    assert head.message == f"incremental export (1 task(s)) of Label Studio project {project}"
    changed = [
        (status, path) for status, path, *_ in repos.diff(repos.resolve(f"{head.ref}^"), head)
    ]
    assert changed == [("added", f"/tasks/{task_id}.json")]

    # A deleted annotation reaches the store the same way: it leaves the current labels.
    labeling.client.sdk.annotations.delete(id=annotation["id"])
    while current_label(stack, annotation["id"]):
        assert time.monotonic() < deadline + 30, log.read_text()
        time.sleep(0.2)
    assert label_rows_for(stack, annotation["id"]) == [("tech",), ("tech",)]  # and a tombstone


def current_label(stack, annotation_id):
    with stack.connect() as conn:
        return conn.execute(
            "SELECT label FROM labels_current WHERE annotation_id = %s", [annotation_id]
        ).fetchall()


def test_webhook_receiver_retries_a_failed_export(project_factory, monkeypatch):
    """An export that fails (the database restarting, say) does not stop the receiver: it is
    retried with backoff until it succeeds."""
    import httpx

    from pipelines.core.errors import StackError
    from pipelines.core.postgres import free_port

    stack = project_factory()
    outcomes = [StackError("cannot reach the platform database"), RuntimeError("connection lost")]
    exports = []

    def export(self, tasks=None):
        exports.append((self.case.name, tasks, time.monotonic()))
        if outcomes:
            raise outcomes.pop(0)
        return ExportResult(None, 1, 1, 1, 0, [])

    monkeypatch.setattr(Labeling, "export", export)
    monkeypatch.setattr(webhooks, "RETRY_S", 0.2)
    port, stop, said = free_port(), threading.Event(), []
    receiver = webhooks.WebhookReceiver(
        use_cases_by_project(),
        lambda name, scope: Labeling(stack, use_case(name)).export_scope(scope),
        said.append,
    )
    receiver = threading.Thread(target=receiver.serve, args=(port, stop))
    receiver.start()
    try:
        deadline = time.monotonic() + 10
        while not said:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        event = {
            "action": "ANNOTATION_CREATED",
            "project": {"title": "BBC news topics"},
            "annotation": {"id": 40, "task": 7},
            "task": {"id": 7},
        }
        assert httpx.post(f"http://127.0.0.1:{port}/hook", json=event).status_code == 200
        other = {"action": "ANNOTATION_CREATED", "project": {"title": "someone else's"}}
        assert httpx.post(f"http://127.0.0.1:{port}/hook", json=other).status_code == 202
        while len(exports) < 3:
            assert time.monotonic() < deadline, said
            time.sleep(0.05)
    finally:
        stop.set()
        receiver.join(10)
    assert [(name, tasks) for name, tasks, _ in exports] == [("bbc_news", {7})] * 3
    waits = [b[2] - a[2] for a, b in zip(exports, exports[1:], strict=False)]
    assert 0.2 <= waits[0] < waits[1]  # backoff doubles
    assert any("export failed, retrying in" in line for line in said)
    assert "bbc_news: exported 1 task(s) (incremental), 1 new label row(s)" in said[-1]


def test_event_scope():
    from pipelines.data.labeling.webhooks import event_scope, merge_scopes

    created = {"action": "ANNOTATION_CREATED", "annotation": {"id": 4, "task": 9}}
    assert event_scope(created) == {("task", 9)}
    assert event_scope({**created, "task": {"id": 9}}) == {("task", 9)}
    deleted = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 4}, {"id": 5}]}
    assert event_scope(deleted) == {("annotation", 4), ("annotation", 5)}
    bulk = {
        "action": "ANNOTATIONS_CREATED",
        "annotation": [{"id": 4, "task": 9}, {"id": 6, "task": 8}],
    }
    assert event_scope(bulk) == {("task", 9), ("task", 8)}
    assert event_scope({"action": "ANNOTATION_UPDATED"}) is None  # names nothing: export all
    assert event_scope({"action": "ANNOTATIONS_DELETED", "annotations": "x"}) is None
    assert merge_scopes({("task", 1)}, {("task", 2)}) == {("task", 1), ("task", 2)}
    assert merge_scopes({("task", 1)}, None) is None
    many = {("task", i) for i in range(600)}
    assert merge_scopes(many, {("task", -i) for i in range(1, 601)}) is None


def label_rows_for(stack, annotation_id):
    with stack.connect() as conn:
        return conn.execute(
            "SELECT label FROM label_rows WHERE annotation_id = %s ORDER BY version",
            [annotation_id],
        ).fetchall()


def test_bad_annotations_are_reported_not_loaded(lab):
    stack, labeling, _ = lab
    labeling.sync()
    with stack.connect() as conn:
        tasks = [
            r[0]
            for r in conn.execute(
                "SELECT task_id FROM label_tasks WHERE use_case = 'bbc_news' ORDER BY task_id DESC "
                "LIMIT 3"
            )
        ]
    before = len(label_rows(stack, "annotation_id"))
    labeling.annotate(tasks[0])  # no choice
    labeling.annotate(tasks[1], "sport", "tech")
    try:
        labeling.annotate(tasks[2], "weather")
        outside_config = True
    except CDLError as refused:  # Label Studio itself may refuse a label outside the config
        assert "weather" in str(refused) or "HTTP 400" in str(refused)
        outside_config = False
    result = labeling.export()
    problems = "\n".join(result.problems)
    assert ": no choice" in problems
    assert "2 choices ['sport', 'tech'], expected one" in problems
    if outside_config:
        assert "label 'weather' is not in the labeling config" in problems
    assert len(label_rows(stack, "annotation_id")) == before


def test_task_whose_file_left_the_dataset(lab):
    stack, labeling, _ = lab
    repos = DataRepos(stack)
    labeling.sync()
    labeling.auto_annotate()
    labeling.export()
    gone = repos.files(repos.resolve("bbc-raw"), "/business")
    first = next(gone).path
    repos.delete(Ref.parse("bbc-raw"), [first])
    PipelineEngine(stack).run_pending()
    result = labeling.export()
    assert any("is no longer in bbc-validate@master" in p for p in result.problems)


def annotated_with_an_empty_store(stack, labeling) -> None:
    """Every task annotated in Label Studio, and the label store emptied of its rows and splits,
    so that the next export loads everything."""
    labeling.sync()
    labeling.auto_annotate()
    labeling.export()
    with stack.connect() as conn:
        conn.execute("DELETE FROM label_rows WHERE use_case = 'bbc_news' AND version > 0")
        conn.execute("DELETE FROM label_splits WHERE use_case = 'bbc_news'")
        conn.commit()


def test_export_is_all_or_nothing(quiet_lab, monkeypatch):
    stack, labeling, _ = quiet_lab
    annotated_with_an_empty_store(stack, labeling)
    real_rows = Labeling._rows

    def rows_with_a_broken_last_one(self, *args):
        rows, problems = real_rows(self, *args)
        return rows + [{**rows[-1], "annotation_id": 10**9, "labeled_at": "not a time"}], problems

    monkeypatch.setattr(Labeling, "_rows", rows_with_a_broken_last_one)
    with pytest.raises(psycopg.errors.InvalidDatetimeFormat):
        labeling.export()
    assert label_rows(stack, "annotation_id") == []  # no half-loaded table
    with stack.connect() as conn:
        assert conn.execute("SELECT count(*) FROM label_splits").fetchone() == (0,)
    monkeypatch.undo()
    assert labeling.export().loaded > 0


def test_export_killed_halfway_loads_nothing(quiet_lab):
    """A `cdl label export` SIGKILLed while its load is inside the database leaves no rows and
    no splits behind; the next export loads everything."""
    stack, labeling, _ = quiet_lab
    annotated_with_an_empty_store(stack, labeling)
    with stack.connect() as blocker:
        # The export's insert into the train table waits here, its transaction open.
        blocker.execute("LOCK TABLE label_rows_bbc_news_train IN SHARE MODE")
        export = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli.main", "label", "export", "bbc_news"],
            cwd=stack.settings.root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        waiting = (
            "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE 'INSERT INTO label_rows%'"
        )
        deadline = time.monotonic() + 90
        with stack.connect(autocommit=True) as watcher:
            while not (backend := watcher.execute(waiting).fetchone()):
                assert export.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
            export.send_signal(signal.SIGKILL)
            export.wait()
            blocker.rollback()  # the lock goes; the orphaned backend finds its client gone
            while watcher.execute(
                "SELECT 1 FROM pg_stat_activity WHERE pid = %s", backend
            ).fetchone():
                time.sleep(0.2)
    assert label_rows(stack, "annotation_id") == []
    with stack.connect() as conn:
        assert conn.execute(
            "SELECT count(*) FROM label_splits WHERE use_case = 'bbc_news'"
        ).fetchone() == (0,)
    result = labeling.export()
    assert result.loaded == result.rows > 0


def test_deleted_annotation_leaves_the_current_labels(quiet_lab):
    stack, labeling, _ = quiet_lab
    labeling.sync()
    labeling.auto_annotate()
    labeling.export()
    *_, (task_id, annotation_id, version, label) = label_rows(
        stack, "task_id", "annotation_id", "version", "label"
    )
    labeling.client.sdk.annotations.delete(id=annotation_id)
    result = labeling.export(tasks=[task_id])  # incremental: just that task
    assert (result.tasks, result.deleted, result.loaded) == (0, 1, 0)
    repos = DataRepos(stack)
    before = repos.resolve(f"{result.commit.ref}^")
    assert list(repos.diff(before, result.commit)) == [
        ("removed", f"/tasks/{task_id}.json", ANY, None)
    ]  # the task has no annotation left; the other tasks' files stay
    with stack.connect() as conn:
        latest = conn.execute(
            "SELECT version, label, deleted, export_commit FROM label_rows "
            "WHERE annotation_id = %s ORDER BY version DESC LIMIT 1",
            [annotation_id],
        ).fetchone()
        current = conn.execute(
            "SELECT count(*) FROM labels_current WHERE annotation_id = %s", [annotation_id]
        ).fetchone()[0]
    assert latest == (version + 1, label, True, result.commit.id)  # history keeps the label
    assert current == 0
    assert labeling.export().deleted == 0  # marked once
    labeling.snapshot("after-delete")
    assert annotation_id not in {r["annotation_id"] for r in labeling.snapshot_rows("after-delete")}


def test_roles_keep_test_labels_from_scientists(lab):
    stack, labeling, _ = lab
    labeling.sync()
    labeling.auto_annotate()
    labeling.export()
    with stack.connect() as conn:
        conn.execute("SET ROLE cdl_scientist")
        assert conn.execute("SELECT count(*) FROM labels_train").fetchone()[0] > 0
        assert conn.execute("SELECT count(*) FROM labels_bbc_news_train").fetchone()[0] > 0
        assert conn.execute("SELECT count(*) FROM label_rows_bbc_news_train").fetchone()[0] > 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT count(*) FROM labels_bbc_news_test")
        conn.rollback()
        conn.execute("SET ROLE cdl_scientist")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT count(*) FROM label_rows_bbc_news_test")
        conn.rollback()
        conn.execute("SET ROLE cdl_scientist")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT count(*) FROM labels_test")
        conn.rollback()
        conn.execute("SET ROLE cdl_evaluator")
        assert conn.execute("SELECT count(*) FROM labels_test").fetchone()[0] > 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT count(*) FROM label_rows")


def test_test_labels_do_not_leak_through_a_function(lab):
    """The classic leak through a view: a cheap function in the WHERE clause sees the rows
    before the view's own filter and prints them. The scientist's views are security barriers,
    so it sees train rows only; and the scientist cannot create such a function in the first
    place (PUBLIC has no TEMP or CREATE on the platform database)."""
    stack, labeling, _ = lab
    labeling.sync()
    labeling.auto_annotate()
    labeling.export()
    labeling.snapshot(f"leak-{time.monotonic_ns()}")
    noticed: list[str] = []
    with stack.connect(autocommit=True) as conn:
        test_sources = {
            r[0] for r in conn.execute("SELECT source FROM labels_current WHERE split = 'test'")
        }
        assert test_sources
        conn.execute(
            """CREATE OR REPLACE FUNCTION public.cdl_leak(text) RETURNS boolean
               LANGUAGE plpgsql COST 0.0000001 AS $$
               BEGIN RAISE NOTICE 'row: %', $1; RETURN true; END $$"""
        )
        conn.add_notice_handler(lambda notice: noticed.append(notice.message_primary))
        try:
            conn.execute("SET ROLE cdl_scientist")
            for view in ("labels_train", "labels_bbc_news_train"):
                noticed.clear()
                rows = conn.execute(f"SELECT source FROM {view} WHERE cdl_leak(source)").fetchall()
                assert rows  # the train rows are there to read
                seen = {message.removeprefix("row: ") for message in noticed}
                assert seen and not seen & test_sources, (view, sorted(seen & test_sources)[:3])
            noticed.clear()  # snapshots keep each row's split: the function gets to print it
            rows = conn.execute(
                "SELECT source FROM snapshot_train WHERE cdl_leak(split || ' ' || source)"
            ).fetchall()
            assert rows and noticed
            assert not [m for m in noticed if m.startswith("row: test ")], "snapshot_train"
            for attempt in (
                "CREATE TEMP TABLE stash (source text)",
                "CREATE FUNCTION pg_temp.mine(text) RETURNS boolean LANGUAGE sql AS 'SELECT true'",
                "CREATE FUNCTION public.mine(text) RETURNS boolean LANGUAGE sql AS 'SELECT true'",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(attempt)
        finally:
            conn.execute("RESET ROLE")
            conn.execute("DROP FUNCTION public.cdl_leak(text)")


def test_admin_secrets_stay_off_the_command_line(project_factory):
    """Label Studio takes its admin password and token from the environment: a password that
    starts with '-' works, and neither secret shows in the process list or the run state. It is
    closed (a stranger cannot sign up) and quiet (its pages carry no Sentry DSN)."""
    stack = project_factory()
    server = LabelStudioServer(stack)
    password = "-starts-with-a-dash"
    server.password_file.parent.mkdir(parents=True)
    server.password_file.write_text(password)
    stack.up(["label-studio"])
    assert server.client().projects() == []  # the token works
    browser = httpx.Client(base_url=server.url, follow_redirects=True)
    page = browser.get("/user/login")  # sets the CSRF cookie the form must send back
    form = {
        "email": "admin@cdl.local",
        "password": password,
        "csrfmiddlewaretoken": browser.cookies["csrftoken"],
    }
    signed_in = browser.post("/user/login", data=form, headers={"Referer": str(page.url)})
    assert signed_in.url.path != "/user/login"  # a wrong password shows the form again
    state = (stack.settings.home / "run" / "label-studio.json").read_text()
    cmdline = Path(f"/proc/{stack.supervisor.pid('label-studio')}/cmdline").read_bytes()
    for secret in (password, server.token):
        assert secret not in state and secret.encode() not in cmdline

    projects_page = browser.get("/projects/").text  # the app's pages configure Sentry
    assert "sentry_dsn: null" in projects_page and "ingest.sentry.io" not in projects_page
    stranger = httpx.Client(base_url=server.url)
    form_page = stranger.get("/user/signup")
    signup = {
        "email": "stranger@example.com",
        "password": "long-enough-password",
        "csrfmiddlewaretoken": stranger.cookies["csrftoken"],
    }
    refused = stranger.post("/user/signup", data=signup, headers={"Referer": str(form_page.url)})
    assert refused.status_code == 403
    emails = [u.email for u in server.client().sdk.users.list()]
    assert emails == ["admin@cdl.local"]

    added = cdl("label", "users", "add", "labeler@example.com", cwd=stack.settings.root)
    assert added.returncode == 0, added.stderr
    given = added.stdout.split("with the password ")[1].split()[0]
    labeler = httpx.Client(base_url=server.url, follow_redirects=True)
    login = labeler.get("/user/login")
    form = {
        "email": "labeler@example.com",
        "password": given,
        "csrfmiddlewaretoken": labeler.cookies["csrftoken"],
    }
    signed_in = labeler.post("/user/login", data=form, headers={"Referer": str(login.url)})
    assert signed_in.url.path != "/user/login"
    assert labeler.get("/api/projects").status_code == 200  # a member of the organization
    again = cdl("label", "users", "add", "labeler@example.com", cwd=stack.settings.root)
    assert again.returncode == 1 and "already has a user labeler@example.com" in again.stderr


def test_label_studio_down_is_a_clear_error():
    client = LabelStudioClient("http://127.0.0.1:9", "0" * 40, retries=2, backoff_s=0.01)
    with pytest.raises(CDLError, match=r"does not answer .* after 3 tries") as err:
        client.projects()
    assert "stack up --with label-studio" in err.value.fix


def test_a_lost_answer_to_an_import_is_not_sent_again():
    """A server that takes a request and dies before answering may have done it: a read is
    tried again, an import is not (its files would become tasks twice), and says so."""
    requests = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def take_and_drop() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            requests.append(conn.recv(65536).split(b" ", 2)[:2])
            conn.close()  # no answer

    threading.Thread(target=take_and_drop, daemon=True).start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    client = LabelStudioClient(url, "0" * 40, retries=2, backoff_s=0.01)
    try:
        with pytest.raises(CDLError, match="does not answer .* after 3 tries"):
            client.projects()
        assert len(requests) == 3
        with pytest.raises(CDLError, match="took no answer back .* may or may not") as err:
            client.import_tasks(1, [{"data": {"text": "x"}}])
        assert len(requests) == 4 and requests[-1][0] == b"POST"
        assert "run the command again" in err.value.fix
    finally:
        server.close()


def idx(dims, payload: bytes) -> bytes:
    header = b"\0\0\x08" + bytes([len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    return gzip.compress(header + payload)


def test_fashion_images_through_the_loop(lab, tmp_path):
    stack, _, _ = lab
    repos, engine = DataRepos(stack), PipelineEngine(stack)
    fashion = Labeling(stack, use_case("fashion_mnist"))
    with pytest.raises(CDLError, match="no validated data to label for fashion_mnist"):
        fashion.sync()
    src = tmp_path / "idx"
    src.mkdir()
    pixels = random.Random(5).randbytes(50 * 784)
    (src / "train-images-idx3-ubyte.gz").write_bytes(idx((50, 28, 28), pixels))
    (src / "train-labels-idx1-ubyte.gz").write_bytes(idx((50,), bytes(i % 10 for i in range(50))))
    repos.create_repo("fashion-raw")
    repos.put(Ref.parse("fashion-raw"), [src])
    for step in ("ingest", "validate", "report"):
        engine.create(REPO / "use_cases" / "fashion_mnist" / "data" / f"{step}.yaml")
    engine.run_pending()
    assert fashion.sync() == (50, 0)
    assert fashion.auto_annotate() == 50
    result = fashion.export()  # what the webhook has not loaded yet
    assert (result.rows, result.problems) == (50, [])
    assert fashion.snapshot("first") == 50
    rows = fashion.snapshot_rows("first")
    assert {r["split"] for r in rows if r["label"] == "bag"} == {"train", "test"}
    assert sum(r["split"] == "test" for r in rows) == 10  # a fifth of each class's five
    with stack.connect() as conn:
        assert conn.execute("SELECT count(*) FROM label_rows_fashion_mnist_test").fetchone() == (
            10,
        )
    [task] = fashion.client.sdk.tasks.list(project=fashion.project(), page_size=1).items
    assert task.data["image"].startswith("data:image/png;base64,")


def test_cli(lab):
    stack, labeling, _ = lab
    labeling.sync()
    labeling.auto_annotate()
    folder = stack.settings.root
    assert "imported 0 new task(s)" in cdl("label", "sync", "bbc_news", cwd=folder).stdout
    exported = cdl("label", "export", "bbc_news", cwd=folder)
    assert exported.returncode == 0, exported.stderr
    assert "raw export in bbc-news-labels@" in exported.stdout
    created = cdl("label", "snapshot", "create", "bbc_news", "cli-snap", cwd=folder)
    assert created.returncode == 0, created.stderr
    shown = cdl("label", "snapshot", "show", "bbc_news", "cli-snap", cwd=folder)
    assert "train" in shown.stdout and "test" in shown.stdout
    listed = cdl("label", "snapshot", "list", "bbc_news", cwd=folder)
    assert listed.returncode == 0 and "cli-snap" in listed.stdout
    missing = cdl("label", "snapshot", "show", "bbc_news", "no-such-snap", cwd=folder)
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: no snapshot bbc_news/no-such-snap")
    assert "(fix: 'cdl label snapshot list bbc_news' lists them)" in missing.stderr
    wrong_ref = cdl("label", "sync", "bbc_news", "--ref", "bbc-validate@deadbeef", cwd=folder)
    assert wrong_ref.returncode == 1
    assert "cannot label bbc-validate@deadbeef: no commit in bbc-validate" in wrong_ref.stderr
    assert "'cdl data log bbc-validate' lists them" in wrong_ref.stderr
    unknown = cdl("label", "sync", "weather", cwd=folder)
    assert unknown.returncode == 1 and "no use case 'weather'" in unknown.stderr


def test_commands_without_label_studio(project_factory):
    stack = project_factory()
    stack.up()
    result = cdl("label", "sync", "bbc_news", cwd=stack.settings.root)
    assert result.returncode == 1
    assert "Label Studio is not running" in result.stderr
    assert "cdl stack up --with label-studio" in result.stderr


def test_predictions_become_pre_annotations(lab, tmp_path):
    stack, labeling, corpus = lab
    repos = DataRepos(stack)
    labeling.sync()
    extra = tmp_path / "more" / "sport"
    extra.mkdir(parents=True)
    shutil.copyfile(corpus / "sport" / "002.txt", extra / "700.txt")
    (extra / "700.txt").write_text((extra / "700.txt").read_text() + "Extra time was played.\n")
    repos.put(Ref.parse("bbc-raw"), [tmp_path / "more"])
    PipelineEngine(stack).run_pending()
    with stack.connect() as conn:
        known = {r[0] for r in conn.execute("SELECT path FROM label_tasks")}
    [new_path] = [
        e.path for e in repos.files(repos.resolve("bbc-validate"), "/valid") if e.path not in known
    ]
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text(
        json.dumps({"path": new_path, "label": "sport", "score": 0.87, "model": "bbc/3"}) + "\n"
    )
    result = cdl(
        "label", "sync", "bbc_news", "--predictions", str(predictions), cwd=stack.settings.root
    )
    assert result.returncode == 0, result.stderr
    assert "imported 1 new task(s)" in result.stdout
    with stack.connect() as conn:
        task_id = conn.execute(
            "SELECT task_id FROM label_tasks WHERE path = %s", [new_path]
        ).fetchone()[0]
    task = labeling.client.task(task_id)
    [prediction] = task["predictions"]
    assert prediction["model_version"] == "bbc/3" and prediction["score"] == 0.87
    assert prediction["result"][0]["value"]["choices"] == ["sport"]

    predictions.write_text('{"path": "/valid/x.txt", "label": "weather"}\n{not json\n')
    with pytest.raises(CDLError, match="predictions.jsonl line 2: not a prediction"):
        file_predictor(predictions)
    predictions.write_text(json.dumps({"path": new_path, "label": "weather"}) + "\n")
    found = file_predictor(predictions)([(new_path, b"")])
    with pytest.raises(CDLError, match="label 'weather' is not in the labeling config"):
        labeling_rows.prediction(labeling.case, new_path, found[new_path])


def fresh_articles(tmp_path, seed: int, docs: int):
    """Clean generated articles under names no earlier file of bbc-raw has."""
    generated = tmp_path / f"generated-{seed}"
    bbc.generate(generated, docs=docs, seed=seed, dirty=False)
    out = tmp_path / f"fresh-{seed}"
    for article in generated.rglob("*.txt"):
        target = out / article.parent.name / f"s{seed}-{article.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        article.rename(target)
    return out


def test_champion_model_pre_annotates_new_tasks(lab, tmp_path):
    from pipelines.model.approvals import approve
    from pipelines.model.evaluation import evaluate
    from pipelines.model.experiments import experiment_engine
    from pipelines.model.registry import CHAMPION, register
    from tests.conftest import register_model

    stack, labeling, _ = lab
    repos, folder = DataRepos(stack), stack.settings.root

    def add_and_sync(articles, *flags):
        repos.put(Ref.parse("bbc-raw"), [articles])
        PipelineEngine(stack).run_pending()
        with stack.connect() as conn:
            before = {r[0] for r in conn.execute("SELECT task_id FROM label_tasks")}
        result = cdl("label", "sync", "bbc_news", *flags, cwd=folder)
        with stack.connect() as conn:
            new = conn.execute(
                "SELECT task_id, path FROM label_tasks WHERE NOT task_id = ANY(%s)", [list(before)]
            ).fetchall()
        return result, new

    # No champion yet: the tasks come in without pre-annotations, and the output says so.
    result, new = add_and_sync(fresh_articles(tmp_path, seed=21, docs=5), "--pre-annotate")
    assert result.returncode == 0, result.stderr
    assert "no 'champion' version of model bbc-news yet" in result.stderr
    assert new and all(not labeling.client.task(task_id)["predictions"] for task_id, _ in new)

    # A model trained by the platform on the snapshot's train labels (the use case's training
    # spec, shortened) passes the gate and becomes the champion.
    labeling.auto_annotate()
    labeling.export()
    labeling.snapshot("champion-training")
    spec = yaml.safe_load((REPO / "use_cases" / "bbc_news" / "model" / "train.yaml").read_text())
    spec["data"]["snapshot"] = "champion-training"
    spec["hyperparameters"]["epochs"] = 6
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(spec))
    experiments = experiment_engine(stack)
    submitted = experiments.submit(tmp_path / "train.yaml", attached=True).experiment
    experiment = experiments.wait(submitted.id)
    assert experiment.state == "completed", experiment.error
    version = register(stack, str(experiment.id)).version.version
    assert evaluate(stack, f"bbc-news/{version}", min_accuracy=0.8).passed
    approve(stack, f"bbc-news/{version}", by="test", reason="trained by the platform")

    result, new = add_and_sync(fresh_articles(tmp_path, seed=22, docs=20), "--pre-annotate")
    assert result.returncode == 0, result.stderr
    assert f"pre-annotated from bbc-news/{version} (champion)" in result.stdout
    assert len(new) == 20
    right = 0
    for task_id, path in new:
        [prediction] = labeling.client.task(task_id)["predictions"]
        assert prediction["model_version"] == f"bbc-news/{version}"
        assert 0 < prediction["score"] <= 1
        [choice] = prediction["result"][0]["value"]["choices"]
        right += choice == path.split("/")[2]  # /valid/<class>/<file>
    assert right >= 16  # the model has learned the topics, not guessed

    # A champion that answers outside the labeling config stops the sync before any import.
    register_model(
        stack,
        "bbc-news",
        "contract",
        alias=CHAMPION,
        model_config={"behaviour": "constant", "label": "weather"},
    )
    articles = fresh_articles(tmp_path, seed=23, docs=5)
    result, new = add_and_sync(articles, "--pre-annotate")
    assert result.returncode == 1
    assert "label 'weather' is not in the labeling config" in result.stderr
    assert f"bbc-news/{int(version) + 1}" in result.stderr and new == []
    predictions = str(tmp_path / "train.yaml")  # any file: the two options exclude each other
    both = cdl(
        "label", "sync", "bbc_news", "--pre-annotate", "--predictions", predictions, cwd=folder
    )
    assert both.returncode == 1 and "choose one of them" in both.stderr
    result, new = add_and_sync(articles)  # without pre-annotations the same files import
    assert result.returncode == 0 and len(new) == 5


def test_a_changed_labeling_config_updates_the_project(lab, tmp_path):
    """The labeling config is versioned in the use-case folder: a sync after it changes updates
    the Label Studio project, unless it drops a label the store uses."""
    stack, labeling, _ = lab
    labeling.sync()
    labeling.auto_annotate()
    labeling.export()  # the store uses every label
    folder = tmp_path / "bbc_news"
    shutil.copytree(REPO / "use_cases" / "bbc_news", folder)
    config = folder / "labeling.xml"
    original = config.read_text()
    config.write_text(
        original.replace(
            '<Choice value="tech"/>', '<Choice value="tech"/>\n    <Choice value="science"/>'
        )
    )
    changed = Labeling(stack, use_case("bbc_news", root=tmp_path))
    assert "science" in changed.case.labels
    try:
        project_id = changed.project()
        stored = changed.client.label_config(project_id)
        assert '<Choice value="science"/>' in stored
        # Dropping a label the store uses would stop it loading: refused, and the project kept.
        config.write_text(original.replace('<Choice value="sport"/>', ""))
        with pytest.raises(
            CDLError,
            match=r"labeling.xml drops labels the label store uses: "
            r"'sport' \(\d+ label\(s\)\)",
        ):
            Labeling(stack, use_case("bbc_news", root=tmp_path)).project()
        stored = changed.client.label_config(project_id)
        assert '<Choice value="sport"/>' in stored
    finally:
        labeling.project()  # back to the repo's config
    stored = labeling.client.label_config(project_id)
    assert stored.strip() == labeling.case.label_config.strip()


def test_sync_cut_off_after_label_studio_took_its_import(lab, tmp_path, monkeypatch):
    """A sync that stops after Label Studio imported its tasks but before the store recorded
    them (killed, or its database gone) leaves tasks the store does not know: the next sync
    records them instead of importing their files a second time."""
    stack = lab[0]
    shutil.copytree(REPO / "use_cases" / "bbc_news", tmp_path / "bbc_resync")
    spec = tmp_path / "bbc_resync" / "labeling.yaml"
    spec.write_text(spec.read_text().replace("project: BBC news topics", "project: BBC resync"))
    labeling = Labeling(stack, use_case("bbc_resync", root=tmp_path))
    repos = DataRepos(stack)
    valid = {e.path for e in repos.files(repos.resolve("bbc-validate"), "/valid")}

    def database_gone(*args):
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(LabelStore, "add_tasks", database_gone)
    with pytest.raises(psycopg.OperationalError):
        labeling.sync()
    monkeypatch.undo()
    project_id = labeling.project()
    assert len(labeling.client.tasks(project_id)) == len(valid)  # Label Studio has them
    assert labeling.store.tasks() == []
    assert labeling.sync() == (len(valid), 0)
    assert len(labeling.client.tasks(project_id)) == len(valid)  # each file once
    assert {path for _, path in labeling.store.tasks()} == valid
    assert labeling.sync() == (0, len(valid))


def test_sync_on_a_pachyderm_stack_reads_pachd(quiet_lab):
    """With data.engine: pachyderm, `cdl label sync` reads the validated data from pachd (here
    a stand-in speaking its protocol), not the stack's own repos: only the file pachd has and
    the label store does not gets a task, its bytes fetched from pachd."""
    from tests.data.fake_pachd import FakePachd

    stack, labeling, _ = quiet_lab
    labeling.sync()  # every local validated file has its task
    repos = DataRepos(stack)
    local = repos.resolve("bbc-validate")
    files = {e.path: b"".join(repos.store.read_chunks(e.sha256)) for e in repos.files(local)}
    new_path = "/valid/tech/only-on-pachd.txt"
    files[new_path] = b"Chips from pachd\n\nA processor story told only by the cluster." * 3
    pachd = FakePachd("bbc-validate", files)
    try:
        synced = cdl(
            "label",
            "sync",
            "bbc_news",
            cwd=stack.settings.root,
            env={"CDL_DATA__ENGINE": "pachyderm", "CDL_DATA__PACHD_ADDRESS": pachd.address},
        )
        assert synced.returncode == 0, synced.stderr
        known = len([p for p in files if p.startswith("/valid/")]) - 1
        assert f"imported 1 new task(s); {known} file(s) already had one" in synced.stdout
        [asked] = pachd.sent("InspectCommit")
        assert (asked.commit.branch.repo.name, asked.commit.branch.name) == (
            "bbc-validate",
            "master",
        )
        assert [w.file.path for w in pachd.sent("WalkFile")] == ["/valid"]
        assert [g.file.path for g in pachd.sent("GetFile")] == [new_path]
    finally:
        pachd.stop()
    with stack.connect() as conn:
        task_id, source = conn.execute(
            "SELECT task_id, source FROM label_tasks WHERE path = %s", [new_path]
        ).fetchone()
        assert source == f"bbc-validate@{pachd.commit_id}:{new_path}"
        conn.execute("DELETE FROM label_tasks WHERE task_id = %s", [task_id])
    labeling.client.sdk.tasks.delete(id=str(task_id))  # leave the project as the other tests expect


def test_label_services_outlive_a_postgres_kill(lab, tmp_path):
    """The postmaster SIGKILLed under Label Studio and the webhook receiver (both on the stack's
    Postgres): a webhook that comes meanwhile fails its export in one logged line, and once
    `stack up` has Postgres back the same two processes take a new annotation into the label
    store. (Last in the module: a failure here can leave the shared lab's Postgres down.)"""
    stack, labeling, _ = lab
    DataRepos(stack).put(Ref.parse("bbc-raw"), [fresh_articles(tmp_path, seed=47, docs=5)])
    PipelineEngine(stack).run_pending()
    labeling.sync()
    with stack.connect() as conn:
        [task_id] = conn.execute(
            """SELECT t.task_id FROM label_tasks t WHERE t.use_case = 'bbc_news' AND NOT EXISTS
               (SELECT 1 FROM label_rows r WHERE r.task_id = t.task_id)
               ORDER BY t.task_id DESC LIMIT 1"""
        ).fetchone()
    services = (SERVICE, WEBHOOK_SERVICE)
    pids = {name: stack.supervisor.pid(name) for name in services}
    log = stack.supervisor.log_path(WEBHOOK_SERVICE)
    seen = len(log.read_text())

    os.kill(stack.postgres.running_pid(), signal.SIGKILL)
    hook = stack.supervisor.status(WEBHOOK_SERVICE).address
    event = {"action": "ANNOTATION_CREATED", "project": {"title": labeling.case.spec.project}}
    assert httpx.post(hook, json={**event, "task": {"id": task_id}}).status_code == 200
    deadline = time.monotonic() + 60
    while "export failed" not in log.read_text()[seen:]:
        assert time.monotonic() < deadline, log.read_text()[seen:]
        time.sleep(0.2)
    stack.up(["label-studio"])
    assert {name: stack.supervisor.pid(name) for name in services} == pids  # none restarted

    annotation = labeling.annotate(task_id, "sport")  # Label Studio on its own reconnected
    while not label_rows_for(stack, annotation["id"]):
        assert time.monotonic() < deadline, log.read_text()[seen:]
        time.sleep(0.2)
    assert label_rows_for(stack, annotation["id"]) == [("sport",)]
    assert {name: stack.supervisor.pid(name) for name in services} == pids
    lines = log.read_text()[seen:].strip().splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", line) for line in lines), lines
    assert any(re.search(r" bbc_news: export failed, retrying in \d+ s: \S", x) for x in lines)
