"""The shadow report: how a shadow model's answers compare with the stable model's on live traffic.

A shadow (``serving.shadow``, or ``mlops deploy vN --stage shadow``) answers a copy of every
stable request off the request path; its answers go to ``serving/shadow/`` and are never
returned. Joined on ``request_id`` with the stable answers and the bound feedback, they give the
agreement between the two models (with a 95% Wilson interval), each one's live accuracy on the
requests that were labelled, and the shadow's own inference latency.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from ml.layout import FEEDBACK_PREFIX, PREDICTIONS_PREFIX, SHADOW_PREFIX
from ml.monitoring.ab import wilson_interval
from ml.monitoring.logs import log_records
from ml.storage import Storage


@dataclass(frozen=True)
class Share:
    """A proportion with its 95% Wilson score interval."""

    hits: int
    n: int
    value: float | None
    low: float | None
    high: float | None


def wilson(hits: int, n: int) -> Share:
    if n == 0:
        return Share(0, 0, None, None, None)
    low, high = wilson_interval(hits, n)
    return Share(hits, n, round(hits / n, 4), round(low, 4), round(high, 4))


@dataclass(frozen=True)
class ShadowReport:
    stable: str | None
    shadow: str | None
    compared: int  # requests both models answered
    agreement: Share
    stable_accuracy: Share  # on the compared requests that carry a bound label
    shadow_accuracy: Share
    shadow_latency_ms: dict[str, float | None]  # p50 / p99 of the shadow's own model call
    summary: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def shadow_report(
    predictions: list[dict[str, Any]],
    shadows: list[dict[str, Any]],
    feedback: list[dict[str, Any]],
    stable: str | None,
    shadow: str | None,
) -> ShadowReport:
    """Pure: the report from log records (stable answers, shadow answers, bound feedback)."""
    served = {r["request_id"]: r for r in predictions if str(r.get("model_version")) == str(stable)}
    copied = {r["request_id"]: r for r in shadows if str(r.get("model_version")) == str(shadow)}
    labels = {r["request_id"]: r["label"] for r in feedback if r.get("bound") is True}
    both = sorted(set(served) & set(copied))
    agree = sum(served[i].get("predicted_class") == copied[i].get("predicted_class") for i in both)
    labelled = [i for i in both if i in labels]
    stable_right = sum(served[i].get("predicted_class") == labels[i] for i in labelled)
    shadow_right = sum(copied[i].get("predicted_class") == labels[i] for i in labelled)
    latency = np.array([float(copied[i]["latency_ms"]) for i in both]) if both else np.zeros(0)
    report = ShadowReport(
        stable=stable,
        shadow=shadow,
        compared=len(both),
        agreement=wilson(agree, len(both)),
        stable_accuracy=wilson(stable_right, len(labelled)),
        shadow_accuracy=wilson(shadow_right, len(labelled)),
        shadow_latency_ms={
            "p50": round(float(np.percentile(latency, 50)), 2) if latency.size else None,
            "p99": round(float(np.percentile(latency, 99)), 2) if latency.size else None,
        },
        summary="",
    )
    return _summarised(report)


def _summarised(report: ShadowReport) -> ShadowReport:
    if not report.compared:
        text = f"no request answered by both v{report.stable} and shadow v{report.shadow} yet"
    else:
        a, s, t = report.agreement, report.shadow_accuracy, report.stable_accuracy
        text = f"shadow v{report.shadow} agrees with v{report.stable} on {a.value:.1%} of {a.n} requests"
        if s.n:
            text += f"; on {s.n} labelled: shadow {s.value:.1%}, stable {t.value:.1%} right"
    return replace(report, summary=text)


def measure_shadow(
    storage: Storage, stable: str | None, shadow: str | None, start: dt.datetime, end: dt.datetime
) -> ShadowReport:
    """The report over the window (labels may come up to a day after their prediction)."""
    return shadow_report(
        log_records(storage, PREDICTIONS_PREFIX, start, end),
        log_records(storage, SHADOW_PREFIX, start, end),
        log_records(storage, FEEDBACK_PREFIX, start, end + dt.timedelta(days=1)),
        stable,
        shadow,
    )
