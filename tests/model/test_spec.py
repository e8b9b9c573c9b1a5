"""Experiment specs in Determined's format. tests/model/determined_configs holds configs written
for Determined, not for CDL (every searcher, every hyperparameter type, nested hyperparameters,
the deprecated max_length, cluster-only sections): each parses, round-trips through
`canonical()` and reports the cluster-only fields it sets. Bad inputs get one line naming the
file, the field and what is allowed; every shipped spec is a valid CDL experiment."""

from pathlib import Path

import pytest
import yaml

from pipelines.core.errors import Invalid, Unsupported
from pipelines.model.spec import (
    HYPERPARAMETER_TYPES,
    SEARCHERS,
    AdaptiveASHASearcher,
    Budget,
    load_experiment,
    max_epochs,
    parse_experiment,
    read_config,
    search_space,
    training_budget,
)
from tests.conftest import REPO

CORPUS = REPO / "tests" / "model" / "determined_configs"
CONFIGS = sorted(p for p in CORPUS.iterdir() if p.suffix in (".yaml", ".json"))
SHIPPED = sorted(REPO.glob("use_cases/*/model/*.yaml"))
# What only a cluster acts on, as this test reads Determined's documentation.
CLUSTER_FIELDS = {
    "environment",
    "checkpoint_storage",
    "bind_mounts",
    "profiling",
    "optimizations",
    "scheduling_unit",
    "log_policies",
    "retention_policy",
    "integrations",
    "slurm",
    "pbs",
    "workspace",
    "project",
    "debug",
    "tensorboard_storage",
}


def test_the_corpus_covers_determined_configs():
    specs = [read_config(path) for path in CONFIGS]
    assert len(specs) >= 20
    assert {spec.searcher.name for spec in specs} == set(SEARCHERS)
    leaves = [leaf for spec in specs for leaf in search_space(spec).values()]
    assert {leaf.type for leaf in leaves} == set(HYPERPARAMETER_TYPES)
    assert any("." in name for spec in specs for name in search_space(spec))
    asha = [spec.searcher for spec in specs if isinstance(spec.searcher, AdaptiveASHASearcher)]
    assert {s.mode for s in asha} == {"aggressive", "standard", "conservative"}
    assert any(s.max_length is not None for s in asha) and any(s.max_time for s in asha)
    storage = {getattr(spec.checkpoint_storage, "type", None) for spec in specs}
    assert {"shared_fs", "s3", "gcs", "directory"} <= storage


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_corpus_configs_parse_and_round_trip(path: Path):
    spec = read_config(path)
    again = parse_experiment(spec.canonical(), "canonical")
    assert again == spec and again.canonical() == spec.canonical()
    raw = yaml.safe_load(path.read_text())
    # Nothing written is dropped: every top-level field comes back.
    assert set(spec.canonical()) == set(raw)
    expected = {key for key in raw if key in CLUSTER_FIELDS}
    expected |= {f"resources.{k}" for k in raw.get("resources", {}) if k != "slots_per_trial"}
    if raw.get("resources", {}).get("slots_per_trial", 1) > 1:
        expected.add("resources.slots_per_trial")
    assert set(spec.ignored_locally()) == expected


def test_deprecated_forms_get_a_note():
    legacy = read_config(CORPUS / "asha_max_length_deprecated.yaml")
    assert any("max_time and time_metric" in note for note in legacy.notes())
    assert any("entrypoint" in note for note in legacy.notes())
    assert training_budget(legacy) == Budget("epochs", 5) and max_epochs(legacy) == 5
    current = read_config(CORPUS / "asha_standard.yaml")
    assert current.notes() == [] and max_epochs(current) == 10
    horovod = read_config(CORPUS / "profiling_optimizations.yaml")
    assert {n.split()[0] for n in horovod.notes()} == {"optimizations", "scheduling_unit"}


def test_budgets_in_other_units():
    batches = read_config(CORPUS / "async_halving.yaml")
    assert training_budget(batches) == Budget("batches", 4000)
    assert max_epochs(batches, batches_per_epoch=300) == 14
    with pytest.raises(Invalid, match="batches_per_epoch"):
        max_epochs(batches)
    tokens = read_config(CORPUS / "asha_conservative_custom_metric.yaml")
    with pytest.raises(Unsupported, match="tokens_seen"):
        max_epochs(tokens)
    assert training_budget(read_config(CORPUS / "random_legacy_length.yaml")) == Budget(None, 100)
    assert training_budget(read_config(CORPUS / "random_search.yaml")) is None


def test_search_space_flattens_nested_hyperparameters():
    space = search_space(read_config(CORPUS / "nested_hyperparameters.yaml"))
    assert space["optimizer.lr"].type == "log" and space["optimizer.momentum"].val == 0.9
    assert space["model.head.activation"].vals == ["relu", "tanh"]
    assert space["model.head.sizes"].type == "const" and space["model.head.sizes"].val == [128, 64]
    assert space["global_batch_size"].val == 32 and space["optimizer.type_name"].val == "sgd"


ASHA = {
    "name": "bad",
    "entrypoint": "python3 train.py",
    "hyperparameters": {"lr": {"type": "log", "minval": -4, "maxval": -1}},
    "searcher": {
        "name": "adaptive_asha",
        "metric": "val_loss",
        "max_trials": 8,
        "max_time": 9,
        "time_metric": "epochs",
    },
}


def edit(path: str, value, base: dict = ASHA) -> dict:
    """`base` with the dotted `path` set to `value` (or removed, for `...`)."""
    data = yaml.safe_load(yaml.safe_dump(base))
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return data


BAD = {
    "unknown top-level field": (
        edit("max_epochs", 3),
        "(top level): unknown field 'max_epochs' (allowed: name, description",
    ),
    "unknown searcher field": (
        edit("searcher.max_lenght", {"epochs": 2}),
        "searcher: unknown field 'max_lenght' (allowed: name, metric,",
    ),
    "wrong type": (edit("max_restarts", "5"), "max_restarts: Input should be a valid integer"),
    "wrong nested type": (
        edit("searcher.smaller_is_better", "no"),
        "searcher.smaller_is_better: Input should be a valid boolean",
    ),
    "categorical without vals": (
        edit("hyperparameters.act", {"type": "categorical", "vals": []}),
        "hyperparameters.act.vals: List should have at least 1 item",
    ),
    "int with minval > maxval": (
        edit("hyperparameters.model.width", {"type": "int", "minval": 64, "maxval": 8}),
        "hyperparameters.model.width: minval (64) must be less than maxval (8)",
    ),
    "unknown hyperparameter type": (
        edit("hyperparameters.act", {"type": "choice", "vals": [1, 2]}),
        "hyperparameters.act: type must be one of const, int, double, log, categorical",
    ),
    "unknown searcher": (
        edit("searcher.name", "bayesian"),
        "searcher: name: 'bayesian' is not a searcher (allowed: single, random, grid, "
        "async_halving, adaptive_asha)",
    ),
    "removed searcher": (
        edit("searcher.name", "custom"),
        "searcher: name: 'custom' was removed from Determined",
    ),
    "bad mode": (
        edit("searcher.mode", "fast"),
        "searcher.mode: Input should be 'aggressive', 'standard' or 'conservative'",
    ),
    "max_time without time_metric": (
        edit("searcher.time_metric", ...),
        "searcher: max_time is set without time_metric: set both",
    ),
    "time_metric without max_time": (
        edit("searcher.max_time", ...),
        "searcher: time_metric is set without max_time: set both",
    ),
    "max_time and max_length": (
        edit("searcher.max_length", {"epochs": 9}),
        "searcher: max_length is the deprecated form of max_time and time_metric: keep one",
    ),
    "no budget": (
        edit("searcher.time_metric", ..., edit("searcher.max_time", ...)),
        "searcher: adaptive_asha needs max_time and time_metric",
    ),
    "length in two units": (
        edit("min_validation_period", {"epochs": 1, "batches": 10}),
        "min_validation_period: a length has exactly one unit: records, batches or epochs",
    ),
    "unknown storage": (
        edit("checkpoint_storage", {"type": "hdfs", "hdfs_url": "x"}),
        "checkpoint_storage: type must be one of shared_fs, s3, gcs, azure, directory",
    ),
    "grid without count": (
        edit("searcher", {"name": "grid", "metric": "val_loss"}),
        "hyperparameters.lr: a grid search needs a 'count'",
    ),
    "workspace without project": (
        edit("workspace", "research"),
        "workspace and project are set together, or neither",
    ),
    "validation share out of range": (
        edit("data", {"use_case": "bbc_news", "snapshot": "s1", "val_fraction": 1.5}),
        "data.val_fraction: Input should be less than 1",
    ),
    "relative bind mount": (
        edit("bind_mounts", [{"host_path": "data", "container_path": "/data"}]),
        "bind_mounts.0.host_path: String should match pattern '^/'",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_configs_name_file_field_and_allowed_values(case, tmp_path):
    data, expected = BAD[case]
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(Invalid) as caught:
        read_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message


def write_case(tmp_path: Path, data: dict) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "train.yaml").write_text(yaml.safe_dump(data))
    return folder / "train.yaml"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({}, "data.use_case: missing (allowed: bbc_news, fashion_mnist)"),
        ({"use_case": "cats", "snapshot": "latest"}, "data.use_case: unknown use case 'cats'"),
        ({"use_case": "bbc_news"}, "data.snapshot: missing (allowed: 'latest' or a label"),
        ({"use_case": "bbc_news", "snapshot": "a b"}, "data.snapshot: 'a b' is not a name"),
    ],
)
def test_a_cdl_experiment_names_its_use_case_and_snapshot(data, expected, tmp_path):
    path = write_case(tmp_path, edit("data", data))
    read_config(path)  # Determined accepts it
    with pytest.raises(Invalid, match="^" + str(path).replace(".", r"\.") + ": ") as caught:
        load_experiment(path)
    assert expected in str(caught.value)


def test_a_use_case_spec_names_its_own_use_case(tmp_path, monkeypatch):
    for case in ("bbc_news", "fashion_mnist"):
        (tmp_path / case / "model").mkdir(parents=True)
        (tmp_path / case / "labeling.yaml").write_text("project: x\n")
    monkeypatch.setattr("pipelines.model.spec.USE_CASES", tmp_path)
    path = tmp_path / "bbc_news" / "model" / "train.yaml"
    path.write_text(yaml.safe_dump(edit("data", {"use_case": "fashion_mnist", "snapshot": "s1"})))
    with pytest.raises(Invalid, match=r"data\.use_case: unknown use case 'fashion_mnist' "):
        load_experiment(path)
    path.write_text(yaml.safe_dump(edit("data", {"use_case": "bbc_news", "snapshot": "s1"})))
    assert load_experiment(path).data.snapshot == "s1"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parts[-3]}/{p.name}")
def test_shipped_specs_are_valid_experiments(path: Path):
    spec = load_experiment(path)
    assert spec.data.use_case == path.parts[-3] and spec.data.snapshot == "latest"
    assert spec.entrypoint == "python3 -m pipelines.model.entrypoint"
    assert parse_experiment(spec.canonical()) == spec
    assert spec.ignored_locally() == [] and spec.notes() == []
    assert max_epochs(spec) >= 10
    assert path.read_text().startswith("# ")  # says what it is


def test_each_use_case_ships_a_search_and_a_training_spec():
    cases = {p.parts[-3] for p in SHIPPED}
    assert cases == {"bbc_news", "fashion_mnist"}
    for case in cases:
        search = load_experiment(REPO / "use_cases" / case / "model" / "search.yaml")
        train = load_experiment(REPO / "use_cases" / case / "model" / "train.yaml")
        assert search.searcher.name == "adaptive_asha" and search.searcher.time_metric == "epochs"
        assert train.searcher.name == "single"
        searched = {n for n, leaf in search_space(search).items() if leaf.type != "const"}
        assert searched <= set(search_space(train))  # training fixes every searched value
