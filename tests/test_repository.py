"""The repository itself: CI files, manifests, lint, and no secrets or machine paths."""

import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO

BIN = Path(sys.executable).parent


def run(*argv):
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True)


def test_gitlab_ci_file_is_valid():
    result = run(
        str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.gitlab-ci", ".gitlab-ci.yml"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    pipeline = yaml.safe_load((REPO / ".gitlab-ci.yml").read_text())
    assert pipeline["stages"][0] == "test"
    assert pipeline["test"]["script"] == ["make test"]


def test_ci_entry_point_runs_the_readme_test_command():
    assert "make test" in (REPO / ".ci" / "run").read_text()
    assert "make test" in (REPO / "README.md").read_text()


def test_manifests_parse_and_keep_secrets_out():
    for path in (REPO / "manifests").glob("*.yaml"):
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert documents, path
        for doc in documents:
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
        assert "password:" not in path.read_text().replace("key: password", ""), path


def test_lint_and_format():
    check = run(str(BIN / "ruff"), "check", "pipelines", "tests", "bench")
    assert check.returncode == 0, check.stdout
    fmt = run(str(BIN / "ruff"), "format", "--check", "pipelines", "tests", "bench")
    assert fmt.returncode == 0, fmt.stdout


def test_no_machine_specific_paths_in_tracked_files():
    files = run("git", "ls-files").stdout.split()
    offenders = []
    for name in files:
        if name.startswith("tests/") or name.endswith("-constraints.txt"):
            continue
        text = (REPO / name).read_text(errors="replace")
        if "/work/" in text or "/root/" in text or "/home/" in text:
            offenders.append(name)
    assert offenders == []


def test_tests_mirror_the_package():
    """Each package of `pipelines` with code has its tests in the folder of the same name."""
    for package in (REPO / "pipelines").iterdir():
        modules = [p for p in package.rglob("*.py") if p.name != "__init__.py"]
        if package.is_dir() and modules:
            assert list((REPO / "tests" / package.name).glob("test_*.py")), package.name


def test_layers_point_one_way():
    """cli -> deploy -> model -> data -> core: no module imports a layer above its own."""
    layers = ["core", "data", "model", "deploy", "cli"]
    for below, layer in enumerate(layers):
        above = tuple(f"pipelines.{name}" for name in layers[below + 1 :])
        for path in (REPO / "pipelines" / layer).rglob("*.py"):
            for line in path.read_text().splitlines():
                words = line.split()
                if words[:1] in (["import"], ["from"]) and words[1].startswith(above):
                    raise AssertionError(f"{path.relative_to(REPO)} imports upward: {line}")
