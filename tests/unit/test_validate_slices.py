"""Fairness slices: metadata and property slices, CIs matching a plain bootstrap, a gate judged on the CIs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ml.training.evaluate import CI_LEVEL
from ml.training.intervals import share_ci, share_difference_ci
from ml.training.slices import (
    Slice,
    build_slices,
    evaluate_slices,
    metadata_slices,
    slice_checks,
    tertile_slices,
    worst_slice,
)

CLASSES = ["a", "b"]
TAILS = (100 * (1 - CI_LEVEL) / 2, 100 * (1 + CI_LEVEL) / 2)


def plain_bootstrap(values: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """Resample the examples with replacement, recompute the mean: the textbook percentile bootstrap."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, TAILS)
    return float(low), float(high)


@pytest.mark.parametrize(("n", "share"), [(25, 0.6), (60, 0.9), (200, 0.5)])
def test_share_intervals_match_a_plain_bootstrap(n: int, share: float) -> None:
    hits = np.arange(n) < round(share * n)
    found = share_ci(hits, n_bootstrap=20000, seed=1)
    low, high = plain_bootstrap(hits.astype(float), 20000, seed=2)
    assert found.value == pytest.approx(hits.mean())
    assert found.low == pytest.approx(low, abs=0.02) and found.high == pytest.approx(high, abs=0.02)


def test_gap_interval_matches_a_plain_bootstrap_of_two_independent_groups() -> None:
    rest, piece = np.arange(300) < 285, np.arange(80) < 56  # 0.95 vs 0.70
    found = share_difference_ci(rest, piece, n_bootstrap=20000, seed=0)
    rng = np.random.default_rng(5)
    draws = [
        rest[rng.integers(0, 300, 300)].mean() - piece[rng.integers(0, 80, 80)].mean() for _ in range(20000)
    ]
    low, high = np.percentile(draws, TAILS)
    assert found.value == pytest.approx(0.25)
    assert found.low == pytest.approx(low, abs=0.02) and found.high == pytest.approx(high, abs=0.02)


def predictions(groups: list[tuple[int, float]]) -> tuple[list[Slice], np.ndarray, np.ndarray]:
    """Slices of the given (size, accuracy), every example of class 0, right exactly that often."""
    labels = np.zeros(sum(size for size, _ in groups), dtype=np.int64)
    proba = np.zeros((labels.size, 2))
    slices, start = [], 0
    for index, (size, accuracy) in enumerate(groups):
        mask = np.zeros(labels.size, dtype=bool)
        mask[start : start + size] = True
        right = np.arange(size) < round(accuracy * size)
        proba[start : start + size] = np.where(right[:, None], [0.8, 0.2], [0.2, 0.8])
        slices.append(Slice(f"source=s{index}", "source", f"s{index}", "", mask))
        start += size
    return slices, labels, proba


def test_the_gate_reads_the_interval_not_the_point_estimate() -> None:
    # s0: 0.60 on 25 images, below 0.70 but not significantly; s1: 0.40 on 60, significantly below
    slices, labels, proba = predictions([(25, 0.6), (60, 0.4), (300, 0.95)])
    results = evaluate_slices(slices, labels, proba, CLASSES, (20, 0.70, 1.0), n_bootstrap=2000, seed=0)
    by_name = {r.name: r for r in results}
    assert by_name["source=s0"].accuracy.value < 0.70 < by_name["source=s0"].accuracy.high
    assert by_name["source=s0"].passed
    assert by_name["source=s1"].accuracy.high < 0.70 and not by_name["source=s1"].passed
    failed = [check for check in slice_checks(results, 0.70) if not check.passed]
    assert [check.name for check in failed] == ["slice[source=s1]"]
    assert "slice source=s1" in failed[0].detail and "significantly below 0.70" in failed[0].detail
    assert worst_slice(results).name == "source=s1"


def test_a_slice_significantly_further_than_the_gap_below_the_rest_fails() -> None:
    # s0 is 0.25 below the rest (its CI well above 0.10); s1 0.125 below, but its CI reaches below 0.10
    slices, labels, proba = predictions([(100, 0.65), (40, 0.75), (300, 0.95)])
    results = evaluate_slices(slices, labels, proba, CLASSES, (20, 0.0, 0.10), n_bootstrap=2000, seed=0)
    by_name = {r.name: r for r in results}
    assert by_name["source=s0"].gap.low > 0.10 and not by_name["source=s0"].passed
    assert "below the rest" in by_name["source=s0"].detail
    assert (
        by_name["source=s1"].gap.value > 0.10 > by_name["source=s1"].gap.low and by_name["source=s1"].passed
    )


def test_small_slices_are_reported_but_not_judged() -> None:
    slices, labels, proba = predictions([(8, 0.0), (200, 0.95)])
    results = evaluate_slices(slices, labels, proba, CLASSES, (20, 0.7, 0.1), n_bootstrap=500, seed=0)
    small = results[0]
    assert small.support == 8 and not small.judged and small.passed and "not judged" in small.detail
    assert [check.name for check in slice_checks(results, 0.7)] == ["slice[source=s1]"]


def test_slices_come_from_metadata_columns_and_property_tertiles() -> None:
    rows = pd.DataFrame(
        {
            "metadata": [
                json.dumps({"source": s, "camera": c}) for s, c in zip("xxyyyz", "pqpqpq", strict=True)
            ]
            + [None],
            "brightness": [10.0, 20, 30, 40, 50, 60, 70],
            "width": [10, 20, 30, 40, 50, 60, 70],
            "height": [10] * 7,
        }
    )
    names = [piece.name for piece in build_slices(rows)]
    assert names[:5] == ["camera=p", "camera=q", "source=x", "source=y", "source=z"]
    assert names[5:] == [f"brightness={t}" for t in ("low", "mid", "high")] + [
        f"size={t}" for t in ("small", "medium", "large")
    ]
    source = {piece.value: piece.mask.sum() for piece in metadata_slices(rows, ["source"])}
    assert source == {"x": 2, "y": 3, "z": 1}  # the row without metadata is in none
    tertiles = tertile_slices(rows["brightness"].to_numpy(), "brightness")
    assert sum(piece.mask for piece in tertiles).tolist() == [1] * 7  # a partition
    assert [int(piece.mask.sum()) for piece in tertiles] == [3, 2, 2]


def test_an_identifier_column_is_not_sliced_unless_asked_for() -> None:
    metadata = [{"source": "feedback", "request_id": f"req-{i}"} for i in range(30)]
    rows = pd.DataFrame({"metadata": [json.dumps(m) for m in metadata]})
    assert [piece.name for piece in metadata_slices(rows)] == ["source=feedback"]
    assert len(metadata_slices(rows, ["request_id"])) == 30  # named: sliced as asked
