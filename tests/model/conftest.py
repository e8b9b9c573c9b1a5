"""Experiments in these tests name trainers and feature functions of the tests themselves
(`tests.model.toy_trainer`); the worker processes an experiment starts must import them too, as
a user's workers import the user's own trainer package."""

from __future__ import annotations

import os

import pytest

from tests.conftest import REPO


@pytest.fixture(autouse=True)
def tests_importable_by_workers(monkeypatch):
    paths = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(dict.fromkeys(paths)))
