"""Versioned data repositories with Pachyderm semantics: repos, branches, immutable commits.

A commit is written in three steps. It is *opened* (a row in state 'open', visible in the log as
such), its files are stored (bytes in the object store, listing rows in Postgres), and it is
*finished* in one transaction that carries over the parent's other files, moves the branch head,
records lineage and emits `data.commit.finished`. A writer killed before that transaction leaves an
open commit that no branch points to; the next writer on that branch discards it (or `cdl data
clean` does), and bytes already stored are not stored again.

Writers on one branch are serialised by a Postgres advisory lock held for the whole write: it is
released by the server if the writer dies, so a crash never blocks the branch.

`DataRepos` is the local engine's `DataBackend` (see backend.py); it owns the SQL of the
data_repos, data_branches, data_commits, data_files, data_provenance and data_commit_stats tables.
"""

from __future__ import annotations

import os
import re
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator, Mapping

import psycopg
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from pipelines.core import db, events, lineage
from pipelines.core.errors import AlreadyExists, Invalid, NotFound
from pipelines.core.objects import object_store_for
from pipelines.core.stack import Stack
from pipelines.data.backend import (
    BRANCH_NAME,
    DEFAULT_BRANCH,
    REPO_NAME,
    Cleaned,
    Commit,
    DataBackend,
    Entry,
    FileEntry,
    Ref,
    RepoInfo,
    ScanResult,
    default_author,
    files_to_put,
    normalize_path,
)

COPY_BATCH = 5000


class CommitWriter:
    """Adds files to an open commit; see DataRepos.writer."""

    def __init__(self, repos: "DataRepos", conn: psycopg.Connection, commit: Commit):
        self.repos = repos
        self.conn = conn
        self.commit = commit
        self._rows: list[tuple[str, str, int]] = []
        self._paths: set[str] = set()
        self.deleted: set[str] = set()

    def _add(self, path: str, sha256: str, size: int) -> None:
        if path in self._paths:
            raise Invalid(f"{path} was written twice in commit {self.commit.ref}")
        self._paths.add(path)
        self._rows.append((path, sha256, size))
        if len(self._rows) >= COPY_BATCH:
            self.flush()

    def add_file(self, path: str, source: Path) -> FileEntry:
        try:
            sha256, size = self.repos.store.put_file(source)
        except OSError as exc:
            raise Invalid(
                f"cannot read {source}: {exc.strerror or exc}", "fix the file or leave it out"
            ) from exc
        self._add(normalize_path(path), sha256, size)
        return FileEntry(path, sha256, size)

    def add_object(self, path: str, sha256: str, size: int) -> None:
        """A file whose bytes are already in the object store."""
        self._add(normalize_path(path), sha256, size)

    def delete(self, path: str) -> None:
        """Leave a file of the parent commit out of this one."""
        self.deleted.add(normalize_path(path))

    def flush(self) -> None:
        if not self._rows:
            return
        with self.conn.cursor().copy(
            "COPY data_files (commit_id, path, sha256, size) FROM STDIN"
        ) as copy:
            for row in self._rows:
                copy.write_row((self.commit.id, *row))
        self._rows.clear()


class DataRepos(DataBackend):
    def __init__(self, stack: Stack):
        self.stack = stack
        self.store = object_store_for(stack.settings)

    def connect(self, autocommit: bool = True) -> psycopg.Connection:
        return self.stack.connect(autocommit=autocommit)

    def check(self) -> str:
        with self.connect():
            return f"local data engine on {self.stack.postgres.address}"

    # -- repos and branches ------------------------------------------------------------

    def create_repo(self, name: str, description: str = "") -> None:
        if not REPO_NAME.match(name):
            raise Invalid(
                f"'{name}' is not a valid repo name",
                "use 1-63 letters, digits, '-' or '_'",
            )
        with self.connect() as conn, conn.transaction():
            try:
                conn.execute(
                    "INSERT INTO data_repos (name, description) VALUES (%s, %s)",
                    [name, description],
                )
            except psycopg.errors.UniqueViolation as exc:
                raise AlreadyExists(f"repo '{name}' already exists", "pick another name") from exc
            conn.execute(
                "INSERT INTO data_branches (repo, name) VALUES (%s, %s)", [name, DEFAULT_BRANCH]
            )

    def require_repo(self, conn: psycopg.Connection, name: str) -> None:
        if not conn.execute("SELECT 1 FROM data_repos WHERE name = %s", [name]).fetchone():
            known = [r[0] for r in conn.execute("SELECT name FROM data_repos ORDER BY name")]
            raise NotFound(
                f"no repo '{name}'" + (f" (repos: {', '.join(known)})" if known else ""),
                f"create it with 'cdl data repo create {name}'",
            )

    def list_repos(self) -> list[RepoInfo]:
        with self.connect() as conn:
            rows = conn.execute(
                """SELECT r.name, r.description, r.created_at,
                          (SELECT count(*) FROM data_branches b WHERE b.repo = r.name),
                          (SELECT count(*) FROM data_commits c
                           WHERE c.repo = r.name AND c.state = 'finished'),
                          h.size_bytes, h.file_count
                   FROM data_repos r
                   LEFT JOIN data_branches m ON m.repo = r.name AND m.name = %s
                   LEFT JOIN data_commits h ON h.id = m.head
                   ORDER BY r.name""",
                [DEFAULT_BRANCH],
            ).fetchall()
        return [RepoInfo(*row) for row in rows]

    def delete_repo(self, name: str) -> None:
        with self.connect() as conn, conn.transaction():
            self.require_repo(conn, name)
            downstream = conn.execute(
                """SELECT DISTINCT d.repo FROM data_provenance p
                   JOIN data_commits u ON u.id = p.upstream_id
                   JOIN data_commits d ON d.id = p.commit_id
                   WHERE u.repo = %s AND d.repo <> %s""",
                [name, name],
            ).fetchall()
            if downstream:
                names = ", ".join(r[0] for r in downstream)
                raise Invalid(
                    f"repo '{name}' has commits that {names} were computed from",
                    f"delete {names} first",
                )
            conn.execute("DELETE FROM data_repos WHERE name = %s", [name])

    def branches(self, repo: str) -> list[tuple[str, Commit | None]]:
        with self.connect() as conn:
            self.require_repo(conn, repo)
            names = conn.execute(
                "SELECT name, head FROM data_branches WHERE repo = %s ORDER BY name", [repo]
            ).fetchall()
            return [(n, self.commit_by_id(conn, h) if h else None) for n, h in names]

    def create_branch(self, repo: str, name: str, source: Ref | None = None) -> Commit | None:
        if not BRANCH_NAME.match(name):
            raise Invalid(f"'{name}' is not a valid branch name", "use letters, digits, . - _")
        with self.connect() as conn, conn.transaction():
            self.require_repo(conn, repo)
            head = self._resolve(conn, source) if source else None
            if head and head.repo != repo:
                raise Invalid(f"{source} is not in repo '{repo}'", "branch from a commit of it")
            try:
                conn.execute(
                    "INSERT INTO data_branches (repo, name, head) VALUES (%s, %s, %s)",
                    [repo, name, head.id if head else None],
                )
            except psycopg.errors.UniqueViolation as exc:
                raise AlreadyExists(f"branch {repo}@{name} already exists") from exc
            return head

    def delete_branch(self, repo: str, name: str) -> None:
        with self.connect() as conn:
            done = conn.execute(
                "DELETE FROM data_branches WHERE repo = %s AND name = %s", [repo, name]
            )
            if done.rowcount == 0:
                raise NotFound(f"no branch {repo}@{name}", f"see 'cdl data branch {repo}'")

    # -- commits -------------------------------------------------------------------------

    def head(self, conn: psycopg.Connection, repo: str, branch: str) -> Commit | None:
        """The head commit of repo@branch; None when the branch is missing or empty."""
        row = conn.execute(
            "SELECT head FROM data_branches WHERE repo = %s AND name = %s", [repo, branch]
        ).fetchone()
        return self.commit_by_id(conn, row[0]) if row and row[0] else None

    @staticmethod
    def commit_by_id(conn: psycopg.Connection, commit_id: str) -> Commit | None:
        return db.fetch_one(conn, Commit, "SELECT * FROM data_commits WHERE id = %s", [commit_id])

    def _resolve(self, conn: psycopg.Connection, ref: Ref) -> Commit:
        self.require_repo(conn, ref.repo)
        name = ref.name or DEFAULT_BRANCH
        row = conn.execute(
            "SELECT head FROM data_branches WHERE repo = %s AND name = %s", [ref.repo, name]
        ).fetchone()
        if row is not None:
            if row[0] is None:
                raise NotFound(f"branch {ref.repo}@{name} has no commits yet", "put files first")
            commit = self.commit_by_id(conn, row[0])
        else:
            if not re.fullmatch(r"[0-9a-f]{6,32}", name):
                raise NotFound(
                    f"{ref.repo} has no branch '{name}'",
                    f"see 'cdl data branch {ref.repo}', or give a commit id (6+ hex digits)",
                )
            ids = conn.execute(
                "SELECT id FROM data_commits WHERE repo = %s AND id LIKE %s LIMIT 2",
                [ref.repo, name + "%"],
            ).fetchall()
            if len(ids) != 1:
                problem = "no commit" if not ids else "more than one commit"
                raise NotFound(
                    f"{problem} in {ref.repo} starts with '{name}'", "give more of the commit id"
                )
            commit = self.commit_by_id(conn, ids[0][0])
        for _ in range(ref.parents):
            if commit.parent is None:
                raise NotFound(f"{ref} goes past the first commit of {ref.repo}")
            commit = self.commit_by_id(conn, commit.parent)
        return commit

    def resolve(self, ref: Ref | str) -> Commit:
        ref = Ref.parse(ref) if isinstance(ref, str) else ref
        with self.connect() as conn:
            commit = self._resolve(conn, ref)
        if commit.state != "finished":
            raise Invalid(
                f"commit {commit.ref} is still open", "wait for it to finish, or 'cdl data clean'"
            )
        return commit

    def log(self, repo: str, branch: str | None = None, limit: int = 50) -> list[Commit]:
        """Commits of a branch from its head back, or of the whole repo (open ones included)."""
        with self.connect() as conn, conn.cursor(row_factory=class_row(Commit)) as cur:
            self.require_repo(conn, repo)
            if branch is None:
                return cur.execute(
                    "SELECT * FROM data_commits WHERE repo = %s ORDER BY started_at DESC LIMIT %s",
                    [repo, limit],
                ).fetchall()
            if not conn.execute(
                "SELECT 1 FROM data_branches WHERE repo = %s AND name = %s", [repo, branch]
            ).fetchone():
                raise NotFound(f"{repo} has no branch '{branch}'", f"see 'cdl data branch {repo}'")
            return cur.execute(
                """WITH RECURSIVE chain AS (
                       SELECT c.*, 1 AS n FROM data_commits c
                       JOIN data_branches b ON b.head = c.id WHERE b.repo = %s AND b.name = %s
                       UNION ALL
                       SELECT c.*, chain.n + 1 FROM data_commits c
                       JOIN chain ON c.id = chain.parent WHERE chain.n < %s)
                   SELECT id, repo, branch, parent, state, origin, message, author, started_at,
                          finished_at, size_bytes, file_count FROM chain ORDER BY n""",
                [repo, branch, limit],
            ).fetchall()

    def provenance(self, commit: Commit) -> list[Commit]:
        """Every commit upstream of `commit`, nearest first."""
        with self.connect() as conn, conn.cursor(row_factory=class_row(Commit)) as cur:
            return cur.execute(
                """WITH RECURSIVE up(id, depth) AS (
                       SELECT upstream_id, 1 FROM data_provenance WHERE commit_id = %s
                       UNION
                       SELECT p.upstream_id, up.depth + 1 FROM data_provenance p
                       JOIN up ON p.commit_id = up.id)
                   SELECT c.* FROM data_commits c
                   JOIN (SELECT id, min(depth) AS depth FROM up GROUP BY id) u ON u.id = c.id
                   ORDER BY u.depth, c.repo""",
                [commit.id],
            ).fetchall()

    # -- writing ---------------------------------------------------------------------------

    @contextmanager
    def writer(
        self,
        repo: str,
        branch: str = DEFAULT_BRANCH,
        message: str = "",
        author: str | None = None,
        origin: str = "user",
        provenance: list[Commit] = (),
        carry_parent: bool = True,
        on_wait: Callable[[], None] | None = None,
    ) -> Iterator[CommitWriter]:
        """Open a commit on `repo@branch`, yield a writer, finish the commit on exit.

        With `carry_parent` the parent's files are kept unless written or deleted again (a put);
        without, the commit holds exactly what was written (a pipeline's output).
        """
        if not BRANCH_NAME.match(branch):
            raise Invalid(f"'{branch}' is not a valid branch name", "use letters, digits, . - _")
        with (
            self.connect() as conn,
            db.advisory_lock(conn, self._lock_key(repo, branch), on_wait=on_wait),
        ):
            self.require_repo(conn, repo)
            self._discard_open(conn, repo, branch)
            conn.execute(
                """INSERT INTO data_branches (repo, name) VALUES (%s, %s)
                   ON CONFLICT DO NOTHING""",
                [repo, branch],
            )
            head = conn.execute(
                "SELECT head FROM data_branches WHERE repo = %s AND name = %s", [repo, branch]
            ).fetchone()[0]
            commit_id = uuid.uuid4().hex
            conn.execute(
                """INSERT INTO data_commits (id, repo, branch, parent, state, origin, message,
                                             author)
                   VALUES (%s, %s, %s, %s, 'open', %s, %s, %s)""",
                [commit_id, repo, branch, head, origin, message, author or default_author()],
            )
            writer = CommitWriter(self, conn, self.commit_by_id(conn, commit_id))
            try:
                yield writer
                writer.flush()
                writer.commit = self._finish(conn, writer, carry_parent, provenance)
            except BaseException:
                # Not finished: remove the open commit now rather than leave it for later.
                conn.execute("DELETE FROM data_commits WHERE id = %s", [commit_id])
                raise

    @staticmethod
    def _lock_key(repo: str, branch: str) -> str:
        return f"cdl.data.branch:{repo}@{branch}"

    @staticmethod
    def _discard_open(conn, repo: str, branch: str) -> int:
        """Open commits on a branch whose lock we hold were left by a writer that died."""
        return conn.execute(
            "DELETE FROM data_commits WHERE repo = %s AND branch = %s AND state = 'open'",
            [repo, branch],
        ).rowcount

    def clean(self, repo: str) -> Cleaned:
        removed = 0
        with self.connect() as conn:
            self.require_repo(conn, repo)
            branches = conn.execute(
                "SELECT DISTINCT branch FROM data_commits WHERE repo = %s AND state = 'open'",
                [repo],
            ).fetchall()
            for (branch,) in branches:
                with db.advisory_lock(conn, self._lock_key(repo, branch), wait=False) as held:
                    if held:  # else its writer is still at work
                        removed += self._discard_open(conn, repo, branch)
        return Cleaned(removed, self.store.clean())

    def _finish(self, conn, writer: CommitWriter, carry_parent: bool, provenance) -> Commit:
        commit = writer.commit
        with conn.transaction():
            if carry_parent and commit.parent:
                conn.execute(
                    """INSERT INTO data_files (commit_id, path, sha256, size)
                       SELECT %s, path, sha256, size FROM data_files
                       WHERE commit_id = %s AND NOT (path = ANY(%s))
                       ON CONFLICT (commit_id, path) DO NOTHING""",
                    [commit.id, commit.parent, list(writer.deleted)],
                )
            count, size = conn.execute(
                """SELECT count(*), coalesce(sum(size), 0)::bigint FROM data_files
                   WHERE commit_id = %s""",
                [commit.id],
            ).fetchone()
            conn.execute(
                """UPDATE data_commits SET state = 'finished', finished_at = now(),
                          size_bytes = %s, file_count = %s WHERE id = %s""",
                [size, count, commit.id],
            )
            conn.execute(
                "UPDATE data_branches SET head = %s WHERE repo = %s AND name = %s",
                [commit.id, commit.repo, commit.branch],
            )
            for upstream in provenance:
                conn.execute(
                    "INSERT INTO data_provenance (commit_id, upstream_id) VALUES (%s, %s)",
                    [commit.id, upstream.id],
                )
            finished = self.commit_by_id(conn, commit.id)
            lineage.record_node(
                conn,
                lineage.Kind.DATASET_COMMIT,
                finished.ref,
                branch=finished.branch,
                files=count,
                size=size,
                origin=finished.origin,
                message=finished.message,
            )
            events.emit(
                conn,
                events.COMMIT_FINISHED,
                finished.lineage_id,
                {
                    "repo": finished.repo,
                    "branch": finished.branch,
                    "commit": finished.id,
                    "files": count,
                    "size": size,
                    "origin": finished.origin,
                },
            )
        return finished

    def put(
        self,
        target: Ref,
        sources: list[Path],
        dest: str = "/",
        message: str = "",
        author: str | None = None,
        progress: Callable[[int, int], None] | None = None,
        on_wait: Callable[[], None] | None = None,
    ) -> tuple[Commit, ScanResult]:
        """Store files and folders in a new commit on `target` (a branch); return it and the scan
        (what was skipped and why)."""
        scan = files_to_put(target, sources, dest)
        with self.writer(
            target.repo, target.name or DEFAULT_BRANCH, message, author, on_wait=on_wait
        ) as writer:
            total = sum(os.lstat(src).st_size for src, _ in scan.files)
            done = 0
            for source, path in scan.files:
                entry = writer.add_file(path, source)
                done += entry.size
                if progress:
                    progress(done, total)
        return writer.commit, scan

    def write(
        self,
        repo: str,
        files: Mapping[str, bytes],
        deletes: list[str] = (),
        carry_parent: bool = True,
        message: str = "",
        author: str | None = None,
        branch: str = DEFAULT_BRANCH,
    ) -> Commit:
        with self.writer(repo, branch, message, author, carry_parent=carry_parent) as writer:
            for path in deletes:
                writer.delete(path)
            for path, data in files.items():
                writer.add_object(path, *self.store.put_bytes(data))
        return writer.commit

    # -- reading ---------------------------------------------------------------------------

    def files(self, commit: Commit, prefix: str = "/") -> Iterator[FileEntry]:
        """The commit's files under `prefix`, in path order, streamed from the server."""
        prefix = normalize_path(prefix)
        like = db.like_escape(prefix.rstrip("/"))
        with self.connect(autocommit=False) as conn:
            with conn.cursor(name="files", row_factory=class_row(FileEntry)) as cur:
                cur.itersize = 2000
                cur.execute(
                    """SELECT path, sha256, size FROM data_files
                       WHERE commit_id = %s AND (path = %s OR path LIKE %s)
                       ORDER BY path""",
                    [commit.id, prefix, like + "/%"],
                )
                yield from cur

    def listing(self, commit: Commit, prefix: str = "/") -> list[Entry]:
        """The entries directly under `prefix`."""
        prefix = normalize_path(prefix)
        base = prefix.rstrip("/") + "/"
        like = db.like_escape(base)
        with self.connect() as conn:
            rows = conn.execute(
                """SELECT split_part(substr(path, %(n)s), '/', 1) AS name,
                          bool_or(strpos(substr(path, %(n)s), '/') > 0) AS is_dir,
                          sum(size)::bigint, count(*)
                   FROM data_files WHERE commit_id = %(c)s AND path LIKE %(like)s
                   GROUP BY 1 ORDER BY 1""",
                {"n": len(base) + 1, "c": commit.id, "like": like + "%"},
            ).fetchall()
            if not rows and prefix != "/":
                single = conn.execute(
                    "SELECT size FROM data_files WHERE commit_id = %s AND path = %s",
                    [commit.id, prefix],
                ).fetchone()
                if single:
                    return [Entry(prefix.rsplit("/", 1)[1], "file", single[0], 1)]
                raise NotFound(f"{commit.ref} has no file or folder {prefix}")
        return [Entry(name, "dir" if d else "file", size, n) for name, d, size, n in rows]

    def diff(self, old: Commit, new: Commit) -> Iterator[tuple[str, str, int | None, int | None]]:
        """(status, path, old size, new size) for each path that differs; status is one of
        added, removed, modified. Streamed, in path order."""
        with self.connect(autocommit=False) as conn, conn.cursor(name="diff") as cur:
            cur.itersize = 2000
            cur.execute(
                """SELECT CASE WHEN a.path IS NULL THEN 'added'
                               WHEN b.path IS NULL THEN 'removed' ELSE 'modified' END,
                          coalesce(a.path, b.path), a.size, b.size
                   FROM (SELECT * FROM data_files WHERE commit_id = %s) a
                   FULL OUTER JOIN (SELECT * FROM data_files WHERE commit_id = %s) b
                     ON a.path = b.path
                   WHERE a.sha256 IS DISTINCT FROM b.sha256
                   ORDER BY 2""",
                [old.id, new.id],
            )
            yield from cur

    def open(self, commit: Commit, entry: FileEntry) -> IO[bytes]:
        return self.store.open(entry.sha256)

    def record_stats(self, commit: Commit, path: str, fmt: str, stats: dict) -> None:
        with self.connect() as conn:
            conn.execute(
                """INSERT INTO data_commit_stats (commit_id, path, format, stats)
                   VALUES (%s, %s, %s, %s)
                   ON CONFLICT (commit_id, path, format) DO UPDATE
                   SET stats = EXCLUDED.stats, computed_at = now()""",
                [commit.id, path, fmt, Jsonb(stats)],
            )

    def stored_stats(self, commit: Commit) -> list[dict]:
        """The statistics recorded for `commit` so far."""
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT stats FROM data_commit_stats WHERE commit_id = %s ORDER BY path, format",
                [commit.id],
            ).fetchall()
        return [row[0] for row in rows]
