"""Fixtures of the data tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def pachyderm_stack(project_factory):
    """Make projects on the Pachyderm data engine at a pachd address (not started); they are
    removed afterwards."""

    def make(address: str):
        data = {"engine": "pachyderm", "pachd_address": address}
        return project_factory({"stacks": {"local": {"data": data}}})

    return make
