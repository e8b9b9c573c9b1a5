-- Jobs that survive their runner and can be stopped (pipelines/data/engine.py).
-- A running job names the process running it and that process beats every second; a job whose
-- runner is gone is resumed by the next one. A stop is requested on the row and obeyed by the
-- runner; the job ends 'killed'. The effective timeouts are kept so that `cdl stack status` can
-- flag a job that stopped making progress.
ALTER TABLE pipeline_jobs DROP CONSTRAINT pipeline_jobs_state_check;
ALTER TABLE pipeline_jobs ADD CONSTRAINT pipeline_jobs_state_check
    CHECK (state IN ('running', 'success', 'failure', 'killed'));
ALTER TABLE pipeline_jobs
    ADD COLUMN runner          text,         -- host/pid/start time of the process running it
    ADD COLUMN heartbeat_at    timestamptz,  -- its runner's last beat
    ADD COLUMN progress_at     timestamptz,  -- when its last datum finished
    ADD COLUMN stop_requested  text,         -- why it was asked to stop
    ADD COLUMN resumed         integer NOT NULL DEFAULT 0,
    ADD COLUMN datum_timeout_s real,
    ADD COLUMN job_timeout_s   real;

CREATE INDEX pipeline_jobs_running ON pipeline_jobs (pipeline) WHERE state = 'running';
