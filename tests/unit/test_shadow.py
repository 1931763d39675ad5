"""The shadow report: agreement with the stable model and live accuracy, from log records."""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest

from ml.monitoring.shadow import shadow_report, wilson


def records(n: int, agree: float, stable_right: float, labelled: float, seed: int = 0):
    """Stable answers right with ``stable_right``; the shadow agrees with them with ``agree``."""
    rng = np.random.default_rng(seed)
    predictions, shadows, feedback = [], [], []
    for i in range(n):
        rid = f"r{i}"
        truth = "a"
        stable_class = "a" if rng.random() < stable_right else "b"
        shadow_class = stable_class if rng.random() < agree else ("b" if stable_class == "a" else "a")
        predictions.append({"request_id": rid, "model_version": "1", "predicted_class": stable_class})
        shadows.append(
            {
                "request_id": rid,
                "model_version": "2",
                "predicted_class": shadow_class,
                "latency_ms": 5.0 + i % 3,
            }
        )
        if rng.random() < labelled:
            feedback.append({"request_id": rid, "label": truth, "bound": True})
    return predictions, shadows, feedback


def test_the_wilson_interval_matches_scipy() -> None:
    for hits, n in ((0, 10), (7, 10), (480, 500), (10, 10)):
        share = wilson(hits, n)
        expected = binomtest(hits, n).proportion_ci(0.95, method="wilson")
        assert abs(share.low - expected.low) < 1e-4 and abs(share.high - expected.high) < 1e-4
    assert wilson(0, 0).value is None


def test_agreement_and_accuracy_on_the_labelled_requests() -> None:
    predictions, shadows, feedback = records(2000, agree=0.9, stable_right=0.8, labelled=0.5)
    feedback.append({"request_id": "r1", "label": "b"})  # unbound: ignored
    shadows.append({"request_id": "other", "model_version": "9", "predicted_class": "a", "latency_ms": 1})
    report = shadow_report(predictions, shadows, feedback, "1", "2")
    assert report.compared == 2000
    assert report.agreement.low < 0.9 < report.agreement.high
    labelled = {r["request_id"] for r in feedback if r.get("bound")}
    served = {r["request_id"]: r["predicted_class"] for r in predictions}
    copied = {r["request_id"]: r["predicted_class"] for r in shadows}
    assert report.stable_accuracy.n == len(labelled) == report.shadow_accuracy.n
    assert report.stable_accuracy.hits == sum(served[i] == "a" for i in labelled)
    assert report.shadow_accuracy.hits == sum(copied[i] == "a" for i in labelled)
    assert report.shadow_latency_ms["p50"] == 6.0
    assert "agrees with v1" in report.summary and "labelled" in report.summary


def test_no_overlap_says_so() -> None:
    report = shadow_report(
        [{"request_id": "x", "model_version": "1", "predicted_class": "a"}], [], [], "1", "2"
    )
    assert report.compared == 0 and report.agreement.value is None and "no request" in report.summary
