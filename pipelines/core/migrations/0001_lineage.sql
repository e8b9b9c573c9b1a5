-- Lineage: typed nodes and the edges between them, always pointing downstream (data flow).
-- 'consumed': the downstream activity read the upstream node; 'produced': the upstream activity
-- made the downstream node.
CREATE TABLE lineage_nodes (
    id          text PRIMARY KEY,              -- '<kind>:<key>', e.g. 'model_version:bbc/3'
    kind        text NOT NULL CHECK (kind IN (
                    'dataset_commit', 'pipeline_job', 'label_snapshot', 'run',
                    'model_version', 'deployment', 'prediction_batch')),
    key         text NOT NULL CHECK (key <> ''),
    attributes  jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (kind, key)
);

CREATE TABLE lineage_edges (
    upstream    text NOT NULL REFERENCES lineage_nodes (id) ON DELETE CASCADE,
    downstream  text NOT NULL REFERENCES lineage_nodes (id) ON DELETE CASCADE,
    relation    text NOT NULL CHECK (relation IN ('consumed', 'produced')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (upstream, downstream),
    CHECK (upstream <> downstream)
);

CREATE INDEX lineage_edges_downstream ON lineage_edges (downstream);
