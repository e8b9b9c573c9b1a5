"""Pipeline specs in the Pachyderm pipeline-spec format (JSON or YAML).

The fields the local engine runs are modelled and validated here; fields that only matter on a
Kubernetes cluster (pod patches, autoscaling, ...) are accepted and passed on to Pachyderm, and
anything else is an error naming the field, so a typo never silently changes what runs.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipelines.core.errors import Invalid

NAME = re.compile(r"^[a-zA-Z0-9_-]{1,63}$")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PipelineName(_Spec):
    name: str
    project: dict[str, Any] | None = None  # Pachyderm 2.5+ projects; ignored locally

    @field_validator("name")
    @classmethod
    def _valid(cls, value: str) -> str:
        if not NAME.match(value):
            raise ValueError("use 1-63 letters, digits, '-' or '_'")
        return value


class Transform(_Spec):
    cmd: list[str] = Field(min_length=1)
    stdin: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    image: str | None = None  # the container image on Pachyderm; locally the spec's folder
    working_dir: str | None = None  # in the image; locally only when inside /pfs
    accept_return_code: list[int] = Field(default_factory=list)
    datum_batching: bool = False  # start once per worker, ask for datums: see batching.py
    # Cluster-only, passed on to Pachyderm:
    user: str | None = None
    secrets: list[dict[str, Any]] = Field(default_factory=list)
    image_pull_secrets: list[str] = Field(default_factory=list)
    err_cmd: list[str] = Field(default_factory=list)
    err_stdin: list[str] = Field(default_factory=list)


def check_glob(glob: str) -> str:
    if not glob.startswith("/"):
        raise ValueError(f"glob {glob!r} must start with '/', e.g. '/*' or '/'")
    depth = 0
    for char in glob:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if depth < 0 or depth > 1:
            raise ValueError(f"glob {glob!r} has unbalanced brackets")
    if depth:
        raise ValueError(f"glob {glob!r} has an unclosed '['")
    if "{" in glob or "}" in glob:
        raise ValueError(f"glob {glob!r}: alternatives {{a,b}} are not supported, use a union")
    return glob


class PFSInput(_Spec):
    repo: str
    glob: str
    branch: str = "master"
    name: str | None = None  # default: the repo name
    join_on: str | None = None
    outer_join: bool = False
    lazy: bool = False  # a cluster-side mount option
    empty_files: bool = False
    s3: bool = False
    repo_type: str | None = None
    project: str | None = None

    @field_validator("glob")
    @classmethod
    def _glob(cls, value: str) -> str:
        return check_glob(value)

    @property
    def input_name(self) -> str:
        return self.name or self.repo


class Input(_Spec):
    pfs: PFSInput | None = None
    cross: list["Input"] | None = None
    union: list["Input"] | None = None
    join: list["Input"] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "Input":
        kinds = [k for k in ("pfs", "cross", "union", "join") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(
                "an input is exactly one of pfs, cross, union, join"
                + (f"; got {', '.join(kinds)}" if kinds else "")
            )
        for kind in ("cross", "union", "join"):
            if getattr(self, kind) is not None and len(getattr(self, kind)) < 2:
                raise ValueError(f"'{kind}' needs at least two inputs")
        if self.join is not None:
            for item in self.join:
                if item.pfs is None or not item.pfs.join_on:
                    raise ValueError("every input of a join is a pfs input with 'join_on'")
        return self

    def leaves(self) -> list[PFSInput]:
        if self.pfs is not None:
            return [self.pfs]
        return [
            leaf for child in (self.cross or self.union or self.join) for leaf in child.leaves()
        ]


Input.model_rebuild()


class ParallelismSpec(_Spec):
    constant: int = Field(1, ge=1)


class PipelineSpec(_Spec):
    pipeline: PipelineName
    transform: Transform
    input: Input
    description: str = ""
    parallelism_spec: ParallelismSpec = ParallelismSpec()
    datum_tries: int = Field(3, ge=1)
    datum_timeout: str | None = None  # Go duration, e.g. "30s", "5m"
    output_branch: str = "master"
    resource_requests: dict[str, Any] | None = None
    # Cluster-only, passed on to Pachyderm:
    resource_limits: dict[str, Any] | None = None
    sidecar_resource_limits: dict[str, Any] | None = None
    autoscaling: bool | None = None
    job_timeout: str | None = None
    scheduling_spec: dict[str, Any] | None = None
    pod_spec: str | None = None
    pod_patch: str | None = None
    tolerations: list[dict[str, Any]] | None = None
    metadata: dict[str, Any] | None = None
    reprocess_spec: Literal["until_success", "every_job"] | None = None

    @model_validator(mode="after")
    def _names(self) -> "PipelineSpec":
        names = [leaf.input_name for leaf in self.input.leaves()]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(
                f"input names must be unique, repeated: {', '.join(repeated)} "
                "(give each pfs input a 'name')"
            )
        if self.pipeline.name in {leaf.repo for leaf in self.input.leaves()}:
            raise ValueError("a pipeline cannot read its own output repo")
        if self.datum_timeout is not None:
            parse_duration(self.datum_timeout)
        return self

    @property
    def name(self) -> str:
        return self.pipeline.name

    def canonical(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True, exclude_defaults=True)

    def version_hash(self, code_hash: str = "", salt: str = "") -> str:
        """What decides whether a datum's earlier output can be reused: the transform and the
        inputs' shape (not parallelism or descriptions), the code it runs, and a salt that
        `update --reprocess` changes."""
        relevant = {
            # how datums reach the code, not what it computes (like parallelism)
            "transform": self.transform.model_dump(mode="json", exclude={"datum_batching"}),
            "input": self.input.model_dump(mode="json", exclude_none=True),
            "code": code_hash,
            "salt": salt,
        }
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def parse_duration(text: str) -> float:
    """A Go duration ('1h30m', '45s', '500ms') in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"duration {text!r} is not like '30s', '5m' or '1h30m'")
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


def load_spec(path: Path) -> PipelineSpec:
    """Read and validate a spec file; errors name the file and the field."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise Invalid(f"cannot read pipeline spec {path}: {exc}", "check the -f path") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise Invalid(f"{path}: not valid {path.suffix.lstrip('.') or 'YAML'}: {exc}") from exc
    return parse_spec(data, str(path))


def parse_spec(data: Any, source: str = "spec") -> PipelineSpec:
    if not isinstance(data, dict):
        raise Invalid(
            f"{source}: a pipeline spec is a mapping with 'pipeline', 'transform', 'input'"
        )
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "(top level)"
            message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{field}: {message.removeprefix('Value error, ')}")
        raise Invalid(f"{source}: " + "; ".join(problems), "fix the spec") from exc
