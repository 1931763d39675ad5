from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from ml.config import load_settings
from ml.training.model import predict_proba
from ml.training.train import Hyperparameters, SplitData, fit_head, split_data, training_curves_png

SETTINGS = load_settings(environ={})


def clusters(n: int, classes: int, dim: int, views: int, seed: int, noise: float = 0.6) -> SplitData:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(size=(classes, dim)).astype(np.float32)
    labels = rng.integers(0, classes, size=n)
    features = centres[labels][:, None, :] + rng.normal(scale=noise, size=(n, views, dim)).astype(np.float32)
    return SplitData(features.astype(np.float32), labels.astype(np.int64), [f"{i:064x}" for i in range(n)])


def head(dim: int = 16, classes: int = 5) -> nn.Module:
    return nn.Sequential(
        nn.Dropout(0.3), nn.Linear(dim, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, classes)
    )


def hparams(**overrides: object) -> Hyperparameters:
    return Hyperparameters.from_settings(SETTINGS, **{"epochs": 30, "patience": 5, **overrides})


def test_head_learns_separable_features_and_logs_every_epoch() -> None:
    data = {
        "train": clusters(400, 5, 16, 3, 1),
        "val": clusters(100, 5, 16, 1, 2),
        "test": clusters(100, 5, 16, 1, 3),
    }
    logged: list[tuple[dict[str, float], int]] = []
    result = fit_head(head(), data, hparams(), sink=lambda metrics, step: logged.append((metrics, step)))
    accuracy = (
        predict_proba(result.head, data["test"].features[:, 0]).argmax(1) == data["test"].labels
    ).mean()
    assert accuracy > 0.9
    assert len(logged) == len(result.history) >= 2
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "lr"} <= set(logged[0][0])
    assert logged[-1][0]["loss"] < logged[0][0]["loss"]
    assert result.best_val_accuracy == max(h["val_accuracy"] for h in result.history)


def test_training_is_deterministic_for_a_seed() -> None:
    data = {
        "train": clusters(200, 5, 16, 2, 1),
        "val": clusters(50, 5, 16, 1, 2),
        "test": clusters(50, 5, 16, 1, 3),
    }
    torch.manual_seed(0)
    first = fit_head(head(), data, hparams(epochs=5))
    torch.manual_seed(0)
    second = fit_head(head(), data, hparams(epochs=5))
    for a, b in zip(first.head.state_dict().values(), second.head.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_early_stopping_stops_when_validation_does_not_improve() -> None:
    rng = np.random.default_rng(5)
    noise = SplitData(rng.normal(size=(200, 1, 16)).astype(np.float32), rng.integers(0, 5, 200), ["x"] * 200)
    result = fit_head(head(), {"train": noise, "val": noise, "test": noise}, hparams(epochs=200, patience=3))
    assert result.stopped_early and len(result.history) < 200


def test_split_data_maps_labels_and_refuses_unknown_ones() -> None:
    rows = pd.DataFrame(
        {
            "sha256": list("abcdef"),
            "label": ["books", "toys", "home", "books", "toys", "home"],
            "split": ["train", "train", "val", "test", "train", "val"],
        }
    )
    features = np.arange(6 * 2 * 3, dtype=np.float32).reshape(6, 2, 3)
    data = split_data(rows, features, SETTINGS.classes)
    assert data["train"].sha256 == ["a", "b", "e"]
    assert list(data["train"].labels) == [SETTINGS.classes.index(x) for x in ("books", "toys", "toys")]
    assert np.array_equal(data["test"].features, features[[3]])
    with pytest.raises(ValueError, match="outside the configured classes"):
        split_data(rows.assign(label="spaceships"), features, SETTINGS.classes)
    with pytest.raises(ValueError, match="no val images"):
        split_data(rows.assign(split="train"), features, SETTINGS.classes)


def test_training_curves_png() -> None:
    history = [
        {"epoch": i, "loss": 1 / (i + 1), "val_loss": 1.2 / (i + 1), "accuracy": 0.5, "val_accuracy": 0.4}
        for i in range(4)
    ]
    assert training_curves_png(history).startswith(b"\x89PNG")
