"""Experiment specs in Determined's experiment-config format (0.38), so that the same file runs
locally and is accepted by a Determined master (`det experiment create FILE DIR`).

A use case keeps its specs in `use_cases/<name>/model/*.yaml`. Every top-level field of
Determined 0.38's config is modelled here with its sections' fields and types (CDL's own model of
the schema in Determined's `schemas/expconf/v0/`, which the `determined` wheel does not ship;
only the legacy `tensorboard_storage`, `security` and `internal` are kept as written); anything
else is an error naming the field and the fields allowed there, as the master would reject it.

- `hyperparameters` is a tree: a leaf is `{type: const|int|double|log|categorical, ...}` or a
  plain value (shorthand for a const); a mapping without `type` nests hyperparameters.
  `search_space` flattens it to dotted names.
- `searcher` is one of Determined 0.38's: single, random, grid, async_halving, adaptive_asha.
  The halving searchers take their budget as `max_time` in units of `time_metric` (0.38 replaced
  `max_length`, still read, with a note). Searchers 0.38 removed (custom, adaptive, ...) are
  refused as the master refuses them. The training length of the others lives in the training
  code; CDL's entrypoint reads an `epochs` hyperparameter (see `training_budget`).
- `data` is free-form in Determined; a CDL experiment (`load_experiment`) names in it the use
  case and its label snapshot: a snapshot name, or `latest`, which the submit command resolves
  and records (the spec keeps what was written).

Fields that only matter on a cluster (environment images, checkpoint storage, resource pools,
bind mounts, profiling, optimizations, log policies, ...) are kept, so that `canonical()` sends
them to Determined; `ignored_locally` lists those a spec sets, which the local engine reports
once. `notes` lists deprecated forms a spec uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from typing_extensions import TypeAliasType

from pipelines.core.errors import Invalid, Unsupported
from pipelines.data.labeling.spec import SNAPSHOT_NAME, USE_CASES
from pipelines.model.trainer import DEFAULT_VAL_FRACTION

SEARCHERS = ("single", "random", "grid", "async_halving", "adaptive_asha")
# Parsed by 0.38 for old experiments only: "not valid for new experiments".
REMOVED_SEARCHERS = ("sync_halving", "adaptive", "adaptive_simple", "custom")
HYPERPARAMETER_TYPES = ("const", "int", "double", "log", "categorical")
LENGTH_UNITS = ("records", "batches", "epochs")
LATEST = "latest"

# What the local engine does not act on; each is kept and sent to Determined.
CLUSTER_ONLY = (
    "workspace",
    "project",
    "environment",
    "checkpoint_storage",
    "bind_mounts",
    "scheduling_unit",
    "profiling",
    "optimizations",
    "log_policies",
    "retention_policy",
    "integrations",
    "slurm",
    "pbs",
    "debug",
    "tensorboard_storage",
    "security",
    "internal",
)
RESOURCES_CLUSTER_ONLY = (
    "resource_pool",
    "max_slots",
    "priority",
    "weight",
    "shm_size",
    "devices",
    "native_parallel",
    "is_single_node",
    "slots",
)
SEARCHER_CLUSTER_ONLY = ("source_trial_id", "source_checkpoint_uuid")  # Determined's own ids


class _Spec(BaseModel):
    """Strict, as Determined's JSON schema: no unknown fields, no '5' for 5."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        # Checked here rather than by extra="forbid" so that the error lists the allowed fields.
        if isinstance(data, dict) and cls.model_config.get("extra") == "forbid":
            unknown = [repr(key) for key in data if key not in cls.model_fields]
            if unknown:
                raise ValueError(
                    f"unknown field {', '.join(unknown)} (allowed: {', '.join(cls.model_fields)})"
                )
        return data


def _form(value: Any) -> str:
    """The branch of a union of forms: a mapping, a list or a plain value."""
    if isinstance(value, (dict, BaseModel)):
        return "<mapping>"
    return "<list>" if isinstance(value, list) else "<plain>"


def _either(message: str, **forms: Any) -> Any:
    """A field written in one of several forms (plain=, list=, mapping=), chosen by the input's
    shape; an input of no listed form gets `message`. Branch tags are in angle brackets, which
    error paths leave out."""
    choices = tuple(Annotated[kind, Tag(f"<{form}>")] for form, kind in forms.items())
    return Annotated[
        Union[choices],  # noqa: UP007 - a runtime tuple of branches
        Discriminator(_form, custom_error_type="form", custom_error_message=message),
    ]


# -- training lengths ---------------------------------------------------------------------------


class Length(_Spec):
    """A training length in one unit: {epochs: 2}, {batches: 900} or {records: 50000}."""

    records: int | None = Field(None, ge=0)
    batches: int | None = Field(None, ge=0)
    epochs: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one_unit(self) -> Length:
        if len([u for u in LENGTH_UNITS if getattr(self, u) is not None]) != 1:
            raise ValueError("a length has exactly one unit: records, batches or epochs")
        return self

    @property
    def unit(self) -> str:
        return next(u for u in LENGTH_UNITS if getattr(self, u) is not None)

    @property
    def amount(self) -> int:
        return getattr(self, self.unit)


# A searcher's max_length: a Length, or a bare count in the training code's own unit.
SearcherLength = _either(
    "a length such as {epochs: 3}, or a whole number",
    plain=Annotated[int, Field(ge=0)],
    mapping=Length,
)


# -- hyperparameters ----------------------------------------------------------------------------


class ConstHyperparameter(_Spec):
    type: Literal["const"]
    val: Any


class _Range(_Spec):
    count: int | None = Field(None, ge=1)  # how many values a grid search tries

    @model_validator(mode="after")
    def _ordered(self) -> _Range:
        if not self.minval < self.maxval:
            raise ValueError(f"minval ({self.minval}) must be less than maxval ({self.maxval})")
        return self


class IntHyperparameter(_Range):
    type: Literal["int"]
    minval: int
    maxval: int


class DoubleHyperparameter(_Range):
    type: Literal["double"]
    minval: float
    maxval: float


class LogHyperparameter(_Range):
    """Values base**x for x between minval and maxval (exponents, not values)."""

    type: Literal["log"]
    minval: float
    maxval: float
    base: float = Field(10.0, gt=0)


class CategoricalHyperparameter(_Spec):
    type: Literal["categorical"]
    vals: list[Any] = Field(min_length=1)


Hyperparameter = Union[  # noqa: UP007 - a runtime alias
    ConstHyperparameter,
    IntHyperparameter,
    DoubleHyperparameter,
    LogHyperparameter,
    CategoricalHyperparameter,
]


def _node_kind(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        return f"<{value.type}>"
    if not isinstance(value, dict):
        return "<value>"
    if "type" not in value:
        return "<nested>"
    kind = value["type"]
    return f"<{kind}>" if isinstance(kind, str) and kind in HYPERPARAMETER_TYPES else None


def _as_const(value: Any) -> Any:
    return value if isinstance(value, ConstHyperparameter) else {"type": "const", "val": value}


# A node of the tree: a typed hyperparameter, a plain value (a const) or nested hyperparameters.
Node = TypeAliasType(
    "Node",
    Annotated[
        Union[  # noqa: UP007
            Annotated[ConstHyperparameter, Tag("<const>")],
            Annotated[IntHyperparameter, Tag("<int>")],
            Annotated[DoubleHyperparameter, Tag("<double>")],
            Annotated[LogHyperparameter, Tag("<log>")],
            Annotated[CategoricalHyperparameter, Tag("<categorical>")],
            Annotated[dict[str, "Node"], Tag("<nested>")],
            Annotated[ConstHyperparameter, BeforeValidator(_as_const), Tag("<value>")],
        ],
        Discriminator(
            _node_kind,
            custom_error_type="hyperparameter_type",
            custom_error_message=f"type must be one of {', '.join(HYPERPARAMETER_TYPES)}",
        ),
    ],
)


# -- searchers ----------------------------------------------------------------------------------


class _Searcher(_Spec):
    name: str  # each searcher narrows it to its own name
    metric: str  # the validation metric the searcher compares trials on
    smaller_is_better: bool = True
    source_trial_id: int | None = None  # warm start from a Determined trial or checkpoint
    source_checkpoint_uuid: str | None = None
    max_length: SearcherLength | None = None  # deprecated in 0.38 for every searcher


class SingleSearcher(_Searcher):
    name: Literal["single"]


class RandomSearcher(_Searcher):
    name: Literal["random"]
    max_trials: int = Field(ge=1)
    max_concurrent_trials: int = Field(0, ge=0)  # 0: Determined's default (16)


class GridSearcher(_Searcher):
    name: Literal["grid"]
    max_concurrent_trials: int = Field(0, ge=0)


class _Halving(_Searcher):
    """Successive halving, whose budget is `max_time` units of `time_metric` (a metric the
    training code reports, e.g. epochs or batches), or the deprecated `max_length`."""

    max_trials: int = Field(ge=1)
    divisor: float = Field(4.0, gt=1)
    max_concurrent_trials: int = Field(0, ge=0)
    max_time: int | None = Field(None, ge=1)
    time_metric: str | None = Field(None, min_length=1)
    stop_once: bool = False

    @model_validator(mode="after")
    def _budget(self) -> _Halving:
        example = "e.g. max_time: 12 and time_metric: epochs"
        if (self.max_time is None) != (self.time_metric is None):
            given, missing = ("max_time", "time_metric")[:: 1 if self.time_metric is None else -1]
            raise ValueError(f"{given} is set without {missing}: set both ({example})")
        if self.max_time is not None and self.max_length is not None:
            raise ValueError(
                "max_length is the deprecated form of max_time and time_metric: keep one "
                f"({example})"
            )
        if self.max_time is None and self.max_length is None:
            raise ValueError(f"{self.name} needs max_time and time_metric ({example})")
        return self


class AsyncHalvingSearcher(_Halving):
    name: Literal["async_halving"]
    num_rungs: int = Field(ge=1)


class AdaptiveASHASearcher(_Halving):
    name: Literal["adaptive_asha"]
    mode: Literal["aggressive", "standard", "conservative"] = "standard"
    max_rungs: int = Field(5, ge=1)
    bracket_rungs: list[int] = Field(default_factory=list)


Searcher = Annotated[
    Union[  # noqa: UP007
        Annotated[SingleSearcher, Tag("<single>")],
        Annotated[RandomSearcher, Tag("<random>")],
        Annotated[GridSearcher, Tag("<grid>")],
        Annotated[AsyncHalvingSearcher, Tag("<async_halving>")],
        Annotated[AdaptiveASHASearcher, Tag("<adaptive_asha>")],
    ],
    Discriminator(
        lambda value: (
            f"<{value.name}>"
            if isinstance(value, BaseModel)
            else f"<{value.get('name')}>"
            if isinstance(value, dict)
            else None
        ),
        custom_error_type="searcher_name",
        custom_error_message=f"name must be one of {', '.join(SEARCHERS)}",
    ),
]


# -- cluster sections ---------------------------------------------------------------------------


class _Storage(_Spec):
    """Which checkpoints Determined keeps when an experiment ends."""

    save_experiment_best: int | None = Field(None, ge=0)
    save_trial_best: int | None = Field(None, ge=0)
    save_trial_latest: int | None = Field(None, ge=0)


class SharedFSStorage(_Storage):
    type: Literal["shared_fs"]
    host_path: str
    storage_path: str | None = None
    propagation: str | None = None
    container_path: str | None = None
    checkpoint_path: str | None = None  # legacy
    tensorboard_path: str | None = None  # legacy


class S3Storage(_Storage):
    type: Literal["s3"]
    bucket: str
    access_key: str | None = None
    secret_key: str | None = None
    endpoint_url: str | None = None
    prefix: str | None = None


class GCSStorage(_Storage):
    type: Literal["gcs"]
    bucket: str
    prefix: str | None = None


class AzureStorage(_Storage):
    type: Literal["azure"]
    container: str
    connection_string: str | None = None
    account_url: str | None = None
    credential: str | None = None


class DirectoryStorage(_Storage):
    type: Literal["directory"]
    container_path: str


STORAGE_TYPES = ("shared_fs", "s3", "gcs", "azure", "directory")

CheckpointStorage = Annotated[
    Union[  # noqa: UP007
        Annotated[SharedFSStorage, Tag("<shared_fs>")],
        Annotated[S3Storage, Tag("<s3>")],
        Annotated[GCSStorage, Tag("<gcs>")],
        Annotated[AzureStorage, Tag("<azure>")],
        Annotated[DirectoryStorage, Tag("<directory>")],
        # Only the save_* policy, merged by the master with its own storage.
        Annotated[_Storage, Tag("<policy>")],
    ],
    Discriminator(
        lambda value: (
            f"<{getattr(value, 'type', 'policy')}>"
            if isinstance(value, BaseModel)
            else f"<{value['type']}>"
            if isinstance(value, dict) and "type" in value
            else "<policy>"
        ),
        custom_error_type="storage_type",
        custom_error_message=f"type must be one of {', '.join(STORAGE_TYPES)}",
    ),
]


class Device(_Spec):
    host_path: str
    container_path: str
    mode: str | None = None


DeviceSpec = _either("'host:container[:mode]', or a mapping", plain=str, mapping=Device)


class Resources(_Spec):
    slots_per_trial: int | None = Field(None, ge=0)  # Determined's default: 1
    max_slots: int | None = Field(None, ge=0)
    weight: float | None = Field(None, ge=0)
    priority: int | None = Field(None, ge=1, le=99)
    resource_pool: str | None = None
    shm_size: int | None = Field(None, ge=0)
    native_parallel: bool | None = None
    is_single_node: bool | None = None
    slots: int | None = Field(None, ge=0)  # commands only
    devices: list[DeviceSpec] | None = None


class BindMount(_Spec):
    host_path: str = Field(pattern="^/")  # absolute, on the agent
    container_path: str
    read_only: bool = False
    propagation: str | None = None

    @field_validator("container_path")
    @classmethod
    def _not_dot(cls, value: str) -> str:
        if value == ".":
            raise ValueError("container_path must not be '.'")
        return value


class ImageMap(_Spec):
    """An image per kind of agent; `gpu` is the older name of `cuda`."""

    cpu: str | None = None
    cuda: str | None = None
    rocm: str | None = None
    gpu: str | None = None


class VariablesMap(_Spec):
    cpu: list[str] | None = None
    cuda: list[str] | None = None
    rocm: list[str] | None = None
    gpu: list[str] | None = None


Image = _either("an image, or a mapping cpu/cuda/rocm", plain=str, mapping=ImageMap)
Variables = _either(
    "NAME=value strings, or a mapping cpu/cuda/rocm", list=list[str], mapping=VariablesMap
)


class ProxyPort(_Spec):
    proxy_port: int
    proxy_tcp: bool | None = None
    unauthenticated: bool | None = None
    default_service_id: str | None = None


class Environment(_Spec):
    image: Image | None = None
    environment_variables: Variables | None = None
    force_pull_image: bool | None = None
    registry_auth: dict[str, Any] | None = None
    pod_spec: dict[str, Any] | None = None  # a Kubernetes Pod
    ports: dict[str, int] | None = None
    add_capabilities: list[str] | None = None
    drop_capabilities: list[str] | None = None
    proxy_ports: list[ProxyPort] | None = None


class Profiling(_Spec):
    enabled: bool = False
    begin_on_batch: int = Field(0, ge=0)
    end_after_batch: int | None = Field(None, ge=0)
    sync_timings: bool = True


class Optimizations(_Spec):
    """Deprecated in 0.38 (configured in training code now); Horovod settings."""

    aggregation_frequency: int | None = Field(None, ge=1)
    average_aggregated_gradients: bool | None = None
    average_training_metrics: bool | None = None
    gradient_compression: bool | None = None
    grad_updates_size_file: str | None = None
    mixed_precision: str | None = None
    tensor_fusion_threshold: int | None = None
    tensor_fusion_cycle_time: int | None = None
    auto_tune_tensor_fusion: bool | None = None


class Reproducibility(_Spec):
    experiment_seed: int | None = Field(None, ge=0, le=2**32 - 1)


LogActions = Literal["exclude_node", "cancel_retries"]


class LogAction(_Spec):
    type: LogActions


LogActionSpec = _either("exclude_node or cancel_retries", plain=LogActions, mapping=LogAction)


class LogPolicy(_Spec):
    """A regex over trial logs and what to do on a match (a name, or the older {type: ...})."""

    name: str | None = None
    pattern: str | None = None
    action: LogActionSpec | None = None


class RetentionPolicy(_Spec):
    log_retention_days: int | None = Field(None, ge=-1, le=32767)  # -1: forever


class PachydermPachd(_Spec):
    host: str | None = None
    port: int | None = None


class PachydermProxy(_Spec):
    scheme: str | None = None
    host: str | None = None
    port: int | None = None


class PachydermDataset(_Spec):
    project: str | None = None
    repo: str | None = None
    commit: str | None = None
    branch: str | None = None
    token: str | None = None


class PachydermIntegration(_Spec):
    pachd: PachydermPachd | None = None
    proxy: PachydermProxy | None = None
    dataset: PachydermDataset | None = None


class WebhooksIntegration(_Spec):
    webhook_id: list[int] | None = None
    webhook_name: list[str] | None = None
    exclude: bool = False


class Integrations(_Spec):
    pachyderm: PachydermIntegration | None = None
    webhooks: WebhooksIntegration | None = None


class Slurm(_Spec):
    slots_per_node: int | None = Field(None, ge=1)
    gpu_type: str | None = None
    sbatch_args: list[str] | None = None


class Pbs(_Spec):
    slots_per_node: int | None = Field(None, ge=1)
    pbsbatch_args: list[str] | None = None


class DataSection(_Spec):
    """Free-form in Determined (read by the training code); a CDL experiment names its use case
    and label snapshot here, beside any other keys."""

    model_config = ConfigDict(extra="allow", strict=True)

    use_case: str | None = None
    snapshot: str | None = None  # a snapshot name, or `latest` (resolved at submit time)
    # The classes the model predicts; default: the choices of the use case's labeling config.
    # The snapshot must hold exactly these (search.check_label_set).
    labels: list[str] | None = Field(None, min_length=2)
    # The share of the snapshot's train split carved out for validation (seeded, stratified).
    val_fraction: float = Field(DEFAULT_VAL_FRACTION, gt=0, lt=1)


# -- the experiment -----------------------------------------------------------------------------


# A script (`python3 train.py`, as a string or an argv list) or, deprecated, module:Trial.
Entrypoint = _either("a command, or a list of strings", plain=str, list=list[str])


class ExperimentSpec(_Spec):
    name: str | None = None
    description: str | None = None
    labels: list[str] | None = None
    workspace: str | None = None
    project: str | None = None
    data: DataSection | None = None
    entrypoint: Entrypoint | None = None
    hyperparameters: dict[str, Node] = Field(default_factory=dict)
    searcher: Searcher
    resources: Resources | None = None
    max_restarts: int = Field(5, ge=0)
    min_validation_period: Length | None = None
    min_checkpoint_period: Length | None = None
    perform_initial_validation: bool = False
    checkpoint_policy: Literal["best", "all", "none"] = "best"
    records_per_epoch: int | None = Field(None, ge=0)  # deprecated in 0.38
    reproducibility: Reproducibility | None = None
    # Cluster-only, passed on to Determined:
    checkpoint_storage: CheckpointStorage | None = None
    environment: Environment | None = None
    bind_mounts: list[BindMount] | None = None
    scheduling_unit: int | None = Field(None, ge=1)  # deprecated in 0.38
    profiling: Profiling | None = None
    optimizations: Optimizations | None = None  # deprecated in 0.38
    log_policies: list[LogPolicy] | None = None
    retention_policy: RetentionPolicy | None = None
    integrations: Integrations | None = None
    slurm: Slurm | None = None
    pbs: Pbs | None = None
    debug: bool = False
    # Legacy sections 0.38 still parses, kept as written.
    tensorboard_storage: dict[str, Any] | None = None
    security: dict[str, Any] | None = None
    internal: dict[str, Any] | None = None

    @field_validator("searcher", mode="before")
    @classmethod
    def _current_searcher(cls, value: Any) -> Any:
        name = value.get("name") if isinstance(value, dict) else None
        if name in REMOVED_SEARCHERS:
            raise ValueError(
                f"name: '{name}' was removed from Determined and is not valid for new "
                f"experiments (allowed: {', '.join(SEARCHERS)})"
            )
        if isinstance(value, dict) and name not in SEARCHERS:
            raise ValueError(f"name: {name!r} is not a searcher (allowed: {', '.join(SEARCHERS)})")
        return value

    @model_validator(mode="after")
    def _check(self) -> ExperimentSpec:
        if (self.workspace is None) != (self.project is None):
            raise ValueError("workspace and project are set together, or neither")
        if self.entrypoint is None and not (self.internal or {}).get("native"):
            raise ValueError(
                "entrypoint is missing: the command that trains, e.g. python3 train.py"
            )
        if self.searcher.name == "grid":
            for name, leaf in search_space(self).items():
                if leaf.type in ("int", "double", "log") and leaf.count is None:
                    raise ValueError(
                        f"hyperparameters.{name}: a grid search needs a 'count' for each "
                        "int, double and log hyperparameter"
                    )
        return self

    def ignored_locally(self) -> list[str]:
        """The cluster-only fields this spec sets, which the local engine does not act on."""

        def set_in(model: BaseModel | None, keys: tuple[str, ...], prefix: str) -> list[str]:
            return [
                prefix + key
                for key in keys
                if model is not None and getattr(model, key) not in (None, False, [], {})
            ]

        found = set_in(self, CLUSTER_ONLY, "")
        found += set_in(self.resources, RESOURCES_CLUSTER_ONLY, "resources.")
        if self.resources and (self.resources.slots_per_trial or 0) > 1:
            found.append("resources.slots_per_trial")  # locally a trial is one process
        return found + set_in(self.searcher, SEARCHER_CLUSTER_ONLY, "searcher.")

    def notes(self) -> list[str]:
        """The deprecated forms this spec uses, each with what replaces it."""
        found = []
        if self.searcher.max_length is not None:
            replacement = (
                "max_time and time_metric"
                if isinstance(self.searcher, _Halving)
                else "a training length in the training code (CDL: an 'epochs' hyperparameter)"
            )
            found.append(
                f"searcher.max_length is deprecated since Determined 0.38: use {replacement}"
            )
        for key in ("optimizations", "scheduling_unit", "records_per_epoch"):
            if getattr(self, key) is not None:
                found.append(f"{key} is deprecated since Determined 0.38: set it in training code")
        if (
            isinstance(self.entrypoint, str)
            and ":" in self.entrypoint
            and " " not in self.entrypoint
        ):
            found.append(
                "entrypoint module:TrialClass is deprecated since Determined 0.38: run a script "
                "(python3 train.py)"
            )
        return found

    def canonical(self) -> dict[str, Any]:
        """The spec as Determined reads it: what the file set (shorthand consts written out)."""
        return self.model_dump(mode="json", exclude_unset=True)


def search_space(spec: ExperimentSpec) -> dict[str, Hyperparameter]:
    """Every leaf hyperparameter by its dotted name (`optimizer.lr`), consts included."""
    flat: dict[str, Hyperparameter] = {}

    def walk(tree: dict[str, Any], prefix: str) -> None:
        for name, node in tree.items():
            if isinstance(node, dict):
                walk(node, f"{prefix}{name}.")
            else:
                flat[prefix + name] = node

    walk(spec.hyperparameters, "")
    return flat


# -- training length ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """How long the longest trial trains: `amount` of `unit` (epochs, batches, records, another
    metric the training code reports, or None for a bare max_length in the code's own unit)."""

    unit: str | None
    amount: int


def training_budget(spec: ExperimentSpec) -> Budget | None:
    """From `max_time`/`time_metric`, else the deprecated `max_length`, else (0.38's way: the
    length lives in training code) a const `epochs` hyperparameter; None when none is set."""
    searcher = spec.searcher
    if isinstance(searcher, _Halving) and searcher.max_time is not None:
        return Budget(searcher.time_metric, searcher.max_time)
    if isinstance(searcher.max_length, Length):
        return Budget(searcher.max_length.unit, searcher.max_length.amount)
    if isinstance(searcher.max_length, int):
        return Budget(None, searcher.max_length)
    epochs = spec.hyperparameters.get("epochs")
    if isinstance(epochs, ConstHyperparameter) and type(epochs.val) is int:
        return Budget("epochs", epochs.val)
    return None


def max_epochs(spec: ExperimentSpec, batches_per_epoch: int | None = None) -> int | None:
    """The longest trial's length in whole epochs (rounded up), for the local engine, which
    counts epochs. Batches need `batches_per_epoch` (the training data's size is known only at
    submit time), records the spec's `records_per_epoch`; a bare max_length counts epochs."""
    budget = training_budget(spec)
    if budget is None:
        return None
    if budget.unit in (None, "epochs"):
        return budget.amount
    per_epoch = {"batches": batches_per_epoch, "records": spec.records_per_epoch}
    if budget.unit not in per_epoch:
        raise Unsupported(
            f"time_metric '{budget.unit}': the local engine measures training in epochs, batches "
            "or records",
            "use time_metric: epochs or batches, or run this experiment on Determined",
        )
    if not per_epoch[budget.unit]:
        raise Invalid(
            f"the budget is {budget.amount} {budget.unit}, but how many make an epoch is unknown",
            "pass batches_per_epoch" if budget.unit == "batches" else "set records_per_epoch",
        )
    return math.ceil(budget.amount / per_epoch[budget.unit])


# -- loading ------------------------------------------------------------------------------------


def read_config(path: Path) -> ExperimentSpec:
    """Any experiment config a Determined 0.38 master accepts (one YAML or JSON document)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise Invalid(f"cannot read experiment spec {path}: {exc}", "check the path") from exc
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise Invalid(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
    if len(documents) != 1:
        raise Invalid(
            f"{path} holds {len(documents)} experiment specs where one is expected",
            "write one spec per file (entrypoint, hyperparameters, searcher, ...)",
        )
    return parse_experiment(documents[0], str(path))


def load_experiment(path: Path) -> ExperimentSpec:
    """A CDL experiment: a Determined config whose `data` names the use case (that of the
    `use_cases/<name>/` folder the file is in, if any) and a label snapshot or `latest`."""
    spec = read_config(path)
    cases = sorted(p.name for p in USE_CASES.iterdir() if (p / "labeling.yaml").exists())
    data = spec.data or DataSection()
    folder = path.resolve().parent
    home = (
        folder.parent.name if folder.name == "model" and folder.parent.parent == USE_CASES else None
    )
    if data.use_case is None or data.use_case not in ([home] if home else cases):
        problem = "missing" if data.use_case is None else f"unknown use case '{data.use_case}'"
        raise Invalid(
            f"{path}: data.use_case: {problem} (allowed: {home or ', '.join(cases)})",
            "name the use case the experiment trains on",
        )
    if data.snapshot is None or not SNAPSHOT_NAME.fullmatch(data.snapshot):
        problem = "missing" if data.snapshot is None else f"'{data.snapshot}' is not a name"
        raise Invalid(
            f"{path}: data.snapshot: {problem} (allowed: '{LATEST}' or a label snapshot name of "
            "letters, digits, '.', '-', '_')",
            "see cdl label snapshot list",
        )
    return spec


def parse_experiment(data: Any, source: str = "experiment spec") -> ExperimentSpec:
    """Determined's rules for one config; errors name the source, the field path and what is
    allowed there, on one line."""
    if not isinstance(data, dict):
        raise Invalid(f"{source}: an experiment spec is a mapping with entrypoint and searcher")
    try:
        return ExperimentSpec.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            # Union branches are tagged <...>: not fields, left out of the path.
            path = [str(p) for p in err["loc"] if not str(p).startswith("<")]
            message = err["msg"].removeprefix("Value error, ")
            problems.append(f"{'.'.join(path) or '(top level)'}: {message}")
        raise Invalid(f"{source}: " + "; ".join(problems), "fix the experiment spec") from exc
