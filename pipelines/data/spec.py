"""Pipeline specs in the Pachyderm pipeline-spec format (JSON or YAML).

Every field of pachd's CreatePipelineRequest is modelled and validated here, in snake_case or
camelCase at every level (pachctl accepts both); anything else is an error naming the field as
written, so a typo never silently changes what runs. A file may hold several specs, as
`pachctl create pipeline -f` reads them: a stream of JSON objects, or YAML documents separated by
`---`. Globs may omit the leading '/' ('*' is '/*'), as on Pachyderm.

Inputs are pfs, cross, union, join, group and cron (see datums.py for their datums); a spout
pipeline has no input. Input names follow pachd's rule: unique, except that the inputs of a union
may share one (each union datum mounts under that name). A cron input reads the repo
`<pipeline>_<name>` unless it names one.

Fields that only matter on a Kubernetes cluster (resources, pod patches, egress, secrets,
autoscaling, ...) are kept and sent to pachd; `ignored_locally` lists those a spec sets, which
the local engine reports once when the pipeline is created.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from pipelines.core.durations import parse_duration
from pipelines.core.errors import Invalid
from pipelines.data.schedule import parse_cron

NAME = re.compile(r"^[a-zA-Z0-9_-]{1,63}$")
INPUT_KINDS = ("pfs", "cross", "union", "join", "group", "cron")

# What the local engine does not do; each is kept and sent to pachd.
CLUSTER_ONLY = (
    "resource_requests",
    "resource_limits",
    "sidecar_resource_limits",
    "sidecar_resource_requests",
    "egress",
    "s3_out",
    "autoscaling",
    "scheduling_spec",
    "pod_spec",
    "pod_patch",
    "tolerations",
    "metadata",
    "datum_set_spec",
    "tf_job",
    "job_timeout",
    "salt",
    "update",
    "reprocess",
    "dry_run",
    "spec_commit",
    "determined",
    "maximum_expected_uptime",
    "max_queue_size",
)
TRANSFORM_CLUSTER_ONLY = (
    "user",
    "secrets",
    "image_pull_secrets",
    "err_cmd",
    "err_stdin",
    "debug",
    "dockerfile",
    "memory_volume",
)
PFS_CLUSTER_ONLY = ("lazy", "empty_files", "s3", "trigger", "commit", "propagation_spec")
# The transform fields that made a pipeline's version before the cluster-only ones were
# modelled: adding a field must not make every datum of existing pipelines run again.
HASHED_TRANSFORM = {
    "cmd",
    "stdin",
    "env",
    "image",
    "working_dir",
    "accept_return_code",
    "user",
    "secrets",
    "image_pull_secrets",
    "err_cmd",
    "err_stdin",
}


class _Spec(BaseModel):
    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, validate_by_name=True, validate_by_alias=True
    )


class Project(_Spec):
    name: str


class PipelineName(_Spec):
    name: str
    project: Project | None = None  # Pachyderm 2.5+ projects; ignored locally

    @field_validator("name")
    @classmethod
    def _valid(cls, value: str) -> str:
        if not NAME.match(value):
            raise ValueError("use 1-63 letters, digits, '-' or '_'")
        return value


class SecretMount(_Spec):
    name: str
    key: str | None = None
    mount_path: str | None = None
    env_var: str | None = None


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
    secrets: list[SecretMount] = Field(default_factory=list)
    image_pull_secrets: list[str] = Field(default_factory=list)
    err_cmd: list[str] = Field(default_factory=list)
    err_stdin: list[str] = Field(default_factory=list)
    debug: bool | None = None
    dockerfile: str | None = None
    memory_volume: bool | None = None


def check_glob(glob: str) -> str:
    """The glob with its leading '/' (Pachyderm reads '*' as '/*'), or ValueError."""
    glob = glob if glob.startswith("/") else "/" + glob
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


class Trigger(_Spec):
    branch: str | None = None
    all: bool | None = None
    rate_limit_spec: str | None = None
    size: str | None = None
    cron_spec: str | None = None
    commits: int | None = None


class PFSInput(_Spec):
    repo: str
    glob: str
    branch: str = "master"
    name: str | None = None  # default: the repo name
    join_on: str | None = None
    outer_join: bool = False
    group_by: str | None = None
    lazy: bool = False  # a cluster-side mount option
    empty_files: bool = False
    s3: bool = False
    repo_type: str | None = None
    project: str | None = None
    commit: str | None = None
    trigger: Trigger | None = None
    propagation_spec: dict[str, Any] | None = None
    reference: bool | None = None

    @field_validator("glob")
    @classmethod
    def _glob(cls, value: str) -> str:
        return check_glob(value)

    @property
    def input_name(self) -> str:
        return self.name or self.repo

    @property
    def ref(self) -> str:
        return f"{self.repo}@{self.branch}"


class CronInput(_Spec):
    name: str
    spec: str
    repo: str | None = None  # default: <pipeline>_<name>, set by PipelineSpec
    overwrite: bool = False  # each tick commit holds only the newest tick file
    start: datetime | None = None  # the first tick is the first due time after it
    project: str | None = None
    commit: str | None = None

    @field_validator("spec")
    @classmethod
    def _schedule(cls, value: str) -> str:
        parse_cron(value)
        return value

    @field_validator("start")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return value.replace(tzinfo=timezone.utc) if value and value.tzinfo is None else value

    def as_pfs(self) -> PFSInput:
        """What a job reads: one datum per tick file, mounted under the input's name."""
        return PFSInput(repo=self.repo or self.name, glob="/*", name=self.name)


class Input(_Spec):
    pfs: PFSInput | None = None
    cross: list["Input"] | None = None
    union: list["Input"] | None = None
    join: list["Input"] | None = None
    group: list["Input"] | None = None
    cron: CronInput | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "Input":
        kinds = [k for k in INPUT_KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(
                f"an input is exactly one of {', '.join(INPUT_KINDS)}"
                + (f"; got {', '.join(kinds)}" if kinds else "")
            )
        if kinds[0] not in ("pfs", "cron") and not self.children:
            raise ValueError(f"'{kinds[0]}' needs at least one input")
        for kind, key in (("join", "join_on"), ("group", "group_by")):
            for item in getattr(self, kind) or []:
                if item.pfs is None or not getattr(item.pfs, key):
                    raise ValueError(f"every input of a {kind} is a pfs input with '{key}'")
        return self

    @property
    def children(self) -> list["Input"]:
        for kind in ("cross", "union", "join", "group"):
            if getattr(self, kind) is not None:
                return getattr(self, kind)
        return []

    def walk(self) -> Iterator["Input"]:
        yield self
        for child in self.children:
            yield from child.walk()

    def leaves(self) -> list[PFSInput]:
        """The pfs inputs (a cron input as the pfs input of its tick repo), in order."""
        if self.pfs is not None:
            return [self.pfs]
        if self.cron is not None:
            return [self.cron.as_pfs()]
        return [leaf for child in self.children for leaf in child.leaves()]


Input.model_rebuild()


def check_names(node: Input, names: set[str]) -> None:
    """pachd's rule: input names are unique, except among the inputs of a union (a union datum
    comes from one of them); inputs crossed or joined with a union must not reuse its names."""
    if node.pfs is not None or node.cron is not None:
        name = node.pfs.input_name if node.pfs is not None else node.cron.name
        if name == "out":
            raise ValueError("no input can be named 'out': /pfs/out is the output (set 'name')")
        if name in names:
            raise ValueError(
                f"input names must be unique, repeated: {name} "
                "(give each input a 'name'; only the inputs of a union may share one)"
            )
        names.add(name)
    elif node.union is not None:
        seen: set[str] = set()
        for child in node.union:
            branch = set(names)
            check_names(child, branch)
            seen |= branch
        names |= seen
    else:
        for child in node.children:
            check_names(child, names)


class ParallelismSpec(_Spec):
    constant: int = Field(1, ge=1)


class GPUSpec(_Spec):
    type: str | None = None
    number: int | None = None


class ResourceSpec(_Spec):
    cpu: float | None = None
    memory: str | None = None
    gpu: GPUSpec | None = None
    disk: str | None = None


class Service(_Spec):
    internal_port: int | None = None
    external_port: int | None = None
    ip: str | None = None
    type: str | None = None


class Spout(_Spec):
    service: Service | None = None


class Egress(_Spec):
    url: str | None = Field(None, alias="URL")  # pachd's JSON name is URL
    object_storage: dict[str, Any] | None = None
    sql_database: dict[str, Any] | None = None


class SchedulingSpec(_Spec):
    node_selector: dict[str, str] | None = None
    priority_class_name: str | None = None


class Toleration(_Spec):
    key: str | None = None
    operator: str | None = None
    value: str | None = None
    effect: str | None = None
    toleration_seconds: int | None = None


class Metadata(_Spec):
    annotations: dict[str, str] | None = None
    labels: dict[str, str] | None = None


class DatumSetSpec(_Spec):
    number: int | None = None
    size_bytes: int | None = None
    per_worker: int | None = None


class TFJob(_Spec):
    tf_job: str | None = None


class PipelineSpec(_Spec):
    pipeline: PipelineName
    transform: Transform
    input: Input | None = None  # only a spout has none
    spout: Spout | None = None
    service: Service | None = None
    description: str = ""
    parallelism_spec: ParallelismSpec = ParallelismSpec()
    datum_tries: int = Field(3, ge=1)
    datum_timeout: str | None = None  # Go duration, e.g. "30s", "5m"
    output_branch: str = "master"
    reprocess_spec: Literal["until_success", "every_job"] | None = None
    # Cluster-only, passed on to Pachyderm:
    resource_requests: ResourceSpec | None = None
    resource_limits: ResourceSpec | None = None
    sidecar_resource_limits: ResourceSpec | None = None
    sidecar_resource_requests: ResourceSpec | None = None
    egress: Egress | None = None
    s3_out: bool = False
    autoscaling: bool | None = None
    job_timeout: str | None = None
    scheduling_spec: SchedulingSpec | None = None
    pod_spec: str | None = None
    pod_patch: str | None = None
    tolerations: list[Toleration] | None = None
    metadata: Metadata | None = None
    datum_set_spec: DatumSetSpec | None = None
    tf_job: TFJob | None = None
    salt: str | None = None
    update: bool = False
    reprocess: bool = False
    dry_run: bool = False
    spec_commit: dict[str, Any] | None = None
    determined: dict[str, Any] | None = None
    maximum_expected_uptime: str | None = None
    max_queue_size: int | None = None  # Pachyderm 1.x; pachd 2 has no such field: not sent

    @model_validator(mode="after")
    def _check(self) -> "PipelineSpec":
        if self.spout is not None and self.input is not None and self.spout.service is None:
            raise ValueError("a spout pipeline (without a service) has no 'input'")
        if self.spout is None and self.input is None:
            raise ValueError("'input' is missing (only a spout pipeline has none)")
        for node in self.input.walk() if self.input else []:
            if node.cron is not None and node.cron.repo is None:
                node.cron.repo = f"{self.name}_{node.cron.name}"
                if not NAME.match(node.cron.repo):
                    raise ValueError(
                        f"cron input '{node.cron.name}': its repo name {node.cron.repo!r} is not "
                        "1-63 letters, digits, '-' or '_' (shorten the names or set 'repo')"
                    )
        if self.input is not None:
            check_names(self.input, set())
        if self.name in {leaf.repo for leaf in self.leaves()}:
            raise ValueError("a pipeline cannot read its own output repo")
        for key in ("datum_timeout", "job_timeout", "maximum_expected_uptime"):
            if getattr(self, key) is not None:
                parse_duration(getattr(self, key))
        return self

    @property
    def name(self) -> str:
        return self.pipeline.name

    def leaves(self) -> list[PFSInput]:
        return self.input.leaves() if self.input is not None else []

    def crons(self) -> list[CronInput]:
        return [n.cron for n in self.input.walk() if n.cron] if self.input is not None else []

    def ignored_locally(self) -> list[str]:
        """The cluster-only fields this spec sets, which the local engine does not act on."""

        def set_in(model: BaseModel, keys: tuple[str, ...], prefix: str) -> list[str]:
            return [prefix + k for k in keys if getattr(model, k) not in (None, False, [], {})]

        found = set_in(self, CLUSTER_ONLY, "") + set_in(
            self.transform, TRANSFORM_CLUSTER_ONLY, "transform."
        )
        if self.spout is not None and self.spout.service is not None:
            found.append("spout.service")
        for leaf in self.leaves():
            found += [k for k in set_in(leaf, PFS_CLUSTER_ONLY, "pfs.") if k not in found]
        return found

    def canonical(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True, exclude_defaults=True)

    def version_hash(self, code_hash: str = "", salt: str = "") -> str:
        """What decides whether a datum's earlier output can be reused: the transform and the
        inputs' shape (not parallelism or descriptions), the code it runs, and a salt that
        `update --reprocess` changes."""
        relevant = {
            "transform": self.transform.model_dump(mode="json", include=HASHED_TRANSFORM),
            "input": self.input.model_dump(mode="json", exclude_none=True) if self.input else None,
            "code": code_hash,
            "salt": salt,
        }
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def load_specs(path: Path) -> list[PipelineSpec]:
    """Every spec of a file, in order (a JSON stream or YAML documents); errors name the file,
    the spec and the field."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise Invalid(f"cannot read pipeline spec {path}: {exc}", "check the -f path") from exc
    # As pachctl: JSON when the file is .json or starts with '{', YAML otherwise.
    as_json = path.suffix == ".json" or text.lstrip().startswith("{")
    try:
        documents = _json_stream(text) if as_json else list(yaml.safe_load_all(text))
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise Invalid(f"{path}: not valid {'json' if as_json else 'YAML'}: {exc}") from exc
    documents = [d for d in documents if d is not None]  # e.g. a trailing '---'
    if not documents:
        raise Invalid(f"{path} holds no pipeline spec", "write one: pipeline, transform, input")
    many = len(documents) > 1
    specs = [
        parse_spec(data, f"{path} (spec {i} of {len(documents)})" if many else str(path))
        for i, data in enumerate(documents, 1)
    ]
    names = [s.name for s in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise Invalid(
            f"{path}: pipeline {', '.join(repeated)} is specified more than once",
            "give each spec of the file its own pipeline.name",
        )
    return specs


def load_spec(path: Path) -> PipelineSpec:
    """The one spec of a file; a file with several is an error."""
    specs = load_specs(path)
    if len(specs) > 1:
        raise Invalid(
            f"{path} holds {len(specs)} pipeline specs where one is expected",
            "split the file, or create them all with 'cdl data pipeline create -f'",
        )
    return specs[0]


def _json_stream(text: str) -> list[Any]:
    """Concatenated JSON values with whitespace between, as `pachctl create pipeline` reads."""
    decoder, documents, at = json.JSONDecoder(), [], 0
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at == len(text):
            return documents
        value, at = decoder.raw_decode(text, at)
        documents.append(value)


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
            # Locations are the keys as written (snake_case or camelCase).
            field = ".".join(str(p) for p in err["loc"]) or "(top level)"
            message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{field}: {message.removeprefix('Value error, ')}")
        raise Invalid(f"{source}: " + "; ".join(problems), "fix the spec") from exc
