import threading

import psycopg
import pytest

from pipelines.core import migrations
from pipelines.core.errors import StackError
from pipelines.core.postgres import ensure_databases


@pytest.fixture
def scratch_dsn(shared_stack, request):
    """A fresh empty database on the shared cluster."""
    name = f"mig_{request.node.name[:40].lower()}"
    with psycopg.connect(shared_stack.dsn("postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
    ensure_databases(shared_stack.dsn("postgres"), [name])
    return shared_stack.dsn(name)


def two_migrations(tmp_path):
    (tmp_path / "0001_first.sql").write_text("CREATE TABLE a (x int);")
    (tmp_path / "0002_second.sql").write_text("CREATE TABLE b (y int); INSERT INTO b VALUES (1);")
    return migrations.discover(tmp_path)


def test_apply_twice_applies_once(scratch_dsn, tmp_path):
    found = two_migrations(tmp_path)
    assert [m.version for m in migrations.apply(scratch_dsn, found)] == [1, 2]
    assert migrations.apply(scratch_dsn, found) == []
    assert migrations.applied_versions(scratch_dsn) == [1, 2]
    with psycopg.connect(scratch_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM b").fetchone() == (1,)


def test_a_failing_migration_leaves_nothing_half_applied(scratch_dsn, tmp_path):
    (tmp_path / "0001_ok.sql").write_text("CREATE TABLE ok (x int);")
    (tmp_path / "0002_broken.sql").write_text("CREATE TABLE half (x int); SELECT no_such_column;")
    with pytest.raises(psycopg.errors.UndefinedColumn):
        migrations.apply(scratch_dsn, migrations.discover(tmp_path))
    assert migrations.applied_versions(scratch_dsn) == [1]
    with psycopg.connect(scratch_dsn) as conn:
        assert conn.execute("SELECT to_regclass('half')").fetchone() == (None,)
    (tmp_path / "0002_broken.sql").write_text("CREATE TABLE half (x int);")
    assert [m.version for m in migrations.apply(scratch_dsn, migrations.discover(tmp_path))] == [2]


def test_edited_applied_migration_is_refused(scratch_dsn, tmp_path):
    migrations.apply(scratch_dsn, two_migrations(tmp_path))
    (tmp_path / "0001_first.sql").write_text("CREATE TABLE a (x bigint);")
    with pytest.raises(StackError, match="0001_first.sql changed after it was applied"):
        migrations.apply(scratch_dsn, migrations.discover(tmp_path))


def test_badly_named_file_is_refused(tmp_path):
    (tmp_path / "add_table.sql").write_text("SELECT 1;")
    with pytest.raises(StackError, match="is not named NNNN_name.sql"):
        migrations.discover(tmp_path)


def test_duplicate_versions_are_refused(tmp_path):
    (tmp_path / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "0001_b.sql").write_text("SELECT 2;")
    with pytest.raises(StackError, match="share a version number"):
        migrations.discover(tmp_path)


def test_concurrent_appliers_apply_each_migration_once(scratch_dsn, tmp_path):
    found = two_migrations(tmp_path)
    results, errors = [], []

    def run():
        try:
            results.append(len(migrations.apply(scratch_dsn, found)))
        except Exception as exc:  # noqa: BLE001 - any error fails the test below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results) == [0, 0, 0, 2]


def test_platform_migrations_are_well_formed():
    found = migrations.discover()
    assert [m.version for m in found] == list(range(1, len(found) + 1))


def test_label_rows_move_into_tables_per_use_case_and_split(scratch_dsn):
    """Label rows loaded before the store was partitioned survive the migration, each in the
    table of its use case and split."""
    platform = migrations.discover()
    migrations.apply(scratch_dsn, [m for m in platform if m.version <= 6])
    columns = "use_case, split, source, label, labeler, labeled_at, task_id, annotation_id"
    with psycopg.connect(scratch_dsn, autocommit=True) as conn:
        for split, annotation, version, label in [
            ("train", 1, 1, "tech"),
            ("train", 1, 2, "sport"),  # a changed annotation
            ("test", 2, 1, "tech"),
        ]:
            conn.execute(
                f"INSERT INTO label_rows ({columns}, version, export_commit) "
                "VALUES ('bbc_news', %s, 'r@c:/a', %s, 'x', now(), 1, %s, %s, 'c')",
                [split, label, annotation, version],
            )
    applied = migrations.apply(scratch_dsn, platform)
    assert [m.version for m in applied] == [m.version for m in platform if m.version > 6]
    with psycopg.connect(scratch_dsn, autocommit=True) as conn:

        def count(table):
            return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

        assert (count("label_rows_bbc_news_train"), count("label_rows_bbc_news_test")) == (2, 1)
        assert conn.execute("SELECT label, version FROM labels_bbc_news_train").fetchall() == [
            ("sport", 2)
        ]
        kinds = dict(
            conn.execute(
                "SELECT relname, relkind FROM pg_class WHERE relname LIKE 'label_rows%'"
                " AND relkind IN ('r', 'p')"
            ).fetchall()
        )
        assert kinds == {
            "label_rows": "p",
            "label_rows_bbc_news": "p",
            "label_rows_bbc_news_train": "r",
            "label_rows_bbc_news_test": "r",
        }
        conn.execute("SELECT label_tables('fashion_mnist')")  # a new use case; idempotent
        conn.execute("SELECT label_tables('fashion_mnist')")
        assert count("labels_fashion_mnist_test") == 0
