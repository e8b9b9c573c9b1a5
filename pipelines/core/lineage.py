"""Lineage: typed nodes (dataset commits, label snapshots, features, runs, model versions,
deployments, prediction batches, pipeline jobs) and the edges between them, so that for any node
one query returns everything upstream of it (what it was made from) or downstream (what was made
from it).

Node ids are '<kind>:<key>', e.g. 'dataset_commit:bbc_raw@5d41402a', 'model_version:bbc/3'.
Recording is idempotent: the same node or edge recorded twice is stored once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum

import psycopg
from psycopg.types.json import Jsonb

from pipelines.core import db
from pipelines.core.errors import Invalid, NotFound


class Kind(str, Enum):
    DATASET_COMMIT = "dataset_commit"
    PIPELINE_JOB = "pipeline_job"
    LABEL_SNAPSHOT = "label_snapshot"
    RUN = "run"
    MODEL_VERSION = "model_version"
    DEPLOYMENT = "deployment"
    PREDICTION_BATCH = "prediction_batch"
    FEATURES = "features"  # a snapshot's preprocessed train split (model/features.py)


class Relation(str, Enum):
    CONSUMED = "consumed"  # the downstream activity read the upstream node
    PRODUCED = "produced"  # the upstream activity made the downstream node


@dataclass
class Node:
    id: str
    kind: str
    key: str
    attributes: dict
    created_at: datetime | None = None
    relation: str | None = None  # how it is linked to its parent in a tree
    children: list["Node"] = field(default_factory=list)
    repeated: bool = False  # already shown elsewhere in the same tree

    def to_dict(self) -> dict:
        data = {"id": self.id, "kind": self.kind, "key": self.key, "attributes": self.attributes}
        if self.created_at:
            data["created_at"] = self.created_at.isoformat()
        if self.relation:
            data["relation"] = self.relation
        if self.repeated:
            data["repeated"] = True
        if self.children:
            data["children"] = [c.to_dict() for c in self.children]
        return data


def node_id(kind: Kind | str, key: str) -> str:
    return f"{Kind(kind).value}:{key}"


def record_node(conn: psycopg.Connection, kind: Kind | str, key: str, **attributes) -> str:
    """Create the node, or merge `attributes` into an existing one; return its id."""
    kind = Kind(kind)
    if not key:
        raise Invalid(f"a {kind.value} lineage node needs a non-empty key")
    nid = node_id(kind, key)
    conn.execute(
        """INSERT INTO lineage_nodes (id, kind, key, attributes) VALUES (%s, %s, %s, %s)
           ON CONFLICT (id) DO UPDATE
           SET attributes = lineage_nodes.attributes || EXCLUDED.attributes""",
        [nid, kind.value, key, Jsonb(attributes)],
    )
    return nid


def record_edge(conn: psycopg.Connection, upstream: str, downstream: str, relation: Relation | str):
    relation = Relation(relation)
    if upstream == downstream:
        raise Invalid(f"a lineage node cannot depend on itself: {upstream}")
    try:
        conn.execute(
            """INSERT INTO lineage_edges (upstream, downstream, relation) VALUES (%s, %s, %s)
               ON CONFLICT (upstream, downstream) DO NOTHING""",
            [upstream, downstream, relation.value],
        )
    except psycopg.errors.ForeignKeyViolation as exc:
        raise Invalid(
            f"lineage edge {upstream} -> {downstream} names an unknown node",
            "record both nodes before the edge",
        ) from exc


def consumed(conn: psycopg.Connection, activity: str, *inputs: str) -> None:
    """`activity` (a job, a run, a deployment...) read each of `inputs`."""
    for item in inputs:
        record_edge(conn, item, activity, Relation.CONSUMED)


def produced(conn: psycopg.Connection, activity: str, *outputs: str) -> None:
    """`activity` made each of `outputs`."""
    for item in outputs:
        record_edge(conn, activity, item, Relation.PRODUCED)


def get_node(conn: psycopg.Connection, nid: str) -> Node | None:
    row = conn.execute(
        "SELECT id, kind, key, attributes, created_at FROM lineage_nodes WHERE id = %s", [nid]
    ).fetchone()
    return Node(*row) if row else None


def similar_ids(conn: psycopg.Connection, wanted: str, limit: int = 5) -> list[str]:
    """Ids containing the key part of `wanted`, nodes of the same kind first."""
    kind, _, key = wanted.rpartition(":")
    pattern = "%" + db.like_escape(key) + "%"
    rows = conn.execute(
        """SELECT id FROM lineage_nodes WHERE id ILIKE %s
           ORDER BY kind = %s DESC, created_at DESC LIMIT %s""",
        [pattern, kind, limit],
    ).fetchall()
    return [r[0] for r in rows]


def show(stack, nid: str, direction: str = "upstream", depth: int = 50) -> Node:
    """`tree` on its own connection to the stack's database, for commands."""
    with stack.connect() as conn:
        return tree(conn, nid, direction, depth)


def tree(conn: psycopg.Connection, nid: str, direction: str = "upstream", depth: int = 50) -> Node:
    """The node with everything upstream (or downstream) of it, as a tree.

    One recursive query fetches the reachable edges; a node reached twice (a diamond, e.g. one
    dataset commit feeding both training and evaluation) is expanded once and marked repeated
    after that.
    """
    if direction not in ("upstream", "downstream"):
        raise ValueError(direction)
    root = get_node(conn, nid)
    if root is None:
        near = similar_ids(conn, nid)
        hint = f"did you mean: {', '.join(near)}" if near else "ids look like 'model_version:bbc/3'"
        raise NotFound(f"no lineage node '{nid}'", hint)
    near_col, far_col = (
        ("downstream", "upstream") if direction == "upstream" else ("upstream", "downstream")
    )
    rows = conn.execute(
        f"""WITH RECURSIVE walk(near, far, relation, depth) AS (
                SELECT {near_col}, {far_col}, relation, 1
                FROM lineage_edges WHERE {near_col} = %(id)s
                UNION
                SELECT e.{near_col}, e.{far_col}, e.relation, w.depth + 1
                FROM lineage_edges e JOIN walk w ON e.{near_col} = w.far
                WHERE w.depth < %(depth)s)
            SELECT DISTINCT w.near, w.far, w.relation, n.kind, n.key, n.attributes, n.created_at
            FROM walk w JOIN lineage_nodes n ON n.id = w.far
            ORDER BY n.created_at, w.far""",
        {"id": nid, "depth": depth},
    ).fetchall()
    links: dict[str, list[tuple]] = {}
    for near, far, relation, kind, key, attributes, created_at in rows:
        links.setdefault(near, []).append((far, relation, kind, key, attributes, created_at))

    expanded = {root.id}

    def grow(node: Node, level: int) -> None:
        if level >= depth:
            return
        for far, relation, kind, key, attributes, created_at in links.get(node.id, []):
            child = Node(far, kind, key, attributes, created_at, relation)
            node.children.append(child)
            if far in expanded:
                child.repeated = True
                continue
            expanded.add(far)
            grow(child, level + 1)

    grow(root, 0)
    return root
