import json
from pathlib import Path

import pytest
import yaml

from pipelines.core.config import load_settings
from pipelines.core.errors import ConfigError
from tests.conftest import REPO, cdl


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "cdl.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_repository_config_is_valid_and_defaults_to_local():
    settings = load_settings(REPO / "cdl.yaml", environ={})
    assert settings.stack_name == "local"
    assert settings.home == REPO / ".cdl"
    assert settings.stack.postgres.dsn is None
    assert [s.kind for s in settings.stack.events.subscribers] == ["console"]


def test_no_file_gives_defaults_in_working_directory(tmp_path):
    settings = load_settings(environ={}, cwd=tmp_path)
    assert settings.config_path is None
    assert settings.home == tmp_path / ".cdl"
    assert settings.stack.postgres.port == 0


def test_file_is_found_in_a_parent_folder(tmp_path):
    write(tmp_path, {"stacks": {"local": {"home": "state"}}})
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    settings = load_settings(environ={}, cwd=nested)
    assert settings.config_path == tmp_path / "cdl.yaml"
    assert settings.home == tmp_path / "state"  # relative to the file, not the working dir


def test_stack_selection_by_argument_and_environment(tmp_path):
    path = write(
        tmp_path,
        {
            "default_stack": "a",
            "stacks": {"a": {"postgres": {"port": 5001}}, "b": {"postgres": {"port": 5002}}},
        },
    )
    assert load_settings(path, environ={}).stack.postgres.port == 5001
    assert load_settings(path, environ={"CDL_STACK": "b"}).stack.postgres.port == 5002
    assert load_settings(path, stack="a", environ={"CDL_STACK": "b"}).stack_name == "a"


def test_environment_overrides_nested_fields_with_yaml_values(tmp_path):
    path = write(tmp_path, {"stacks": {"local": {}}})
    settings = load_settings(
        path,
        environ={
            "CDL_POSTGRES__PORT": "5544",
            "CDL_POSTGRES__DATABASES__MLFLOW": "tracking",
            "CDL_HOME": "/srv/cdl",
            "CDL_EVENT_TYPE": "not config",  # other CDL_ variables are ignored
        },
    )
    assert settings.stack.postgres.port == 5544
    assert settings.stack.postgres.databases.mlflow == "tracking"
    assert settings.home == Path("/srv/cdl")
    assert settings.overrides == (
        "CDL_HOME",
        "CDL_POSTGRES__DATABASES__MLFLOW",
        "CDL_POSTGRES__PORT",
    )


def test_unknown_field_is_named_with_its_path(tmp_path):
    path = write(tmp_path, {"stacks": {"local": {"postgres": {"prot": 5432}}}})
    with pytest.raises(ConfigError) as err:
        load_settings(path, environ={})
    assert f"{path}: stacks.local.postgres.prot: unknown field" in str(err.value)
    assert f"edit {path}" in err.value.fix


def test_bad_environment_value_names_the_variable(tmp_path):
    path = write(tmp_path, {"stacks": {"local": {}}})
    with pytest.raises(ConfigError) as err:
        load_settings(path, environ={"CDL_POSTGRES__PORT": "99999"})
    message = str(err.value)
    assert "CDL_POSTGRES__PORT (stacks.local.postgres.port)" in message
    assert "less than or equal to 65535" in message
    assert err.value.fix == "fix or unset CDL_POSTGRES__PORT"


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "stacks:\n  local:\n    home: [unclosed\n")
    with pytest.raises(ConfigError, match=r"line \d+: invalid YAML"):
        load_settings(path, environ={})


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_settings(write(tmp_path, "- a\n- b\n"), environ={})


def test_unknown_stack_lists_the_defined_ones(tmp_path):
    path = write(tmp_path, {"stacks": {"local": {}, "shared": {}}})
    with pytest.raises(ConfigError) as err:
        load_settings(path, environ={"CDL_STACK": "prod"})
    assert "stack 'prod' (from CDL_STACK) is not defined" in str(err.value)
    assert "defined: local, shared" in str(err.value)


@pytest.mark.parametrize(
    "subscriber, message",
    [
        ({"name": "w", "kind": "webhook"}, "a webhook subscriber needs 'url'"),
        ({"name": "w", "kind": "webhook", "url": "ftp://x"}, "must start with http://"),
        ({"name": "c", "kind": "command"}, "a command subscriber needs 'command'"),
        ({"name": "c", "kind": "pager"}, "stacks.local.events.subscribers.0.kind"),
    ],
)
def test_subscriber_errors(tmp_path, subscriber, message):
    path = write(tmp_path, {"stacks": {"local": {"events": {"subscribers": [subscriber]}}}})
    with pytest.raises(ConfigError, match=message):
        load_settings(path, environ={})


def test_duplicate_subscriber_names(tmp_path):
    subs = [{"name": "x", "kind": "console"}, {"name": "x", "kind": "console"}]
    path = write(tmp_path, {"stacks": {"local": {"events": {"subscribers": subs}}}})
    with pytest.raises(ConfigError, match="repeated: x"):
        load_settings(path, environ={})


def test_cdl_config_pointing_nowhere(tmp_path):
    with pytest.raises(ConfigError, match="CDL_CONFIG points to"):
        load_settings(environ={"CDL_CONFIG": str(tmp_path / "missing.yaml")}, cwd=tmp_path)


def test_cli_prints_one_line_error_for_a_bad_config(tmp_path):
    write(tmp_path, {"stacks": {"local": {"postgres": {"port": "many"}}}})
    result = cdl("config", "show", cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "stacks.local.postgres.port" in lines[0] and "fix: edit" in lines[0]
    assert "Traceback" not in result.stderr


def test_cli_config_show_masks_passwords(tmp_path):
    write(tmp_path, {"stacks": {"local": {}}})
    result = cdl(
        "config",
        "show",
        "--json",
        cwd=tmp_path,
        env={"CDL_POSTGRES__DSN": "postgresql://u:s3cret@db.example:5432/cdl"},
    )
    assert result.returncode == 0, result.stderr
    assert "s3cret" not in result.stdout
    shown = json.loads(result.stdout)
    assert shown["settings"]["postgres"]["dsn"] == "postgresql://u:***@db.example:5432/cdl"
    assert shown["overridden_by"] == ["CDL_POSTGRES__DSN"]
    assert shown["stack"] == "local"


def test_s3_object_store_needs_a_bucket(tmp_path):
    path = write(tmp_path, {"stacks": {"local": {"object_store": {"kind": "s3"}}}})
    with pytest.raises(ConfigError, match="stacks.local.object_store: an s3 object store needs"):
        load_settings(path, environ={})
    settings = load_settings(path, environ={"CDL_OBJECT_STORE__BUCKET": "team-data"})
    assert settings.stack.object_store.bucket == "team-data"


def test_tracking_defaults_to_the_stack_and_resolves_artifact_folders(tmp_path):
    settings = load_settings(write(tmp_path, {"stacks": {"local": {"home": "state"}}}), environ={})
    assert settings.stack.tracking.uri is None
    assert settings.stack.tracking.artifacts == str(tmp_path / "state" / "artifacts")
    relative = {"stacks": {"local": {"tracking": {"artifacts": "runs"}}}}
    settings = load_settings(write(tmp_path, relative), environ={})
    assert settings.stack.tracking.artifacts == str(tmp_path / "runs")
    server = load_settings(
        write(tmp_path, {"stacks": {"local": {}}}),
        environ={
            "CDL_TRACKING__URI": "http://mlflow:5000",
            "CDL_TRACKING__ARTIFACTS": "s3://models/mlflow",
        },
    )
    assert server.stack.tracking.uri == "http://mlflow:5000"
    assert server.stack.tracking.artifacts == "s3://models/mlflow"
    default_server = load_settings(
        write(tmp_path, {"stacks": {"local": {"tracking": {"uri": "http://mlflow:5000"}}}}),
        environ={},
    )
    assert default_server.stack.tracking.artifacts is None  # the server's own default


def test_config_show_masks_tracking_credentials(tmp_path):
    write(tmp_path, {"stacks": {"local": {"tracking": {"uri": "http://ci:s3cret@mlflow:5000"}}}})
    shown = cdl("config", "show", "--json", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "s3cret" not in shown.stdout
    assert json.loads(shown.stdout)["settings"]["tracking"]["uri"] == "http://ci:***@mlflow:5000"
