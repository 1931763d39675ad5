"""A bundle: one registered model version made servable, and the model that runs it.

A bundle folder holds the version's ONNX export (outputs ``logits`` and ``features``), the PCA of
its drift reference and a ``meta.json`` (version, dataset, classes, preprocessing, and from model
validation the temperature and the conformal threshold; bundles made before carry neither and
serve uncalibrated probabilities without prediction sets). Release puts
it in the BentoML model store and publishes it to storage (``serving/bundles/<name>/``), so a
replica on any host finds a deployed model: from its own store, else fetched from storage into
a local cache (``fetch_bundle``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ml.layout import bundle_key
from ml.storage import Storage
from ml.training.preprocessing import Preprocessing

BUNDLE_ONNX = "model.onnx"
BUNDLE_META = "meta.json"
BUNDLE_PCA = "pca.npz"
BUNDLE_FILES = (BUNDLE_ONNX, BUNDLE_PCA, BUNDLE_META)  # meta.json last: its presence means complete


def bundle_name(tag: str) -> str:
    """The storage name of a model-store tag: ``product-classifier:v3-<run>`` -> ``v3-<run>``."""
    return tag.split(":", 1)[-1]


def publish_bundle(storage: Storage, tag: str, folder: Path) -> bool:
    """Copy a bundle folder to storage (meta.json last); False when it was there already."""
    name = bundle_name(tag)
    if storage.exists(bundle_key(name, BUNDLE_META)):
        return False
    for file in BUNDLE_FILES:
        storage.write_bytes(bundle_key(name, file), (folder / file).read_bytes())
    return True


def fetch_bundle(storage: Storage, tag: str, cache: Path) -> Path:
    """The bundle folder of ``tag`` under ``cache``, downloaded from storage when not there yet."""
    folder = cache / bundle_name(tag)
    if (folder / BUNDLE_META).is_file():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache))
    try:
        for file in BUNDLE_FILES:
            storage.download(bundle_key(bundle_name(tag), file), partial / file)
        os.replace(partial, folder)  # whole or not at all: another worker may race us to it
    except OSError:
        if not (folder / BUNDLE_META).is_file():
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


@dataclass(frozen=True)
class BundleMeta:
    model_version: str
    dataset_version: str
    run_id: str
    classes: list[str]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    temperature: float | None = None  # logits are divided by it (temperature scaling)
    conformal_threshold: float | None = None  # a class is in the prediction set when p >= 1 - this
    coverage: float | None = None  # the coverage the threshold was fitted for
    jpeg_draft: bool = False  # preprocessing v2 (bundles made before decode at full size)

    @property
    def preprocessing(self) -> Preprocessing:
        mean, std = tuple(self.mean), tuple(self.std)
        return Preprocessing(self.image_size, mean, std, self.jpeg_draft)  # type: ignore[arg-type]

    @classmethod
    def read(cls, folder: Path) -> BundleMeta:
        raw = json.loads((folder / BUNDLE_META).read_text())
        return cls(**{key: raw[key] for key in cls.__dataclass_fields__ if key in raw})


def write_bundle(folder: Path, onnx_file: Path, pca_file: Path, meta: BundleMeta) -> None:
    """Lay a bundle out in ``folder`` (a BentoML model directory in production)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / BUNDLE_ONNX).write_bytes(onnx_file.read_bytes())
    (folder / BUNDLE_PCA).write_bytes(pca_file.read_bytes())
    (folder / BUNDLE_META).write_text(json.dumps(asdict(meta), indent=2))


@dataclass
class Outputs:
    """Model outputs for a batch: class probabilities and the embedding's PCA projection."""

    proba: np.ndarray  # (N, classes)
    projected: np.ndarray  # (N, components)


class ServingModel:
    """One bundle loaded into ONNX Runtime. ``infer`` is thread-safe (ORT sessions are)."""

    def __init__(self, folder: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        self.meta = BundleMeta.read(folder)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # idle threads sleep instead of spinning: the other workers and the decoders need the cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(folder / BUNDLE_ONNX), options, providers=["CPUExecutionProvider"]
        )
        outputs = {out.name for out in self.session.get_outputs()}
        if not {"logits", "features"} <= outputs:
            raise ValueError(f"{folder / BUNDLE_ONNX} must output logits and features, has {sorted(outputs)}")
        with np.load(folder / BUNDLE_PCA) as pca:
            self.pca_mean, self.pca_components = pca["mean"], pca["components"]
        self.version = self.meta.model_version
        self.prep = self.meta.preprocessing

    def infer(self, batch: np.ndarray) -> Outputs:
        logits, features = self.session.run(["logits", "features"], {"image": batch})
        if self.meta.temperature:
            logits = logits / np.float32(self.meta.temperature)
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        proba = shifted / shifted.sum(axis=1, keepdims=True)
        return Outputs(proba, (features - self.pca_mean) @ self.pca_components.T)

    def answer(self, proba: np.ndarray) -> dict[str, Any]:
        """The service's answer for one image's probabilities (without its ``request_id``)."""
        classes = self.meta.classes
        best = int(np.argmax(proba))
        return {
            "predicted_class": classes[best],
            "confidence": float(proba[best]),
            "probabilities": {name: float(p) for name, p in zip(classes, proba, strict=True)},
            "model_version": self.version,
            **self.abstention(proba),  # prediction_set, abstain: bundles with a conformal threshold
        }

    def abstention(self, proba: np.ndarray) -> dict[str, Any]:
        """``prediction_set`` (class names) and ``abstain`` (more than one class) for one answer;
        nothing for a bundle without a conformal threshold."""
        threshold = self.meta.conformal_threshold
        if threshold is None:
            return {}
        members = conformal_set(proba, threshold)
        return {"prediction_set": [self.meta.classes[k] for k in members], "abstain": len(members) > 1}


def conformal_set(proba: np.ndarray, threshold: float) -> list[int]:
    """Classes with p >= 1 - threshold, most probable first; always the top class (as training's
    ``ml.training.calibration.prediction_sets``)."""
    order = [int(k) for k in np.argsort(-proba, kind="stable")]
    return [order[0], *(k for k in order[1:] if proba[k] >= 1.0 - threshold)]
