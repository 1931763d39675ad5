"""Calibration: temperature scaling repairs an overconfident model; conformal sets reach their coverage."""

from __future__ import annotations

import numpy as np
import pytest

from ml.serving.bundle import conformal_set
from ml.training.calibration import (
    calibrate,
    conformal_threshold,
    coverage_check,
    ece,
    fit_temperature,
    nll,
    prediction_sets,
    softmax,
)


def synthetic(n: int, seed: int, classes: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """True logits and labels drawn from their softmax: a perfectly calibrated model's logits."""
    rng = np.random.default_rng(seed)
    logits = 2.0 * rng.standard_normal((n, classes))
    proba = softmax(logits)
    labels = np.array([rng.choice(classes, p=row) for row in proba])
    return logits, labels


def test_temperature_scaling_finds_the_overconfidence_and_lowers_ece() -> None:
    logits, labels = synthetic(3000, seed=0)
    overconfident = 4.0 * logits  # the same ranking, four times too sure
    temperature = fit_temperature(overconfident[:1500], labels[:1500])
    assert temperature == pytest.approx(4.0, rel=0.2)
    test, test_labels = overconfident[1500:], labels[1500:]
    before, after = ece(softmax(test), test_labels), ece(softmax(test, temperature), test_labels)
    assert before > 0.15 and after < 0.05 and after < before / 3
    assert nll(test, test_labels, temperature) < nll(test, test_labels)


def test_a_calibrated_model_keeps_a_temperature_near_one() -> None:
    logits, labels = synthetic(3000, seed=1)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.1)


def test_a_validation_split_without_errors_keeps_a_finite_temperature() -> None:
    logits = 3.0 * np.random.default_rng(7).standard_normal((50, 5))
    labels = logits.argmax(axis=1)  # every validation image right: the NLL alone falls as T -> 0
    assert nll(logits, labels, 0.06) < nll(logits, labels, 0.5)
    assert 0.2 < fit_temperature(logits, labels) < 1.0
    assert fit_temperature(logits, labels, prior_sd=100.0) < 0.07  # without the prior: the search bound


def test_conformal_sets_reach_their_target_coverage_on_fresh_data() -> None:
    (val_logits, val_labels), (test_logits, test_labels) = synthetic(600, seed=2), synthetic(4000, seed=3)
    for target in (0.8, 0.9, 0.95):
        report = calibrate(
            (val_logits, val_labels), (test_logits, test_labels), coverage=target, n_bootstrap=500
        )
        assert abs(report.coverage.value - target) < 0.03, (target, report.coverage)
        assert report.coverage.low < report.coverage.value < report.coverage.high
        assert coverage_check(report).passed
        assert report.mean_set_size.value > 1 and 0 < report.abstain_rate.value < 1


def test_a_threshold_fitted_for_too_little_coverage_fails_the_coverage_gate() -> None:
    (val_logits, val_labels), (test_logits, test_labels) = synthetic(600, seed=4), synthetic(2000, seed=5)
    report = calibrate((val_logits, val_labels), (test_logits, test_labels), coverage=0.6, n_bootstrap=500)
    from dataclasses import replace

    claimed = replace(report, target_coverage=0.95)  # sets made for 60% judged against 95%
    check = coverage_check(claimed)
    assert not check.passed and "significantly below the 0.95 target" in check.detail


def test_the_threshold_is_the_finite_sample_quantile() -> None:
    proba = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]])
    labels = np.array([0, 0, 0, 0])  # scores 0.1, 0.4, 0.7, 0.2
    assert conformal_threshold(proba, labels, 0.5) == pytest.approx(0.4)  # the ceil(5 * 0.5) = 3rd smallest
    assert conformal_threshold(proba, labels, 0.9) == 1.0  # ceil(5 * 0.9) / 4 > 1: every class


def test_the_service_builds_the_same_sets_as_training() -> None:
    proba = softmax(np.random.default_rng(6).standard_normal((500, 5)) * 2)
    for threshold in (0.0, 0.3, 0.7, 0.95):
        sets = prediction_sets(proba, threshold)
        assert sets[np.arange(500), proba.argmax(axis=1)].all()  # the top class always
        for row, members in zip(proba, sets, strict=True):
            served = conformal_set(row.astype(np.float32), threshold)
            assert served[0] == int(row.argmax()) and sorted(served) == np.flatnonzero(members).tolist()
