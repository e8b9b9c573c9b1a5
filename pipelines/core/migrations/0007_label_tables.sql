-- A physical table per use case and split: label_rows becomes partitioned by use case, each use
-- case's partition by split (label_rows_<use case>_train, label_rows_<use case>_test). Queries
-- on label_rows and the views keep working; `label_tables(use_case)` makes a use case's tables
-- and its split views on its first load.

DROP VIEW labels_current CASCADE;  -- with labels_train, labels_test and the per use case views
ALTER TABLE label_rows RENAME TO label_rows_unpartitioned;
ALTER TABLE label_rows_unpartitioned RENAME CONSTRAINT label_rows_pkey
    TO label_rows_unpartitioned_pkey;

CREATE TABLE label_rows (
    use_case       text NOT NULL,
    split          text NOT NULL CHECK (split IN ('train', 'test')),
    source         text NOT NULL,              -- repo@commit:path
    label          text NOT NULL,
    labeler        text NOT NULL,
    labeled_at     timestamptz NOT NULL,       -- when the annotation was made or last changed
    task_id        integer NOT NULL,
    annotation_id  integer NOT NULL,
    version        integer NOT NULL CHECK (version > 0),
    export_commit  text NOT NULL,              -- the labels-repo commit holding the raw export
    loaded_at      timestamptz NOT NULL DEFAULT now(),
    -- a file's split never changes, so (use_case, annotation_id, version) stays unique
    PRIMARY KEY (use_case, split, annotation_id, version)
) PARTITION BY LIST (use_case);

-- labels_current: the latest version of each annotation
CREATE INDEX label_rows_latest ON label_rows (use_case, annotation_id, version DESC);

CREATE VIEW labels_current AS
    SELECT DISTINCT ON (use_case, annotation_id) *
    FROM label_rows ORDER BY use_case, annotation_id, version DESC;
CREATE VIEW labels_train AS
    SELECT use_case, source, label, labeler, labeled_at, annotation_id, version
    FROM labels_current WHERE split = 'train';
CREATE VIEW labels_test AS
    SELECT use_case, source, label, labeler, labeled_at, annotation_id, version
    FROM labels_current WHERE split = 'test';

-- A use case's tables (label_rows_<uc>_<split>) and views of its current labels per split
-- (labels_<uc>_<split>), readable by the roles allowed to see that split. Idempotent.
CREATE FUNCTION label_tables(uc text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    split text;
    role text;
BEGIN
    IF to_regclass(format('%I', 'label_rows_' || uc)) IS NULL THEN
        EXECUTE format('CREATE TABLE %I PARTITION OF label_rows FOR VALUES IN (%L) '
                       'PARTITION BY LIST (split)', 'label_rows_' || uc, uc);
    END IF;
    FOREACH split IN ARRAY ARRAY['train', 'test'] LOOP
        IF to_regclass(format('%I', 'label_rows_' || uc || '_' || split)) IS NULL THEN
            EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES IN (%L)',
                           'label_rows_' || uc || '_' || split, 'label_rows_' || uc, split);
        END IF;
        EXECUTE format('CREATE OR REPLACE VIEW %I AS SELECT source, label, labeler, labeled_at, '
                       'annotation_id, version FROM labels_current '
                       'WHERE use_case = %L AND split = %L',
                       'labels_' || uc || '_' || split, uc, split);
        FOREACH role IN ARRAY CASE WHEN split = 'train' THEN ARRAY['cdl_scientist', 'cdl_evaluator']
                                   ELSE ARRAY['cdl_evaluator'] END LOOP
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = role) THEN
                EXECUTE format('GRANT SELECT ON %I, %I TO %I', 'labels_' || uc || '_' || split,
                               'label_rows_' || uc || '_' || split, role);
            END IF;
        END LOOP;
    END LOOP;
END $$;

SELECT label_tables(use_case) FROM (SELECT DISTINCT use_case FROM label_rows_unpartitioned) u;
INSERT INTO label_rows SELECT * FROM label_rows_unpartitioned;
DROP TABLE label_rows_unpartitioned;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cdl_scientist') THEN
        GRANT SELECT ON labels_train TO cdl_scientist;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cdl_evaluator') THEN
        GRANT SELECT ON labels_train, labels_test TO cdl_evaluator;
    END IF;
END $$;
