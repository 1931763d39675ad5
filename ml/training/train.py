"""Train the classifier head on cached backbone features with PyTorch Lightning.

With a frozen backbone (the default), every image's features come from the feature cache
(``ml.training.features``): view 0 is the clean image, views 1..V-1 augmented copies. Each epoch draws
one cached view per training image, so augmentation costs nothing after the first run.
Validation and test use view 0 only.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ml.config import Settings
from ml.training.evaluate import Evaluation, evaluate
from ml.training.model import Head, predict_proba

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Hyperparameters:
    epochs: int
    learning_rate: float
    batch_size: int
    optimizer: str
    scheduler: str
    patience: int
    monitor: str
    seed: int
    dropout: float
    accelerator: str = "cpu"
    devices: int = 1
    strategy: str = "auto"

    @property
    def trainer_strategy(self) -> str:
        """Lightning's strategy: with several devices, "auto" means ddp_fork, which (unlike "ddp", which
        relaunches the script) works inside an Airflow task, a notebook or a test."""
        if self.devices > 1 and self.strategy == "auto":
            return "ddp_fork"
        return self.strategy

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> Hyperparameters:
        training = settings.training
        values = {
            "epochs": training.epochs,
            "learning_rate": training.learning_rate,
            "batch_size": training.batch_size,
            "optimizer": training.optimizer,
            "scheduler": training.scheduler,
            "patience": training.early_stopping.patience,
            "monitor": training.early_stopping.monitor,
            "seed": training.seed,
            "dropout": settings.model.dropout_rate,
            "accelerator": training.accelerator,
            "devices": training.devices,
            "strategy": training.strategy,
        }
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)


@dataclass
class SplitData:
    features: np.ndarray  # (N, V, D) float32
    labels: np.ndarray  # (N,) int64
    sha256: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def split_data(rows: pd.DataFrame, features: np.ndarray, classes: list[str]) -> dict[str, SplitData]:
    """Features and label indices per split; rows with labels outside ``classes`` are an error."""
    unknown = sorted(set(rows["label"]) - set(classes))
    if unknown:
        raise ValueError(f"catalog has labels outside the configured classes: {unknown}")
    index = {name: i for i, name in enumerate(classes)}
    out = {}
    for split in SPLITS:
        mask = (rows["split"] == split).to_numpy()
        out[split] = SplitData(
            features[mask].astype(np.float32),
            rows.loc[mask, "label"].map(index).to_numpy(dtype=np.int64),
            list(rows.loc[mask, "sha256"]),
        )
        if len(out[split]) == 0:
            raise ValueError(f"the dataset has no {split} images yet: ingest more days before training")
    return out


class HeadModule(L.LightningModule):
    """Cross-entropy training of ``head``; logs loss/accuracy and val_loss/val_accuracy per epoch.

    ``record`` (the epoch history, the best epoch) is the module's extra state, so under DDP it travels
    back from rank 0 with the weights to the process that called ``fit``.
    """

    def __init__(self, head: nn.Module, hparams: Hyperparameters) -> None:
        super().__init__()
        self.head = head
        self.hp = hparams
        self.loss = nn.CrossEntropyLoss()
        self.record: dict[str, Any] = {"history": [], "best_epoch": 0, "best_value": 0.0, "stopped": False}

    def get_extra_state(self) -> dict[str, Any]:
        return self.record

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.record = state

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], prefix: str) -> torch.Tensor:
        features, labels = batch
        logits = self(features)
        loss = self.loss(logits, labels)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        # sync_dist: under DDP every rank sees the same epoch metric (early stopping, best weights)
        self.log(f"{prefix}loss", loss, on_step=False, on_epoch=True, batch_size=len(labels), sync_dist=True)
        self.log(
            f"{prefix}accuracy",
            accuracy,
            on_step=False,
            on_epoch=True,
            batch_size=len(labels),
            sync_dist=True,
        )
        return loss

    def on_train_epoch_start(self) -> None:
        self._sums = torch.zeros(3)  # loss x rows, correct rows, rows

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The epoch's loss and accuracy are summed here and logged once, at its last batch: Lightning's
        per-call logging cost more than a step of the head itself."""
        features, labels = batch
        logits = self(features)
        loss = self.loss(logits, labels)
        with torch.no_grad():
            correct = (logits.argmax(dim=1) == labels).sum()
            self._sums += torch.stack(
                [loss.detach() * len(labels), correct.float(), torch.tensor(len(labels))]
            )
        if batch_idx == self.trainer.num_training_batches - 1:
            loss_sum, correct_sum, rows = self._sums
            self.log("loss", loss_sum / rows, on_step=False, on_epoch=True, batch_size=1, sync_dist=True)
            self.log(
                "accuracy", correct_sum / rows, on_step=False, on_epoch=True, batch_size=1, sync_dist=True
            )
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val_")

    def parameter_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.head.parameters()), "lr": self.hp.learning_rate}]

    def configure_optimizers(self) -> Any:
        optimizers = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW, "SGD": torch.optim.SGD}
        # foreach: one kernel per step for all parameters instead of one per tensor (torch's CPU default)
        foreach = {} if self.hp.optimizer == "SGD" else {"foreach": True}
        optimizer = optimizers[self.hp.optimizer](
            self.parameter_groups(), lr=self.hp.learning_rate, **foreach
        )
        if self.hp.scheduler == "none":
            return optimizer
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", patience=3, factor=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val_loss"}}


class ViewSamplingData(L.LightningDataModule):
    """Each epoch draws one cached view per training image (seeded by seed and epoch)."""

    def __init__(self, train: SplitData, val: SplitData, hparams: Hyperparameters) -> None:
        super().__init__()
        self.train, self.val, self.hp = train, val, hparams

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch if self.trainer else 0
        rng = np.random.default_rng([self.hp.seed, epoch])
        views = rng.integers(0, self.train.features.shape[1], size=len(self.train))
        chosen = self.train.features[np.arange(len(self.train)), views]
        generator = torch.Generator().manual_seed(self.hp.seed + epoch)
        order = torch.randperm(len(self.train), generator=generator)  # the order shuffle=True would draw
        dataset = Batches(
            torch.from_numpy(chosen), torch.from_numpy(self.train.labels), rank_batch_size(self), order
        )
        return DataLoader(dataset, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        features, labels = torch.from_numpy(self.val.features[:, 0]), torch.from_numpy(self.val.labels)
        return DataLoader(Batches(features, labels, max(self.hp.batch_size, 256)), batch_size=None)


def rank_batch_size(data: L.LightningDataModule) -> int:
    """Each process's share of ``batch_size``: under DDP the ranks' batches together make one batch of
    the configured size, so the same hyperparameters take the same steps on 1 process or N."""
    world = data.trainer.world_size if data.trainer else 1
    return max(1, data.hp.batch_size // world)


class Batches(Dataset):
    """Whole batches sliced from in-memory tensors (one index per batch, not per row: the head trains on
    cached features, where a per-row dataset and the collate step cost more than the head's own step)."""

    def __init__(
        self, features: torch.Tensor, labels: torch.Tensor, batch_size: int, order: torch.Tensor | None = None
    ) -> None:
        self.features, self.labels, self.batch_size = features, labels, batch_size
        self.order = order if order is not None else torch.arange(len(labels))

    def __len__(self) -> int:
        return (len(self.order) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        return self.features[rows], self.labels[rows]


class EpochMetrics(L.Callback):
    """Records each finished epoch's metrics in the module and hands them to ``sink`` (MLflow in
    production, a list in tests); under DDP the caller replays them after the fit instead, so no forked
    process writes to the tracking store."""

    def __init__(self, sink: Callable[[dict[str, float], int], None] | None) -> None:
        self.sink = sink

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in _EPOCH_KEYS}
        if "loss" not in metrics:  # the first validation pass runs before any training epoch ends
            return
        metrics["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        module.record["history"].append({"epoch": trainer.current_epoch, **metrics})
        if self.sink is not None and trainer.world_size == 1:
            self.sink(metrics, trainer.current_epoch)


_EPOCH_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")


@dataclass
class FitResult:
    head: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = 0.0
    stopped_early: bool = False


def fit_head(
    head: nn.Module,
    data: dict[str, SplitData],
    hparams: Hyperparameters,
    sink: Callable[[dict[str, float], int], None] | None = None,
    *,
    callbacks: Sequence[L.Callback] | None = None,
) -> FitResult:
    """Train ``head`` on cached features with early stopping; return the best epoch's weights.

    ``callbacks`` run after the built-in ones each epoch (a tuning trial's pruning hook).
    """
    data_module = ViewSamplingData(data["train"], data["val"], hparams)
    return fit_module(HeadModule(head, hparams), data_module, hparams, sink, callbacks=callbacks)


def fit_module(
    module: HeadModule,
    data_module: L.LightningDataModule,
    hparams: Hyperparameters,
    sink: Callable[[dict[str, float], int], None] | None = None,
    *,
    callbacks: Sequence[L.Callback] | None = None,
) -> FitResult:
    """Fit ``module`` with early stopping on ``hparams.monitor`` on ``hparams.devices`` (DDP when more
    than one); ``module.head`` ends with the best epoch's weights, here and under DDP alike."""
    L.seed_everything(hparams.seed, workers=True, verbose=False)
    mode = "max" if "accuracy" in hparams.monitor else "min"
    stopper = L.pytorch.callbacks.EarlyStopping(monitor=hparams.monitor, mode=mode, patience=hparams.patience)
    trainer = L.Trainer(
        max_epochs=hparams.epochs,
        accelerator=hparams.accelerator,
        devices=hparams.devices,
        strategy=hparams.trainer_strategy,
        deterministic=True,
        callbacks=[EpochMetrics(sink), stopper, _BestWeights(hparams.monitor, mode), *(callbacks or ())],
        reload_dataloaders_every_n_epochs=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data_module)
    record = module.record
    if sink is not None and trainer.world_size > 1:
        for entry in record["history"]:
            sink({k: v for k, v in entry.items() if k != "epoch"}, int(entry["epoch"]))
    module.head.cpu()
    return FitResult(
        module.head, record["history"], record["best_epoch"], record["best_value"], record["stopped"]
    )


class _BestWeights(L.Callback):
    """Keeps the head's weights from the best epoch in memory (no checkpoint files) and puts them back
    into the head when the fit ends."""

    def __init__(self, monitor: str, mode: str) -> None:
        self.monitor, self.mode = monitor, mode
        self.value = -np.inf if mode == "max" else np.inf
        self.epoch = 0
        self.state: dict[str, torch.Tensor] = {}

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        better = value > self.value if self.mode == "max" else value < self.value
        if better or not self.state:
            self.value, self.epoch = value, trainer.current_epoch
            self.state = {k: v.detach().clone() for k, v in module.head.state_dict().items()}

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.state:
            module.head.load_state_dict(self.state)
        stopper = trainer.early_stopping_callback
        module.record.update(
            best_epoch=self.epoch,
            best_value=float(self.value) if self.state else 0.0,
            stopped=bool(stopper is not None and stopper.stopped_epoch > 0),
        )


@dataclass
class TrainResult:
    """A fitted head and how it did on the test split."""

    head: nn.Module
    fit: FitResult
    evaluation: Evaluation
    test_proba: np.ndarray
    backbone: Any = None  # a fine-tuned Backbone (None: the snapshot's frozen one)...
    features: np.ndarray | None = None  # ...and every row's clean-view features under it, (N, 1, D)
    held_out: SplitData | None = None  # val the fit did not train on, to calibrate on (None: all of val)


def train(
    data: dict[str, SplitData],
    classes: list[str],
    hparams: Hyperparameters,
    sink: Callable[[dict[str, float], int], None] | None = None,
) -> TrainResult:
    """The pure core of a retrain: a new head fitted on the features, evaluated on the test split."""
    head = Head(data["train"].features.shape[2], len(classes), hparams.dropout)
    fit = fit_head(head, data, hparams, sink)
    proba = predict_proba(fit.head, data["test"].features[:, 0])
    return TrainResult(fit.head, fit, evaluate(data["test"].labels, proba, classes, seed=hparams.seed), proba)


def training_curves_png(history: list[dict[str, float]]) -> bytes:
    """Loss and accuracy per epoch, train and validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, axis in (("loss", left), ("accuracy", right)):
        axis.plot(epochs, [h.get(key, np.nan) for h in history], label=f"train {key}")
        axis.plot(epochs, [h.get(f"val_{key}", np.nan) for h in history], label=f"val {key}")
        axis.set_xlabel("epoch")
        axis.set_title(key)
        axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()
