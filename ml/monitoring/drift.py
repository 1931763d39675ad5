"""Drift: a batch of images against the current champion's reference, with Evidently.

The reference (``ml.training.reference``) is built when a model is trained, from the held-out
rows of its dataset version, and logged with the model's MLflow run (``drift_reference/``).

Columns and decision (all thresholds in ``monitoring``):

- each column gets two Evidently drift metrics: an effect size (normed Wasserstein distance for
  numbers, Jensen-Shannon distance for categories) and a test (KS; for categories a two-sample
  chi-square test of the 2 x k contingency table, registered with Evidently as ``CHI2_TWO_SAMPLE``:
  Evidently's own ``chisquare`` treats the reference's counts as the truth, and with a reference of
  ~70 held-out rows it called a same-distribution day of 120 drifted about one day in four, where the
  two-sample test stays at its nominal level). A column drifts
  when the effect is at least ``column_effect_threshold`` AND the test's p-value is below
  ``column_alpha`` / columns (Bonferroni). The effect size alone flags noise on small batches
  (normed Wasserstein between two samples of 120 from one distribution is ~0.12); the p-value
  alone flags every negligible shift on large ones;
- ``drift_score`` = share of drifted columns; data drift when it exceeds ``data_drift_threshold``;
- prediction drift: KL(current || reference) of the predicted-class mix, smoothed, minus its
  small-sample bias (k - 1)/2 (1/n + 1/m) (Miller-Madow for both samples: the reference is a sample
  too, often of only ~70 held-out rows), above ``prediction_drift_kl_threshold``, AND the
  ``predicted_class`` column's two-sample test significant at the columns' level, as for any column.
  With the current sample's bias alone, a 70-row reference crossed KL 0.05 on ~20% of
  same-distribution days of 120; corrected and tested, well under 1%, while the demo's class-mix
  knob at 0.6 is still caught ~95% of the time (``tests/unit/test_drift.py``).
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

from ml import registry
from ml.alerts import Alert, Notify, mlflow_run_url
from ml.config import MonitoringConfig, Settings
from ml.layout import (
    DRIFT_REPORTS_PREFIX,
    HEAD_META_ARTIFACT,
    HEAD_WEIGHTS_ARTIFACT,
    ONNX_ARTIFACT,
    REFERENCE_ARTIFACTS,
    RETRAIN_REQUESTS_KEY,
    drift_summary_key,
)
from ml.storage import Storage, append_jsonl, browsable_link
from ml.training.reference import Reference, batch_frame

log = logging.getLogger(__name__)


def prediction_kl(current: pd.Series, reference: pd.Series, classes: list[str]) -> float:
    """Bias-corrected KL(current || reference) of the predicted-class mix (>= 0): the plug-in
    estimate minus its expectation when both samples come from one mix, (k - 1)/2 (1/n + 1/m)."""
    k, n, m = len(classes), max(len(current), 1), max(len(reference), 1)
    cur = current.value_counts().reindex(classes, fill_value=0).to_numpy(float) + 0.5
    ref = reference.value_counts().reindex(classes, fill_value=0).to_numpy(float) + 0.5
    p, q = cur / cur.sum(), ref / ref.sum()
    return max(0.0, float(np.sum(p * np.log(p / q))) - (k - 1) / 2 * (1 / n + 1 / m))


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
    mlflow_run_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The day's ``summary.json``."""
        out = asdict(self)
        out.pop("mlflow_run_id")
        return out

    def summary(self) -> dict[str, Any]:
        """What ``mlops drift --json`` prints and the DAG hands on."""
        return {"status": "measured", "mlflow_run_id": self.mlflow_run_id, **self.to_dict()}

    def reason_text(self) -> str:
        return "; ".join(self.reasons) or "no drift"


CHI2_TWO_SAMPLE = "chisquare_2sample"


def two_sample_chisquare(reference: pd.Series, current: pd.Series) -> float:
    """p-value of the chi-square test of independence on the (reference, current) x category counts."""
    from scipy.stats import chi2_contingency

    keys = sorted(set(reference.dropna()) | set(current.dropna()), key=str)
    table = np.array([[int((sample == key).sum()) for key in keys] for sample in (reference, current)])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or (table.sum(axis=1) == 0).any():
        return 1.0
    return float(chi2_contingency(table)[1])


def register_two_sample_chisquare() -> None:
    """Make ``CHI2_TWO_SAMPLE`` a method Evidently's ``ValueDrift`` knows (idempotent)."""
    from evidently.legacy.calculations.stattests.registry import StatTest, register_stattest
    from evidently.legacy.core import ColumnType

    def impl(
        reference: pd.Series, current: pd.Series, feature_type: Any, threshold: float
    ) -> tuple[float, bool]:
        p_value = two_sample_chisquare(reference, current)
        return p_value, p_value < threshold

    test = StatTest(
        name=CHI2_TWO_SAMPLE,
        display_name="two-sample chi-square p_value",
        allowed_feature_types=[ColumnType.Categorical],
    )
    register_stattest(test, default_impl=impl)


def _evidently_metrics(numerical: list[str], categorical: list[str], monitoring: MonitoringConfig) -> list:
    from evidently.metrics import ValueDrift

    register_two_sample_chisquare()

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
        metrics.append(ValueDrift(column=column, method=CHI2_TWO_SAMPLE, threshold=monitoring.column_alpha))
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
            ("wasserstein", "ks") if kind == "numerical" else ("jensenshannon", CHI2_TWO_SAMPLE)
        )
        effect = values[(column, effect_method)]
        p_value = values[(column, test_method)]
        drifted = bool(effect >= monitoring.column_effect_threshold and p_value < alpha)
        columns.append(ColumnDrift(column, kind, effect, effect_method, p_value, test_method, drifted))
    return snapshot, columns


def drift_verdict(
    columns: list[ColumnDrift], kl: float, monitoring: MonitoringConfig
) -> tuple[float, bool, bool, bool, list[str]]:
    """(drift_score, data_drift, prediction_drift, severe, reasons) from the column decisions and KL."""
    drifted = [c for c in columns if c.drifted]
    score = len(drifted) / max(len(columns), 1)
    data_drift = score > monitoring.data_drift_threshold
    mix = next((c for c in columns if c.column == "predicted_class"), None)
    significant = mix is None or mix.p_value < monitoring.column_alpha / max(len(columns), 1)
    prediction_drift = kl > monitoring.prediction_drift_kl_threshold and significant
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
            "(predicted-class mix vs training" + ("" if mix is None else f", p {mix.p_value:.1e}") + ")"
        )
    return score, data_drift, prediction_drift, severe, reasons


# ---------------------------------------------------------------- the champion's side


def load_reference(settings: Settings, version: str) -> Reference:
    """The drift reference logged with model ``version``'s training run."""
    client = registry.client(settings)
    model_version = client.get_model_version(settings.mlflow.registered_model, str(version))
    with tempfile.TemporaryDirectory() as folder:
        return Reference.load(
            Path(client.download_artifacts(model_version.run_id, REFERENCE_ARTIFACTS, folder))
        )


def champion_reference(settings: Settings) -> tuple[str, Reference, Any] | None:
    """(version, reference, head) of the current champion, or None when there is none yet."""
    version = registry.version_for_alias(settings, registry.CHAMPION)
    if version is None:
        return None
    return version, load_reference(settings, version), load_champion_head(settings, version)


@dataclass(frozen=True)
class ChampionModel:
    """The champion as the monitor runs it: its head on the configured backbone's cached embeddings,
    or, when its backbone was fine-tuned (those embeddings are not its input), its ONNX export on the
    day's images."""

    head: Any
    onnx: bytes | None = None  # the fine-tuned model's export

    def predict_proba(
        self, settings: Settings, storage: Storage, rows: pd.DataFrame, embeddings: np.ndarray
    ) -> np.ndarray:
        from ml.training.model import predict_proba

        if self.onnx is None:
            return predict_proba(self.head, embeddings)
        from ml.training.preprocessing import Preprocessing, batch_arrays, decode_rgb
        from ml.training.scoring import onnx_predict_proba

        prep = Preprocessing.from_settings(settings.preprocessing)
        images = [decode_rgb(storage.read_bytes(key), prep) for key in rows["curated_key"]]
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.onnx"
            path.write_bytes(self.onnx)
            return onnx_predict_proba(path, batch_arrays(images, prep))


def load_champion_head(settings: Settings, version: str) -> ChampionModel:
    """Model ``version``: its head from the state dict (``weights_only``: never a pickled model) and,
    when it fine-tuned its backbone, its ONNX export."""
    from ml.training.model import load_head

    client = registry.client(settings)
    model_version = client.get_model_version(settings.mlflow.registered_model, str(version))
    fine_tuned = client.get_run(model_version.run_id).data.params.get("frozen_backbone") == "False"
    with tempfile.TemporaryDirectory() as folder:
        weights = client.download_artifacts(model_version.run_id, HEAD_WEIGHTS_ARTIFACT, folder)
        spec = client.download_artifacts(model_version.run_id, HEAD_META_ARTIFACT, folder)
        head = load_head(Path(weights), Path(spec))
        onnx = (
            Path(client.download_artifacts(model_version.run_id, ONNX_ARTIFACT, folder)).read_bytes()
            if fine_tuned
            else None
        )
    return ChampionModel(head, onnx)


def current_frame(
    settings: Settings, storage: Storage, rows: pd.DataFrame, reference: Reference, model: Any
) -> pd.DataFrame:
    """The batch's drift columns: cached embeddings (computed and cached when missing), projected, and
    the champion's predictions (``model``: a ChampionModel, or a head on those embeddings)."""
    from ml.training.features import feature_cache
    from ml.training.model import backbone_from_settings
    from ml.training.preprocessing import Preprocessing

    prep = Preprocessing.from_settings(settings.preprocessing)
    cache = feature_cache(settings, storage, backbone_from_settings(settings), prep)
    if cache.id != reference.cache_id:
        raise ValueError(
            f"the champion's reference was built with feature cache {reference.cache_id}, the config gives "
            f"{cache.id} (backbone, weights, model.precision, preprocessing or views changed): "
            "retrain before monitoring"
        )
    features, _ = cache.features_for(rows)
    embeddings = features[:, 0]
    champion = model if isinstance(model, ChampionModel) else ChampionModel(model)
    proba = champion.predict_proba(settings, storage, rows, embeddings)
    return batch_frame(rows, reference.project(embeddings), proba, reference.classes)


def write_report(
    storage: Storage, day: str, snapshot: Any, prefix: str = DRIFT_REPORTS_PREFIX
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


@dataclass(frozen=True)
class NotMeasured:
    """A day drift could not be measured for: no champion yet, or nothing curated that day."""

    status: str  # no_reference | empty
    day: str
    reason: str

    def summary(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "day": self.day,
            "drift_detected": False,
            "drift_score": None,
            "reasons": [self.reason],
        }


def judge_frame(
    day: str, version: str, current: pd.DataFrame, reference: Reference, monitoring: MonitoringConfig
) -> tuple[DriftResult, Any]:
    """Compare a batch's drift columns with the reference: the result and the Evidently snapshot."""
    snapshot, columns = compare(current, reference, monitoring)
    kl = prediction_kl(current["predicted_class"], reference.frame["predicted_class"], reference.classes)
    score, data_drift, prediction_drift, severe, reasons = drift_verdict(columns, kl, monitoring)
    result = DriftResult(
        day=day,
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
    return result, snapshot


def measure_day(settings: Settings, storage: Storage, day: dt.date) -> DriftResult | NotMeasured:
    """Drift of ``day``'s curated images against the champion: report, MLflow run, summary."""
    from ml.data.catalog import read_partition

    found = champion_reference(settings)
    if found is None:
        return NotMeasured("no_reference", str(day), "no champion model yet: nothing to compare against")
    version, reference, head = found
    rows = read_partition(storage, day)
    if rows.empty:
        return NotMeasured("empty", str(day), f"no curated images for {day}")
    current = current_frame(settings, storage, rows, reference, head)
    result, snapshot = judge_frame(str(day), version, current, reference, settings.monitoring)
    result.report, result.report_json, report_html = write_report(storage, str(day), snapshot)
    storage.write_bytes(drift_summary_key(day), json.dumps(result.to_dict(), indent=2, default=str).encode())
    result.mlflow_run_id = log_to_mlflow(settings, result, report_html)
    return result


def drift_alert(summary: dict[str, Any], report_link: str = "", run_url: str = "") -> Alert:
    """The Slack warning for a drifted day, with the reasons, the retrain decision, the report (a link
    a person can open; default: the storage URL) and the MLflow run."""
    return Alert(
        title="data_drift_detected",
        severity="warning",
        reason=f"{'; '.join(summary['reasons'])}. Retrain: {summary['retrain']['why']}.",
        dag_id="drift_monitor",
        task_id="measure",
        date=summary["day"],
        link=report_link or summary.get("report", ""),
        details={"drift_score": summary["drift_score"], "prediction_kl": summary["prediction_kl"]},
        run_url=run_url,
    )


def monitor_days(settings: Settings, storage: Storage, days: list[dt.date], notify: Notify) -> dict[str, Any]:
    """Measure each day, decide on a retrain (cooldown), then warn for each drifted one.

    Returns the summary to act on: the last day that requests a retrain, else the last day, with
    ``failed_days`` (day -> error) for the days that could not be measured: a failing day does not
    hold back what the others found (the caller acts on them, then reports the failure), and no
    warning is sent before every day was measured, so a retry does not send one twice. Raises when
    no day could be measured.
    """
    summaries, failed = [], {}
    for day in days:
        try:
            summary = measure_day(settings, storage, day).summary()
        except Exception as exc:  # reported with the other days: they are acted on first
            log.exception("%s: drift could not be measured", day)
            failed[day.isoformat()] = f"{type(exc).__name__}: {exc}"
            if len(failed) == len(days):
                raise
            continue
        request, why = should_request_retrain(storage, summary, settings.monitoring.cooldown_days)
        summary["retrain"] = {"request": request, "why": why}
        log.info(
            "%s: %s; drift_score %s, prediction_kl %s; detected %s; retrain: %s; report %s",
            summary["day"],
            summary["status"],
            summary["drift_score"],
            summary.get("prediction_kl"),
            summary["drift_detected"],
            why,
            summary.get("report", "-"),
        )
        summaries.append(summary)
    for summary in summaries:
        if summary["drift_detected"]:
            report = browsable_link(storage, summary.get("report", ""), settings)
            run_url = mlflow_run_url(settings, summary.get("mlflow_run_id", ""))
            summary["alert"] = notify(drift_alert(summary, report, run_url))
    requests = [summary for summary in summaries if summary["retrain"]["request"]]
    chosen = requests[-1] if requests else summaries[-1]  # one retrain covers every day it sees
    return {key: value for key, value in chosen.items() if key != "columns"} | {"failed_days": failed}


# ---------------------------------------------------------------- retrain requests and cooldown


def retrain_requests(storage: Storage) -> list[dict[str, Any]]:
    if not storage.exists(RETRAIN_REQUESTS_KEY):
        return []
    return [
        json.loads(line) for line in storage.read_bytes(RETRAIN_REQUESTS_KEY).decode().splitlines() if line
    ]


def should_request_retrain(storage: Storage, summary: dict[str, Any], cooldown_days: int) -> tuple[bool, str]:
    """Drift requests a retrain unless one was requested for a day within the cooldown of this one, on
    either side (a late day measured after a later one; severe drift overrides), and never twice for
    one day (a re-run of the day's ingest measures it again)."""
    if not summary.get("drift_detected"):
        return False, "no drift"
    day = dt.date.fromisoformat(summary["day"])
    requests = retrain_requests(storage)
    if any(r["day"] == summary["day"] for r in requests):
        return False, f"a retrain was already requested for {summary['day']}"
    recent = [r for r in requests if abs((day - dt.date.fromisoformat(r["day"])).days) < cooldown_days]
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
    append_jsonl(storage, RETRAIN_REQUESTS_KEY, record)
    return record


def retrain_request_extra(summary: dict[str, Any]) -> dict[str, Any]:
    """What the ``retrain_requested`` event carries: reason, report, score, day."""
    return {
        "reason": f"drift on {summary['day']}: {'; '.join(summary['reasons'])}",
        "report": summary.get("report", ""),
        "drift_score": summary["drift_score"],
        "prediction_kl": summary["prediction_kl"],
        "day": summary["day"],
    }
