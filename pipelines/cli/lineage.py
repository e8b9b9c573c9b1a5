"""`cdl lineage`: where anything came from, and what was made from it."""

from __future__ import annotations

import json

import typer
from rich.tree import Tree

from pipelines.cli.context import cli_context, console
from pipelines.core import lineage

app = typer.Typer(
    rich_markup_mode=None,
    help="Follow lineage between dataset commits, label snapshots, runs, models, "
    "deployments and predictions.",
    no_args_is_help=True,
)


# How a child relates to its parent in each direction of the tree.
RELATION_LABELS = {
    ("upstream", "produced"): "made by",
    ("upstream", "consumed"): "input",
    ("downstream", "consumed"): "read by",
    ("downstream", "produced"): "output",
}


def _label(node: lineage.Node, direction: str) -> str:
    relation = RELATION_LABELS.get((direction, node.relation), "")
    relation = f"[dim]{relation}:[/] " if relation else ""
    attrs = ", ".join(f"{k}={v}" for k, v in sorted(node.attributes.items())[:4])
    attrs = f" [dim]({attrs})[/]" if attrs else ""
    seen = " [yellow](shown above)[/]" if node.repeated else ""
    return f"{relation}[bold]{node.kind}[/] {node.key}{attrs}{seen}"


def render(root: lineage.Node, direction: str = "upstream") -> Tree:
    tree = Tree(_label(root, direction))

    def add(parent: Tree, node: lineage.Node) -> None:
        for child in node.children:
            add(parent.add(_label(child, direction)), child)

    add(tree, root)
    return tree


@app.command()
def show(
    ctx: typer.Context,
    node_id: str = typer.Argument(
        ..., metavar="ID", help="Node id '<kind>:<key>', e.g. model_version:bbc/3."
    ),
    downstream: bool = typer.Option(
        False, "--downstream", help="Show what was made from ID instead of what it came from."
    ),
    depth: int = typer.Option(50, min=1, help="How many levels to follow."),
    as_json: bool = typer.Option(False, "--json", help="Print the tree as JSON."),
) -> None:
    """Print the upstream tree of ID (its inputs, their inputs, ...), or with --downstream the
    tree of everything derived from it."""
    direction = "downstream" if downstream else "upstream"
    root = lineage.show(cli_context(ctx).stack, node_id, direction, depth)
    if as_json:
        print(json.dumps(root.to_dict(), indent=2, default=str))
    else:
        console.print(render(root, direction))
