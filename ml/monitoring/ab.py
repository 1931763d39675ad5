"""A/B comparison of the canary (challenger) against the stable model (control) on live traffic.

Both arms come from the same window of the prediction log (``serving/predictions/DAY/``), joined
on ``request_id`` to the feedback log (``serving/feedback/DAY/``; only ``bound: true`` labels
count, and a label may arrive up to a day after its prediction, so feedback is read a day past
the window's end). Per model version: requests, errors (status >= 500), answered requests,
labelled answers, live accuracy and the latency of every answer.

Each metric is a difference **challenger - control** with a two-sided interval at
``ab.confidence`` (95%), and a p-value for "no difference":

- ``accuracy`` (success metric): Newcombe's hybrid score interval (method 10 of Newcombe 1998,
  built from the two Wilson intervals) for the difference of two independent proportions;
  p-value of the pooled two-proportion z-test.
- ``latency_p50_ms`` (success metric, lower is better): difference of median latencies, percentile
  bootstrap interval (each arm resampled on its own, ``ab.bootstrap_resamples`` times, seeded by
  ``ab.bootstrap_seed``); p-value of the two-sided Mann-Whitney U test.
- ``error_rate`` (guardrail, lower is better): as accuracy (Newcombe interval, z-test).

Verdicts are read off the interval, oriented so that a positive *gain* is good (accuracy: the
difference; latency and error rate: minus the difference). With ``[lo, hi]`` the gain interval,
``m`` the metric's non-inferiority margin and ``s`` its superiority margin (> 0):

- ``not enough data``: an arm has fewer than ``ab.min_labelled`` labelled answers (accuracy) or
  ``ab.min_requests`` answers / requests (latency / error rate), or the interval still contains
  ``-m`` (neither non-inferiority nor inferiority shown yet: more traffic decides);
- ``worse``: ``hi < -m`` (worse by more than the margin, at the stated confidence);
- ``better``: ``lo > s`` (better by more than the superiority margin; success metrics only: the
  error rate can block but never makes a challenger "better");
- ``not worse``: otherwise, i.e. ``lo > -m``.

Margins: ``ab.non_inferiority_margin`` / ``ab.superiority_margin`` (accuracy, absolute share),
``ab.latency_margin_ms`` / ``ab.latency_superiority_ms`` and ``ab.error_rate_margin``.
Overall: ``worse`` if any metric is worse; else ``not enough data`` if any metric is; else
``better`` if a success metric is better; else ``not worse``. On two equal arms "better" needs the
lower bound of a 95% interval to clear a positive margin: with the defaults 0.15-0.3% of the
time at the least traffic judged (200 labelled answers per arm, 92% accuracy) and quickly less as
traffic grows; ``bench/ab.py`` counts the verdicts by simulation.

Requests are treated as independent draws. Canary routing is sticky per client, so when a few
clients send most of the traffic the intervals are somewhat too narrow.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from statistics import NormalDist
from typing import Any

import numpy as np

from ml.config import AbConfig, Settings
from ml.layout import FEEDBACK_PREFIX, PREDICTIONS_PREFIX
from ml.monitoring.logs import iso, log_records
from ml.storage import Storage

FEEDBACK_DELAY = dt.timedelta(days=1)  # a label may come this long after its prediction
ACCURACY, LATENCY, ERROR_RATE = "accuracy", "latency_p50_ms", "error_rate"
SUCCESS_METRICS = (ACCURACY, LATENCY)


class Verdict(StrEnum):
    BETTER = "better"
    NOT_WORSE = "not worse"
    WORSE = "worse"
    NOT_ENOUGH_DATA = "not enough data"


# ---------------------------------------------------------------- statistics


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (n > 0)."""
    z, p = _z(confidence), successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_interval(x1: int, n1: int, x2: int, n2: int, confidence: float = 0.95) -> tuple[float, float]:
    """Newcombe's hybrid score interval of ``x1/n1 - x2/n2`` (two independent proportions)."""
    p1, p2 = x1 / n1, x2 / n2
    l1, u1 = wilson_interval(x1, n1, confidence)
    l2, u2 = wilson_interval(x2, n2, confidence)
    difference = p1 - p2
    return (
        difference - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
        difference + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2),
    )


def two_proportion_p(x1: int, n1: int, x2: int, n2: int) -> float:
    """Two-sided p-value of the pooled two-proportion z-test (1.0 when both are 0% or 100%)."""
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0
    return 2 * NormalDist().cdf(-abs(x1 / n1 - x2 / n2) / se)


def bootstrap_medians(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Medians of ``resamples`` bootstrap resamples of ``values``, drawn exactly in O(resamples).

    The resample's k-th smallest value is ``sorted[floor(n * U_(k))]`` with ``U_(k)`` the k-th of n
    uniforms, a Beta(k+1, n-k) draw; the next one up is the first of the n-k-1 uniforms above it.
    This is the same distribution as ``np.median`` of resampled arrays, without building them.
    """
    ordered, n = np.sort(values), len(values)
    low = (n - 1) // 2
    u_low = rng.beta(low + 1, n - low, resamples)
    lower = ordered[np.minimum((n * u_low).astype(int), n - 1)]
    if n % 2:
        return lower
    u_high = u_low + (1 - u_low) * rng.beta(1, n - low - 1, resamples)
    return (lower + ordered[np.minimum((n * u_high).astype(int), n - 1)]) / 2


def bootstrap_median_difference(
    challenger: np.ndarray, control: np.ndarray, resamples: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``median(challenger) - median(control)``."""
    rng = np.random.default_rng(seed)
    draws = bootstrap_medians(challenger, resamples, rng) - bootstrap_medians(control, resamples, rng)
    low, high = np.quantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def mann_whitney_p(challenger: np.ndarray, control: np.ndarray) -> float:
    """Two-sided p-value of the Mann-Whitney U test (scipy's choice of exact or asymptotic)."""
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(challenger, control, alternative="two-sided").pvalue)


def judge(gain: tuple[float, float], worse_margin: float, better_margin: float | None) -> Verdict:
    """Verdict from the interval of the gain (challenger better = positive), as the module docstring says."""
    low, high = gain
    if better_margin is not None and low > better_margin:
        return Verdict.BETTER
    if high < -worse_margin:
        return Verdict.WORSE
    if low > -worse_margin:
        return Verdict.NOT_WORSE
    return Verdict.NOT_ENOUGH_DATA


@dataclass(frozen=True)
class Rule:
    """How a metric is judged: its direction and its margins (in the metric's own unit)."""

    higher_is_better: bool
    worse_margin: float
    better_margin: float | None  # None: a guardrail, never "better"
    unit: str = ""

    def verdict(self, ci: tuple[float, float]) -> Verdict:
        gain = ci if self.higher_is_better else (-ci[1], -ci[0])
        return judge(gain, self.worse_margin, self.better_margin)

    def explain(self, verdict: Verdict) -> str:
        """The rule behind a verdict, in the metric's own direction (challenger - control)."""
        sign = 1 if self.higher_is_better else -1
        worse, side = f"{-sign * self.worse_margin:+g}{self.unit}", "below" if sign > 0 else "above"
        if verdict == Verdict.BETTER:
            better = f"{sign * (self.better_margin or 0):+g}{self.unit}"
            return f"entirely {'above' if sign > 0 else 'below'} the {better} superiority margin"
        if verdict == Verdict.WORSE:
            return f"entirely {side} the {worse} margin"
        if verdict == Verdict.NOT_WORSE:
            return f"clear of the {worse} margin"
        return f"the interval still contains the {worse} margin, more traffic decides"


# ---------------------------------------------------------------- the arms


@dataclass(frozen=True)
class ArmStats:
    """What one model version did in the window."""

    version: str
    requests: int  # answered or failed
    errors: int  # status >= 500
    answered: int
    labelled: int  # answers with a bound label
    correct: int
    share: float  # of both arms' requests
    latency_ms: np.ndarray = field(repr=False, compare=False)  # every answer's server-side latency

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def median_latency_ms(self) -> float | None:
        return float(np.median(self.latency_ms)) if self.answered else None

    def to_dict(self) -> dict[str, Any]:
        p99 = float(np.percentile(self.latency_ms, 99)) if self.answered else None
        return {
            "version": self.version,
            "requests": self.requests,
            "errors": self.errors,
            "answered": self.answered,
            "labelled": self.labelled,
            "correct": self.correct,
            "share": round(self.share, 4),
            "accuracy": _round(self.accuracy),
            "error_rate": _round(self.error_rate),
            "p50_latency_ms": _round(self.median_latency_ms, 2),
            "p99_latency_ms": _round(p99, 2),
        }


def _round(value: float | None, places: int = 4) -> float | None:
    return None if value is None else round(value, places)


def bound_labels(feedback: Iterable[dict[str, Any]]) -> dict[str, str]:
    """request_id -> label, from feedback the service bound to its prediction only."""
    return {record["request_id"]: record["label"] for record in feedback if record.get("bound") is True}


def _failed(record: dict[str, Any]) -> bool:
    return int(record.get("status") or 200) >= 500


def tally(version: str, records: Sequence[dict[str, Any]], labels: dict[str, str], total: int) -> ArmStats:
    """One arm's counts from its prediction-log records; ``total``: requests of both arms."""
    answered = [r for r in records if "predicted_class" in r and not _failed(r)]
    labelled = [r for r in answered if r["request_id"] in labels]
    latency = np.array([float(r["latency_ms"]) for r in answered], dtype=float)
    latency.flags.writeable = False
    return ArmStats(
        version=version,
        requests=len(records),
        errors=sum(_failed(r) for r in records),
        answered=len(answered),
        labelled=len(labelled),
        correct=sum(r["predicted_class"] == labels[r["request_id"]] for r in labelled),
        share=len(records) / total if total else 0.0,
        latency_ms=latency,
    )


def arms(
    predictions: Iterable[dict[str, Any]], feedback: Iterable[dict[str, Any]], control: str, challenger: str
) -> tuple[ArmStats, ArmStats]:
    """(control, challenger) counts of served traffic; other versions and shadow answers are left out."""
    rows: dict[str, list[dict[str, Any]]] = {control: [], challenger: []}
    for record in predictions:
        version = str(record.get("model_version"))
        if version in rows and record.get("track") != "shadow":
            rows[version].append(record)
    labels, total = bound_labels(feedback), len(rows[control]) + len(rows[challenger])
    return tally(control, rows[control], labels, total), tally(challenger, rows[challenger], labels, total)


# ---------------------------------------------------------------- comparing


@dataclass(frozen=True)
class MetricComparison:
    """One metric, challenger - control: estimate, interval, p-value and verdict."""

    metric: str
    control: float | None
    challenger: float | None
    difference: float | None
    ci: tuple[float, float] | None
    p_value: float | None
    method: str
    verdict: Verdict
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "control": _round(self.control, 6),
            "challenger": _round(self.challenger, 6),
            "difference": _round(self.difference, 6),
            "ci": None if self.ci is None else [round(self.ci[0], 6), round(self.ci[1], 6)],
            "p_value": _round(self.p_value, 6),
            "method": self.method,
            "verdict": str(self.verdict),
            "reason": self.reason,
        }


PROPORTION_METHOD = "Newcombe hybrid score interval (Wilson); pooled two-proportion z-test"
LATENCY_METHOD = "difference of medians, percentile bootstrap interval; Mann-Whitney U test"


def _too_few(what: str, control: int, challenger: int, needed: int) -> str | None:
    """Why an arm has too little data to judge, or None when both have enough."""
    if min(control, challenger) >= needed:
        return None
    return f"{challenger} (challenger) and {control} (control) {what}, {needed} per arm needed"


def _unjudged(metric: str, method: str, too_few: str | None) -> MetricComparison:
    return MetricComparison(
        metric, None, None, None, None, None, method, Verdict.NOT_ENOUGH_DATA, too_few or ""
    )


def compare_proportions(
    metric: str,
    challenger: tuple[int, int],
    control: tuple[int, int],
    rule: Rule,
    too_few: str | None,
    confidence: float,
) -> MetricComparison:
    """A proportion (hits, n) per arm: difference, Newcombe interval, z-test p-value, verdict."""
    (x1, n1), (x2, n2) = challenger, control
    if not (n1 and n2):
        return _unjudged(metric, PROPORTION_METHOD, too_few)
    ci = newcombe_interval(x1, n1, x2, n2, confidence)
    verdict = Verdict.NOT_ENOUGH_DATA if too_few else rule.verdict(ci)
    difference = x1 / n1 - x2 / n2
    reason = f"{metric} {difference:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}], {too_few or rule.explain(verdict)}"
    p_value = two_proportion_p(x1, n1, x2, n2)
    return MetricComparison(
        metric, x2 / n2, x1 / n1, difference, ci, p_value, PROPORTION_METHOD, verdict, reason
    )


def compare_accuracy(control: ArmStats, challenger: ArmStats, config: AbConfig) -> MetricComparison:
    too_few = _too_few("labelled answers", control.labelled, challenger.labelled, config.min_labelled)
    rule = Rule(True, config.non_inferiority_margin, config.superiority_margin)
    arms_ = (challenger.correct, challenger.labelled), (control.correct, control.labelled)
    return compare_proportions(ACCURACY, *arms_, rule, too_few, config.confidence)


def compare_error_rate(control: ArmStats, challenger: ArmStats, config: AbConfig) -> MetricComparison:
    too_few = _too_few("requests", control.requests, challenger.requests, config.min_requests)
    rule = Rule(False, config.error_rate_margin, None)
    arms_ = (challenger.errors, challenger.requests), (control.errors, control.requests)
    return compare_proportions(ERROR_RATE, *arms_, rule, too_few, config.confidence)


def compare_latency(control: ArmStats, challenger: ArmStats, config: AbConfig) -> MetricComparison:
    """Median latency: difference, bootstrap interval, Mann-Whitney p-value, verdict."""
    too_few = _too_few("answers", control.answered, challenger.answered, config.min_requests)
    if not (control.answered and challenger.answered):
        return _unjudged(LATENCY, LATENCY_METHOD, too_few)
    a, b = challenger.latency_ms, control.latency_ms
    ci = bootstrap_median_difference(
        a, b, config.bootstrap_resamples, config.confidence, config.bootstrap_seed
    )
    rule = Rule(False, config.latency_margin_ms, config.latency_superiority_ms, " ms")
    verdict = Verdict.NOT_ENOUGH_DATA if too_few else rule.verdict(ci)
    medians = float(np.median(a)), float(np.median(b))
    difference = medians[0] - medians[1]
    why = too_few or rule.explain(verdict)
    reason = f"median latency {difference:+.1f} ms [{ci[0]:+.1f}, {ci[1]:+.1f}], {why}"
    p_value = mann_whitney_p(a, b)
    return MetricComparison(
        LATENCY, medians[1], medians[0], difference, ci, p_value, LATENCY_METHOD, verdict, reason
    )


# ---------------------------------------------------------------- the report


@dataclass(frozen=True)
class AbReport:
    """Challenger against control on one window: the arms, each metric and the overall verdict."""

    control: ArmStats
    challenger: ArmStats
    metrics: tuple[MetricComparison, ...]
    verdict: Verdict
    reason: str
    config: AbConfig
    window: tuple[str, str] | None = None

    def metric(self, name: str) -> MetricComparison:
        return next(m for m in self.metrics if m.metric == name)

    def to_dict(self) -> dict[str, Any]:
        config = self.config
        return {
            "window": None if self.window is None else list(self.window),
            "control": self.control.to_dict(),
            "challenger": self.challenger.to_dict(),
            "metrics": {m.metric: m.to_dict() for m in self.metrics},
            "verdict": str(self.verdict),
            "reason": self.reason,
            "confidence": config.confidence,
            "margins": {
                "accuracy_non_inferiority": config.non_inferiority_margin,
                "accuracy_superiority": config.superiority_margin,
                "latency_ms": config.latency_margin_ms,
                "latency_superiority_ms": config.latency_superiority_ms,
                "error_rate": config.error_rate_margin,
            },
        }


def overall(metrics: Sequence[MetricComparison]) -> tuple[Verdict, str]:
    """The overall verdict and one sentence of reasons (see the module docstring for the order)."""
    by = {verdict: [m for m in metrics if m.verdict == verdict] for verdict in Verdict}
    if by[Verdict.WORSE]:
        verdict, named = Verdict.WORSE, by[Verdict.WORSE]
    elif by[Verdict.NOT_ENOUGH_DATA]:
        verdict, named = Verdict.NOT_ENOUGH_DATA, by[Verdict.NOT_ENOUGH_DATA]
    elif any(m.metric in SUCCESS_METRICS for m in by[Verdict.BETTER]):
        verdict, named = Verdict.BETTER, list(metrics)
    else:
        verdict, named = Verdict.NOT_WORSE, list(metrics)
    return verdict, f"{verdict}: " + "; ".join(f"{m.reason or m.metric}" for m in named) + "."


def ab_report(
    records_predictions: Iterable[dict[str, Any]],
    records_feedback: Iterable[dict[str, Any]],
    control: str,
    challenger: str,
    config: AbConfig,
) -> AbReport:
    """Compare ``challenger`` with ``control`` on these prediction and feedback records."""
    control, challenger = str(control), str(challenger)
    if control == challenger:
        raise ValueError(f"control and challenger are the same version ({control})")
    stable, canary = arms(records_predictions, records_feedback, control, challenger)
    metrics = (
        compare_accuracy(stable, canary, config),
        compare_latency(stable, canary, config),
        compare_error_rate(stable, canary, config),
    )
    verdict, reason = overall(metrics)
    return AbReport(stable, canary, metrics, verdict, reason, config)


def measure_ab(
    settings: Settings, storage: Storage, control: str, challenger: str, start: dt.datetime, end: dt.datetime
) -> AbReport:
    """The A/B report for predictions with ``start < time <= end`` (labels up to a day later)."""
    predictions = log_records(storage, PREDICTIONS_PREFIX, start, end)
    feedback = log_records(storage, FEEDBACK_PREFIX, start, end + FEEDBACK_DELAY)
    report = ab_report(predictions, feedback, control, challenger, settings.ab)
    return replace(report, window=(iso(start), iso(end)))


def promotion_allowed(report: AbReport, config: AbConfig) -> tuple[bool, str]:
    """May the challenger be promoted? Not when its live accuracy is worse, nor unproven when
    ``ab.require_not_worse_to_promote`` asks for proof."""
    accuracy = report.metric(ACCURACY)
    if accuracy.verdict == Verdict.WORSE:
        return (
            False,
            f"v{report.challenger.version} is worse than v{report.control.version}: {accuracy.reason}",
        )
    if accuracy.verdict == Verdict.NOT_ENOUGH_DATA and config.require_not_worse_to_promote:
        return False, f"not worse is required and not shown yet: {accuracy.reason}"
    return True, f"accuracy {accuracy.verdict}: {accuracy.reason}"
