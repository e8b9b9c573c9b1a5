"""Versioned SQL migrations for the platform database.

Files `migrations/NNNN_name.sql` are applied in order, each in its own transaction, and recorded
in `cdl_schema_migrations` with a checksum. Applying twice does nothing; a recorded migration whose
file has changed since is an error (write a new migration instead of editing an applied one).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg

from pipelines.core import db
from pipelines.core.errors import StackError

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
FILE_PATTERN = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
LOCK_NAME = "cdl.migrations"  # one migrator at a time across processes


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover(folder: Path = MIGRATIONS_DIR) -> list[Migration]:
    found = []
    for path in sorted(folder.glob("*.sql")):
        match = FILE_PATTERN.match(path.name)
        if not match:
            raise StackError(
                f"migration file {path} is not named NNNN_name.sql",
                "rename it, e.g. 0003_add_table.sql",
            )
        found.append(Migration(int(match[1]), match[2], path.read_text(encoding="utf-8")))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise StackError(
            f"two migrations in {folder} share a version number",
            "give each file its own NNNN prefix",
        )
    return found


def apply(dsn: str, migrations: list[Migration] | None = None) -> list[Migration]:
    """Apply the pending migrations; return the ones applied now."""
    migrations = discover() if migrations is None else migrations
    applied_now = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        with db.advisory_lock(conn, LOCK_NAME):
            conn.execute(
                """CREATE TABLE IF NOT EXISTS cdl_schema_migrations (
                       version integer PRIMARY KEY,
                       name text NOT NULL,
                       checksum text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            recorded = {
                version: (name, checksum)
                for version, name, checksum in conn.execute(
                    "SELECT version, name, checksum FROM cdl_schema_migrations"
                )
            }
            for migration in migrations:
                if migration.version in recorded:
                    name, checksum = recorded[migration.version]
                    if checksum != migration.checksum:
                        raise StackError(
                            f"migration {migration.version:04d}_{migration.name}.sql changed after "
                            "it was applied to this database",
                            "restore the file and put the change in a new migration",
                        )
                    continue
                with conn.transaction():
                    conn.execute(migration.sql)
                    conn.execute(
                        "INSERT INTO cdl_schema_migrations (version, name, checksum) "
                        "VALUES (%s, %s, %s)",
                        [migration.version, migration.name, migration.checksum],
                    )
                applied_now.append(migration)
    return applied_now


def applied_versions(dsn: str) -> list[int]:
    with psycopg.connect(dsn) as conn:
        return [
            row[0]
            for row in conn.execute("SELECT version FROM cdl_schema_migrations ORDER BY version")
        ]
