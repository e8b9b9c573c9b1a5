-- Approvals of model versions (pipelines/model/approvals.py): who moved a registered model's
-- `champion` alias to which version, when and why, from which previous champion, and how the
-- two scored on the same test split. Append-only: the history of what went to production.
CREATE TABLE model_approvals (
    id                bigserial PRIMARY KEY,
    model             text NOT NULL,                 -- the MLflow registered model (bbc-news)
    version           integer NOT NULL,
    action            text NOT NULL CHECK (action IN ('promoted', 'rolled_back')),
    approved_by       text NOT NULL CHECK (approved_by <> ''),
    reason            text NOT NULL CHECK (reason <> ''),
    forced            boolean NOT NULL DEFAULT false, -- approved without passing the gate
    previous_version  integer,                       -- the champion before; NULL: the first
    snapshot          text NOT NULL,                 -- use_case/name: whose test split scored both
    metrics           jsonb NOT NULL,                -- the approved version's scores on it
    previous_metrics  jsonb,                         -- the previous champion's, same split
    approved_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX model_approvals_model ON model_approvals (model, approved_at DESC, id DESC);

CREATE FUNCTION model_approvals_frozen() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'model approvals are history: they are never changed or deleted';
END $$;

CREATE TRIGGER model_approvals_frozen BEFORE UPDATE OR DELETE ON model_approvals
    FOR EACH ROW EXECUTE FUNCTION model_approvals_frozen();
