"""The drift reference a model is trained with: what its inputs and outputs looked like.

Built when a model is trained, from the held-out rows (val + test) of its dataset version, so
the model's outputs on it are not inflated by training; logged with the model's MLflow run
(``drift_reference/``). It holds, per image: the ingestion properties, the backbone embedding
projected on a PCA fitted on the reference, the label, and the model's predicted class and
confidence; plus the PCA itself and the feature-cache id the embeddings came from. Drift
monitoring (``ml.monitoring``) compares new images and served traffic against it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

PROPERTY_COLUMNS = ("width", "height", "file_bytes", "brightness", "contrast", "blur")


def pca_columns(components: int) -> list[str]:
    return [f"embedding_pc{i}" for i in range(components)]


@dataclass(frozen=True)
class Reference:
    """What a model's inputs and outputs looked like when it was trained."""

    frame: pd.DataFrame  # properties, embedding_pc*, label, predicted_class, confidence
    pca_mean: np.ndarray  # (D,)
    pca_components: np.ndarray  # (k, D)
    cache_id: str
    classes: list[str]
    dataset_version: str

    def project(self, embeddings: np.ndarray) -> np.ndarray:
        return (embeddings - self.pca_mean) @ self.pca_components.T

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.frame.to_parquet(folder / "reference.parquet", index=False)
        np.savez(folder / "pca.npz", mean=self.pca_mean, components=self.pca_components)
        meta = {"cache_id": self.cache_id, "classes": self.classes, "dataset_version": self.dataset_version}
        (folder / "meta.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, folder: Path) -> Reference:
        meta = json.loads((folder / "meta.json").read_text())
        with np.load(folder / "pca.npz") as pca:
            mean, components = pca["mean"], pca["components"]
        frame = pd.read_parquet(folder / "reference.parquet")
        return cls(frame, mean, components, meta["cache_id"], meta["classes"], meta["dataset_version"])


def fit_pca(embeddings: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and top principal axes (k, D) of ``embeddings`` (SVD; signs fixed for reproducibility)."""
    mean = embeddings.mean(axis=0)
    _, _, axes = np.linalg.svd(embeddings - mean, full_matrices=False)
    axes = axes[: min(components, len(axes))]
    signs = np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])
    return mean.astype(np.float32), (axes * signs[:, None]).astype(np.float32)


def batch_frame(
    rows: pd.DataFrame,
    projected: np.ndarray,
    proba: np.ndarray,
    classes: list[str],
) -> pd.DataFrame:
    """One row per image: the columns drift compares."""
    frame = rows[list(PROPERTY_COLUMNS)].astype(float).reset_index(drop=True)
    for i, column in enumerate(pca_columns(projected.shape[1])):
        frame[column] = projected[:, i]
    frame["label"] = rows["label"].astype(str).to_numpy() if "label" in rows else "unknown"
    frame["predicted_class"] = np.asarray(classes)[proba.argmax(axis=1)]
    frame["confidence"] = proba.max(axis=1)
    return frame


def build_reference(
    rows: pd.DataFrame,
    embeddings: np.ndarray,
    proba: np.ndarray,
    classes: list[str],
    *,
    cache_id: str,
    dataset_version: str,
    components: int,
    max_rows: int,
    seed: int = 0,
) -> Reference:
    """A reference from held-out rows, their clean-view embeddings (N, D) and the model's probabilities."""
    if len(rows) > max_rows:
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), max_rows, replace=False))
        rows, embeddings, proba = rows.iloc[keep], embeddings[keep], proba[keep]
    mean, axes = fit_pca(embeddings.astype(np.float32), components)
    projected = (embeddings - mean) @ axes.T
    return Reference(
        batch_frame(rows, projected, proba, classes), mean, axes, cache_id, classes, dataset_version
    )
