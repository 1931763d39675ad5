"""One retraining run: snapshot -> features -> train -> gate -> log -> register (alias challenger).

The core (``ml.training.train.train``) is pure: features in, a fitted head and its evaluation
out. Around it, this module reads the dataset version and the feature cache, compares the
challenger with the champion on the same test images, and at the edge logs everything to one
MLflow run (params, per-epoch metrics, final metrics with 95% bootstrap CIs, the confusion
matrix, classification report, training curves, class names, the model with signature and
input example, an ONNX export checked for parity, the drift reference) and registers the
model when the gate passes. The gate's decision and every reason are logged either way.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ml import registry
from ml.config import REPO_ROOT, Settings
from ml.data.catalog import dataset_rows, split_rows
from ml.data.feedback import from_feedback
from ml.layout import CLASS_NAMES_ARTIFACT, HEAD_WEIGHTS_ARTIFACT, ONNX_ARTIFACT, REFERENCE_ARTIFACTS
from ml.runs import RunContext
from ml.storage import Storage, StorageError
from ml.training.evaluate import (
    ClassesDiffer,
    Evaluation,
    GateDecision,
    classification_report_text,
    confusion_matrix_png,
    evaluate,
    gate,
    in_class_order,
)
from ml.training.features import CacheStats, feature_cache
from ml.training.finetune import fine_tune_fn
from ml.training.model import (
    Backbone,
    Classifier,
    backbone_from_settings,
    compose_serving_graph,
    export_serving_graph,
    predict_proba,
    save_head,
    set_deterministic,
)
from ml.training.preprocessing import AUGMENTATION_VERSION, Preprocessing, batch_arrays, decode_rgb
from ml.training.quantize import (
    int8_parity,
    int8_runner,
    precision_name,
    published_backbone,
)
from ml.training.reference import build_reference
from ml.training.scoring import onnx_predict_proba
from ml.training.train import Hyperparameters, SplitData, TrainResult, split_data, train, training_curves_png
from ml.training.validate import validate_in_run

ONNX_MODEL = "onnx_model"  # the ONNX export as an MLflow ``onnx`` model: runs:/<run_id>/onnx_model
ONNX_MODEL_PACKAGES = ("numpy", "onnx", "onnxruntime")  # what the ONNX model needs to run
TORCH_MODEL_PACKAGES = ("torch", "torchvision", "efficientnet-lite-pytorch")  # ...and the PyTorch one

# split data, classes, hyperparameters, per-epoch sink -> a fitted head and its test evaluation
TrainFn = Callable[
    [dict[str, SplitData], list[str], Hyperparameters, Callable[[dict[str, float], int], None] | None],
    TrainResult,
]

log = logging.getLogger(__name__)


class RetrainStatus(StrEnum):
    REGISTERED = "registered"
    REJECTED = "rejected"  # trained, evaluated, failed the gate
    SKIPPED = "skipped"  # the champion was trained on this dataset version
    NO_DATA = "no_data"  # nothing ingested yet


@dataclass(frozen=True)
class RetrainResult:
    """What a retrain did; ``to_dict()`` keeps the JSON the CLI prints and the DAG hands on."""

    status: RetrainStatus
    model_version: str | None = None
    reason: str = ""
    run_id: str = ""
    dataset_version: str = ""
    champion_version: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)
    feature_cache: dict[str, Any] = field(default_factory=dict)
    epochs_run: int = 0
    validation: dict[str, Any] = field(default_factory=dict)  # ml.training.validate.summary

    def to_dict(self) -> dict[str, Any]:
        if self.status == RetrainStatus.NO_DATA:
            return {"status": str(self.status), "reason": self.reason, "model_version": None}
        if self.status == RetrainStatus.SKIPPED:
            return {
                "status": str(self.status),
                "reason": self.reason,
                "model_version": None,
                "champion_version": self.champion_version,
                "dataset_version": self.dataset_version,
            }
        return {
            "status": str(self.status),
            "run_id": self.run_id,
            "model_version": self.model_version,
            "dataset_version": self.dataset_version,
            "champion_version": self.champion_version,
            "metrics": self.metrics,
            "gate": self.gate,
            "feature_cache": self.feature_cache,
            "epochs_run": self.epochs_run,
            "validation": self.validation,
        }


def git_commit() -> str:
    git = shutil.which("git")
    if git is None:
        return "unknown"
    try:
        command = [git, "rev-parse", "HEAD"]
        out = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)  # noqa: S603
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_images(storage: Storage, keys: list[str], prep: Preprocessing | None = None) -> list[Any]:
    """Decoded RGB images of curated keys (as the model's input when ``prep`` is given)."""
    return [decode_rgb(storage.read_bytes(key), prep) for key in keys]


def download_onnx(settings: Settings, version: str, folder: Path) -> Path:
    """The ONNX export logged with a registered model version."""
    mlflow_client = registry.client(settings)
    model_version = mlflow_client.get_model_version(settings.mlflow.registered_model, version)
    return Path(mlflow_client.download_artifacts(model_version.run_id, ONNX_ARTIFACT, str(folder)))


def version_correctness(
    settings: Settings, storage: Storage, version: str, test_rows: pd.DataFrame, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, correct) of a registered version on the given test rows, via its ONNX export; its
    columns in the configured class order whatever order it was trained in (``ClassesDiffer`` when it
    was trained on other classes)."""
    theirs = registry.version_classes(settings, version)
    in_class_order(np.zeros((0, len(theirs))), theirs, settings.classes)  # refuse before scoring
    prep = Preprocessing.from_settings(settings.preprocessing)
    arrays = batch_arrays(load_images(storage, list(test_rows["curated_key"]), prep), prep)
    with tempfile.TemporaryDirectory() as folder:
        proba = onnx_predict_proba(download_onnx(settings, version, Path(folder)), arrays)
    proba = in_class_order(proba, theirs, settings.classes)
    return proba, proba.argmax(axis=1) == labels


@dataclass(frozen=True)
class Snapshot:
    """A dataset version, its rows and their cached features (clean view first)."""

    version: dict[str, Any]
    rows: pd.DataFrame
    features: np.ndarray  # (N, V, D)
    backbone: Backbone
    cache_id: str
    stats: CacheStats
    seconds: float


def snapshot(settings: Settings, storage: Storage, version: dict[str, Any], rows: pd.DataFrame) -> Snapshot:
    """Every row's features from the cache (computing and caching the missing ones)."""
    prep = Preprocessing.from_settings(settings.preprocessing)
    backbone = backbone_from_settings(settings)
    cache = feature_cache(settings, storage, backbone, prep)
    started = time.perf_counter()
    features, stats = cache.features_for(rows)
    return Snapshot(version, rows, features, backbone, cache.id, stats, time.perf_counter() - started)


def skip_unchanged(settings: Settings, dataset_version: str, force: bool) -> RetrainResult | None:
    """Skip when the champion was trained on this exact dataset version (unless forced)."""
    if force:
        return None
    champion = registry.version_for_alias(settings, registry.CHAMPION)
    if champion is None:
        return None
    tags = registry.client(settings).get_model_version(settings.mlflow.registered_model, champion).tags
    if tags.get("dataset_version") != dataset_version:
        return None
    return RetrainResult(
        RetrainStatus.SKIPPED,
        reason=f"champion v{champion} was trained on dataset {dataset_version}; use force to retrain",
        champion_version=champion,
        dataset_version=dataset_version,
    )


def retrain(
    settings: Settings,
    storage: Storage,
    *,
    overrides: dict[str, Any] | None = None,
    context: RunContext | None = None,
    dataset_day: dt.date | None = None,
    dataset_version: str | None = None,
    force: bool = False,
    shuffle_labels: bool = False,
    fit: TrainFn | None = None,
    tags: dict[str, str] | None = None,
) -> RetrainResult:
    """Train a challenger on a dataset version (an id, a day's, or LATEST), gate it, register it.

    The version's partitions are read exactly as it recorded them (sha256 checked): an unknown id
    raises ``UnknownDatasetVersion``, a partition changed since raises ``DatasetIntegrityError``.
    ``fit`` replaces the default training (``train``: train split, early stopping on val), e.g. the
    tuned model's fixed epochs on train+val; ``tags`` are set on the MLflow run.
    """
    if dataset_day is not None and dataset_version is not None:
        raise ValueError("give a dataset day or a dataset version, not both")
    hparams = Hyperparameters.from_settings(settings, **(overrides or {}))
    try:
        version, rows = dataset_rows(storage, dataset_day, version=dataset_version)
    except StorageError as exc:  # nothing ingested yet: a scheduled run has nothing to do
        return RetrainResult(RetrainStatus.NO_DATA, reason=str(exc))
    skipped = skip_unchanged(settings, version["version"], force)
    if skipped:
        return skipped
    set_deterministic(hparams.seed)
    snap = snapshot(settings, storage, version, rows)
    if shuffle_labels:  # negative control: a model that cannot have learned anything real
        rows = rows.assign(label=np.random.default_rng(hparams.seed).permutation(rows["label"].to_numpy()))
        snap = Snapshot(version, rows, snap.features, snap.backbone, snap.cache_id, snap.stats, snap.seconds)
    data = split_data(rows, snap.features, list(settings.classes))
    if fit is None and not settings.model.freeze_backbone:
        fit = fine_tune_fn(settings, storage, rows)
    context = context or RunContext()
    return train_and_register(
        settings, storage, snap, data, hparams, context, shuffle_labels, fit=fit, tags=tags
    )


def train_and_register(
    settings: Settings,
    storage: Storage,
    snap: Snapshot,
    data: dict[str, SplitData],
    hparams: Hyperparameters,
    context: RunContext,
    shuffled: bool,
    *,
    fit: TrainFn | None = None,
    tags: dict[str, str] | None = None,
) -> RetrainResult:
    """Inside one MLflow run: train, compare with the champion, gate, log, register when it passes."""
    import mlflow

    mlflow.set_tracking_uri(registry.tracking_uri(settings))
    experiment_id = registry.ensure_experiment(settings)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"retrain-{snap.version['version']}") as run:
        log_inputs(settings, snap, hparams, context, shuffled)
        mlflow.set_tags(tags or {})
        trained = fit_in_run(fit or train, data, list(settings.classes), hparams)
        pretrained = snap
        snap, data = with_trained_backbone(snap, data, trained, list(settings.classes))
        champion, champion_correct = champion_correctness(settings, storage, snap.rows, data["test"].labels)
        decision = gate(trained.evaluation, settings.acceptance, champion_correct)
        model = _classifier(snap.backbone, trained.head)
        parity = _log_model_and_onnx(model, settings, storage, snap.rows, snap.backbone)
        add_parity_check(decision, parity, settings)
        validation = validate_in_run(settings, storage, snap, data, trained, champion, decision)
        log_outcome(settings, trained, decision, champion)
        _log_drift_reference(settings, pretrained, predict_proba(trained.head, snap.features[:, 0]))
        mlflow.set_tag("gate", "passed" if decision.passed else "failed")
        model_version = (
            register(settings, run.info.run_id, snap.version["version"], trained.evaluation, decision)
            if decision.passed
            else None
        )
        return RetrainResult(
            RetrainStatus.REGISTERED if model_version else RetrainStatus.REJECTED,
            model_version=model_version,
            run_id=run.info.run_id,
            dataset_version=snap.version["version"],
            champion_version=champion,
            metrics=headline_metrics(trained.evaluation),
            gate=decision.to_dict(),
            feature_cache=dict(
                hits=snap.stats.hits, misses=snap.stats.misses, seconds=round(snap.seconds, 2)
            ),
            epochs_run=len(trained.fit.history),
            validation=validation,
        )


def fit_in_run(
    fit: TrainFn, data: dict[str, SplitData], classes: list[str], hparams: Hyperparameters
) -> TrainResult:
    """Train (every epoch's metrics to the active MLflow run), then log the test evaluation."""
    import mlflow

    started = time.perf_counter()
    trained = fit(
        data, classes, hparams, sink=lambda values, step: mlflow.log_metrics(epoch_metrics(values), step=step)
    )
    mlflow.log_metrics(
        {
            **trained.evaluation.flat_metrics(),
            "best_epoch": trained.fit.best_epoch,
            "epochs_run": len(trained.fit.history),
            "train_seconds": time.perf_counter() - started,  # fit + test evaluation, features cached
        }
    )
    return trained


def with_trained_backbone(
    snap: Snapshot, data: dict[str, SplitData], trained: TrainResult, classes: list[str]
) -> tuple[Snapshot, dict[str, SplitData]]:
    """A fine-tuned model's snapshot and splits (its backbone, its features); otherwise unchanged."""
    if trained.backbone is None:
        return snap, data
    import mlflow

    mlflow.log_param("fine_tuned_backbone_weights", trained.backbone.weights_id)
    tuned = replace(snap, backbone=trained.backbone, features=trained.features)
    return tuned, split_data(tuned.rows, tuned.features, classes)


def epoch_metrics(values: dict[str, float]) -> dict[str, float]:
    """An epoch's metrics as MLflow names them: the training split's loss and accuracy as ``train_*``,
    so ``accuracy`` (and ``loss``) in a run always mean the test evaluation, never the last epoch."""
    return {f"train_{k}" if k in ("loss", "accuracy") else k: v for k, v in values.items()}


HEADLINE_METRICS = ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "f1_macro", "roc_auc_macro")


def headline_metrics(evaluation: Evaluation) -> dict[str, float]:
    """Accuracy with its CI, macro F1 and ROC AUC (the per-class figures are in MLflow)."""
    flat = evaluation.flat_metrics()
    return {k: flat[k] for k in HEADLINE_METRICS if k in flat}


def champion_correctness(
    settings: Settings, storage: Storage, rows: pd.DataFrame, labels: np.ndarray
) -> tuple[str | None, np.ndarray | None]:
    """The champion's version and its per-example correctness on the same test images (None without one)."""
    champion = registry.version_for_alias(settings, registry.CHAMPION)
    if not champion:
        return None, None
    try:
        _, correct = version_correctness(settings, storage, champion, split_rows(rows, "test"), labels)
    except ClassesDiffer as exc:  # no image-by-image comparison: the class change goes to a human
        log.warning("the challenger is not compared with champion v%s: %s", champion, exc)
        return champion, None
    return champion, correct


def add_parity_check(decision: GateDecision, parity: float, settings: Settings) -> None:
    import mlflow

    limit = settings.acceptance.onnx_max_abs_diff
    passed = parity <= limit
    detail = f"ONNX export differs from PyTorch by {parity:.2e} {'<=' if passed else '>'} {limit}"
    decision.add_check("onnx_parity", parity, limit, passed, detail)
    mlflow.log_metric("onnx_max_abs_diff", parity)


def log_inputs(
    settings: Settings, snap: Snapshot, hparams: Hyperparameters, context: RunContext, shuffled: bool
) -> None:
    """What the run was given: hyperparameters, data, code and why it was started."""
    import mlflow

    prep = Preprocessing.from_settings(settings.preprocessing)
    mlflow.log_params(
        {
            "learning_rate": hparams.learning_rate,
            "batch_size": hparams.batch_size,
            "epochs_max": hparams.epochs,
            "architecture": snap.backbone.name,
            "backbone_weights": snap.backbone.weights_id,
            "frozen_backbone": settings.model.freeze_backbone,
            "precision": precision_name(settings.model.precision),
            "optimizer": hparams.optimizer,
            "scheduler": hparams.scheduler,
            "early_stopping": f"{hparams.monitor}/patience={hparams.patience}",
            "dropout_rate": hparams.dropout,
            "seed": hparams.seed,
            "data_augmentation": ",".join(settings.preprocessing.augmentation) or "none",
            "augmentation_version": AUGMENTATION_VERSION if settings.preprocessing.augmentation else "none",
            "augmented_views": settings.training.augmented_views,
            "preprocessing": prep.version,
            "dataset_version": snap.version["version"],
            "dataset_rows": len(snap.rows),
            "feedback_images": int(
                from_feedback(snap.rows).sum()
            ),  # labelled served images (source=feedback)
            "classes": ",".join(settings.classes),
            "git_commit": git_commit(),
            "airflow_run_id": context.airflow_run_id or "none",
            "trigger": context.trigger,
            "shuffled_labels": shuffled,
        }
    )
    mlflow.set_tags(
        {"trigger": context.trigger, "reason": context.reason, "report": context.report, "note": context.note}
    )
    mlflow.log_metrics(
        {
            "feature_cache_hits": snap.stats.hits,
            "feature_cache_misses": snap.stats.misses,
            "feature_seconds": round(snap.seconds, 3),
        }
    )


def training_log_csv(history: list[dict[str, float]]) -> str:
    """Every epoch's metrics, one row each (the spec's ``training_logs`` artifact)."""
    return pd.DataFrame(history).to_csv(index=False)


def training_log_summary(trained: TrainResult) -> dict[str, Any]:
    fit = trained.fit
    return {
        "epochs_run": len(fit.history),
        "best_epoch": fit.best_epoch,
        "best_val_accuracy": fit.best_val_accuracy,
        "stopped_early": fit.stopped_early,
        "fine_tuned_backbone": trained.backbone is not None,
    }


def log_outcome(
    settings: Settings, trained: TrainResult, decision: GateDecision, champion: str | None
) -> None:
    """The evaluation, the gate's verdict and the figures a reviewer looks at."""
    import mlflow

    evaluation = trained.evaluation
    mlflow.log_dict(evaluation.to_dict(), "evaluation/evaluation.json")
    mlflow.log_dict(decision.to_dict() | {"champion_version": champion}, "evaluation/gate.json")
    mlflow.log_text(classification_report_text(evaluation), "evaluation/classification_report.txt")
    mlflow.log_image(_png(confusion_matrix_png(evaluation)), "evaluation/confusion_matrix.png")
    mlflow.log_image(_png(training_curves_png(trained.fit.history)), "evaluation/training_curves.png")
    mlflow.log_text(training_log_csv(trained.fit.history), "training_logs/epochs.csv")
    mlflow.log_dict(training_log_summary(trained), "training_logs/fit.json")
    mlflow.log_dict({"classes": list(settings.classes)}, CLASS_NAMES_ARTIFACT)
    with tempfile.TemporaryDirectory() as folder:
        for path in save_head(trained.head, Path(folder)):
            mlflow.log_artifact(str(path), HEAD_WEIGHTS_ARTIFACT.rsplit("/", 1)[0])


def _classifier(backbone: Backbone, head: Any) -> Classifier:
    return Classifier(backbone.module, head).eval()


def _log_drift_reference(settings: Settings, snap: Snapshot, proba: np.ndarray) -> None:
    """The held-out rows' properties, embeddings (the configured backbone's, fine-tuned or not: a fixed
    space the monitor can compute for any day) and the model's outputs: what drift compares against."""
    import mlflow

    rows, embeddings = snap.rows, snap.features[:, 0]
    held_out = (rows["split"] != "train").to_numpy()
    reference = build_reference(
        rows[held_out].reset_index(drop=True),
        embeddings[held_out],
        proba[held_out],
        list(settings.classes),
        cache_id=snap.cache_id,
        dataset_version=snap.version["version"],
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
    model: Any, settings: Settings, storage: Storage, rows: pd.DataFrame, backbone: Backbone
) -> float:
    """Log the PyTorch model (signature, input example) and its ONNX export; return the parity gap
    (against torch; for int8, against the quantised feature runner and the torch head)."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    prep = Preprocessing.from_settings(settings.preprocessing)
    sample = batch_arrays(load_images(storage, list(rows["curated_key"].head(4)), prep), prep)
    with torch.inference_mode():
        logits = model(torch.from_numpy(sample)).numpy()
    mlflow.pytorch.log_model(
        model,
        name="model",
        serialization_format="pickle",
        signature=infer_signature(sample, logits),
        input_example=sample[:1],
        pip_requirements=pinned(TORCH_MODEL_PACKAGES),
    )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        # The served graph is the backbone graph the features came from (FP32: exported once per
        # weights and kept on local disk; int8: the published quantised one) with the head appended:
        # ~0.1 s, where exporting the whole classifier again took 11-15 s.
        if settings.model.precision == "int8":
            graph = published_backbone(storage, backbone, prep)
            compose_serving_graph(graph, model.head, backbone.dim, path)
            parity = int8_parity(path, int8_runner(storage, backbone, prep), model.head, sample)
        else:
            limit = settings.acceptance.onnx_max_abs_diff
            parity = export_serving_graph(model, backbone, prep.image_size, path, sample, limit)
        mlflow.log_artifact(str(path), ONNX_ARTIFACT.rsplit("/", 1)[0])  # what release and monitoring read
        log_onnx_model(path, sample)
    return float(parity)


def pinned(packages: tuple[str, ...]) -> list[str]:
    """``name==version`` of each installed package, without a local label (torch's ``+cpu``): a logged
    model's requirements, named, as MLflow would infer them (its inference imports the model in a
    subprocess, ~5 s)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in packages]


def log_onnx_model(path: Path, sample: np.ndarray) -> Any:
    """The ONNX export as an MLflow ``onnx`` model (``ONNX_MODEL``) in the active run, its signature
    from ``sample``: ``image`` -> ``logits``, ``features``; returns its ``ModelInfo``."""
    import mlflow.onnx
    import onnx
    import onnxruntime as ort
    from mlflow.models import infer_signature

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    outputs = dict(zip(names, session.run(names, {"image": sample}), strict=True))
    return mlflow.onnx.log_model(
        onnx.load(str(path)),
        name=ONNX_MODEL,
        signature=infer_signature({"image": sample}, outputs),
        save_as_external_data=False,  # one model.onnx, byte-for-byte a valid standalone export
        pip_requirements=pinned(ONNX_MODEL_PACKAGES),
    )


def register(
    settings: Settings, run_id: str, dataset_version: str, evaluation: Evaluation, decision: GateDecision
) -> str:
    """Register the run's model as a new version with its gate as tags, then alias ``challenger``.

    All or nothing: when a tag or the alias cannot be set (the registry failing mid-way), the new
    version is deleted again, so a retried run registers one whole version, not a second one beside
    an untagged orphan."""
    import mlflow

    name = settings.mlflow.registered_model
    version = str(mlflow.register_model(f"runs:/{run_id}/model", name).version)
    mlflow_client = registry.client(settings)
    tags = {
        "dataset_version": dataset_version,
        "accuracy": f"{evaluation.accuracy.value:.4f}",
        "f1_macro": f"{evaluation.f1_macro.value:.4f}",
        "gate": "passed",
        "gate_reasons": json.dumps(decision.reasons),
        "run_id": run_id,
    }
    try:
        for key, value in tags.items():
            mlflow_client.set_model_version_tag(name, version, key, value)
        mlflow_client.set_registered_model_alias(name, registry.CHALLENGER, version)  # last: what others read
    except Exception:
        try:
            mlflow_client.delete_model_version(name, version)
        except Exception:  # the registry is down: the version stays, untagged, without the alias
            log.exception("v%s could not be deleted after its registration failed", version)
        raise
    return version


def evaluate_version(settings: Settings, storage: Storage, version: str) -> dict[str, Any]:
    """Evaluate a registered version (its ONNX export) on the current dataset's test split."""
    dataset, rows = dataset_rows(storage)
    test = split_rows(rows, "test")
    index = {name: i for i, name in enumerate(settings.classes)}
    labels = test["label"].map(index).to_numpy(dtype=np.int64)
    proba, _ = version_correctness(settings, storage, version, test, labels)
    evaluation = evaluate(labels, proba, list(settings.classes), seed=settings.training.seed)
    decision = gate(evaluation, settings.acceptance)
    return {
        "model_version": version,
        "dataset_version": dataset["version"],
        "metrics": evaluation.to_dict(),
        "meets_acceptance_bar": decision.passed,
        "reasons": decision.reasons,
    }
