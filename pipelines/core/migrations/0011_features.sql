-- The transformation registry (pipelines/model/features.py): a use case's features for a label
-- snapshot, computed once per preprocessing version and validation carve, their arrays and
-- description kept in the object store; every trial and later experiment on the snapshot reuses
-- them. A `features` lineage node links them to the snapshot they were computed from.
CREATE TABLE features (
    use_case        text NOT NULL,
    snapshot        text NOT NULL,
    preprocessing   text NOT NULL,            -- the trainer's PREPROCESSING_VERSION
    val_seed        integer NOT NULL,         -- the validation carve out of the train split
    val_fraction    double precision NOT NULL CHECK (val_fraction > 0 AND val_fraction < 1),
    arrays_sha256   text NOT NULL,            -- .npz in the object store: x/y train/val
    meta_sha256     text NOT NULL,            -- JSON in the object store: labels, preprocessing,
                                              -- validation (seed, sources held out)
    train_rows      integer NOT NULL,
    val_rows        integer NOT NULL,
    bytes           bigint NOT NULL,          -- of both objects
    seconds         real NOT NULL,            -- reading the files and featurizing them
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (use_case, snapshot, preprocessing, val_seed, val_fraction),
    FOREIGN KEY (use_case, snapshot) REFERENCES label_snapshots (use_case, name)
);

ALTER TABLE lineage_nodes DROP CONSTRAINT lineage_nodes_kind_check;
ALTER TABLE lineage_nodes ADD CONSTRAINT lineage_nodes_kind_check CHECK (kind IN (
    'dataset_commit', 'pipeline_job', 'label_snapshot', 'run', 'model_version', 'deployment',
    'prediction_batch', 'features'));
