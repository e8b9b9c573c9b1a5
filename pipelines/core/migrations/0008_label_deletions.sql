-- Annotations deleted in Label Studio: the export that no longer finds an annotation adds a
-- version of it marked deleted (its last label kept, for the history); labels_current, the
-- split views and snapshots leave it out from then on.

ALTER TABLE label_rows ADD COLUMN deleted boolean NOT NULL DEFAULT false;

-- The latest version of each annotation, deleted ones included: what the loader compares with.
CREATE VIEW labels_latest AS
    SELECT DISTINCT ON (use_case, annotation_id) *
    FROM label_rows ORDER BY use_case, annotation_id, version DESC;

CREATE OR REPLACE VIEW labels_current AS
    SELECT use_case, split, source, label, labeler, labeled_at, task_id, annotation_id, version,
           export_commit, loaded_at
    FROM labels_latest WHERE NOT deleted;
