-- Versioned data repositories (Pachyderm semantics): repos, branches, immutable commits, and the
-- complete file listing of every commit. File bytes live in the object store, addressed by sha256.
CREATE TABLE data_repos (
    name         text PRIMARY KEY CHECK (name ~ '^[a-zA-Z0-9_-]{1,63}$'),
    description  text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE data_commits (
    id           text PRIMARY KEY,             -- 32 hex characters
    repo         text NOT NULL REFERENCES data_repos (name) ON DELETE CASCADE,
    branch       text NOT NULL,
    parent       text REFERENCES data_commits (id) ON DELETE SET NULL,
    state        text NOT NULL CHECK (state IN ('open', 'finished')),
    origin       text NOT NULL CHECK (origin IN ('user', 'pipeline')),
    message      text NOT NULL DEFAULT '',
    author       text NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    size_bytes   bigint,
    file_count   integer,
    CHECK ((state = 'finished') = (finished_at IS NOT NULL))
);

CREATE INDEX data_commits_repo ON data_commits (repo, started_at);

CREATE TABLE data_branches (
    repo  text NOT NULL REFERENCES data_repos (name) ON DELETE CASCADE,
    name  text NOT NULL CHECK (name ~ '^[a-zA-Z0-9_.-]{1,63}$'),
    head  text REFERENCES data_commits (id),    -- always a finished commit; NULL: empty branch
    PRIMARY KEY (repo, name)
);

CREATE TABLE data_files (
    commit_id  text NOT NULL REFERENCES data_commits (id) ON DELETE CASCADE,
    path       text NOT NULL CHECK (path ~ '^/'),
    sha256     text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    size       bigint NOT NULL CHECK (size >= 0),
    PRIMARY KEY (commit_id, path)
);

CREATE INDEX data_files_sha256 ON data_files (sha256);

-- The commits a commit was computed from (pipeline outputs).
CREATE TABLE data_provenance (
    commit_id    text NOT NULL REFERENCES data_commits (id) ON DELETE CASCADE,
    upstream_id  text NOT NULL REFERENCES data_commits (id) ON DELETE CASCADE,
    PRIMARY KEY (commit_id, upstream_id)
);
