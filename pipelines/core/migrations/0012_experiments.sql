-- Hyperparameter searches of the local experiment engine (pipelines/model/search.py).
-- Optuna keeps the search state (its own tables, in the `optuna` database); these tables keep what
-- CDL shows and resumes: each experiment's resolved inputs and outcome, and each trial's progress,
-- checkpoint folder, MLflow run and the worker running it. A running trial names its runner
-- (host/pid/start time), which beats every second; a trial whose runner is gone is resumed from
-- its checkpoints by another worker, up to the experiment's max_restarts.
CREATE TABLE experiments (
    id                serial PRIMARY KEY,
    name              text NOT NULL,
    use_case          text NOT NULL,
    snapshot          text NOT NULL,          -- the label snapshot, resolved ('latest' never kept)
    spec              jsonb NOT NULL,         -- the spec as Determined reads it
    spec_path         text NOT NULL,
    trainer           text NOT NULL,          -- module:Class
    features          text,                   -- module:function; NULL: the transformation registry
    searcher          text NOT NULL,          -- single | random | grid | async_halving | adaptive_asha
    metric            text NOT NULL,
    smaller_is_better boolean NOT NULL,
    max_trials        integer NOT NULL,       -- for grid: the grid's size
    max_epochs        integer NOT NULL,
    max_restarts      integer NOT NULL,
    workers           integer NOT NULL,       -- worker processes started by submit
    seed              bigint NOT NULL,        -- reproducibility.experiment_seed, or drawn at submit
    state             text NOT NULL DEFAULT 'active'
                      CHECK (state IN ('active', 'completed', 'killed', 'failed')),
    best_trial        integer,
    best_metric       double precision,
    mlflow_run        text,                   -- the parent run; trials are nested runs
    error             text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz
);

CREATE TABLE trials (
    experiment    integer NOT NULL REFERENCES experiments (id) ON DELETE CASCADE,
    number        integer NOT NULL,           -- 0, 1, ... in the order trials were started
    optuna_number integer NOT NULL,
    bracket       integer NOT NULL,           -- how many rungs its ASHA bracket has (1: no pruning)
    state         text NOT NULL
                  CHECK (state IN ('running', 'completed', 'pruned', 'failed', 'killed')),
    hparams       jsonb NOT NULL,
    epochs        integer NOT NULL DEFAULT 0, -- epochs done (checkpointed and reported)
    rung          integer NOT NULL DEFAULT 0, -- rungs of its bracket reached
    metric        double precision,           -- the searcher's metric at the last epoch
    mlflow_run    text,
    checkpoints   text NOT NULL,              -- the trial's checkpoint folder
    restarts      integer NOT NULL DEFAULT 0, -- times resumed after its runner died
    runner        text,                       -- host/pid/start time; NULL: released, resumable
    heartbeat_at  timestamptz,
    error         text,                       -- why it failed, with the traceback
    log           text NOT NULL DEFAULT '',   -- one timestamped line per start, epoch and end
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    PRIMARY KEY (experiment, number)
);

CREATE INDEX trials_running ON trials (experiment) WHERE state = 'running';
