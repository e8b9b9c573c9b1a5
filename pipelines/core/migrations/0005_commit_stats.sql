-- Dataset statistics computed for a commit (`cdl data stats`), one row per format read as.
CREATE TABLE data_commit_stats (
    commit_id    text NOT NULL REFERENCES data_commits (id) ON DELETE CASCADE,
    format       text NOT NULL,
    stats        jsonb NOT NULL,
    computed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (commit_id, format)
);
