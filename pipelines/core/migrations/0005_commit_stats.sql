-- Dataset statistics computed for a commit (`cdl data stats`): one row per folder and format.
CREATE TABLE data_commit_stats (
    commit_id    text NOT NULL REFERENCES data_commits (id) ON DELETE CASCADE,
    path         text NOT NULL DEFAULT '/',
    format       text NOT NULL,
    stats        jsonb NOT NULL,
    computed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (commit_id, path, format)
);
