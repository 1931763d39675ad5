"""Stratified k-fold cross-validation of one configuration, and the final fit on train+val.

Each fold trains a fresh head on the other k-1 folds of train+val, with early stopping on its own
held-out fold, and reports accuracy and macro F1 of its best epoch on that held-out fold only (the
figures are mildly optimistic, since the fold also chose the epoch; the untouched test split, which
no fold sees, is what the gate judges). The final model trains on all of train+val for the median
of the folds' best epoch counts and keeps its last epoch: nothing is held out to pick another.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import lightning as L
import numpy as np

from ml.training.evaluate import evaluate
from ml.training.model import Head, predict_proba
from ml.training.train import (
    EpochMetrics,
    FitResult,
    HeadModule,
    Hyperparameters,
    SplitData,
    TrainResult,
    ViewSamplingData,
    fit_head,
)


@dataclass(frozen=True)
class FoldResult:
    """One fold: sizes, its best epoch, and accuracy and macro F1 on its own held-out part."""

    fold: int
    train_size: int
    held_out_size: int
    accuracy: float
    f1_macro: float
    best_epoch: int  # 0-based, as Lightning counts
    epochs_run: int
    held_out: tuple[int, ...]  # positions in the pooled train+val data
    predictions: tuple[int, ...]  # the fold head's class for each held-out position, in that order

    def to_dict(self) -> dict[str, Any]:
        return {
            "fold": self.fold,
            "train_size": self.train_size,
            "held_out_size": self.held_out_size,
            "accuracy": round(self.accuracy, 4),
            "f1_macro": round(self.f1_macro, 4),
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
        }


@dataclass(frozen=True)
class CrossValidation:
    """Every fold and the summary: mean and sample standard deviation (ddof=1) across folds."""

    folds: tuple[FoldResult, ...]
    seed: int

    @property
    def accuracy_mean(self) -> float:
        return float(np.mean([f.accuracy for f in self.folds]))

    @property
    def accuracy_sd(self) -> float:
        return float(np.std([f.accuracy for f in self.folds], ddof=1))

    @property
    def f1_macro_mean(self) -> float:
        return float(np.mean([f.f1_macro for f in self.folds]))

    @property
    def f1_macro_sd(self) -> float:
        return float(np.std([f.f1_macro for f in self.folds], ddof=1))

    @property
    def final_epochs(self) -> int:
        """Epochs for the final fit: the median of the folds' best epoch counts (rounded up)."""
        return int(math.ceil(np.median([f.best_epoch + 1 for f in self.folds])))

    def to_dict(self) -> dict[str, Any]:
        return {
            "folds": [f.to_dict() for f in self.folds],
            "k": len(self.folds),
            "seed": self.seed,
            "accuracy_mean": round(self.accuracy_mean, 4),
            "accuracy_sd": round(self.accuracy_sd, 4),
            "f1_macro_mean": round(self.f1_macro_mean, 4),
            "f1_macro_sd": round(self.f1_macro_sd, 4),
            "final_epochs": self.final_epochs,
        }


def epochs_trained(fit: FitResult) -> int:
    """Epochs a fit ran (its history starts at epoch 1: epoch 0 ends before a training loss exists)."""
    return max([h["epoch"] for h in fit.history] + [fit.best_epoch]) + 1


def pool(*parts: SplitData) -> SplitData:
    """Splits concatenated in order (train then val: what CV and the final fit train on)."""
    return SplitData(
        np.concatenate([p.features for p in parts]),
        np.concatenate([p.labels for p in parts]),
        [sha for p in parts for sha in p.sha256],
    )


def subset(data: SplitData, positions: np.ndarray) -> SplitData:
    return SplitData(data.features[positions], data.labels[positions], [data.sha256[i] for i in positions])


def stratified_folds(
    labels: np.ndarray, classes: Sequence[str], k: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train positions, held-out positions) per fold, every class spread evenly (StratifiedKFold)."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(labels, minlength=len(classes))
    too_few = {classes[i]: int(n) for i, n in enumerate(counts) if 0 < n < k}
    if too_few:
        raise ValueError(
            f"{k}-fold cross-validation needs at least {k} train+val images of every class; "
            f"too few: {too_few}"
        )
    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return list(folds.split(np.zeros(len(labels)), labels))


def fold_figures(labels: np.ndarray, predictions: np.ndarray) -> tuple[float, float]:
    """Accuracy and macro F1 (over the classes present in ``labels``)."""
    from sklearn.metrics import f1_score

    present = np.unique(labels)
    f1 = f1_score(labels, predictions, labels=present, average="macro", zero_division=0)
    return float((labels == predictions).mean()), float(f1)


def run_fold(
    fold: int,
    pooled: SplitData,
    positions: tuple[np.ndarray, np.ndarray],
    classes: int,
    hparams: Hyperparameters,
) -> FoldResult:
    """Train on the fold's training part (early stopping on its held-out part), score the held-out part."""
    train_at, held_at = positions
    held_out = subset(pooled, held_at)
    head = Head(pooled.features.shape[2], classes, hparams.dropout)
    fit = fit_head(head, {"train": subset(pooled, train_at), "val": held_out}, hparams)
    predictions = predict_proba(fit.head, held_out.features[:, 0]).argmax(axis=1)
    accuracy, f1 = fold_figures(held_out.labels, predictions)
    return FoldResult(
        fold,
        len(train_at),
        len(held_at),
        accuracy,
        f1,
        fit.best_epoch,
        epochs_trained(fit),
        tuple(int(i) for i in held_at),
        tuple(int(p) for p in predictions),
    )


def cross_validate(
    pooled: SplitData,
    classes: Sequence[str],
    hparams: Hyperparameters,
    k: int,
    seed: int,
    on_fold: Callable[[FoldResult], None] | None = None,
) -> CrossValidation:
    """Stratified k-fold CV of ``hparams`` on ``pooled`` (train+val); ``on_fold`` sees each finished fold."""
    if len(pooled) == 0:
        raise ValueError("cross-validation needs train+val images; the pooled split is empty")
    results = []
    for fold, positions in enumerate(stratified_folds(pooled.labels, classes, k, seed)):
        result = run_fold(fold, pooled, positions, len(classes), hparams)
        if on_fold:
            on_fold(result)
        results.append(result)
    return CrossValidation(tuple(results), seed)


def fit_epochs(
    head: Head,
    train: SplitData,
    watch: SplitData,
    hparams: Hyperparameters,
    sink: Callable[[dict[str, float], int], None] | None = None,
) -> FitResult:
    """Exactly ``hparams.epochs`` epochs, keeping the last; ``watch`` only feeds the logged val curves."""
    L.seed_everything(hparams.seed, workers=True, verbose=False)
    module = HeadModule(head, hparams)
    trainer = L.Trainer(
        max_epochs=hparams.epochs,
        accelerator="cpu",
        deterministic=True,
        callbacks=[EpochMetrics(sink)],
        reload_dataloaders_every_n_epochs=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=ViewSamplingData(train, watch, hparams))
    history = module.record["history"]
    last = history[-1]["val_accuracy"] if history else float("nan")
    return FitResult(head, history, hparams.epochs - 1, last, False)


def train_on_train_and_val(
    data: dict[str, SplitData],
    classes: list[str],
    hparams: Hyperparameters,
    sink: Callable[[dict[str, float], int], None] | None = None,
) -> TrainResult:
    """The tuned model: train and half of val (each class halved) for ``hparams.epochs`` epochs,
    evaluated on the untouched test split. The other half of val is ``held_out``: the calibration's
    temperature and conformal threshold are fitted there, on images the model did not train on (fitted
    on val it trained on, a threshold covered 57% of test images where 90% was asked).

    The logged val curves are in-sample (that half of val is part of the training data here).
    """
    kept, held_out = halve_by_class(data["val"], hparams.seed)
    pooled = pool(data["train"], kept)
    head = Head(pooled.features.shape[2], len(classes), hparams.dropout)
    fit = fit_epochs(head, pooled, kept, hparams, sink)
    proba = predict_proba(fit.head, data["test"].features[:, 0])
    evaluation = evaluate(data["test"].labels, proba, classes, seed=hparams.seed)
    return TrainResult(fit.head, fit, evaluation, proba, held_out=held_out)


def halve_by_class(data: SplitData, seed: int) -> tuple[SplitData, SplitData]:
    """(the rest, half of each class's images, rounded down, at random with ``seed``): a class with one
    image stays in the rest."""
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for label in np.unique(data.labels):
        positions = rng.permutation(np.flatnonzero(data.labels == label))
        held.extend(int(i) for i in positions[: len(positions) // 2])
    chosen = np.zeros(len(data), dtype=bool)
    chosen[held] = True
    return subset(data, np.flatnonzero(~chosen)), subset(data, np.flatnonzero(chosen))


def with_params(base: Hyperparameters, params: dict[str, Any]) -> Hyperparameters:
    """``base`` with the searched parameters (spec names: learning_rate, batch_size, dropout_rate)."""
    return replace(
        base,
        learning_rate=float(params["learning_rate"]),
        batch_size=int(params["batch_size"]),
        dropout=float(params["dropout_rate"]),
    )
