"""Drift: a batch of images against the current champion's reference, with Evidently.

Reference: built when a model is trained, from the held-out rows (val + test) of its dataset
version, so the model's outputs on it are not inflated by training; logged with the model's
MLflow run (``drift_reference/``). It holds, per image: the ingestion properties, the backbone
embedding projected on a PCA fitted on the reference, the label, and the model's predicted class
and confidence; plus the PCA itself and the feature-cache id the embeddings came from.

Columns and decision (all thresholds in ``monitoring``):

- each column gets two Evidently drift metrics: an effect size (normed Wasserstein distance for
  numbers, Jensen-Shannon distance for categories) and a test (KS, chi-square). A column drifts
  when the effect is at least ``column_effect_threshold`` AND the test's p-value is below
  ``column_alpha`` / columns (Bonferroni). The effect size alone flags noise on small batches
  (normed Wasserstein between two samples of 120 from one distribution is ~0.12); the p-value
  alone flags every negligible shift on large ones;
- ``drift_score`` = share of drifted columns; data drift when it exceeds ``data_drift_threshold``;
- prediction drift: KL(current || reference) of the predicted-class mix, smoothed, minus its
  small-sample bias (k - 1) / 2n (Miller-Madow), above ``prediction_drift_kl_threshold``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ml.config import MonitoringConfig, Settings
from ml.storage import Storage

log = logging.getLogger(__name__)

PROPERTY_COLUMNS = ("width", "height", "file_bytes", "brightness", "contrast", "blur")
REFERENCE_ARTIFACTS = "drift_reference"
REPORTS_PREFIX = "reports/drift"
REQUESTS_KEY = "monitoring/drift/retrain_requests.jsonl"


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


def prediction_kl(current: pd.Series, reference: pd.Series, classes: list[str]) -> float:
    """Bias-corrected KL(current || reference) of the predicted-class mix (>= 0)."""
    k, n = len(classes), max(len(current), 1)
    cur = current.value_counts().reindex(classes, fill_value=0).to_numpy(float) + 0.5
    ref = reference.value_counts().reindex(classes, fill_value=0).to_numpy(float) + 0.5
    p, q = cur / cur.sum(), ref / ref.sum()
    return max(0.0, float(np.sum(p * np.log(p / q))) - (k - 1) / (2 * n))


@dataclass
class ColumnDrift:
    column: str
    kind: str  # numerical | categorical
    effect: float
    effect_method: str
    p_value: float
    test_method: str
    drifted: bool


@dataclass
class DriftResult:
    day: str
    model_version: str
    reference_dataset_version: str
    rows_current: int
    rows_reference: int
    drift_score: float
    data_drift: bool
    prediction_kl: float
    prediction_drift: bool
    drift_detected: bool
    severe: bool
    reasons: list[str]
    columns: list[ColumnDrift] = field(default_factory=list)
    report: str = ""
    report_json: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def reason_text(self) -> str:
        return "; ".join(self.reasons) or "no drift"


def _evidently_metrics(numerical: list[str], categorical: list[str], monitoring: MonitoringConfig) -> list:
    from evidently.metrics import ValueDrift

    metrics = []
    for column in numerical:
        metrics.append(
            ValueDrift(column=column, method="wasserstein", threshold=monitoring.column_effect_threshold)
        )
        metrics.append(ValueDrift(column=column, method="ks", threshold=monitoring.column_alpha))
    for column in categorical:
        metrics.append(
            ValueDrift(column=column, method="jensenshannon", threshold=monitoring.column_effect_threshold)
        )
        metrics.append(ValueDrift(column=column, method="chisquare", threshold=monitoring.column_alpha))
    return metrics


def compare(current: pd.DataFrame, reference: Reference, monitoring: MonitoringConfig) -> tuple[Any, list]:
    """Run the Evidently report; return its snapshot and the per-column drift decisions."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataSummaryPreset

    categorical = [c for c in ("label", "predicted_class") if c in current]
    numerical = [c for c in current.columns if c not in categorical]
    definition = DataDefinition(numerical_columns=numerical, categorical_columns=categorical)
    report = Report([*_evidently_metrics(numerical, categorical, monitoring), DataSummaryPreset()])
    snapshot = report.run(
        Dataset.from_pandas(current, data_definition=definition),
        Dataset.from_pandas(reference.frame[current.columns], data_definition=definition),
    )
    values: dict[tuple[str, str], float] = {}
    for metric in snapshot.dict()["metrics"]:
        config = metric.get("config", {})
        if config.get("type", "").endswith("ValueDrift"):
            values[(config["column"], config["method"])] = float(metric["value"])
    alpha = monitoring.column_alpha / max(len(numerical) + len(categorical), 1)
    columns = []
    for column in numerical + categorical:
        kind = "numerical" if column in numerical else "categorical"
        effect_method, test_method = (
            ("wasserstein", "ks") if kind == "numerical" else ("jensenshannon", "chisquare")
        )
        effect = values[(column, effect_method)]
        p_value = values[(column, test_method)]
        drifted = bool(effect >= monitoring.column_effect_threshold and p_value < alpha)
        columns.append(ColumnDrift(column, kind, effect, effect_method, p_value, test_method, drifted))
    return snapshot, columns


def decide(
    columns: list[ColumnDrift], kl: float, monitoring: MonitoringConfig
) -> tuple[float, bool, bool, bool, list[str]]:
    """(drift_score, data_drift, prediction_drift, severe, reasons) from the column decisions and KL."""
    drifted = [c for c in columns if c.drifted]
    score = len(drifted) / max(len(columns), 1)
    data_drift = score > monitoring.data_drift_threshold
    prediction_drift = kl > monitoring.prediction_drift_kl_threshold
    severe = score >= monitoring.severe_drift_score or kl >= monitoring.severe_prediction_kl
    reasons = []
    if data_drift:
        names = ", ".join(f"{c.column} ({c.effect:.2f})" for c in drifted)
        reasons.append(
            f"data drift: {len(drifted)}/{len(columns)} columns drifted (score {score:.2f} > "
            f"{monitoring.data_drift_threshold}): {names}"
        )
    if prediction_drift:
        reasons.append(
            f"prediction drift: KL {kl:.3f} > {monitoring.prediction_drift_kl_threshold} "
            "(predicted-class mix vs training)"
        )
    return score, data_drift, prediction_drift, severe, reasons


# ---------------------------------------------------------------- the champion's side


def load_reference(settings: Settings, version: str) -> Reference:
    """The drift reference logged with model ``version``'s training run."""
    from ml import registry

    client = registry.client(settings)
    model_version = client.get_model_version(settings.mlflow.registered_model, str(version))
    with tempfile.TemporaryDirectory() as folder:
        return Reference.load(
            Path(client.download_artifacts(model_version.run_id, REFERENCE_ARTIFACTS, folder))
        )


def champion_reference(settings: Settings) -> tuple[str, Reference, Any] | None:
    """(version, reference, head) of the current champion, or None when there is none yet."""
    import mlflow

    from ml import registry

    version = registry.version_for_alias(settings, registry.CHAMPION)
    if version is None:
        return None
    reference = load_reference(settings, version)
    mlflow.set_tracking_uri(registry.tracking_uri(settings))
    model = mlflow.pytorch.load_model(f"models:/{settings.mlflow.registered_model}/{version}")
    return version, reference, model.head.eval()


def current_frame(
    settings: Settings, storage: Storage, rows: pd.DataFrame, reference: Reference, head: Any
) -> pd.DataFrame:
    """The batch's drift columns: cached embeddings (computed and cached when missing), projected."""
    from ml.model import build_backbone
    from ml.preprocessing import Preprocessing
    from ml.retrain import feature_cache
    from ml.train import predict_proba

    prep = Preprocessing.from_settings(settings.preprocessing)
    backbone = build_backbone(
        settings.model.architecture, settings.model.pretrained, settings.model.weights_path
    )
    cache = feature_cache(settings, storage, backbone, prep)
    if cache.id != reference.cache_id:
        raise ValueError(
            f"the champion's reference was built with feature cache {reference.cache_id}, the config gives "
            f"{cache.id} (backbone, weights, preprocessing or views changed): retrain before monitoring"
        )
    features, _ = cache.features_for(rows)
    embeddings = features[:, 0]
    return batch_frame(
        rows, reference.project(embeddings), predict_proba(head, embeddings), reference.classes
    )


def write_report(
    storage: Storage, day: str, snapshot: Any, prefix: str = REPORTS_PREFIX
) -> tuple[str, str, str]:
    """Store the Evidently report (HTML, JSON) under ``prefix/day``; return their URLs and the HTML."""
    prefix = f"{prefix}/{day}"
    with tempfile.TemporaryDirectory() as folder:
        html, raw = Path(folder) / "report.html", Path(folder) / "report.json"
        snapshot.save_html(str(html))
        snapshot.save_json(str(raw))
        page = html.read_text()
        storage.write_bytes(f"{prefix}/report.html", page.encode())
        storage.write_bytes(f"{prefix}/evidently.json", raw.read_bytes())
    return storage.url(f"{prefix}/report.html"), storage.url(f"{prefix}/evidently.json"), page


def log_to_mlflow(settings: Settings, result: DriftResult, report_html: str) -> str:
    """One run per monitored day in the ``<experiment>-monitoring`` experiment; returns its id."""
    import mlflow

    from ml import registry

    mlflow.set_tracking_uri(registry.tracking_uri(settings))
    experiment_id = registry.ensure_experiment(settings, f"{settings.mlflow.experiment_name}-monitoring")
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"drift-{result.day}") as run:
        mlflow.set_tags({"kind": "drift", "day": result.day, "model_version": result.model_version})
        mlflow.log_metrics(
            {
                "drift_score": result.drift_score,
                "prediction_kl": result.prediction_kl,
                "drift_detected": int(result.drift_detected),
                "rows_current": result.rows_current,
            }
        )
        mlflow.log_text(report_html, "drift/report.html")
        mlflow.log_dict(result.to_dict(), "drift/summary.json")
        return run.info.run_id


def _not_measured(status: str, day: dt.date, reason: str) -> dict[str, Any]:
    return {
        "status": status,
        "day": str(day),
        "drift_detected": False,
        "drift_score": None,
        "reasons": [reason],
    }


def monitor_day(settings: Settings, storage: Storage, day: dt.date) -> dict[str, Any]:
    """Drift of ``day``'s curated images against the champion: report, MLflow run, summary."""
    from ml.catalog import read_partition

    found = champion_reference(settings)
    if found is None:
        return _not_measured("no_reference", day, "no champion model yet: nothing to compare against")
    version, reference, head = found
    rows = read_partition(storage, day)
    if rows.empty:
        return _not_measured("empty", day, f"no curated images for {day}")
    current = current_frame(settings, storage, rows, reference, head)
    monitoring = settings.monitoring
    snapshot, columns = compare(current, reference, monitoring)
    kl = prediction_kl(current["predicted_class"], reference.frame["predicted_class"], reference.classes)
    score, data_drift, prediction_drift, severe, reasons = decide(columns, kl, monitoring)
    result = DriftResult(
        day=str(day),
        model_version=version,
        reference_dataset_version=reference.dataset_version,
        rows_current=len(current),
        rows_reference=len(reference.frame),
        drift_score=round(score, 4),
        data_drift=data_drift,
        prediction_kl=round(kl, 4),
        prediction_drift=prediction_drift,
        drift_detected=data_drift or prediction_drift,
        severe=severe,
        reasons=reasons,
        columns=columns,
    )
    result.report, result.report_json, report_html = write_report(storage, str(day), snapshot)
    storage.write_bytes(
        f"{REPORTS_PREFIX}/{day}/summary.json", json.dumps(result.to_dict(), indent=2, default=str).encode()
    )
    run_id = log_to_mlflow(settings, result, report_html)
    return {"status": "measured", "mlflow_run_id": run_id, **result.to_dict()}


# ---------------------------------------------------------------- retrain requests and cooldown


def retrain_requests(storage: Storage) -> list[dict[str, Any]]:
    if not storage.exists(REQUESTS_KEY):
        return []
    return [json.loads(line) for line in storage.read_bytes(REQUESTS_KEY).decode().splitlines() if line]


def should_request_retrain(storage: Storage, summary: dict[str, Any], cooldown_days: int) -> tuple[bool, str]:
    """Drift requests a retrain unless one was requested within the cooldown (severe drift overrides)."""
    if not summary.get("drift_detected"):
        return False, "no drift"
    day = dt.date.fromisoformat(summary["day"])
    recent = [
        r
        for r in retrain_requests(storage)
        if 0 <= (day - dt.date.fromisoformat(r["day"])).days < cooldown_days
    ]
    if recent and not summary.get("severe"):
        until = dt.date.fromisoformat(recent[-1]["day"]) + dt.timedelta(days=cooldown_days)
        return False, f"cooldown: retrain already requested for {recent[-1]['day']}; next from {until}"
    return True, "severe drift overrides the cooldown" if recent else "drift detected"


def record_retrain_request(storage: Storage, summary: dict[str, Any], why: str) -> dict[str, Any]:
    record = {
        "day": summary["day"],
        "requested_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "drift_score": summary.get("drift_score"),
        "prediction_kl": summary.get("prediction_kl"),
        "report": summary.get("report", ""),
        "why": why,
    }
    lines = [json.dumps(r) for r in retrain_requests(storage)] + [json.dumps(record)]
    storage.write_bytes(REQUESTS_KEY, ("\n".join(lines) + "\n").encode())
    return record
