"""The labeling loop: validated files become Label Studio tasks, annotations come back into the
Postgres label store, and named snapshots freeze them for training.

- `spec`: a use case's labeling.yaml (project, labeling config, source files, split).
- `rows`: pure translations between Label Studio's JSON and label rows.
- `client`: the Label Studio calls CDL makes, errors translated into CDL's kinds.
- `server`: the Label Studio server of a stack (a supervised service).
- `store`: the label store in Postgres, all its SQL.
- `predictor`: pre-annotations (the `Predictor` protocol, predictions from a file).
- `service`: `Labeling`, the loop itself: sync, annotate, export, snapshot.
- `webhooks`: the receiver that turns annotation webhooks into incremental exports.
"""
