"""The Determined trial script (`entrypoint: python3 -m pipelines.model.entrypoint`): one trial of
a CDL experiment, run by Determined's Core API with the same Trainer the local engine runs.

On a cluster, `cdl experiment submit` (determined.py) has sent the experiment's code as the
context directory, which is the trial's working directory: the `pipelines` package, and
`features/` with the snapshot's features (`Features.save`), computed at submit time so that the
trial needs no access to the stack. What the trial reads:

- `det.get_cluster_info()`: `info.trial.hparams` (the trial's hyperparameters, nested as the spec
  wrote them), `info.user_data` (the spec's `data` section: `use_case`, the resolved `snapshot`,
  and `cdl` with the `features` folder relative to the context and an optional `trainer`),
  `info.trial._config` (the expanded experiment config, for the training length and the
  searcher's metric), `info.trial.trial_seed` and `info.latest_checkpoint`.
- the training length in epochs, as the local engine counts it (spec.training_budget): the
  searcher's `max_time` when its `time_metric` is `epochs`, or in `batches` over the batches of
  an epoch that submit recorded (`data.cdl.batches_per_epoch`), else a `max_length` in epochs or
  a bare count, else the `epochs` hyperparameter (taken out of what the trainer gets).

What it does: builds the use case's Trainer (`data.cdl.trainer`, else the plugin table's),
restores `info.latest_checkpoint` with `checkpoint.restore_path` into a local folder where the
trainer finds its last epoch, and runs `fit`. After each epoch (which the trainer checkpoints
before reporting) the report stores the trainer's checkpoint folder with
`checkpoint.store_path({"steps_completed": epoch})`, reports `loss` and the other training
metrics with `report_training_metrics`, and the `val_*` metrics, the searcher's metric and the
time metrics `epochs` and, for a budget in batches, `batches` (ASHA in 0.38 reads the spec's
`time_metric` among them: the master stops a trial through its validation metrics) with
`report_validation_metrics`, then asks `preempt.should_preempt()`: when the master preempts the
trial (a pause, a rescheduling, or ASHA stopping it) the report returns False and the trial ends
after that checkpoint; the next run of the trial resumes from it. A trial that trains its whole
length saves the model (`save_model`, an
MLflow pyfunc model) in one last checkpoint, under `model/`.

Without a cluster (`det.core.init()`'s local mode: reports are logged, checkpoints go to a
folder), the trial is described by a JSON file named by CDL_LOCAL_TRIAL:

    {"config": {...experiment config, with data...}, "hparams": {...},
     "checkpoint_storage": "/a/folder", "latest_checkpoint": null or a storage id,
     "trial_seed": 0, "context": "/the/context/folder", "preempt_after": null or N}

(`context` defaults to the folder holding the `pipelines` package; `preempt_after` makes the run
act as if the master preempted it after epoch N, which local mode's preempt context never does).
The last line of a run says how it ended and which checkpoint it left: `<completed|preempted>
after epoch N, checkpoint <id>`.

This module imports nothing that needs the stack; `determined` is imported inside `main` only, so
the platform can read the budget rules here (`budget_epochs`) without it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pipelines.core.errors import CDLError, Invalid, Unsupported

LOCAL_TRIAL_ENV = "CDL_LOCAL_TRIAL"
BUDGET_KEYS = ("epochs",)  # hyperparameters that set the length, not the model (asha.py)
TIME_METRICS = ("epochs", "batches")  # what a trial reports its length in
MODEL_FOLDER = "model"
CONTEXT_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the `pipelines` package

logger = logging.getLogger("cdl.trial")


@dataclass
class TrialSetup:
    """What one run of a trial is given, from the cluster or from a local-trial file."""

    config: dict[str, Any]  # the experiment config
    hparams: dict[str, Any]
    trial_seed: int = 0
    latest_checkpoint: str | None = None
    checkpoint_storage: str | None = None  # local mode only: the folder checkpoints go to
    context: Path = CONTEXT_ROOT
    slots: int = 1
    preempt_after: int | None = None  # local mode: act as if preempted after this epoch
    gpus: int = 0
    cluster: bool = False

    @property
    def data(self) -> dict[str, Any]:
        return self.config.get("data") or {}

    @classmethod
    def from_cluster(cls, info: Any) -> TrialSetup:
        if len(info.container_addrs) > 1:
            raise Unsupported(
                f"this trial spans {len(info.container_addrs)} nodes; CDL's trainers train "
                "data-parallel on one node",
                "set resources.slots_per_trial to at most the slots of one agent",
            )
        return cls(
            config=dict(info.trial._config),
            hparams=dict(info.trial.hparams),
            trial_seed=int(info.trial.trial_seed),
            latest_checkpoint=info.latest_checkpoint,
            slots=max(1, len(info.slot_ids)),
            gpus=len(info.gpu_uuids or []),
            cluster=True,
        )

    @classmethod
    def from_file(cls, path: Path) -> TrialSetup:
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise Invalid(
                f"{LOCAL_TRIAL_ENV}={path}: cannot read it as JSON: {exc}",
                f"point {LOCAL_TRIAL_ENV} at a local-trial file (pipelines/model/entrypoint.py)",
            ) from exc
        unknown = sorted(set(raw) - {f for f in cls.__dataclass_fields__ if f != "cluster"})
        if unknown or "config" not in raw:
            raise Invalid(
                f"{path}: unknown field(s) {', '.join(unknown)}"
                if unknown
                else f"{path}: no 'config' (the experiment config)",
                "write config, hparams, checkpoint_storage, latest_checkpoint, trial_seed, "
                "context, preempt_after",
            )
        if "context" in raw:
            raw["context"] = Path(raw["context"])
        raw.setdefault("hparams", {})
        return cls(**raw)


def budget_epochs(
    config: Mapping[str, Any],
    hparams: Mapping[str, Any],
    batches_per_epoch: int | None = None,
) -> int:
    """How many epochs a trial trains: `searcher.max_time` in `epochs`, or in `batches` over
    `batches_per_epoch` (default: the `data.cdl.batches_per_epoch` that submit recorded), rounded
    up; else the deprecated `max_length` ({epochs: N} or a bare N), else the `epochs`
    hyperparameter."""
    searcher = config.get("searcher") or {}
    if searcher.get("max_time") is not None:
        metric, amount = searcher.get("time_metric"), int(searcher["max_time"])
        if metric == "epochs":
            return amount
        if metric != "batches":
            raise Unsupported(
                f"time_metric '{metric}': CDL's trials report their length in "
                f"{' and '.join(TIME_METRICS)}",
                "use time_metric: epochs or batches",
            )
        per_epoch = batches_per_epoch or _recorded_batches_per_epoch(config)
        if not per_epoch:
            raise Invalid(
                f"the budget is {amount} batches, but how many make an epoch is unknown",
                "submit the experiment with cdl, which records data.cdl.batches_per_epoch",
            )
        return math.ceil(amount / per_epoch)
    length = searcher.get("max_length")
    if isinstance(length, int) and not isinstance(length, bool):
        return length
    if isinstance(length, dict) and set(length) == {"epochs"}:
        return int(length["epochs"])
    if length is not None:
        raise Unsupported(
            f"searcher.max_length {length}: CDL's trials count epochs",
            "use max_time with time_metric: epochs",
        )
    epochs = hparams.get("epochs")
    if isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 1:
        return epochs
    raise Invalid(
        "the experiment sets no training length",
        "set searcher.max_time and time_metric: epochs, or an 'epochs' hyperparameter",
    )


def _recorded_batches_per_epoch(config: Mapping[str, Any]) -> int | None:
    return ((config.get("data") or {}).get("cdl") or {}).get("batches_per_epoch")


def split_metrics(
    epoch: int,
    metrics: Mapping[str, float],
    searcher_metric: str | None,
    batches_per_epoch: int | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """(training, validation) metrics of an epoch: `val_*` and the searcher's metric are
    validation metrics, with the time metrics `epochs` and, when an epoch's batches are known,
    `batches`; the rest are training metrics."""
    validation = {
        k: float(v) for k, v in metrics.items() if k.startswith("val_") or k == searcher_metric
    }
    validation["epochs"] = epoch
    if batches_per_epoch:
        validation["batches"] = epoch * batches_per_epoch
    training = {k: float(v) for k, v in metrics.items() if k not in validation}
    return training, validation


def _not_the_trainers(folder: str, names: list[str]) -> list[str]:
    """What a Determined checkpoint holds beside the trainer's checkpoint folder: its metadata,
    the saved model; and the trainer's half-written files (hidden)."""
    return [n for n in names if n.startswith(".") or n in ("metadata.json", MODEL_FOLDER)]


def run_trial(core: Any, setup: TrialSetup) -> dict:
    """Train one trial under a Core API context; return how it ended (also logged as the run's
    last line)."""
    from pipelines.model.trainer import Features, Resources
    from pipelines.plugins import load, trainer_class

    data = setup.data
    cdl = data.get("cdl") or {}
    use_case = data.get("use_case")
    if not use_case:
        raise Invalid("the experiment config's data has no use_case", "submit it with cdl")
    trainer = load(cdl["trainer"]) if cdl.get("trainer") else trainer_class(use_case)
    if getattr(trainer, "use_case", None) == "fashion_mnist":
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            raise Unsupported(
                "fashion_mnist trains with TensorFlow, which this environment does not have "
                "(CDL's determined venv leaves it out: it is big)",
                "run it in an image with tensorflow (environment.image), or on the local engine",
            ) from None
    features = Features.load(setup.context / cdl.get("features", "features"))
    max_epochs = budget_epochs(setup.config, setup.hparams)
    hparams = {k: v for k, v in setup.hparams.items() if k not in BUDGET_KEYS}
    searcher_metric = (setup.config.get("searcher") or {}).get("metric")
    resources = Resources(threads=os.cpu_count() or 1, slots=setup.slots, gpus=setup.gpus)
    model = trainer(hparams, features, resources, setup.trial_seed % 2**31)

    ended = {"state": "completed", "epoch": 0, "checkpoint": setup.latest_checkpoint}
    with tempfile.TemporaryDirectory(prefix="cdl-trial-") as scratch:
        work = Path(scratch) / "checkpoints"
        work.mkdir()
        if setup.latest_checkpoint:
            with core.checkpoint.restore_path(setup.latest_checkpoint) as path:
                shutil.copytree(path, work, ignore=_not_the_trainers, dirs_exist_ok=True)
            logger.info(f"resuming from checkpoint {setup.latest_checkpoint}")

        def report(epoch: int, metrics: Mapping[str, float]) -> bool:
            with core.checkpoint.store_path({"steps_completed": epoch}) as (path, storage_id):
                shutil.copytree(work, path, ignore=_not_the_trainers, dirs_exist_ok=True)
            training, validation = split_metrics(
                epoch, metrics, searcher_metric, _recorded_batches_per_epoch(setup.config)
            )
            if training:
                core.train.report_training_metrics(steps_completed=epoch, metrics=training)
            core.train.report_validation_metrics(steps_completed=epoch, metrics=validation)
            core.train.report_progress(min(1.0, epoch / max_epochs))
            ended.update(epoch=epoch, checkpoint=storage_id)
            shown = ", ".join(f"{k} {v:.4g}" for k, v in {**training, **validation}.items())
            logger.info(f"epoch {epoch}/{max_epochs}: {shown}; checkpoint {storage_id}")
            simulated = setup.preempt_after is not None and epoch >= setup.preempt_after
            if core.preempt.should_preempt() or simulated:
                ended["state"] = "preempted"
                return False
            return True

        done = model.fit(max_epochs, work, report)
        ended["epoch"] = max(ended["epoch"], done)
        if ended["state"] == "completed" and done >= max_epochs:
            with core.checkpoint.store_path({"steps_completed": done}) as (path, storage_id):
                shutil.copytree(work, path, ignore=_not_the_trainers, dirs_exist_ok=True)
                model.save_model(Path(path) / MODEL_FOLDER)
            ended["checkpoint"] = storage_id
            logger.info(f"model saved in checkpoint {storage_id} ({MODEL_FOLDER}/)")
        elif ended["state"] == "completed":
            ended["state"] = "stopped"
    logger.info(f"{ended['state']} after epoch {ended['epoch']}, checkpoint {ended['checkpoint']}")
    return ended


def main() -> int:
    import determined as det

    logging.basicConfig(level=logging.INFO, format=det.LOG_FORMAT, stream=sys.stdout, force=True)
    started = time.perf_counter()
    try:
        info = det.get_cluster_info()
        if info is not None:
            setup = TrialSetup.from_cluster(info)
        else:
            local = os.environ.get(LOCAL_TRIAL_ENV)
            if not local:
                raise Invalid(
                    "not in a Determined trial, and no local trial described",
                    f"run it on a cluster (cdl experiment submit), or set {LOCAL_TRIAL_ENV} to a "
                    "local-trial file (see pipelines/model/entrypoint.py)",
                )
            setup = TrialSetup.from_file(Path(local))
        distributed = det.core.DummyDistributedContext() if setup.slots > 1 else None
        with det.core.init(
            distributed=distributed,
            checkpoint_storage=None if setup.cluster else setup.checkpoint_storage,
        ) as core:
            run_trial(core, setup)
    except CDLError as exc:
        logger.error(f"failed: {exc}")
        return 2
    logger.info(f"took {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
