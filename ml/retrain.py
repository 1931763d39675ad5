"""One retraining run: snapshot -> features -> train -> evaluate -> gate -> register (alias challenger).

Everything is tracked in one MLflow run: params, per-epoch metrics, final metrics with 95%
bootstrap CIs, the confusion matrix, classification report, training curves, class names,
the model (with signature and input example), and an ONNX export checked for parity.
A model is registered only when the gate passes; the gate's decision and every reason are
logged either way.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ml import registry
from ml.config import REPO_ROOT, Settings
from ml.preprocessing import Preprocessing, batch_arrays, decode_rgb
from ml.storage import Storage, StorageError


@dataclass(frozen=True)
class RunContext:
    """Why and by whom a run was started (logged to MLflow)."""

    trigger: str = "manual"  # manual | schedule | drift
    airflow_run_id: str = ""
    reason: str = ""
    report: str = ""
    note: str = ""


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_images(storage: Storage, keys: list[str]) -> list[Any]:
    return [decode_rgb(storage.read_bytes(key)) for key in keys]


def onnx_predict_proba(onnx_path: Path, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Softmax probabilities from an exported model on preprocessed (N, 3, H, W) images."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    outputs = []
    for start in range(0, len(images), batch_size):
        (logits,) = session.run(["logits"], {"image": images[start : start + batch_size]})
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        outputs.append(shifted / shifted.sum(axis=1, keepdims=True))
    return np.concatenate(outputs)


def download_onnx(settings: Settings, version: str, folder: Path) -> Path:
    """The ONNX export logged with a registered model version."""
    mlflow_client = registry.client(settings)
    model_version = mlflow_client.get_model_version(settings.mlflow.registered_model, version)
    return Path(mlflow_client.download_artifacts(model_version.run_id, "onnx/model.onnx", str(folder)))


def test_rows(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[rows["split"] == "test"].reset_index(drop=True)


def feature_cache(settings: Settings, storage: Storage, backbone: Any, prep: Preprocessing) -> Any:
    """The feature cache the config asks for: the clean view plus augmented views when augmenting."""
    from ml.features import FeatureCache
    from ml.model import onnx_runner, torch_runner

    kinds = list(settings.preprocessing.augmentation)
    views = settings.training.augmented_views + 1 if kinds else 1
    runner = (
        onnx_runner(backbone, prep.image_size, settings.model.feature_threads)
        if settings.model.feature_runtime == "onnxruntime"
        else torch_runner(backbone)
    )
    return FeatureCache(storage, backbone, prep, views, kinds, batch_size=16, runner=runner)


def version_correctness(
    settings: Settings, storage: Storage, version: str, test_rows: pd.DataFrame, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, correct) of a registered version on the given test rows, via its ONNX export."""
    prep = Preprocessing.from_settings(settings.preprocessing)
    arrays = batch_arrays(load_images(storage, list(test_rows["curated_key"])), prep)
    with tempfile.TemporaryDirectory() as folder:
        proba = onnx_predict_proba(download_onnx(settings, version, Path(folder)), arrays)
    return proba, proba.argmax(axis=1) == labels


def train_and_register(
    settings: Settings,
    storage: Storage,
    *,
    overrides: dict[str, Any] | None = None,
    context: RunContext | None = None,
    dataset_day: dt.date | None = None,
    force: bool = False,
    shuffle_labels: bool = False,
) -> dict[str, Any]:
    """Train a challenger on the dataset version, gate it against the bar and the champion, register it."""
    import mlflow

    from ml.evaluate import classification_report_text, confusion_matrix_png, decide, evaluate
    from ml.model import Classifier, Head, build_backbone, set_deterministic
    from ml.train import (
        Hyperparameters,
        dataset_rows,
        fit_head,
        predict_proba,
        split_data,
        training_curves_png,
    )

    context = context or RunContext()
    classes = list(settings.classes)
    hparams = Hyperparameters.from_settings(settings, **(overrides or {}))
    try:
        version, rows = dataset_rows(storage, dataset_day)
    except StorageError as exc:  # nothing ingested yet: a scheduled run has nothing to do
        return {"status": "no_data", "reason": str(exc), "model_version": None}
    skip = _already_trained(settings, version["version"], force)
    if skip:
        return skip
    set_deterministic(hparams.seed)
    prep = Preprocessing.from_settings(settings.preprocessing)
    backbone = build_backbone(
        settings.model.architecture, settings.model.pretrained, settings.model.weights_path
    )
    cache = feature_cache(settings, storage, backbone, prep)
    started = time.perf_counter()
    features, stats = cache.features_for(rows)
    feature_seconds = time.perf_counter() - started
    if shuffle_labels:  # negative control: a model that cannot have learned anything real
        rows = rows.assign(label=np.random.default_rng(hparams.seed).permutation(rows["label"].to_numpy()))
    data = split_data(rows, features, classes)

    mlflow.set_tracking_uri(registry.tracking_uri(settings))
    experiment_id = registry.ensure_experiment(settings)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"retrain-{version['version']}") as run:
        mlflow.log_params(
            {
                "learning_rate": hparams.learning_rate,
                "batch_size": hparams.batch_size,
                "epochs_max": hparams.epochs,
                "architecture": backbone.name,
                "backbone_weights": backbone.weights_id,
                "frozen_backbone": settings.model.freeze_backbone,
                "optimizer": hparams.optimizer,
                "scheduler": hparams.scheduler,
                "early_stopping": f"{hparams.monitor}/patience={hparams.patience}",
                "dropout_rate": hparams.dropout,
                "seed": hparams.seed,
                "data_augmentation": ",".join(settings.preprocessing.augmentation) or "none",
                "augmented_views": settings.training.augmented_views,
                "preprocessing": prep.version,
                "dataset_version": version["version"],
                "dataset_rows": len(rows),
                "classes": ",".join(classes),
                "git_commit": git_commit(),
                "airflow_run_id": context.airflow_run_id or "none",
                "trigger": context.trigger,
                "shuffled_labels": shuffle_labels,
            }
        )
        mlflow.set_tags(
            {
                "trigger": context.trigger,
                "reason": context.reason,
                "report": context.report,
                "note": context.note,
            }
        )
        mlflow.log_metrics(
            {
                "feature_cache_hits": stats.hits,
                "feature_cache_misses": stats.misses,
                "feature_seconds": round(feature_seconds, 3),
            }
        )
        head = Head(backbone.dim, len(classes), hparams.dropout)
        fit = fit_head(head, data, hparams, sink=lambda values, step: mlflow.log_metrics(values, step=step))
        proba = predict_proba(fit.head, data["test"].features[:, 0])
        evaluation = evaluate(data["test"].labels, proba, classes, seed=hparams.seed)
        mlflow.log_metrics(
            {**evaluation.flat_metrics(), "best_epoch": fit.best_epoch, "epochs_run": len(fit.history)}
        )

        champion = registry.version_for_alias(settings, registry.CHAMPION)
        champion_correct = None
        if champion:
            _, champion_correct = version_correctness(
                settings, storage, champion, test_rows(rows), data["test"].labels
            )
        decision = decide(
            evaluation,
            settings.acceptance,
            champion_correct,
            margin=settings.acceptance.non_inferiority_margin,
            alpha=settings.acceptance.alpha,
        )
        model = Classifier(backbone.module, fit.head).eval()
        parity = _log_model_and_onnx(model, settings, storage, rows, prep)
        limit = settings.acceptance.onnx_max_abs_diff
        decision.add_check(
            "onnx_parity",
            parity,
            limit,
            parity <= limit,
            f"ONNX export differs from PyTorch by {parity:.2e} > {limit}",
        )
        mlflow.log_metric("onnx_max_abs_diff", parity)
        gate = decision.to_dict() | {"champion_version": champion}
        mlflow.log_dict(evaluation.to_dict(), "evaluation/evaluation.json")
        mlflow.log_dict(gate, "evaluation/gate.json")
        mlflow.log_text(classification_report_text(evaluation), "evaluation/classification_report.txt")
        mlflow.log_image(_png(confusion_matrix_png(evaluation)), "evaluation/confusion_matrix.png")
        mlflow.log_image(_png(training_curves_png(fit.history)), "evaluation/training_curves.png")
        mlflow.log_dict({"classes": classes}, "model_meta/class_names.json")
        _log_drift_reference(settings, rows, features[:, 0], fit.head, cache.id, version["version"])
        mlflow.set_tag("gate", "passed" if decision.passed else "failed")
        model_version = (
            _register(settings, run.info.run_id, version["version"], evaluation, decision)
            if decision.passed
            else None
        )
        return {
            "status": "registered" if model_version else "rejected",
            "run_id": run.info.run_id,
            "model_version": model_version,
            "dataset_version": version["version"],
            "champion_version": champion,
            "metrics": {
                k: v
                for k, v in evaluation.flat_metrics().items()
                if not k.startswith(("precision_", "recall_", "f1_")) or k == "f1_macro"
            },
            "gate": {"passed": decision.passed, "reasons": decision.reasons},
            "feature_cache": {
                "hits": stats.hits,
                "misses": stats.misses,
                "seconds": round(feature_seconds, 2),
            },
            "epochs_run": len(fit.history),
        }


def _log_drift_reference(
    settings: Settings,
    rows: pd.DataFrame,
    embeddings: np.ndarray,
    head: Any,
    cache_id: str,
    dataset_version: str,
) -> None:
    """The held-out rows' properties, embeddings and model outputs: what drift compares against."""
    import mlflow

    from ml.drift import REFERENCE_ARTIFACTS, build_reference
    from ml.train import predict_proba

    held_out = (rows["split"] != "train").to_numpy()
    reference = build_reference(
        rows[held_out].reset_index(drop=True),
        embeddings[held_out],
        predict_proba(head, embeddings[held_out]),
        list(settings.classes),
        cache_id=cache_id,
        dataset_version=dataset_version,
        components=settings.monitoring.embedding_components,
        max_rows=settings.monitoring.reference_max_rows,
        seed=settings.training.seed,
    )
    with tempfile.TemporaryDirectory() as folder:
        reference.save(Path(folder))
        mlflow.log_artifacts(folder, REFERENCE_ARTIFACTS)


def _png(data: bytes) -> Any:
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data))


def _log_model_and_onnx(
    model: Any, settings: Settings, storage: Storage, rows: pd.DataFrame, prep: Preprocessing
) -> float:
    """Log the PyTorch model (signature, input example) and its ONNX export; return the parity gap."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    from ml.model import SERVING_OUTPUTS, ServingGraph, export_onnx, onnx_parity

    sample = batch_arrays(load_images(storage, list(rows["curated_key"].head(4))), prep)
    with torch.inference_mode():
        logits = model(torch.from_numpy(sample)).numpy()
    mlflow.pytorch.log_model(
        model,
        name="model",
        serialization_format="pickle",
        signature=infer_signature(sample, logits),
        input_example=sample[:1],
        pip_requirements=[
            f"torch=={torch.__version__.split('+')[0]}",
            "torchvision==0.29.1",
            "efficientnet-lite-pytorch==0.1.0",
        ],
    )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        export_onnx(ServingGraph(model), path, prep.image_size, SERVING_OUTPUTS)
        parity = onnx_parity(model, path, sample)
        mlflow.log_artifact(str(path), "onnx")
    return float(parity)


def _register(settings: Settings, run_id: str, dataset_version: str, evaluation: Any, decision: Any) -> str:
    import mlflow

    name = settings.mlflow.registered_model
    version = str(mlflow.register_model(f"runs:/{run_id}/model", name).version)
    mlflow_client = registry.client(settings)
    mlflow_client.set_registered_model_alias(name, registry.CHALLENGER, version)
    tags = {
        "dataset_version": dataset_version,
        "accuracy": f"{evaluation.accuracy.value:.4f}",
        "f1_macro": f"{evaluation.f1_macro.value:.4f}",
        "gate": "passed",
        "gate_reasons": json.dumps(decision.reasons),
        "run_id": run_id,
    }
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(name, version, key, value)
    return version


def _already_trained(settings: Settings, dataset_version: str, force: bool) -> dict[str, Any] | None:
    """Skip when the champion was trained on this exact dataset version (unless forced)."""
    if force:
        return None
    champion = registry.version_for_alias(settings, registry.CHAMPION)
    if champion is None:
        return None
    tags = registry.client(settings).get_model_version(settings.mlflow.registered_model, champion).tags
    if tags.get("dataset_version") != dataset_version:
        return None
    return {
        "status": "skipped",
        "reason": f"champion v{champion} was trained on dataset {dataset_version}; use force to retrain",
        "model_version": None,
        "champion_version": champion,
        "dataset_version": dataset_version,
    }


def evaluate_version(settings: Settings, storage: Storage, version: str) -> dict[str, Any]:
    """Evaluate a registered version (its ONNX export) on the current dataset's test split."""
    from ml.evaluate import decide, evaluate
    from ml.train import dataset_rows

    dataset, rows = dataset_rows(storage)
    test = test_rows(rows)
    index = {name: i for i, name in enumerate(settings.classes)}
    labels = test["label"].map(index).to_numpy(dtype=np.int64)
    proba, _ = version_correctness(settings, storage, version, test, labels)
    evaluation = evaluate(labels, proba, list(settings.classes), seed=settings.training.seed)
    decision = decide(evaluation, settings.acceptance)
    return {
        "model_version": version,
        "dataset_version": dataset["version"],
        "metrics": evaluation.to_dict(),
        "meets_acceptance_bar": decision.passed,
        "reasons": decision.reasons,
    }
