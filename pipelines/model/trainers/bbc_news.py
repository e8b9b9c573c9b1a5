"""The BBC news trainer: Porter-stemmed token counts into an MLP, trained with PyTorch Lightning.

Preprocessing (`featurize`, once per snapshot): each article's words are lowercased and
Porter-stemmed; the vocabulary is every stem found in at least `MIN_DOCUMENTS` articles of the
training part of the train split (the validation carve is held out of it too), most frequent
first, at most `MAX_VOCABULARY`; an article becomes its count of each vocabulary stem. The
`vocabulary` hyperparameter keeps the first N columns, so one featurization serves every trial.

The model (`bbc_news_model.network`): log(1 + count), two hidden layers of Linear, LayerNorm,
GELU and Dropout, logits for the labels; AdamW on cross-entropy. The accelerator is a GPU when one
is present. With `slots > 1` it trains with Lightning's DDP (gloo on CPU, NCCL on GPUs), ranks
started by `ddp.fit_parallel`; `batch_size` is the global batch, split between the ranks.

Each epoch is reproducible from the seed alone (the shuffle and dropout are seeded per epoch), so
a trial resumed from a checkpoint trains exactly as if it had never stopped. The saved model is
`bbc_news_model.py` (models-from-code) with the vocabulary, labels and weights as artifacts.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import warnings
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler, Sampler, Subset, TensorDataset

from pipelines.model.trainer import (
    EpochReport,
    Features,
    Hyperparameter,
    LabeledFile,
    Resources,
    Trainer,
    check_finite,
    checkpoint_name,
    last_checkpoint,
    split_validation,
)
from pipelines.model.trainers import ddp
from pipelines.model.trainers.bbc_news_model import Stems, network

MODEL_CODE = Path(__file__).with_name("bbc_news_model.py")
SUFFIX = ".ckpt"


class EpochSampler(Sampler[int]):
    """A shuffle fixed by (seed, epoch): a resumed trial sees the same order as an unbroken
    one. Lightning calls `set_epoch` before each epoch."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(np.random.default_rng((self.seed, self.epoch)).permutation(self.size).tolist())

    def __len__(self) -> int:
        return self.size


class Classifier(L.LightningModule):
    def __init__(self, net: torch.nn.Module, hparams: Mapping[str, Any], seed: int, data):
        super().__init__()
        self.net = net
        self.settings = dict(hparams)
        self.seed = seed
        self.data = data  # (x_train, y_train, x_val, y_val) tensors
        self.sums = torch.zeros(2)  # loss sum, examples: this epoch's training, this rank
        self.val_metrics: dict[str, float] = {}

    def train_dataloader(self):
        dataset = TensorDataset(self.data[0], self.data[1])
        world, rank = self.trainer.world_size, self.trainer.global_rank
        batch = max(1, self.settings["batch_size"] // world)
        if world > 1:
            sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=self.seed)
        else:
            sampler = EpochSampler(len(dataset), self.seed)
        return DataLoader(dataset, batch_size=batch, sampler=sampler)

    def val_dataloader(self):
        world, rank = self.trainer.world_size, self.trainer.global_rank
        dataset = TensorDataset(self.data[2], self.data[3])
        shard = Subset(dataset, range(rank, len(dataset), world))  # no padding: exact sums
        return DataLoader(shard, batch_size=max(256, self.settings["batch_size"]))

    def configure_optimizers(self):
        return torch.optim.AdamW(
            self.net.parameters(),
            lr=self.settings["learning_rate"],
            weight_decay=self.settings["weight_decay"],
        )

    def on_train_epoch_start(self):
        self.sums = torch.zeros(2)

    def on_train_batch_start(self, batch, batch_index):
        # Dropout draws from the global generator, which Lightning and DataLoader iterators
        # also draw from (at moments that differ after a resume): seed it per batch and rank.
        torch.manual_seed(hash((self.seed, self.current_epoch, batch_index, self.global_rank)))

    def training_step(self, batch, batch_index):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.sums += torch.stack([loss.detach().cpu() * len(y), torch.tensor(float(len(y)))])
        return loss

    def on_validation_epoch_start(self):
        self.val_sums = torch.zeros(3, device=self.device)  # loss sum, correct, examples

    def validation_step(self, batch, batch_index):
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y, reduction="sum")
        correct = (logits.argmax(dim=1) == y).sum()
        examples = torch.tensor(float(len(y)), device=self.device)
        self.val_sums += torch.stack([loss, correct.float(), examples])

    def on_validation_epoch_end(self):
        loss, correct, count = self.trainer.strategy.reduce(self.val_sums, reduce_op="sum")
        self.val_metrics = {
            "val_loss": float(loss / count),
            "val_accuracy": float(correct / count),
        }

    def train_loss(self) -> float:
        loss, count = self.trainer.strategy.reduce(self.sums.to(self.device), reduce_op="sum")
        return float(loss / count)


class Epochs(L.Callback):
    """After each epoch: the metrics (summed over ranks), a checkpoint, then the report; the
    searcher's answer is broadcast from rank 0 so that every rank stops together."""

    def __init__(self, checkpoints: Path, report: EpochReport | None):
        self.checkpoints = checkpoints
        self.report = report
        self.done = 0
        self.started = 0.0

    def on_train_epoch_start(self, trainer, module):
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        epoch = trainer.current_epoch + 1
        metrics = {"loss": module.train_loss(), **module.val_metrics}
        metrics["epoch_seconds"] = time.perf_counter() - self.started
        check_finite(epoch, metrics)
        partial = self.checkpoints / f".{checkpoint_name(epoch, SUFFIX)}.partial"
        trainer.save_checkpoint(partial)
        if trainer.is_global_zero:
            partial.replace(self.checkpoints / checkpoint_name(epoch, SUFFIX))
            for old in self.checkpoints.glob(f"epoch-*{SUFFIX}"):
                if old.name != checkpoint_name(epoch, SUFFIX):
                    old.unlink(missing_ok=True)
        keep = True
        if trainer.is_global_zero and self.report is not None:
            keep = bool(self.report(epoch, metrics))
        keep = trainer.strategy.broadcast(keep, src=0)
        self.done = epoch
        if not keep:
            trainer.should_stop = True


class BBCNewsTrainer(Trainer):
    use_case = "bbc_news"
    task = "text"
    PREPROCESSING_VERSION = "porter-counts-1"
    MAX_VOCABULARY = 20_000
    MIN_DOCUMENTS = 2
    HYPERPARAMETERS = {
        "learning_rate": Hyperparameter(1e-3, float, lambda v: v > 0, "> 0"),
        "hidden": Hyperparameter(256, int, lambda v: v >= 1, ">= 1"),
        "dropout": Hyperparameter(0.3, float, lambda v: 0 <= v < 1, "in [0, 1)"),
        "vocabulary": Hyperparameter(
            5000, int, lambda v: 1 <= v <= 20_000, "in [1, 20000] (stems kept, most frequent)"
        ),
        "batch_size": Hyperparameter(32, int, lambda v: v >= 1, ">= 1"),
        "weight_decay": Hyperparameter(0.0, float, lambda v: v >= 0, ">= 0"),
    }

    @classmethod
    def featurize(cls, files: list[LabeledFile], seed: int, val_fraction: float) -> Features:
        train, val, validation = split_validation(files, seed, val_fraction)
        stems = Stems()
        train_docs = [stems(f.data.decode("utf-8", errors="replace")) for f in train]
        val_docs = [stems(f.data.decode("utf-8", errors="replace")) for f in val]
        documents = Counter(s for doc in train_docs for s in set(doc))
        ranked = sorted(documents.items(), key=lambda item: (-item[1], item[0]))
        vocabulary = [s for s, n in ranked if n >= cls.MIN_DOCUMENTS][: cls.MAX_VOCABULARY]
        index = {s: i for i, s in enumerate(vocabulary)}
        labels = sorted({f.label for f in files})
        code = {label: i for i, label in enumerate(labels)}

        def count(docs: list[list[str]]) -> np.ndarray:
            rows = np.zeros((len(docs), len(vocabulary)), dtype=np.uint16)
            for row, doc in enumerate(docs):
                ids = [index[s] for s in doc if s in index]
                if ids:
                    rows[row] = np.minimum(np.bincount(ids, minlength=len(vocabulary)), 65535)
            return rows

        return Features(
            labels=labels,
            x_train=count(train_docs),
            y_train=np.array([code[f.label] for f in train], dtype=np.int64),
            x_val=count(val_docs),
            y_val=np.array([code[f.label] for f in val], dtype=np.int64),
            preprocessing={
                "tokens": "lowercase letters, 2+, Porter-stemmed (nltk)",
                "vocabulary": vocabulary,
                "min_documents": cls.MIN_DOCUMENTS,
                "version": cls.PREPROCESSING_VERSION,
            },
            validation=validation,
        )

    def __init__(
        self,
        hparams: Mapping[str, Any],
        features: Features,
        resources: Resources,
        seed: int = 0,
    ):
        super().__init__(hparams, features, resources, seed)
        self.inputs = min(self.hparams["vocabulary"], features.x_train.shape[1])
        self.shape = {
            "inputs": self.inputs,
            "hidden": self.hparams["hidden"],
            "classes": len(features.labels),
            "dropout": self.hparams["dropout"],
        }
        torch.manual_seed(seed)
        self.net = network(**self.shape)

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        f, n = self.features, self.inputs
        return (
            torch.from_numpy(f.x_train[:, :n].astype(np.float32)),
            torch.from_numpy(f.y_train.astype(np.int64)),
            torch.from_numpy(f.x_val[:, :n].astype(np.float32)),
            torch.from_numpy(f.y_val.astype(np.int64)),
        )

    def fit(self, max_epochs: int, checkpoints: Path, report: EpochReport) -> int:
        checkpoints.mkdir(parents=True, exist_ok=True)
        if self.resources.slots > 1 and not ddp.launched_externally():
            return ddp.fit_parallel(self, max_epochs, checkpoints, report)
        return self._fit(max_epochs, checkpoints, report, None)

    def _fit(
        self,
        max_epochs: int,
        checkpoints: Path,
        report: EpochReport | None,
        environment: ddp.FixedEnvironment | None,
    ) -> int:
        """Train in this process: alone, or as one rank of `environment` (or of an outside
        launcher's)."""
        torch.set_num_threads(max(1, self.resources.threads))
        done, checkpoint = last_checkpoint(checkpoints, SUFFIX)
        if checkpoint is not None and done >= max_epochs:
            state = torch.load(checkpoint, map_location="cpu", weights_only=False)
            self.net.load_state_dict(
                {k.removeprefix("net."): v for k, v in state["state_dict"].items()}
            )
            return done
        gpu = torch.cuda.is_available()
        parallel = environment is not None or ddp.launched_externally()
        strategy: Any = "auto"
        if parallel:
            strategy = L.pytorch.strategies.DDPStrategy(
                cluster_environment=environment,
                process_group_backend="nccl" if gpu else "gloo",
                timeout=timedelta(minutes=10),
            )
        epochs = Epochs(checkpoints, report)
        module = Classifier(self.net, self.hparams, self.seed, self._tensors())
        with warnings.catch_warnings(), _quiet_lightning():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            warnings.filterwarnings("ignore", ".*LeafSpec.*")
            trainer = L.Trainer(
                accelerator="gpu" if gpu else "cpu",
                devices=self.resources.slots if parallel else 1,
                strategy=strategy,
                max_epochs=max_epochs,
                callbacks=[epochs],
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
                use_distributed_sampler=False,
                default_root_dir=checkpoints,
            )
            trainer.fit(module, ckpt_path=checkpoint)
        self.net = module.net.cpu()
        return max(epochs.done, done)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    def validation_predictions(self) -> tuple[np.ndarray, np.ndarray]:
        x_val, y_val = self.features.x_val[:, : self.inputs], self.features.y_val
        training = self.net.training
        self.net.eval()
        predicted = []
        with torch.no_grad():
            for start in range(0, len(x_val), 1024):
                chunk = torch.from_numpy(x_val[start : start + 1024].astype(np.float32))
                predicted.append(self.net(chunk).argmax(dim=1).numpy())
        self.net.train(training)
        empty = np.zeros(0, dtype=np.int64)
        return np.asarray(y_val, dtype=np.int64), np.concatenate(predicted or [empty])

    def save_model(self, folder: Path) -> None:
        import mlflow

        meta = {
            "labels": self.features.labels,
            "vocabulary": self.features.preprocessing["vocabulary"][: self.inputs],
            "network": self.shape,
            "preprocessing_version": self.PREPROCESSING_VERSION,
            "hyperparameters": self.hparams,
        }
        with tempfile.TemporaryDirectory(prefix="cdl-bbc-model-") as scratch:
            meta_file, weights = Path(scratch) / "preprocessing.json", Path(scratch) / "weights.pt"
            meta_file.write_text(json.dumps(meta))
            torch.save(self.net.cpu().state_dict(), weights)
            mlflow.pyfunc.save_model(
                path=str(folder),
                python_model=str(MODEL_CODE),
                artifacts={"preprocessing": str(meta_file), "weights": str(weights)},
                pip_requirements=[
                    f"torch=={torch.__version__.split('+')[0]}",
                    f"mlflow=={mlflow.__version__}",
                    "nltk",
                    "numpy",
                    "pandas",
                ],
            )


class _quiet_lightning:
    """Lightning's info lines ('GPU available: False ...') are noise in a trial's log."""

    NAMES = ("lightning.pytorch", "lightning.fabric")

    def __enter__(self):
        self.levels = [logging.getLogger(n).level for n in self.NAMES]
        for name in self.NAMES:
            logging.getLogger(name).setLevel(logging.WARNING)

    def __exit__(self, *exc):
        for name, level in zip(self.NAMES, self.levels, strict=True):
            logging.getLogger(name).setLevel(level)
