"""Calibration and abstention: temperature scaling, ECE, split-conformal prediction sets.

The temperature is fitted on the validation split (minimum negative log-likelihood under a weak
log-normal prior, see ``fit_temperature``), and so is
the conformal threshold (on the calibrated probabilities, score ``1 - p(true class)``); ECE,
coverage and set sizes are measured on the test split. A prediction set holds every class with
``p >= 1 - threshold`` and always the top class; the service abstains when it holds more than one.
``serving_params()`` is what the model carries to the service (``CALIBRATION_ARTIFACT``).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ml.training.checks import Check, ci_text
from ml.training.evaluate import Metric
from ml.training.intervals import share_ci, statistic_ci

CALIBRATION_ARTIFACT = "validation/calibration.json"  # read by ml.release.build into the bundle
LOG_T_BOUNDS = (-3.0, 3.0)  # temperatures from 0.05 to 20
LOG_T_PRIOR_SD = 0.5  # log T ~ N(0, 0.5^2): T in [0.37, 2.7] a priori with 95%


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    shifted = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true classes."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    top = scaled.max(axis=1, keepdims=True)
    log_norm = (top + np.log(np.exp(scaled - top).sum(axis=1, keepdims=True)))[:, 0]
    return float(np.mean(log_norm - scaled[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, prior_sd: float = LOG_T_PRIOR_SD) -> float:
    """The temperature maximising the posterior of ``labels``: total NLL plus a N(0, prior_sd^2) prior
    on log T. A validation split the model gets all right has no finite NLL optimum (T -> 0 keeps
    lowering it); the prior keeps T finite there and is outweighed by the data as errors appear."""
    from scipy.optimize import minimize_scalar

    def objective(log_t: float) -> float:
        return len(labels) * nll(logits, labels, math.exp(log_t)) + log_t**2 / (2 * prior_sd**2)

    return float(math.exp(minimize_scalar(objective, bounds=LOG_T_BOUNDS, method="bounded").x))


def _ece_draws(confidence: np.ndarray, correct: np.ndarray, bins: int, idx: np.ndarray) -> np.ndarray:
    """Top-label ECE of each resample ``idx`` (B, n): sum over bins of |hits - confidence| / n."""
    bin_of = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    keys = bin_of[idx] + (np.arange(idx.shape[0]) * bins)[:, None]
    size = idx.shape[0] * bins
    hits = np.bincount(keys.ravel(), weights=correct[idx].ravel().astype(np.float64), minlength=size)
    sure = np.bincount(keys.ravel(), weights=confidence[idx].ravel(), minlength=size)
    return np.abs(hits - sure).reshape(idx.shape[0], bins).sum(axis=1) / idx.shape[1]


def ece(proba: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error of the top class, ``bins`` equal-width confidence bins."""
    confidence, correct = proba.max(axis=1), proba.argmax(axis=1) == labels
    return float(_ece_draws(confidence, correct, bins, np.arange(len(labels))[None, :])[0])


def ece_ci(proba: np.ndarray, labels: np.ndarray, bins: int, n_bootstrap: int, seed: int) -> Metric:
    confidence, correct = proba.max(axis=1), proba.argmax(axis=1) == labels
    value = ece(proba, labels, bins)
    return statistic_ci(
        value, lambda idx: _ece_draws(confidence, correct, bins, idx), len(labels), n_bootstrap, seed
    )


def conformal_threshold(proba: np.ndarray, labels: np.ndarray, coverage: float) -> float:
    """Split-conformal threshold on ``1 - p(true class)``: the k-th smallest score of the n, with
    k = ceil((n + 1) * coverage); 1 (every class) when k > n."""
    scores = np.sort(1.0 - proba[np.arange(len(labels)), labels])
    rank = math.ceil((len(scores) + 1) * coverage)
    return 1.0 if rank > len(scores) else float(scores[rank - 1])


def prediction_sets(proba: np.ndarray, threshold: float) -> np.ndarray:
    """(N, K) membership: every class with p >= 1 - threshold, and always the top class."""
    members = proba >= 1.0 - threshold
    members[np.arange(len(proba)), proba.argmax(axis=1)] = True
    return members


@dataclass(frozen=True)
class CalibrationReport:
    temperature: float
    bins: int
    n_calibration: int
    n_test: int
    ece_before: Metric
    ece_after: Metric
    nll_before: float
    nll_after: float
    target_coverage: float
    conformal_threshold: float
    coverage: Metric
    mean_set_size: Metric
    abstain_rate: Metric

    def to_dict(self) -> dict[str, Any]:
        return {
            "temperature": round(self.temperature, 4),
            "bins": self.bins,
            "n_calibration": self.n_calibration,
            "n_test": self.n_test,
            "ece_before": self.ece_before.to_dict(),
            "ece_after": self.ece_after.to_dict(),
            "nll_before": round(self.nll_before, 4),
            "nll_after": round(self.nll_after, 4),
            "target_coverage": self.target_coverage,
            "conformal_threshold": round(self.conformal_threshold, 6),
            "coverage": self.coverage.to_dict(),
            "mean_set_size": self.mean_set_size.to_dict(),
            "abstain_rate": self.abstain_rate.to_dict(),
        }

    def serving_params(self) -> dict[str, float]:
        """What the service needs: the temperature and the conformal threshold (and its target)."""
        return {
            "temperature": self.temperature,
            "conformal_threshold": self.conformal_threshold,
            "coverage": self.target_coverage,
        }


def calibrate(
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    coverage: float,
    bins: int = 10,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> CalibrationReport:
    """Fit on ``val`` = (logits, labels), measure on ``test``: ECE before/after, conformal coverage."""
    (val_logits, val_labels), (test_logits, test_labels) = val, test
    temperature = fit_temperature(val_logits, val_labels)
    threshold = conformal_threshold(softmax(val_logits, temperature), val_labels, coverage)
    before, after = softmax(test_logits), softmax(test_logits, temperature)
    sets = prediction_sets(after, threshold)
    covered = sets[np.arange(len(test_labels)), test_labels]
    sizes = sets.sum(axis=1).astype(np.float64)
    return CalibrationReport(
        temperature=temperature,
        bins=bins,
        n_calibration=len(val_labels),
        n_test=len(test_labels),
        ece_before=ece_ci(before, test_labels, bins, n_bootstrap, seed),
        ece_after=ece_ci(after, test_labels, bins, n_bootstrap, seed),
        nll_before=nll(test_logits, test_labels),
        nll_after=nll(test_logits, test_labels, temperature),
        target_coverage=coverage,
        conformal_threshold=threshold,
        coverage=share_ci(covered, n_bootstrap, seed),
        mean_set_size=statistic_ci(
            float(sizes.mean()), lambda idx: sizes[idx].mean(axis=1), len(sizes), n_bootstrap, seed
        ),
        abstain_rate=share_ci(sizes > 1, n_bootstrap, seed),
    )


def coverage_check(report: CalibrationReport) -> Check:
    """The conformal sets' coverage on test must reach the target within its CI."""
    target, found = report.target_coverage, report.coverage
    passed = found.high >= target
    verdict = "meets" if passed else "is significantly below"
    return Check(
        "conformal_coverage",
        found.value,
        target,
        passed,
        f"conformal coverage on test {ci_text(found)} {verdict} the {target:.2f} target "
        f"(threshold {report.conformal_threshold:.4f} fitted on {report.n_calibration} validation images)",
    )


def _bin_accuracy(confidence: np.ndarray, correct: np.ndarray, bins: int) -> list[tuple[int, Metric]]:
    """(count, accuracy with its CI) of each confidence bin."""
    bin_of = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    return [(int((bin_of == b).sum()), share_ci(correct[bin_of == b], seed=b)) for b in range(bins)]


def reliability_png(logits: np.ndarray, labels: np.ndarray, temperature: float, bins: int = 10) -> bytes:
    """Reliability diagram on test, before and after temperature scaling: accuracy per confidence bin
    with its 95% CI (error bars) and the bin's image count."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    centres = (np.arange(bins) + 0.5) / bins
    panels = (
        ("before (T = 1)", softmax(logits)),
        (f"after (T = {temperature:.2f})", softmax(logits, temperature)),
    )
    for position, (title, proba) in enumerate(panels, start=1):
        axis = fig.add_subplot(1, 2, position)
        per_bin = _bin_accuracy(proba.max(axis=1), proba.argmax(axis=1) == labels, bins)
        shown = [(c, count, m) for c, (count, m) in zip(centres, per_bin, strict=True) if count]
        values = np.array([m.value for _, _, m in shown])
        errors = np.array([[m.value - m.low for _, _, m in shown], [m.high - m.value for _, _, m in shown]])
        axis.bar([c for c, _, _ in shown], values, width=1 / bins, edgecolor="black", alpha=0.7)
        axis.errorbar([c for c, _, _ in shown], values, yerr=errors, fmt="none", ecolor="black", capsize=3)
        for centre, count, _ in shown:
            axis.text(centre, 0.02, str(count), ha="center", fontsize=7)
        axis.plot([0, 1], [0, 1], "--", color="grey")
        axis.set_title(f"{title}: ECE {ece(proba, labels, bins):.3f}")
        axis.set_xlabel("confidence (bar labels: images per bin)")
        axis.set_ylabel("accuracy (95% CI)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
