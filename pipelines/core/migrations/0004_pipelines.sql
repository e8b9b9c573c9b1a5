-- Pipelines (Pachyderm-format specs) and their jobs, run by the local engine.
CREATE TABLE pipelines (
    name        text PRIMARY KEY,              -- also the name of its output repo
    spec        jsonb NOT NULL,
    spec_path   text,                          -- the file it was created or updated from
    workdir     text NOT NULL,                 -- where its transform runs locally
    code_hash   text NOT NULL,                 -- the files its transform names, hashed
    salt        text NOT NULL,                 -- changed by `update --reprocess`
    version     integer NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Which repo branches trigger which pipeline.
CREATE TABLE pipeline_inputs (
    pipeline  text NOT NULL REFERENCES pipelines (name) ON DELETE CASCADE,
    repo      text NOT NULL,
    branch    text NOT NULL,
    PRIMARY KEY (pipeline, repo, branch)
);

CREATE TABLE pipeline_jobs (
    id                text PRIMARY KEY,
    pipeline          text NOT NULL REFERENCES pipelines (name) ON DELETE CASCADE,
    pipeline_version  integer NOT NULL,
    version_hash      text NOT NULL,
    input_commits     jsonb NOT NULL,          -- {"repo@branch": commit id}
    state             text NOT NULL CHECK (state IN ('running', 'success', 'failure')),
    output_commit     text,
    datums_total      integer NOT NULL DEFAULT 0,
    datums_processed  integer NOT NULL DEFAULT 0,
    datums_skipped    integer NOT NULL DEFAULT 0,
    datums_failed     integer NOT NULL DEFAULT 0,
    error             text,
    started_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz
);

CREATE INDEX pipeline_jobs_pipeline ON pipeline_jobs (pipeline, started_at);

-- One row per datum of a job: what ran (or was reused), its attempts and the tail of its output.
CREATE TABLE pipeline_job_datums (
    job_id       text NOT NULL REFERENCES pipeline_jobs (id) ON DELETE CASCADE,
    datum_hash   text NOT NULL,
    inputs       jsonb NOT NULL,               -- {"input name": "matched path"}
    state        text NOT NULL CHECK (state IN ('processed', 'skipped', 'failed')),
    attempts     integer NOT NULL DEFAULT 0,
    seconds      real,
    log          text NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, datum_hash)
);

-- Outputs of successful datums, reused while the input content and pipeline version match.
CREATE TABLE pipeline_datum_outputs (
    pipeline      text NOT NULL REFERENCES pipelines (name) ON DELETE CASCADE,
    version_hash  text NOT NULL,
    datum_hash    text NOT NULL,
    outputs       jsonb NOT NULL,              -- [[path, sha256, size], ...]
    job_id        text NOT NULL,
    PRIMARY KEY (pipeline, version_hash, datum_hash)
);
