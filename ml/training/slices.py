"""Fairness across slices of the test split: accuracy, per-class recall and support, with CIs, and the gate.

Slices come from the manifest's metadata columns (``source``, ``camera``, ... as the catalog's
``metadata`` keeps them, one slice per value) and from image properties (brightness and pixel
count tertiles of the evaluated rows). The gate is judged on the intervals, never on the point
estimate: a slice with at least ``min_support`` images fails when its accuracy is significantly
below ``accuracy_min`` (the CI's upper bound is below it), or significantly more than ``gap_max``
below the rest of the test split (the CI of rest - slice lies entirely above ``gap_max``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ml.data.catalog import metadata_frame
from ml.training.checks import Check, ci_text
from ml.training.evaluate import Metric, evaluate
from ml.training.intervals import share_ci, share_difference_ci

TERTILES = {"brightness": ("low", "mid", "high"), "size": ("small", "medium", "large")}


@dataclass(frozen=True)
class Slice:
    name: str  # "source=phone", "brightness=low"
    column: str
    value: str
    description: str
    mask: np.ndarray = field(repr=False, compare=False)


MAX_SLICES_PER_COLUMN = 20  # beyond this, a column of mostly distinct values is an identifier


def metadata_slices(rows: pd.DataFrame, columns: Sequence[str] | None = None) -> list[Slice]:
    """One slice per value of each metadata column (``columns``: those only; None: every one that is
    not an identifier, such as a feedback image's ``request_id``)."""
    metadata = metadata_frame(rows)
    if columns is None:
        chosen = sorted(column for column in metadata.columns if not is_identifier(metadata[column]))
    else:
        chosen = [c for c in columns if c in metadata]
    slices = []
    for column in chosen:
        values = metadata[column]
        for value in sorted({str(v) for v in values.dropna()}):
            mask = (values.astype(str) == value).to_numpy() & values.notna().to_numpy()
            slices.append(Slice(f"{column}={value}", column, value, f"labels.csv {column} = {value}", mask))
    return slices


def is_identifier(values: pd.Series) -> bool:
    """A column whose values are (nearly) all different names rows, it does not group them."""
    present = values.dropna()
    distinct = present.astype(str).nunique()
    return distinct > MAX_SLICES_PER_COLUMN and distinct > len(present) / 2


def tertile_slices(values: np.ndarray, column: str) -> list[Slice]:
    """Three slices of ``values`` cut at its 1/3 and 2/3 quantiles (ties go to the lower slice)."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return []
    cuts = np.quantile(data, [1 / 3, 2 / 3])
    bins = np.digitize(data, cuts, right=True)
    edges = [float(data.min()), float(cuts[0]), float(cuts[1]), float(data.max())]
    return [
        Slice(
            f"{column}={name}",
            column,
            name,
            f"{column} in [{edges[i]:.4g}, {edges[i + 1]:.4g}]",
            bins == i,
        )
        for i, name in enumerate(TERTILES[column])
    ]


def build_slices(rows: pd.DataFrame, columns: Sequence[str] | None = None) -> list[Slice]:
    """Metadata slices, then brightness and size (width x height) tertiles of ``rows``."""
    size = rows["width"].to_numpy(dtype=np.float64) * rows["height"].to_numpy(dtype=np.float64)
    return [
        *metadata_slices(rows, columns),
        *tertile_slices(rows["brightness"].to_numpy(dtype=np.float64), "brightness"),
        *tertile_slices(size, "size"),
    ]


@dataclass(frozen=True)
class SliceResult:
    name: str
    column: str
    value: str
    description: str
    support: int
    accuracy: Metric
    recall: dict[str, Metric]  # the classes present in the slice
    rest_accuracy: Metric
    gap: Metric  # rest - slice: positive when the slice does worse
    judged: bool  # support >= min_support
    passed: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "column": self.column,
            "value": self.value,
            "description": self.description,
            "support": self.support,
            "accuracy": self.accuracy.to_dict(),
            "recall": {name: metric.to_dict() for name, metric in self.recall.items()},
            "rest_accuracy": self.rest_accuracy.to_dict(),
            "gap": self.gap.to_dict(),
            "judged": self.judged,
            "passed": self.passed,
            "detail": self.detail,
        }


def judge(
    name: str, support: int, accuracy: Metric, rest: Metric, gap: Metric, accuracy_min: float, gap_max: float
) -> tuple[bool, str]:
    """The slice's verdict on its CIs, and the sentence naming it."""
    head = f"slice {name}: accuracy {ci_text(accuracy)} (n={support})"
    problems = []
    if accuracy.high < accuracy_min:
        problems.append(
            f"significantly below {accuracy_min:.2f} "
            f"(CI upper bound {accuracy.high:.3f} < {accuracy_min:.2f})"
        )
    if not np.isnan(gap.low) and gap.low > gap_max:
        problems.append(
            f"{ci_text(gap)} below the rest ({rest.value:.3f}), significantly more than the {gap_max:.2f} "
            "allowed"
        )
    if problems:
        return False, f"{head} is " + " and ".join(problems)
    rest_text = "no rest" if np.isnan(rest.value) else f"rest {rest.value:.3f}"
    return (
        True,
        f"{head}, {rest_text}: not significantly below {accuracy_min:.2f} or {gap_max:.2f} below the rest",
    )


def _recall(
    labels: np.ndarray, proba: np.ndarray, classes: Sequence[str], n_bootstrap: int, seed: int
) -> dict[str, Metric]:
    if labels.size == 0:
        return {}
    evaluation = evaluate(labels, proba, classes, n_bootstrap=n_bootstrap, seed=seed)
    return {name: evaluation.recall[name] for name in classes if evaluation.support[name] > 0}


def evaluate_slice(
    piece: Slice,
    labels: np.ndarray,
    proba: np.ndarray,
    classes: Sequence[str],
    thresholds: tuple[int, float, float],
    n_bootstrap: int,
    seed: int,
) -> SliceResult:
    """One slice's figures and verdict; ``thresholds`` = (min_support, accuracy_min, gap_max)."""
    min_support, accuracy_min, gap_max = thresholds
    correct = proba.argmax(axis=1) == labels
    inside, outside = correct[piece.mask], correct[~piece.mask]
    accuracy = share_ci(inside, n_bootstrap, seed)
    rest = share_ci(outside, n_bootstrap, seed)
    gap = share_difference_ci(outside, inside, n_bootstrap, seed)
    judged = int(inside.size) >= min_support
    passed, detail = judge(piece.name, int(inside.size), accuracy, rest, gap, accuracy_min, gap_max)
    if not judged:
        passed, detail = True, f"slice {piece.name}: n={inside.size} < {min_support}, reported, not judged"
    recall = _recall(labels[piece.mask], proba[piece.mask], classes, n_bootstrap, seed)
    return SliceResult(
        piece.name,
        piece.column,
        piece.value,
        piece.description,
        int(inside.size),
        accuracy,
        recall,
        rest,
        gap,
        judged,
        passed,
        detail,
    )


def evaluate_slices(
    slices: Sequence[Slice],
    labels: np.ndarray,
    proba: np.ndarray,
    classes: Sequence[str],
    thresholds: tuple[int, float, float],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> list[SliceResult]:
    """Every slice's result on the same predictions."""
    return [evaluate_slice(s, labels, proba, classes, thresholds, n_bootstrap, seed) for s in slices]


def slice_checks(results: Sequence[SliceResult], accuracy_min: float) -> list[Check]:
    """One gate check per judged slice; its value is the accuracy CI's upper bound."""
    return [
        Check(f"slice[{result.name}]", result.accuracy.high, accuracy_min, result.passed, result.detail)
        for result in results
        if result.judged
    ]


def worst_slice(results: Sequence[SliceResult]) -> SliceResult | None:
    """The judged slice with the lowest accuracy (any slice when none is judged)."""
    pool = [result for result in results if result.judged] or list(results)
    return min(pool, key=lambda result: result.accuracy.value) if pool else None
