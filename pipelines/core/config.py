"""Configuration: named stacks in `cdl.yaml`, overridden by `CDL_*` environment variables.

The file is found from `CDL_CONFIG`, else by walking up from the working directory. The stack is
`CDL_STACK`, else the file's `default_stack`. Any field of the selected stack can be overridden by
an environment variable named after its path with `__` between levels, for example
`CDL_POSTGRES__PORT=5544` or `CDL_POSTGRES__DSN=postgresql://...`; values are read as YAML
scalars. Relative paths in the file are relative to the file's folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pipelines.core.durations import parse_duration
from pipelines.core.errors import ConfigError
from pipelines.plugins import engines

CONFIG_FILE = "cdl.yaml"
ENV_PREFIX = "CDL_"
ENV_CONFIG = "CDL_CONFIG"
ENV_STACK = "CDL_STACK"
CHECKOUT = Path(__file__).resolve().parents[2]  # the CDL source tree (an editable install)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Databases(_Strict):
    """Names of the databases the platform keeps in its Postgres."""

    platform: str = "cdl"
    mlflow: str = "mlflow"
    label_studio: str = "label_studio"
    search: str = "optuna"


class PostgresConfig(_Strict):
    """Either an embedded cluster under the stack home (no `dsn`) or an external server (`dsn`)."""

    dsn: str | None = Field(
        None, description="external Postgres, e.g. postgresql://user:pw@host:5432/cdl"
    )
    port: int = Field(0, ge=0, le=65535, description="embedded cluster port; 0 picks a free one")
    user: str = Field("cdl", min_length=1, description="embedded cluster superuser")
    databases: Databases = Databases()


class Subscriber(_Strict):
    """Who hears about events: the console, a webhook URL or a command."""

    name: str = Field(min_length=1)
    kind: Literal["console", "webhook", "command"]
    events: list[str] = Field(default_factory=lambda: ["*"], description="glob patterns of types")
    url: str | None = None
    headers: dict[str, str] = Field(
        default_factory=dict, description="webhook headers; ${VAR} is read from the environment"
    )
    command: str | None = None
    timeout_s: float = Field(10.0, gt=0)
    retries: int = Field(5, ge=0, description="extra attempts after a failed delivery")
    backoff_s: float = Field(1.0, ge=0, description="first retry delay; doubles each attempt")

    @model_validator(mode="after")
    def _target_present(self) -> "Subscriber":
        if self.kind == "webhook" and not self.url:
            raise ValueError("a webhook subscriber needs 'url'")
        if self.kind == "webhook" and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"webhook url must start with http:// or https://, got {self.url!r}")
        if self.kind == "command" and not self.command:
            raise ValueError("a command subscriber needs 'command'")
        return self


class EventsConfig(_Strict):
    subscribers: list[Subscriber] = Field(
        default_factory=lambda: [Subscriber(name="console", kind="console")]
    )

    @model_validator(mode="after")
    def _unique_names(self) -> "EventsConfig":
        names = [s.name for s in self.subscribers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"subscriber names must be unique, repeated: {', '.join(duplicates)}")
        return self


class ObjectStoreConfig(_Strict):
    """Where file bytes of data commits are kept, addressed by sha256."""

    kind: Literal[engines("object_store")] = "local"
    path: Path | None = Field(None, description="local: the folder; default <home>/objects")
    bucket: str | None = Field(None, description="s3: the bucket (credentials: AWS_* env)")
    prefix: str = Field("cdl-objects", description="s3: key prefix inside the bucket")
    endpoint_url: str | None = Field(None, description="s3: e.g. a MinIO URL; default AWS")

    @model_validator(mode="after")
    def _bucket_for_s3(self) -> "ObjectStoreConfig":
        if self.kind == "s3" and not self.bucket:
            raise ValueError("an s3 object store needs 'bucket'")
        return self


class DataConfig(_Strict):
    """Which engine holds versioned data and runs pipelines."""

    engine: Literal[engines("data")] = Field(
        "local", description="local: repos in Postgres + object store; pachyderm: a pachd"
    )
    pachd_address: str = Field("grpc://localhost:30650", description="with engine: pachyderm")
    datum_timeout: str = Field(
        "1h",
        description="local engine: how long a datum may run when its spec sets no "
        "datum_timeout (a Go duration: 30s, 5m, 1h30m), so that one hung datum cannot hold "
        "its pipeline for ever",
    )
    job_slots: int = Field(
        4,
        ge=1,
        description="local engine: how many jobs (of different pipelines) the worker runs at "
        "once, so that one slow pipeline cannot hold up the others",
    )

    @field_validator("datum_timeout")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration(value)
        return value


class TrackingConfig(_Strict):
    """MLflow: experiment tracking and the model registry."""

    uri: str | None = Field(
        None,
        description="an MLflow tracking server, e.g. http://mlflow:5000; default: the stack's "
        "'mlflow' Postgres database",
    )
    artifacts: str | None = Field(
        None,
        description="where new experiments keep their artifacts: a folder or an s3:// URI; "
        "default <home>/artifacts (with a tracking server: the server's default)",
    )


class ExperimentsConfig(_Strict):
    """Which engine runs hyperparameter searches and training (`cdl experiment`)."""

    engine: Literal[engines("experiments")] = Field(
        "local",
        description="local: Optuna workers on this stack's Postgres (more can join from other "
        "machines with 'cdl experiment worker'); determined: a Determined master",
    )
    determined_master: str = Field(
        "http://localhost:8080",
        description="with engine: determined, the master's URL; its credentials come from the "
        "environment (DET_USER and DET_PASS, or DET_USER and DET_USER_TOKEN) or from "
        "'det user login', never from cdl.yaml",
    )

    @field_validator("determined_master")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"determined_master must be an http(s):// URL, got {value!r}")
        if "@" in value.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError("determined_master must not hold credentials: use DET_USER/DET_PASS")
        return value.rstrip("/")


class StackConfig(_Strict):
    home: Path = Field(Path(".cdl"), description="where the stack keeps its state, logs and venvs")
    postgres: PostgresConfig = PostgresConfig()
    object_store: ObjectStoreConfig = ObjectStoreConfig()
    data: DataConfig = DataConfig()
    tracking: TrackingConfig = TrackingConfig()
    experiments: ExperimentsConfig = ExperimentsConfig()
    events: EventsConfig = EventsConfig()


class ConfigFile(_Strict):
    default_stack: str = "local"
    stacks: dict[str, StackConfig] = Field(default_factory=lambda: {"local": StackConfig()})


@dataclass(frozen=True)
class Settings:
    """The resolved configuration one command runs with."""

    stack_name: str
    stack: StackConfig
    config_path: Path | None  # None: no cdl.yaml was found, defaults apply
    root: Path  # the folder of cdl.yaml (or the working directory); relative paths start here
    overrides: tuple[str, ...]  # the CDL_* variables that changed a field

    @property
    def home(self) -> Path:
        return self.stack.home

    @property
    def venvs(self) -> Path:
        """The Label Studio and serving environments `make setup` made in the CDL checkout
        (shared by every project and stack); CDL_VENVS points elsewhere."""
        return Path(os.environ.get("CDL_VENVS") or CHECKOUT / ".cdl" / "venvs")


def find_config_file(environ: Mapping[str, str], cwd: Path) -> Path | None:
    explicit = environ.get(ENV_CONFIG)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"{ENV_CONFIG} points to {path}, which is not a file",
                f"set {ENV_CONFIG} to the path of a cdl.yaml or unset it",
            )
        return path.resolve()
    for folder in [cwd, *cwd.parents]:
        candidate = folder / CONFIG_FILE
        if candidate.is_file():
            return candidate
    return None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}", "make it a readable UTF-8 file") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        reason = getattr(exc, "problem", None) or exc
        raise ConfigError(
            f"{path}{line}: invalid YAML: {reason}", f"fix the YAML in {path}"
        ) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping, got {type(data).__name__}",
            "start the file with 'default_stack:' and 'stacks:'",
        )
    return data


def _env_overrides(environ: Mapping[str, str]) -> dict[tuple[str, ...], tuple[str, Any]]:
    """CDL_A__B=value -> {("a", "b"): ("CDL_A__B", value)} for top-level fields of a stack."""
    fields = set(StackConfig.model_fields)
    found = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in (ENV_CONFIG, ENV_STACK):
            continue
        path = tuple(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
        if path[0] not in fields:  # other CDL_ variables (e.g. for event commands) are not config
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        found[path] = (name, value)
    return found


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any, source: str) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(
                f"{source} sets a field inside '{part}', which is not a mapping",
                f"unset {source}",
            )
        node = child
    node[path[-1]] = value


def _explain(exc: ValidationError, file: str, env_paths: dict[tuple, str], field_prefix: str = ""):
    """One line naming every invalid field, and where it came from (the file or a CDL_ variable)."""
    problems, fixes = [], set()
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        env_name = next((n for path, n in env_paths.items() if loc[: len(path)] == path), None)
        field = field_prefix + ".".join(loc) if loc else "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        if env_name:
            problems.append(f"{env_name} ({field}): {msg}")
            fixes.add(f"fix or unset {env_name}")
        else:
            problems.append(f"{file}: {field}: {msg}")
            fixes.add(f"edit {file}")
    return "; ".join(problems), "; ".join(sorted(fixes))


def load_settings(
    config_path: Path | None = None,
    stack: str | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Settings:
    environ = os.environ if environ is None else environ
    cwd = (cwd or Path.cwd()).resolve()
    path = config_path.resolve() if config_path else find_config_file(environ, cwd)
    raw = _read_yaml(path) if path else {}
    root = path.parent if path else cwd
    file_label = str(path) if path else "defaults"

    try:
        top = ConfigFile.model_validate({k: v for k, v in raw.items() if k != "stacks"})
    except ValidationError as exc:
        problem, fix = _explain(exc, file_label, {})
        raise ConfigError(problem, fix) from exc
    stacks_raw = raw.get("stacks", {"local": {}})
    if not isinstance(stacks_raw, dict) or not stacks_raw:
        raise ConfigError(
            f"{file_label}: 'stacks' must be a non-empty mapping of named stacks",
            f"edit {file_label}",
        )

    name = stack or environ.get(ENV_STACK) or top.default_stack
    if name not in stacks_raw:
        source = "--stack" if stack else ENV_STACK if environ.get(ENV_STACK) else "default_stack"
        raise ConfigError(
            f"stack '{name}' (from {source}) is not defined in {file_label}; "
            f"defined: {', '.join(stacks_raw)}",
            f"use one of the defined stacks or add '{name}' under 'stacks:'",
        )
    stack_raw = stacks_raw[name] or {}
    if not isinstance(stack_raw, dict):
        raise ConfigError(f"{file_label}: stacks.{name} must be a mapping", f"edit {file_label}")

    overrides = _env_overrides(environ)
    merged = yaml.safe_load(yaml.safe_dump(stack_raw))  # deep copy
    for field_path, (env_name, value) in overrides.items():
        _set_path(merged, field_path, value, env_name)
    try:
        stack_config = StackConfig.model_validate(merged)
    except ValidationError as exc:
        env_paths = {p: n for p, (n, _) in overrides.items()}
        problem, fix = _explain(exc, file_label, env_paths, f"stacks.{name}.")
        raise ConfigError(problem, fix) from exc

    def absolute(path: Path) -> Path:
        path = path.expanduser()
        return (path if path.is_absolute() else root / path).absolute()

    home = absolute(stack_config.home)
    objects = stack_config.object_store.path
    artifacts = stack_config.tracking.artifacts
    if artifacts and "://" not in artifacts:
        artifacts = str(absolute(Path(artifacts)))
    elif not artifacts and not stack_config.tracking.uri:
        artifacts = str(home / "artifacts")
    stack_config = stack_config.model_copy(
        update={
            "home": home,
            "object_store": stack_config.object_store.model_copy(
                update={"path": absolute(objects) if objects else home / "objects"}
            ),
            "tracking": stack_config.tracking.model_copy(update={"artifacts": artifacts}),
        }
    )
    return Settings(
        stack_name=name,
        stack=stack_config,
        config_path=path,
        root=root,
        overrides=tuple(sorted(n for n, _ in overrides.values())),
    )
