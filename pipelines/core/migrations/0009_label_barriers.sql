-- Test labels cannot leak to cdl_scientist. A plain view applies a cheap function of the
-- caller's in the WHERE clause before its own filter, so the function saw (and could print)
-- every test row; security barrier views apply their own conditions first. And PUBLIC may no
-- longer create temporary objects or objects in the public schema of this database, where such
-- functions would be made.

ALTER VIEW labels_train SET (security_barrier = true);
ALTER VIEW labels_test SET (security_barrier = true);
ALTER VIEW snapshot_train SET (security_barrier = true);
ALTER VIEW snapshot_test SET (security_barrier = true);

DO $$
DECLARE
    view_name text;
BEGIN
    FOR view_name IN SELECT viewname FROM pg_views
                     WHERE schemaname = current_schema() AND viewname ~ '^labels_.+_(train|test)$'
    LOOP
        EXECUTE format('ALTER VIEW %I SET (security_barrier = true)', view_name);
    END LOOP;
END $$;

-- On a managed Postgres whose CDL user does not own the database, its administrator does this.
DO $$
BEGIN
    EXECUTE format('REVOKE TEMPORARY, CREATE ON DATABASE %I FROM PUBLIC', current_database());
    REVOKE CREATE ON SCHEMA public FROM PUBLIC;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'PUBLIC keeps TEMP and CREATE: the CDL user does not own the database';
END $$;

-- A use case's views are made as security barriers from now on.
CREATE OR REPLACE FUNCTION label_tables(uc text) RETURNS void LANGUAGE plpgsql AS $$
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
        EXECUTE format('CREATE OR REPLACE VIEW %I WITH (security_barrier = true) AS '
                       'SELECT source, label, labeler, labeled_at, annotation_id, version '
                       'FROM labels_current WHERE use_case = %L AND split = %L',
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
