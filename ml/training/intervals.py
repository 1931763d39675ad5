"""Percentile-bootstrap intervals for the validation stage: shares, their differences, means.

A share of 0/1 outcomes resampled with replacement has a Binomial(n, p) / n distribution, so
its bootstrap draws counts instead of indices (exact, and O(B) instead of O(B * n)). Every
interval is at ``ml.training.evaluate.CI_LEVEL`` and seeded.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ml.training.evaluate import CI_LEVEL, Metric

_TAILS = (100 * (1 - CI_LEVEL) / 2, 100 * (1 + CI_LEVEL) / 2)


def _metric(value: float, samples: np.ndarray) -> Metric:
    if samples.size == 0:
        return Metric(float(value), float(value), float(value))
    low, high = np.percentile(samples, _TAILS)
    return Metric(float(value), float(low), float(high))


def share_draws(hits: np.ndarray, n_bootstrap: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap draws of the share of true values in ``hits`` (``n_bootstrap`` of them)."""
    outcomes = np.asarray(hits, dtype=bool)
    if outcomes.size == 0:
        return np.full(n_bootstrap, np.nan)
    return rng.binomial(outcomes.size, outcomes.mean(), size=n_bootstrap) / outcomes.size


def share_ci(hits: np.ndarray, n_bootstrap: int = 1000, seed: int = 0) -> Metric:
    """The share of true values with its bootstrap interval (NaN for no values)."""
    outcomes = np.asarray(hits, dtype=bool)
    if outcomes.size == 0:
        return Metric(float("nan"), float("nan"), float("nan"))
    draws = share_draws(outcomes, n_bootstrap, np.random.default_rng(seed))
    return _metric(float(outcomes.mean()), draws)


def share_difference_ci(
    first: np.ndarray, second: np.ndarray, n_bootstrap: int = 1000, seed: int = 0
) -> Metric:
    """share(first) - share(second) for two independent groups, each resampled on its own."""
    a, b = np.asarray(first, dtype=bool), np.asarray(second, dtype=bool)
    if a.size == 0 or b.size == 0:
        return Metric(float("nan"), float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    draws = share_draws(a, n_bootstrap, rng) - share_draws(b, n_bootstrap, rng)
    return _metric(float(a.mean() - b.mean()), draws)


def resampled(
    statistic: Callable[[np.ndarray], np.ndarray], n: int, n_bootstrap: int = 1000, seed: int = 0
) -> np.ndarray:
    """``statistic`` on ``n_bootstrap`` index resamples: it maps (B, n) indices to (B,) values."""
    if n == 0 or n_bootstrap == 0:
        return np.empty(0)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_bootstrap, n))
    return np.asarray(statistic(idx), dtype=np.float64)


def mean_ci(values: np.ndarray, n_bootstrap: int = 1000, seed: int = 0) -> Metric:
    """The mean of ``values`` (one per example) with its bootstrap interval over examples."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return Metric(float("nan"), float("nan"), float("nan"))
    draws = resampled(lambda idx: data[idx].mean(axis=1), data.size, n_bootstrap, seed)
    return _metric(float(data.mean()), draws)


def statistic_ci(
    value: float,
    statistic: Callable[[np.ndarray], np.ndarray],
    n: int,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> Metric:
    """A statistic's point ``value`` with the interval of its index resamples."""
    return _metric(value, resampled(statistic, n, n_bootstrap, seed))
