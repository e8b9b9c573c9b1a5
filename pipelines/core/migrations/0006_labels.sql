-- The label store: Label Studio tasks CDL created, every version of every annotation, the
-- train/test split, and immutable snapshots that training reads.

-- One task per validated file (path and content) and use case: re-syncing adds only new files.
CREATE TABLE label_tasks (
    use_case    text NOT NULL,
    path        text NOT NULL,                 -- path in the source repo
    sha256      text NOT NULL,
    source      text NOT NULL,                 -- repo@commit:path it was imported from
    project_id  integer NOT NULL,
    task_id     integer NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (use_case, path, sha256),
    UNIQUE (use_case, task_id)
);

-- Which split each labelled file belongs to; assigned once (stratified by the label it had
-- then), never moved.
CREATE TABLE label_splits (
    use_case  text NOT NULL,
    path      text NOT NULL,
    split     text NOT NULL CHECK (split IN ('train', 'test')),
    label     text NOT NULL,
    PRIMARY KEY (use_case, path)
);

-- Every version of every annotation. A changed annotation adds a row with the next version.
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
    PRIMARY KEY (use_case, annotation_id, version)
);

CREATE VIEW labels_current AS
    SELECT DISTINCT ON (use_case, annotation_id) *
    FROM label_rows ORDER BY use_case, annotation_id, version DESC;

CREATE TABLE label_snapshots (
    use_case    text NOT NULL,
    name        text NOT NULL CHECK (name ~ '^[a-zA-Z0-9_.-]{1,63}$'),
    rows        integer NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (use_case, name)
);

CREATE TABLE label_snapshot_rows (
    use_case       text NOT NULL,
    snapshot       text NOT NULL,
    split          text NOT NULL,
    source         text NOT NULL,
    label          text NOT NULL,
    labeler        text NOT NULL,
    labeled_at     timestamptz NOT NULL,
    annotation_id  integer NOT NULL,
    version        integer NOT NULL,
    FOREIGN KEY (use_case, snapshot) REFERENCES label_snapshots (use_case, name)
);

CREATE INDEX label_snapshot_rows_snapshot ON label_snapshot_rows (use_case, snapshot, split);

-- Snapshots are immutable once written.
CREATE FUNCTION label_snapshot_rows_frozen() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'label snapshots are immutable';
END $$;

CREATE TRIGGER label_snapshot_rows_frozen BEFORE UPDATE OR DELETE ON label_snapshot_rows
    FOR EACH ROW EXECUTE FUNCTION label_snapshot_rows_frozen();

CREATE VIEW labels_train AS
    SELECT use_case, source, label, labeler, labeled_at, annotation_id, version
    FROM labels_current WHERE split = 'train';
CREATE VIEW labels_test AS
    SELECT use_case, source, label, labeler, labeled_at, annotation_id, version
    FROM labels_current WHERE split = 'test';
CREATE VIEW snapshot_train AS
    SELECT * FROM label_snapshot_rows WHERE split = 'train';
CREATE VIEW snapshot_test AS
    SELECT * FROM label_snapshot_rows WHERE split = 'test';

-- Roles: a data scientist reads training labels only; the evaluator (CI) reads test labels too.
-- On a managed Postgres without CREATEROLE the roles are left to its administrator.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cdl_scientist') THEN
        CREATE ROLE cdl_scientist NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cdl_evaluator') THEN
        CREATE ROLE cdl_evaluator NOLOGIN;
    END IF;
    GRANT SELECT ON labels_train, snapshot_train, label_snapshots TO cdl_scientist;
    GRANT SELECT ON labels_train, labels_test, snapshot_train, snapshot_test, label_snapshots
        TO cdl_evaluator;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'roles cdl_scientist and cdl_evaluator not created: no CREATEROLE privilege';
END $$;
