"""Every `cdl` command explains itself: walked from the command tree, checked in-process."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from pipelines.cli.main import app

ROOT = typer.main.get_command(app)


def command_paths(group=ROOT, prefix: tuple[str, ...] = ()) -> list[tuple]:
    paths = [prefix]
    if hasattr(group, "commands"):  # a group of subcommands
        for name, sub in sorted(group.commands.items()):
            paths += command_paths(sub, (*prefix, name))
    return paths


COMMANDS = command_paths()


def test_the_tree_holds_every_noun():
    nouns = {path[0] for path in COMMANDS if path}
    assert {"stack", "config", "data", "label", "lineage", "events", "demo"} <= nouns
    assert len(COMMANDS) > 40


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "cdl")
def test_every_command_has_help(command):
    result = CliRunner().invoke(app, [*command, "--help"], prog_name="cdl")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: cdl")
    # Each command says what it does in a sentence, not just its name.
    description = result.output.split("Options:")[0].split("\n", 1)[1]
    assert len(description.split()) >= 5, result.output


def test_unknown_option_is_a_usage_error():
    result = CliRunner().invoke(app, ["data", "put", "--nope"], prog_name="cdl")
    assert result.exit_code == 2
    assert "No such option: --nope" in result.output
