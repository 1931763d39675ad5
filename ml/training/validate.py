"""The model-validation stage: robustness, slices, calibration, explanations, model card, approval route.

``validate_model`` computes the report of a ``Candidate`` (its torch classifier, a whole-model
scorer, its validation and test logits) against an optional champion scorer; its ``checks`` are
what the gate adds. ``validate_in_run`` is the retrain's step, inside its MLflow run: the checks
join the ``GateDecision`` (a failure rejects the challenger with its reason), the figures and the
model card are logged, the temperature and conformal threshold are logged for the bundle
(``CALIBRATION_ARTIFACT``), and a small summary goes back into the ``RetrainResult``.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from ml import registry
from ml.config import Settings
from ml.data.catalog import split_rows
from ml.layout import HEAD_META_ARTIFACT, HEAD_WEIGHTS_ARTIFACT, ONNX_ARTIFACT
from ml.progress import Progress
from ml.storage import Storage
from ml.training.calibration import (
    CALIBRATION_ARTIFACT,
    CalibrationReport,
    calibrate,
    coverage_check,
    reliability_png,
    softmax,
)
from ml.training.card import MODEL_CARD_JSON, MODEL_CARD_MD, card_markdown, class_support, known_limits
from ml.training.checks import Check, ci_text
from ml.training.corruptions import SEVERITIES
from ml.training.evaluate import ClassesDiffer, Evaluation, GateDecision, Metric, in_class_order
from ml.training.explain import (
    DeletionResult,
    deletion_check,
    deletion_png,
    deletion_test,
    explanation_sample,
    gradcam,
    gradcam_grid_png,
    gradcam_layer,
)
from ml.training.features import feature_runner
from ml.training.governance import approval_decision, lineage_changes
from ml.training.intervals import share_ci
from ml.training.model import Backbone, Classifier, load_head, predict_proba
from ml.training.preprocessing import Preprocessing, batch_arrays, decode_rgb
from ml.training.quantize import precision_name
from ml.training.robustness import (
    AttackResult,
    CorruptionSuite,
    adversarial_accuracy,
    corruption_correctness,
    robustness_checks,
    summarise_corruptions,
    to_pixels,
)
from ml.training.slices import SliceResult, build_slices, evaluate_slices, slice_checks, worst_slice
from ml.training.train import SplitData, TrainResult

log = logging.getLogger(__name__)

Scorer = Callable[[np.ndarray], np.ndarray]
SCORE_BATCH = 32
VALIDATION_PARTS = 5  # corruptions, attacks, slices, calibration, explanations


@dataclass(frozen=True)
class Candidate:
    """What validation needs of a model: its torch classifier, its backbone's fast path, its logits."""

    model: nn.Module  # backbone + head (ml.training.model.Classifier): attacks and Grad-CAM
    embed: Callable[[np.ndarray], np.ndarray]  # preprocessed images -> backbone features (fast path)
    val: tuple[np.ndarray, np.ndarray]  # (logits, labels) of the validation split
    test: tuple[np.ndarray, np.ndarray]  # (logits, labels) of the test split, in test_rows order
    test_rows: pd.DataFrame
    load: Callable[[Sequence[int]], list[Image.Image]]  # test images by position in test_rows
    prep: Preprocessing
    classes: list[str]

    @property
    def head(self) -> nn.Module:
        return self.model.head

    def score(self, arrays: np.ndarray) -> np.ndarray:
        """The whole model's probabilities on preprocessed images."""
        return predict_proba(self.head, self.embed(arrays))


@dataclass(frozen=True)
class Champion:
    """The model the challenger is compared with under corruptions: its head, when it shares the
    challenger's backbone (same architecture and weights: the features are computed once for both),
    else its ONNX export."""

    version: str
    head: nn.Module | None = None
    export: Scorer | None = None
    order: list[int] | None = None  # its output columns that give the configured class order, if another

    def aligned(self, proba: np.ndarray) -> np.ndarray:
        return proba if self.order is None else proba[:, self.order]


def head_logits(head: nn.Module, features: np.ndarray) -> np.ndarray:
    head.eval()
    with torch.inference_mode():
        return head(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))).double().numpy()


def batched(run: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """``run`` on at most ``SCORE_BATCH`` images at a time."""

    def apply(arrays: np.ndarray) -> np.ndarray:
        return np.concatenate([run(arrays[s : s + SCORE_BATCH]) for s in range(0, len(arrays), SCORE_BATCH)])

    return apply


def onnx_scorer(path: Path, threads: int = 1) -> Scorer:
    """A whole exported model (output ``logits``) through one ONNX Runtime session."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def score(arrays: np.ndarray) -> np.ndarray:
        parts = [
            session.run(["logits"], {"image": np.ascontiguousarray(arrays[s : s + SCORE_BATCH])})[0]
            for s in range(0, len(arrays), SCORE_BATCH)
        ]
        return softmax(np.concatenate(parts))

    return score


def candidate_from_training(
    settings: Settings,
    storage: Storage,
    rows: pd.DataFrame,
    backbone: Backbone,
    data: dict[str, SplitData],
    head: nn.Module,
) -> Candidate:
    """A trained head on the backbone: cached features give its logits, the backbone scores new images."""
    prep = Preprocessing.from_settings(settings.preprocessing)
    run = feature_runner(settings, storage, backbone, prep, settings.validation.threads)
    test_rows = split_rows(rows, "test")
    keys = list(test_rows["curated_key"])
    return Candidate(
        model=Classifier(backbone.module, head).eval(),
        embed=batched(run),
        val=(head_logits(head, data["val"].features[:, 0]), data["val"].labels),
        test=(head_logits(head, data["test"].features[:, 0]), data["test"].labels),
        test_rows=test_rows,
        load=lambda positions: [decode_rgb(storage.read_bytes(keys[i]), prep) for i in positions],
        prep=prep,
        classes=list(settings.classes),
    )


# -------------------------------------------------------------------------------- the parts


def both_models(candidate: Candidate, champion: Champion | None) -> Callable[[np.ndarray], list[np.ndarray]]:
    """The challenger's and the champion's probabilities on the same images (backbone run once)."""

    def score(arrays: np.ndarray) -> list[np.ndarray]:
        features = candidate.embed(arrays)
        answers = [predict_proba(candidate.head, features)]
        if champion is not None and champion.head is not None:
            answers.append(champion.aligned(predict_proba(champion.head, features)))
        elif champion is not None and champion.export is not None:
            answers.append(champion.aligned(champion.export(arrays)))
        return answers

    return score


def counted(
    score: Callable[[np.ndarray], list[np.ndarray]], progress: Progress
) -> Callable[[np.ndarray], list[np.ndarray]]:
    """``score`` that counts the images it scored in ``progress``."""

    def run(arrays: np.ndarray) -> list[np.ndarray]:
        answers = score(arrays)
        progress.advance(len(arrays))
        return answers

    return run


def _corruptions(
    settings: Settings, candidate: Candidate, champion: Champion | None, images: list[Image.Image]
) -> CorruptionSuite:
    config, acceptance = settings.validation, settings.acceptance
    labels = candidate.test[1][: len(images)]
    total = len(images) * (1 + len(config.corruptions) * len(SEVERITIES))  # clean, then every condition
    with Progress("validation corruptions", total, settings.progress_every, logger=log) as progress:
        score = counted(both_models(candidate, champion), progress)
        conditions, clean, correct = corruption_correctness(
            images, labels, candidate.prep, score, config.corruptions, config.seed
        )
    return summarise_corruptions(
        conditions,
        clean[0],
        correct[0],
        correct[1] if champion else None,
        margin=acceptance.robustness_margin,
        alpha=acceptance.alpha,
        n_bootstrap=config.bootstrap,
        seed=config.seed,
    )


def _attacks(settings: Settings, candidate: Candidate, images: list[Image.Image]) -> list[AttackResult]:
    config = settings.validation
    sample = images[: config.adversarial_sample]
    return adversarial_accuracy(
        candidate.model,
        batch_arrays(sample, candidate.prep),
        candidate.test[1][: len(sample)],
        candidate.prep,
        config.adversarial_eps,
        config.pgd_steps,
        n_bootstrap=config.bootstrap,
        seed=config.seed,
    )


def _slices(settings: Settings, candidate: Candidate) -> list[SliceResult]:
    config, acceptance = settings.validation, settings.acceptance
    logits, labels = candidate.test
    return evaluate_slices(
        build_slices(candidate.test_rows, config.slice_columns),
        labels,
        softmax(logits),
        candidate.classes,
        (config.min_slice_support, acceptance.slice_accuracy_min, acceptance.slice_gap_max),
        n_bootstrap=config.bootstrap,
        seed=config.seed,
    )


def _calibration(settings: Settings, candidate: Candidate) -> tuple[CalibrationReport, bytes]:
    config = settings.validation
    report = calibrate(
        candidate.val,
        candidate.test,
        coverage=settings.serving.coverage,
        bins=config.calibration_bins,
        n_bootstrap=config.bootstrap,
        seed=config.seed,
    )
    return report, reliability_png(*candidate.test, report.temperature, config.calibration_bins)


def _layer_name(model: nn.Module, layer: nn.Module) -> str:
    return next((name for name, module in model.named_modules() if module is layer), type(layer).__name__)


def _explanations(settings: Settings, candidate: Candidate) -> tuple[DeletionResult, bytes, dict[str, Any]]:
    """Grad-CAM on the grid sample and the deletion sample; the deletion test; the grid figure."""
    config = settings.validation
    logits, labels = candidate.test
    proba = softmax(logits)
    predicted = proba.argmax(axis=1)
    grid = explanation_sample(labels, proba, config.explain_per_class, config.explain_confusions)
    correct = np.flatnonzero(predicted == labels)
    rng = np.random.default_rng(config.seed)
    picked = np.sort(rng.choice(correct, size=min(config.deletion_sample, correct.size), replace=False))
    needed = sorted({i for i, _ in grid} | {int(i) for i in picked})
    where = {index: position for position, index in enumerate(needed)}
    arrays = batch_arrays(candidate.load(needed), candidate.prep)
    layer = gradcam_layer(candidate.model.backbone)
    maps = gradcam(candidate.model, layer, arrays, predicted[needed])
    chosen = [where[int(i)] for i in picked]
    deletion = deletion_test(
        candidate.score,
        arrays[chosen],
        predicted[picked],
        maps[chosen],
        config.deletion_fractions,
        alpha=settings.acceptance.alpha,
        seed=config.seed,
        n_bootstrap=config.bootstrap,
    )
    shown = [where[i] for i, _ in grid]
    pixels = (to_pixels(arrays[shown], candidate.prep) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    names = candidate.classes
    titles = [
        f"{kind}: {names[labels[i]]} -> {names[predicted[i]]} ({proba[i, predicted[i]]:.2f})"
        for i, kind in grid
    ]
    shas = list(candidate.test_rows["sha256"])
    images = [
        {
            "sha256": shas[i],
            "kind": kind,
            "true": names[labels[i]],
            "predicted": names[predicted[i]],
            "probability": round(float(proba[i, predicted[i]]), 4),
        }
        for i, kind in grid
    ]
    report = {"method": "captum LayerGradCam", "layer": _layer_name(candidate.model, layer), "images": images}
    return deletion, gradcam_grid_png(pixels, maps[shown], titles), report


# -------------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class Figures:
    gradcam_grid: bytes
    deletion: bytes
    reliability: bytes


@dataclass(frozen=True)
class ValidationReport:
    n_test: int
    accuracy: Metric
    robustness: CorruptionSuite
    adversarial: list[AttackResult]
    slices: list[SliceResult]
    calibration: CalibrationReport
    deletion: DeletionResult
    explanations: dict[str, Any]
    checks: list[Check]
    pgd_steps: int
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "n_test": self.n_test,
            "accuracy": self.accuracy.to_dict(),
            "robustness": self.robustness.to_dict(),
            "adversarial": [attack.to_dict() for attack in self.adversarial],
            "pgd_steps": self.pgd_steps,
            "slices": [result.to_dict() for result in self.slices],
            "calibration": self.calibration.to_dict(),
            "deletion": self.deletion.to_dict(),
            "explanations": self.explanations,
            "checks": [check.to_dict() for check in self.checks],
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
        }

    def headline(self) -> dict[str, str]:
        """The figures the approval form shows."""
        worst, calibration = worst_slice(self.slices), self.calibration
        return {
            "accuracy": f"{ci_text(self.accuracy)} (n={self.n_test})",
            "worst slice": "none"
            if worst is None
            else f"{worst.name} {ci_text(worst.accuracy)} (n={worst.support})",
            "robustness": f"{ci_text(self.robustness.ratio, 2)} of clean accuracy under corruptions",
            "ECE": f"{ci_text(calibration.ece_before)} -> {ci_text(calibration.ece_after)} "
            f"(temperature {calibration.temperature:.2f})",
            "coverage": f"{ci_text(calibration.coverage)} (target {calibration.target_coverage:.2f})",
        }


def _timed(seconds: dict[str, float], name: str, step: Callable[[], Any], parts: Progress) -> Any:
    started = time.perf_counter()
    try:
        done = step()
    finally:
        seconds[name] = time.perf_counter() - started
    parts.advance()
    return done


def validate_model(
    settings: Settings, candidate: Candidate, champion: Champion | None = None
) -> tuple[ValidationReport, Figures]:
    """Every validation part on ``candidate`` (paired with ``champion`` under corruptions) and the checks."""
    seconds: dict[str, float] = {}
    images = candidate.load(range(min(settings.validation.robustness_sample, len(candidate.test_rows))))
    with Progress("validation", VALIDATION_PARTS, 1, unit="parts", logger=log) as parts:
        suite = _timed(
            seconds, "corruptions", lambda: _corruptions(settings, candidate, champion, images), parts
        )
        attacks = _timed(seconds, "attacks", lambda: _attacks(settings, candidate, images), parts)
        slices = _timed(seconds, "slices", lambda: _slices(settings, candidate), parts)
        calibration, reliability = _timed(
            seconds, "calibration", lambda: _calibration(settings, candidate), parts
        )
        deletion, grid, explained = _timed(
            seconds, "explanations", lambda: _explanations(settings, candidate), parts
        )
    checks = [
        *robustness_checks(suite, settings.acceptance.robustness_ratio_min),
        *slice_checks(slices, settings.acceptance.slice_accuracy_min),
        coverage_check(calibration),
        deletion_check(deletion),
    ]
    logits, labels = candidate.test
    report = ValidationReport(
        n_test=len(labels),
        accuracy=share_ci(
            logits.argmax(axis=1) == labels, settings.validation.bootstrap, settings.validation.seed
        ),
        robustness=suite,
        adversarial=attacks,
        slices=slices,
        calibration=calibration,
        deletion=deletion,
        explanations=explained,
        checks=checks,
        pgd_steps=settings.validation.pgd_steps,
        seconds={**seconds, "total": sum(seconds.values())},
    )
    return report, Figures(grid, deletion_png(deletion), reliability)


# -------------------------------------------------------------------------------- lineage


def lineage_of(settings: Settings, storage: Storage, backbone: Backbone) -> dict[str, str]:
    """What the approval route compares (``ml.training.governance.LINEAGE``), as MLflow params."""
    return {
        "architecture": backbone.name,
        "backbone_weights": backbone.weights_id,
        "preprocessing": Preprocessing.from_settings(settings.preprocessing).version,
        "precision": precision_name(settings.model.precision),
        "classes": ",".join(settings.classes),
        "storage_root": storage.root_url,
    }


def version_params(settings: Settings, version: str | None) -> dict[str, str] | None:
    """The training run params of a registered version (None without one)."""
    if not version:
        return None
    client = registry.client(settings)
    run_id = client.get_model_version(settings.mlflow.registered_model, version).run_id
    return dict(client.get_run(run_id).data.params)


def version_head(settings: Settings, version: str, folder: Path) -> nn.Module:
    """The head a registered version was trained with (loaded with ``weights_only``)."""
    client = registry.client(settings)
    run_id = client.get_model_version(settings.mlflow.registered_model, version).run_id
    own = folder / f"v{version}"  # versions never share a download folder
    own.mkdir(parents=True, exist_ok=True)
    weights = client.download_artifacts(run_id, HEAD_WEIGHTS_ARTIFACT, str(own))
    spec = client.download_artifacts(run_id, HEAD_META_ARTIFACT, str(own))
    return load_head(Path(weights), Path(spec))


def champion_of(settings: Settings, version: str | None, folder: Path, backbone: Backbone) -> Champion | None:
    """A registered version to compare with: its head on the shared backbone, else its ONNX export."""
    if not version:
        return None
    client = registry.client(settings)
    run_id = client.get_model_version(settings.mlflow.registered_model, version).run_id
    params = client.get_run(run_id).data.params
    theirs = params["classes"].split(",") if params.get("classes") else list(settings.classes)
    try:
        columns = in_class_order(np.arange(len(theirs))[None, :], theirs, settings.classes)[0]
    except ClassesDiffer as exc:  # not comparable image by image: the class change goes to a human
        log.warning("validation does not compare with champion v%s: %s", version, exc)
        return None
    order = None if theirs == list(settings.classes) else [int(column) for column in columns]
    shared = (params.get("architecture"), params.get("backbone_weights"), params.get("precision", "fp32"))
    if shared == (backbone.name, backbone.weights_id, precision_name(settings.model.precision)):
        return Champion(version, head=version_head(settings, version, folder), order=order)
    own = folder / f"v{version}"
    own.mkdir(parents=True, exist_ok=True)
    path = Path(client.download_artifacts(run_id, ONNX_ARTIFACT, str(own)))
    return Champion(version, export=onnx_scorer(path, settings.validation.threads), order=order)


# -------------------------------------------------------------------------------- in a retrain run


def _metric_key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-/ ]", "_", name)


def flat_metrics(report: ValidationReport) -> dict[str, float]:
    """The report's figures as MLflow metrics under ``validation/``."""
    suite, calibration, deletion = report.robustness, report.calibration, report.deletion
    flat = {
        "validation/robustness_ratio": suite.ratio.value,
        "validation/corruption_mean_accuracy": suite.mean_accuracy.value,
        "validation/temperature": calibration.temperature,
        "validation/ece_before": calibration.ece_before.value,
        "validation/ece_after": calibration.ece_after.value,
        "validation/coverage": calibration.coverage.value,
        "validation/coverage_ci_low": calibration.coverage.low,
        "validation/abstain_rate": calibration.abstain_rate.value,
        "validation/deletion_auc_attributed": deletion.auc_attributed.value,
        "validation/deletion_auc_random": deletion.auc_random.value,
        "validation/deletion_p_value": deletion.p_value,
    }
    for result in suite.results:
        flat[f"validation/corruption/{result.corruption}_s{result.severity}"] = result.accuracy.value
    for attack in report.adversarial:
        flat[f"validation/adversarial/{attack.attack}_eps{attack.eps:g}"] = attack.accuracy.value
    for result in report.slices:
        flat[_metric_key(f"validation/slice/{result.name}_accuracy")] = result.accuracy.value
    for part, seconds in report.seconds.items():
        flat[f"validation/seconds_{part}"] = seconds
    return {key: float(value) for key, value in flat.items() if np.isfinite(value)}


def model_card(
    settings: Settings,
    report: ValidationReport,
    context: dict[str, Any],
    evaluation: Evaluation,
    decision: GateDecision,
) -> dict[str, Any]:
    """The card's JSON; ``context`` holds run_id, lineage, dataset_version, rows and approval."""
    lineage, validation = context["lineage"], report.to_dict()
    return {
        "model": {
            "registered_model": settings.mlflow.registered_model,
            "run_id": context["run_id"],
            "architecture": lineage["architecture"],
            "backbone_weights": lineage["backbone_weights"],
            "preprocessing": lineage["preprocessing"],
            "precision": lineage["precision"],
            "classes": list(settings.classes),
        },
        "data": {
            "dataset_version": context["dataset_version"],
            "storage_root": lineage["storage_root"],
            "class_support": class_support(context["rows"], settings.classes),
        },
        "metrics": evaluation.to_dict(),
        "validation": validation,
        "gate": decision.to_dict(),
        "approval": context["approval"],
        "known_limits": known_limits(validation, settings.validation.min_slice_support),
    }


def log_validation(report: ValidationReport, figures: Figures, card: dict[str, Any]) -> str:
    """Every figure and artifact in the active MLflow run; returns the model card's URI."""
    import io

    import mlflow

    def image(data: bytes) -> Image.Image:
        return Image.open(io.BytesIO(data))

    mlflow.log_metrics(flat_metrics(report))
    mlflow.log_dict(report.to_dict(), "validation/report.json")
    mlflow.log_dict(report.calibration.serving_params(), CALIBRATION_ARTIFACT)
    mlflow.log_image(image(figures.reliability), "validation/calibration/reliability.png")
    mlflow.log_image(image(figures.gradcam_grid), "validation/model_explainability_reports/gradcam_grid.png")
    mlflow.log_dict(report.explanations, "validation/model_explainability_reports/gradcam.json")
    mlflow.log_dict(report.deletion.to_dict(), "validation/feature_importance/deletion_test.json")
    mlflow.log_image(image(figures.deletion), "validation/feature_importance/deletion_curves.png")
    mlflow.log_dict(card, MODEL_CARD_JSON)
    mlflow.log_text(card_markdown(card), MODEL_CARD_MD)
    return str(mlflow.get_artifact_uri(MODEL_CARD_MD))


def summary(report: ValidationReport, approval: dict[str, Any], card_uri: str) -> dict[str, Any]:
    """What the RetrainResult carries (and the approval form shows)."""
    worst, calibration = worst_slice(report.slices), report.calibration
    return {
        "passed": report.passed,
        "failed_checks": [check.name for check in report.checks if not check.passed],
        "headline": report.headline(),
        "robustness_ratio": round(report.robustness.ratio.value, 4),
        "worst_slice": None if worst is None else {"name": worst.name, **worst.accuracy.to_dict()},
        "ece_before": round(calibration.ece_before.value, 4),
        "ece_after": round(calibration.ece_after.value, 4),
        "temperature": round(calibration.temperature, 4),
        "coverage": calibration.coverage.to_dict(),
        "deletion_p_value": float(f"{report.deletion.p_value:.4g}"),
        "lineage_changes": approval["changes"],
        "approval": approval,
        "model_card": card_uri,
        "seconds": round(report.seconds.get("total", 0.0), 1),
    }


def validate_in_run(
    settings: Settings,
    storage: Storage,
    snap: Any,
    data: dict[str, SplitData],
    trained: TrainResult,
    champion: str | None,
    decision: GateDecision,
) -> dict[str, Any]:
    """The retrain's validation step, inside its MLflow run (``snap``: the pipeline's Snapshot): adds the
    checks to ``decision``, logs the figures, the card and the calibration, returns the summary. With the
    checks off it still decides the approval route (what changed since the champion)."""
    import mlflow

    # What the spec reserves for a human is decided whether or not the validation checks run.
    lineage = lineage_of(settings, storage, snap.backbone)
    mlflow.log_param("storage_root", lineage["storage_root"])
    approval = approval_decision(
        settings.mlflow.auto_approve, lineage_changes(lineage, version_params(settings, champion))
    ).to_dict()
    mlflow.set_tag("approval", approval["reason"])
    if not settings.validation.enabled:
        return {"lineage_changes": approval["changes"], "approval": approval}
    if trained.held_out is not None:  # the fit trained on part of val: calibrate on the rest only
        data = {**data, "val": trained.held_out}
    candidate = candidate_from_training(settings, storage, snap.rows, snap.backbone, data, trained.head)
    with tempfile.TemporaryDirectory() as folder:
        report, figures = validate_model(
            settings, candidate, champion_of(settings, champion, Path(folder), snap.backbone)
        )
    for check in report.checks:
        check.add_to(decision)
    mlflow.set_tag("validation", "passed" if report.passed else "failed")
    context = {
        "run_id": mlflow.active_run().info.run_id,
        "lineage": lineage,
        "dataset_version": snap.version["version"],
        "rows": snap.rows,
        "approval": approval,
    }
    card = model_card(settings, report, context, trained.evaluation, decision)
    return summary(report, approval, log_validation(report, figures, card))
