-- ASHA as Determined runs it: promotion, not early stopping. A trial that reaches a rung of its
-- bracket records its metric there and goes on only when it is among the best 1/divisor of the
-- bracket's trials at that rung (counting those that reached it so far); otherwise it waits,
-- `paused` (its checkpoint kept), until later trials at the rung promote it, or the search ends
-- and it is pruned.
ALTER TABLE trials DROP CONSTRAINT trials_state_check;
ALTER TABLE trials ADD CONSTRAINT trials_state_check
    CHECK (state IN ('running', 'paused', 'completed', 'pruned', 'failed', 'killed'));

CREATE TABLE trial_rungs (
    experiment integer NOT NULL,
    number     integer NOT NULL,
    bracket    integer NOT NULL,           -- the trial's bracket (its number of rungs)
    epochs     integer NOT NULL,           -- the rung's milestone: epochs done
    metric     double precision NOT NULL,  -- the searcher's metric there
    promoted   boolean NOT NULL DEFAULT false,
    PRIMARY KEY (experiment, number, epochs),
    FOREIGN KEY (experiment, number) REFERENCES trials (experiment, number) ON DELETE CASCADE
);

CREATE INDEX trial_rungs_rung ON trial_rungs (experiment, bracket, epochs);
