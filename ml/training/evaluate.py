"""Evaluate a classifier on held-out data with bootstrap CIs, compare it with the champion, gate it.

* ``evaluate`` turns labels and predicted probabilities into per-class precision/recall/F1, accuracy,
  macro F1 and one-vs-rest macro ROC AUC, each with a 95% percentile-bootstrap confidence interval
  (examples resampled with replacement, every statistic recomputed on the same resamples; ROC AUC
  uses only the first ``ROC_AUC_BOOTSTRAP_MAX`` of them because it costs O(n) per class per resample).
* ``mcnemar`` and ``non_inferiority`` compare two models' per-example correctness on the same
  examples (paired tests).
* ``gate`` is the promotion gate. The acceptance bar (``AcceptanceConfig``) is applied to the
  **point estimates**, not to the CI bounds: the CIs are reported so a reader can see how much a
  number could move on another test set of this size, but requiring a CI bound above the bar would
  make the bar depend on the test-set size. Against a champion the gate uses the paired tests, which
  do account for sampling noise: the challenger must be non-inferior (one-sided, margin on accuracy)
  and must not be significantly worse by McNemar's test.

Conventions: a per-class metric whose denominator is zero (a class never predicted, a class with no
examples) is 0.0, as ``sklearn``'s ``zero_division=0``; macro F1 averages over every configured class.
Macro ROC AUC averages over the classes present in ``y_true``.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from ml.config import AcceptanceConfig

CI_LEVEL = 0.95
_PERCENTILES = (100 * (1 - CI_LEVEL) / 2, 100 * (1 + CI_LEVEL) / 2)
_CHUNK_ELEMENTS = 4_000_000  # resampled indices held in memory at once
ROC_AUC_BOOTSTRAP_MAX = 200  # AUC costs O(n) per class per resample; its CI uses the first 200
MCNEMAR_EXACT_BELOW = 25


@dataclass(frozen=True)
class Metric:
    """A point estimate with its 95% bootstrap confidence interval."""

    value: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return {"value": _r(self.value), "low": _r(self.low), "high": _r(self.high)}


@dataclass
class Evaluation:
    """Metrics of one model on one labelled set; ``correct`` is kept for paired tests."""

    classes: list[str]
    n: int
    accuracy: Metric
    precision: dict[str, Metric]
    recall: dict[str, Metric]
    f1: dict[str, Metric]
    f1_macro: Metric
    roc_auc_macro: Metric | None
    confusion: list[list[int]]  # rows = true class, columns = predicted class
    support: dict[str, int]
    correct: np.ndarray = field(repr=False)
    loss: float | None = None  # mean cross-entropy of the probabilities (None: not computed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (floats rounded to 4 places, ``correct`` left out)."""
        return {
            "classes": list(self.classes),
            "n": int(self.n),
            "ci_level": CI_LEVEL,
            "accuracy": self.accuracy.to_dict(),
            "precision": {name: m.to_dict() for name, m in self.precision.items()},
            "recall": {name: m.to_dict() for name, m in self.recall.items()},
            "f1": {name: m.to_dict() for name, m in self.f1.items()},
            "f1_macro": self.f1_macro.to_dict(),
            "roc_auc_macro": None if self.roc_auc_macro is None else self.roc_auc_macro.to_dict(),
            "confusion": [[int(v) for v in row] for row in self.confusion],
            "support": {name: int(v) for name, v in self.support.items()},
            "loss": None if self.loss is None else _r(self.loss),
        }

    def flat_metrics(self) -> dict[str, float]:
        """Flat ``name -> float`` for MLflow; class names sanitised to ``[A-Za-z0-9_]``."""
        flat = {
            "accuracy": self.accuracy.value,
            "accuracy_ci_low": self.accuracy.low,
            "accuracy_ci_high": self.accuracy.high,
            "f1_macro": self.f1_macro.value,
            # the spec's names (experiment_tracking.metrics): macro averages over the classes
            "precision": float(np.mean([m.value for m in self.precision.values()])),
            "recall": float(np.mean([m.value for m in self.recall.values()])),
            "f1_score": self.f1_macro.value,
        }
        if self.loss is not None:
            flat["loss"] = self.loss
        if self.roc_auc_macro is not None:
            flat["roc_auc_macro"] = self.roc_auc_macro.value
        for name, key in zip(self.classes, metric_keys(self.classes), strict=True):
            flat[f"precision_{key}"] = self.precision[name].value
            flat[f"recall_{key}"] = self.recall[name].value
            flat[f"f1_{key}"] = self.f1[name].value
        return {k: float(v) for k, v in flat.items()}


class ClassesDiffer(ValueError):
    """Two models answer over different sets of classes: their answers cannot be compared image by image."""


def in_class_order(proba: np.ndarray, theirs: Sequence[str], ours: Sequence[str]) -> np.ndarray:
    """``proba`` (columns in ``theirs`` order) with its columns in ``ours`` order; ``ClassesDiffer`` when
    the two name other classes (a model trained before ``data.classes`` changed)."""
    if list(theirs) == list(ours):
        return proba
    if sorted(theirs) != sorted(ours) or len(set(ours)) != len(ours):
        raise ClassesDiffer(f"the model answers over {list(theirs)}, this dataset's classes are {list(ours)}")
    return proba[:, [list(theirs).index(name) for name in ours]]


LOSS_FLOOR = 1e-12  # a probability of 0 for the true class costs -log(1e-12), not infinity


def _r(value: float) -> float:
    return round(float(value), 4)


HEADLINE_SUFFIXES = ("macro", "score")  # f1_macro and f1_score are the headline figures, not a class's


def metric_keys(classes: Sequence[str]) -> list[str]:
    """Class names as metric-name suffixes: ``[A-Za-z0-9_]`` only, made unique with ``_<index>``, and
    never a headline's suffix (a class named ``macro`` would otherwise overwrite ``f1_macro``)."""
    keys: list[str] = []
    taken = set(HEADLINE_SUFFIXES)
    for index, name in enumerate(classes):
        key = re.sub(r"[^A-Za-z0-9_]", "_", name) or "class"
        while key in taken:
            key = f"{key}_{index}"
        keys.append(key)
        taken.add(key)
    return keys


# --------------------------------------------------------------------------------------------------
# statistics on (batches of) confusion matrices and example weights


def _confusions(cells: np.ndarray, idx: np.ndarray, k: int) -> np.ndarray:
    """Confusion matrices ``(B, K, K)`` of the resamples ``idx`` (B, n); ``cells`` = true * K + pred."""
    b = idx.shape[0]
    keys = cells[idx] + (np.arange(b, dtype=np.int64) * (k * k))[:, None]
    return np.bincount(keys.ravel(), minlength=b * k * k).reshape(b, k, k)


def _rates(conf: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy ``(B,)``, per-class precision/recall/F1 ``(B, K)`` and macro F1 from ``(B, K, K)``."""
    conf = conf.astype(np.float64)
    tp = np.diagonal(conf, axis1=1, axis2=2)
    predicted = conf.sum(axis=1)
    actual = conf.sum(axis=2)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(tp), where=both > 0)
    accuracy = tp.sum(axis=1) / conf.sum(axis=(1, 2))
    return {
        "accuracy": accuracy,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "f1_macro": f1.mean(axis=1),
    }


def _weights(idx: np.ndarray, n: int) -> np.ndarray:
    """How often each example occurs in each resample: ``(B, n)`` counts as float32 (exact below 2**24)."""
    b = idx.shape[0]
    keys = idx + (np.arange(b, dtype=np.int64) * n)[:, None]
    return np.bincount(keys.ravel(), minlength=b * n).reshape(b, n).astype(np.float32)


@dataclass(frozen=True)
class _AucClass:
    """One class's scores sorted once: reused for the point estimate and every resample."""

    order: np.ndarray
    positive: np.ndarray  # in sorted order
    tie_starts: np.ndarray | None  # group starts of equal scores; None when no ties


def _auc_classes(y: np.ndarray, proba: np.ndarray, present: np.ndarray) -> list[_AucClass]:
    prepared = []
    for k in present:
        order = np.argsort(proba[:, k], kind="stable")
        scores = proba[order, k]
        starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])
        prepared.append(_AucClass(order, y[order] == k, None if starts.size == scores.size else starts))
    return prepared


def _weighted_auc(w: np.ndarray, prep: _AucClass) -> np.ndarray:
    """One-vs-rest AUC per resample (Mann-Whitney with ties counted 1/2); NaN when undefined."""
    ws = w[:, prep.order]
    pos = ws * prep.positive
    neg = ws - pos
    if prep.tie_starts is not None:
        pos = np.add.reduceat(pos, prep.tie_starts, axis=1)
        neg = np.add.reduceat(neg, prep.tie_starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    numerator = np.einsum("bi,bi->b", pos, neg_below + 0.5 * neg, dtype=np.float64)
    denominator = pos.sum(axis=1, dtype=np.float64) * neg.sum(axis=1, dtype=np.float64)
    return np.divide(numerator, denominator, out=np.full_like(numerator, np.nan), where=denominator > 0)


def _macro_auc(w: np.ndarray, prepared: list[_AucClass]) -> np.ndarray:
    """Mean AUC over the classes defined in each resample; NaN where none is."""
    aucs = np.stack([_weighted_auc(w, prep) for prep in prepared], axis=1)
    defined = ~np.isnan(aucs)
    count = defined.sum(axis=1)
    total = np.where(defined, aucs, 0.0).sum(axis=1)
    return np.divide(total, count, out=np.full(total.shape, np.nan), where=count > 0)


def _interval(samples: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval along axis 0 ignoring NaN (undefined resamples); the point where none is left."""
    if samples.shape[0] == 0:
        return value, value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices
        low, high = np.nanpercentile(samples, _PERCENTILES, axis=0)
    return np.where(np.isnan(low), value, low), np.where(np.isnan(high), value, high)


# --------------------------------------------------------------------------------------------------
# evaluate


def _validate(y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(proba, dtype=np.float64)
    k = len(classes)
    if len(set(classes)) != k or k == 0:
        raise ValueError(f"classes must be unique and non-empty, got {list(classes)}")
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"y_true must be a non-empty 1-D array, got shape {y.shape}")
    if p.shape != (y.size, k):
        raise ValueError(f"proba must have shape (n, K) = ({y.size}, {k}), got {p.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.number) and np.all(np.mod(y, 1) == 0)):
            raise ValueError("y_true must hold integer class indices")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"y_true holds indices outside [0, {k}): {sorted(set(y[(y < 0) | (y >= k)]))[:5]}")
    if not np.all(np.isfinite(p)):
        raise ValueError("proba holds NaN or infinite values")
    if not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("proba rows must sum to 1 (pass probabilities, not logits)")
    return y, p


def _bootstrap(
    cells: np.ndarray, k: int, prepared: list[_AucClass], n_bootstrap: int, seed: int
) -> tuple[dict[str, list[np.ndarray]], list[np.ndarray]]:
    """Every rate on ``n_bootstrap`` resamples (in chunks that fit memory), and macro AUC on the first few."""
    n = cells.size
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // n)
    boot: dict[str, list[np.ndarray]] = {
        name: [] for name in ("accuracy", "precision", "recall", "f1", "f1_macro")
    }
    auc_boot: list[np.ndarray] = []
    for start in range(0, max(0, n_bootstrap), chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_bootstrap - start), n))
        for name, values in _rates(_confusions(cells, idx, k)).items():
            boot[name].append(values)
        auc_rows = min(idx.shape[0], ROC_AUC_BOOTSTRAP_MAX - start)
        if prepared and auc_rows > 0:
            auc_boot.append(_macro_auc(_weights(idx[:auc_rows], n), prepared))
    return boot, auc_boot


def evaluate(
    y_true: np.ndarray,
    proba: np.ndarray,
    classes: Sequence[str],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> Evaluation:
    """Metrics with 95% percentile-bootstrap CIs; predictions are ``argmax(proba)``.

    Accuracy, precision, recall and F1 use ``n_bootstrap`` resamples (``numpy.random.default_rng(seed)``);
    ROC AUC, which costs O(n) per class per resample, uses the first ``ROC_AUC_BOOTSTRAP_MAX`` of them.
    ``n_bootstrap=0`` gives zero-width intervals.
    """
    y, p = _validate(y_true, proba, classes)
    n, k = p.shape
    pred = p.argmax(axis=1)
    cells = y * k + pred
    point = _rates(np.bincount(cells, minlength=k * k).reshape(1, k, k))

    present = np.unique(y)
    prepared = _auc_classes(y, p, present) if present.size >= 2 else []
    auc_point = _macro_auc(np.ones((1, n)), prepared) if prepared else None

    boot, auc_boot = _bootstrap(cells, k, prepared, n_bootstrap, seed)

    def metrics(name: str) -> list[Metric]:
        value = point[name][0]
        samples = np.concatenate(boot[name]) if boot[name] else np.empty((0, *np.shape(value)))
        low, high = _interval(samples, value)
        return [Metric(float(v), float(lo), float(hi)) for v, lo, hi in np.broadcast(value, low, high)]

    roc_auc = None
    if auc_point is not None:
        samples = np.concatenate(auc_boot) if auc_boot else np.empty(0)
        low, high = _interval(samples, auc_point[0])
        roc_auc = Metric(float(auc_point[0]), float(low), float(high))

    names = list(classes)
    confusion = np.bincount(cells, minlength=k * k).reshape(k, k)
    return Evaluation(
        classes=names,
        n=int(n),
        accuracy=metrics("accuracy")[0],
        precision=dict(zip(names, metrics("precision"), strict=True)),
        recall=dict(zip(names, metrics("recall"), strict=True)),
        f1=dict(zip(names, metrics("f1"), strict=True)),
        f1_macro=metrics("f1_macro")[0],
        roc_auc_macro=roc_auc,
        confusion=confusion.tolist(),
        support={name: int(v) for name, v in zip(names, confusion.sum(axis=1), strict=True)},
        correct=pred == y,
        loss=float(-np.log(np.clip(p[np.arange(n), y], LOSS_FLOOR, 1.0)).mean()) if n else None,
    )


# --------------------------------------------------------------------------------------------------
# reports


def _ci(m: Metric) -> str:
    return f"{m.value:.3f} [{m.low:.3f}, {m.high:.3f}]"


def classification_report_text(ev: Evaluation) -> str:
    """A plain-text table: per-class precision/recall/F1 with 95% CIs and support, then the totals."""
    width = max(len("roc auc (ovr)"), *(len(name) for name in ev.classes))
    cell = 22
    header = f"{'class':<{width}}  {'precision':>{cell}}  {'recall':>{cell}}  {'f1':>{cell}}  {'support':>8}"
    lines = [f"n = {ev.n}; values as point [95% bootstrap CI]", header, "-" * len(header)]
    for name in ev.classes:
        lines.append(
            f"{name:<{width}}  {_ci(ev.precision[name]):>{cell}}  {_ci(ev.recall[name]):>{cell}}  "
            f"{_ci(ev.f1[name]):>{cell}}  {ev.support[name]:>8}"
        )
    lines.append("-" * len(header))
    lines.append(f"{'accuracy':<{width}}  {_ci(ev.accuracy):>{cell}}")
    lines.append(f"{'f1 (macro)':<{width}}  {_ci(ev.f1_macro):>{cell}}")
    auc = "n/a (fewer than 2 classes present)" if ev.roc_auc_macro is None else _ci(ev.roc_auc_macro)
    lines.append(f"{'roc auc (ovr)':<{width}}  {auc:>{cell}}")
    return "\n".join(lines) + "\n"


def confusion_matrix_png(ev: Evaluation) -> bytes:
    """PNG of the confusion matrix: colour = share of the true class, text = count (Agg, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(ev.confusion, dtype=np.int64)
    k = counts.shape[0]
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    side = min(max(4.0, 0.6 * k + 2.5), 24.0)
    fig = Figure(figsize=(side + 1.0, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    font = max(5, 11 - k // 4)
    for i in range(k):
        for j in range(k):
            colour = "white" if shares[i, j] > 0.5 else "black"
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", color=colour, fontsize=font)
    ax.set_xticks(range(k), labels=ev.classes, rotation=45, ha="right", fontsize=font)
    ax.set_yticks(range(k), labels=ev.classes, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix (n={ev.n}, accuracy {ev.accuracy.value:.3f})")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# paired comparisons with the champion


def _paired(challenger_correct: np.ndarray, champion_correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(challenger_correct).astype(bool)
    b = np.asarray(champion_correct).astype(bool)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise ValueError(
            f"correctness arrays must be non-empty, 1-D and aligned, got shapes {a.shape} and {b.shape}"
        )
    return a, b


@dataclass(frozen=True)
class McNemar:
    """McNemar's test: ``b`` = challenger right and champion wrong, ``c`` = the reverse."""

    b: int
    c: int
    statistic: float
    p_value: float

    @property
    def exact(self) -> bool:
        return self.b + self.c < MCNEMAR_EXACT_BELOW


def mcnemar(challenger_correct: np.ndarray, champion_correct: np.ndarray) -> McNemar:
    """Two-sided McNemar test: exact binomial when b + c < 25, else chi-square with continuity correction.

    The exact test reports ``statistic = min(b, c)``; the chi-square one
    ``max(|b - c| - 1, 0)^2 / (b + c)`` (never below 0, so b == c gives p = 1).
    """
    challenger, champion = _paired(challenger_correct, champion_correct)
    b = int(np.sum(challenger & ~champion))
    c = int(np.sum(~challenger & champion))
    if b + c == 0:
        return McNemar(b, c, 0.0, 1.0)
    if b + c < MCNEMAR_EXACT_BELOW:
        tail = sum(math.comb(b + c, i) for i in range(min(b, c) + 1)) / 2 ** (b + c)
        p_value = min(1.0, 2.0 * tail)
        return McNemar(b, c, float(min(b, c)), p_value)
    statistic = max(abs(b - c) - 1, 0) ** 2 / (b + c)
    return McNemar(b, c, float(statistic), math.erfc(math.sqrt(statistic / 2)))  # chi2(1) survival


@dataclass(frozen=True)
class NonInferiority:
    """One-sided paired test of H0: acc(challenger) - acc(champion) <= -margin."""

    margin: float
    alpha: float
    difference: float
    lower_bound: float
    p_value: float
    non_inferior: bool


def non_inferiority(
    challenger_correct: np.ndarray,
    champion_correct: np.ndarray,
    margin: float = 0.02,
    alpha: float = 0.05,
) -> NonInferiority:
    """Normal approximation on the paired differences ``d_i = challenger_i - champion_i`` in {-1, 0, 1}.

    ``lower_bound`` is the one-sided (1 - alpha) lower confidence bound of the accuracy difference;
    ``non_inferior`` iff ``p < alpha`` (equivalently ``lower_bound > -margin``). When the differences
    have no spread (se = 0) the decision is the sign of ``difference + margin``.
    """
    challenger, champion = _paired(challenger_correct, champion_correct)
    return paired_non_inferiority(challenger.astype(np.float64) - champion.astype(np.float64), margin, alpha)


def paired_non_inferiority(
    differences: np.ndarray, margin: float = 0.02, alpha: float = 0.05
) -> NonInferiority:
    """``non_inferiority`` on any paired per-item differences, e.g. each image's accuracy over a set of
    corruptions (the image, not the image x corruption pair, is the independent unit)."""
    if margin < 0 or not 0 < alpha < 1:
        raise ValueError(f"need margin >= 0 and 0 < alpha < 1, got margin={margin}, alpha={alpha}")
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"paired differences must be non-empty and 1-D, got shape {d.shape}")
    diff = float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else 0.0
    if se == 0.0:
        p_value = 0.0 if diff + margin > 0 else 1.0
        lower = diff
    else:
        p_value = 0.5 * math.erfc((diff + margin) / se / math.sqrt(2))  # normal upper tail
        lower = diff - NormalDist().inv_cdf(1 - alpha) * se
    return NonInferiority(margin, alpha, diff, lower, p_value, p_value < alpha)


# --------------------------------------------------------------------------------------------------
# the gate


@dataclass
class GateDecision:
    """The gate's verdict: every check with its numbers, and one sentence per failure (or why it passed)."""

    passed: bool
    reasons: list[str]
    checks: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "reasons": list(self.reasons),
            "checks": [dict(c) for c in self.checks],
        }

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [check for check in self.checks if not check["passed"]]

    def add_check(
        self, name: str, value: float | None, threshold: float | None, passed: bool, detail: str
    ) -> None:
        """Record a further check (e.g. ONNX parity); a failure replaces the pass sentence in ``reasons``."""
        self.checks.append(_check(name, value, threshold, passed, detail))
        if not passed:
            self.reasons = [*self.reasons, detail] if not self.passed else [detail]
            self.passed = False


def _fmt(value: float, threshold: float, digits: int = 2) -> str:
    """``value`` with ``digits`` decimals, or more where that would print it equal to ``threshold``."""
    for places in range(digits, 7):
        if f"{value:.{places}f}" != f"{threshold:.{places}f}":
            return f"{value:.{places}f}"
    return f"{value:.6f}"


def _check(
    name: str, value: float | None, threshold: float | None, passed: bool, detail: str
) -> dict[str, Any]:
    """One gate check; numbers kept to 4 significant digits (p-values can be tiny)."""
    return {
        "name": name,
        "value": None if value is None else float(f"{value:.4g}"),
        "threshold": None if threshold is None else float(f"{threshold:.4g}"),
        "passed": bool(passed),
        "detail": detail,
    }


def _bar_check(name: str, label: str, value: float, minimum: float, extra: str = "") -> tuple[dict, str]:
    passed = value >= minimum
    op = ">=" if passed else "<"
    sentence = f"{label} {_fmt(value, minimum)} {op} {minimum:.2f}{extra}"
    return _check(name, value, minimum, passed, sentence), sentence


def _acceptance_checks(ev: Evaluation, acceptance: AcceptanceConfig) -> list[tuple[dict, str]]:
    checks = [_bar_check("accuracy", "accuracy", ev.accuracy.value, acceptance.accuracy_min)]
    predicted = np.asarray(ev.confusion).sum(axis=0)
    for metric, minimum in (("precision", acceptance.precision_min), ("recall", acceptance.recall_min)):
        per_class: dict[str, Metric] = getattr(ev, metric)
        for index, name in enumerate(ev.classes):
            extra = ""
            if metric == "recall" and ev.support[name] == 0:
                extra = " (no test examples of this class)"
            elif metric == "precision" and predicted[index] == 0:
                extra = " (never predicted)"
            checks.append(
                _bar_check(
                    f"{metric}[{name}]", f"{metric} for {name!r}", per_class[name].value, minimum, extra
                )
            )
    checks.append(_bar_check("f1_macro", "macro F1", ev.f1_macro.value, acceptance.f1_macro_min))
    return checks


def _champion_checks(
    ev: Evaluation, champion_correct: np.ndarray, margin: float, alpha: float
) -> list[tuple[dict, str]]:
    champion = np.asarray(champion_correct)
    if champion.shape != ev.correct.shape:
        raise ValueError(
            f"champion_correct must cover the same {ev.n} examples in the same order, "
            f"got shape {champion.shape}"
        )
    ni = non_inferiority(ev.correct, champion, margin=margin, alpha=alpha)
    mc = mcnemar(ev.correct, champion)
    op = ">" if ni.non_inferior else "<="
    ni_evidence = (
        f"accuracy diff {ni.difference:+.3f} ({100 * (1 - alpha):g}% lower bound "
        f"{_fmt(ni.lower_bound, -margin, 3)} {op} -{margin:g} margin)"
    )
    mc_evidence = f"McNemar p={mc.p_value:.2g} (challenger-only correct {mc.b}, champion-only correct {mc.c})"
    ni_sentence = (
        f"challenger is {'' if ni.non_inferior else 'not shown '}non-inferior to the champion: {ni_evidence}"
    )
    worse = mc.p_value < alpha and mc.c > mc.b
    mc_sentence = (
        f"challenger is {'' if worse else 'not '}significantly worse than the champion: "
        f"{ni_evidence}, {mc_evidence}"
    )
    return [
        (_check("non_inferiority", ni.lower_bound, -margin, ni.non_inferior, ni_sentence), ni_sentence),
        (_check("mcnemar", mc.p_value, alpha, not worse, mc_sentence), mc_sentence),
    ]


def gate(
    challenger: Evaluation,
    acceptance: AcceptanceConfig,
    champion_correct: np.ndarray | None = None,
    *,
    margin: float | None = None,
    alpha: float | None = None,
) -> GateDecision:
    """Gate the challenger: acceptance bar on point estimates, then paired tests against the champion.

    ``champion_correct`` is the champion's per-example correctness on the same examples, same order.
    ``margin`` and ``alpha`` default to ``acceptance.non_inferiority_margin`` and ``acceptance.alpha``.
    """
    margin = acceptance.non_inferiority_margin if margin is None else margin
    alpha = acceptance.alpha if alpha is None else alpha
    results = _acceptance_checks(challenger, acceptance)
    if champion_correct is None:
        detail = "no champion yet: only the acceptance bar applies"
        results.append((_check("no_champion", None, None, True, detail), detail))
    else:
        results.extend(_champion_checks(challenger, champion_correct, margin, alpha))

    checks = [check for check, _ in results]
    failures = [sentence for check, sentence in results if not check["passed"]]
    if failures:
        return GateDecision(False, failures, checks)
    summary = (
        f"passed: accuracy {challenger.accuracy.value:.3f} >= "
        f"{acceptance.accuracy_min:.2f}, macro F1 {challenger.f1_macro.value:.3f} >= "
        f"{acceptance.f1_macro_min:.2f}, every class has precision >= {acceptance.precision_min:.2f} "
        f"and recall >= {acceptance.recall_min:.2f}; "
        + (
            "no champion yet, so only the acceptance bar applies"
            if champion_correct is None
            else "non-inferior to and not significantly worse than the champion: "
            + results[-1][1].split(": ", 1)[1]
        )
    )
    return GateDecision(True, [summary], checks)
