from __future__ import annotations

import io
import json
import math
import re
import time
import warnings

import numpy as np
import pytest
from PIL import Image
from scipy import stats
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

from ml.config import load_settings
from ml.training.evaluate import (
    Evaluation,
    classification_report_text,
    confusion_matrix_png,
    evaluate,
    gate,
    mcnemar,
    metric_keys,
    non_inferiority,
)

ACCEPTANCE = load_settings(environ={}).acceptance.model_copy(
    update={
        "accuracy_min": 0.85,
        "precision_min": 0.80,
        "recall_min": 0.80,
        "f1_macro_min": 0.80,
        "non_inferiority_margin": 0.02,
        "alpha": 0.05,
    }
)
CLASSES = ["shoes", "bags", "toys", "books", "lamps"]


def proba_for(pred: np.ndarray, k: int, confidence: float = 0.8) -> np.ndarray:
    """Probabilities whose argmax is ``pred``."""
    proba = np.full((pred.size, k), (1 - confidence) / (k - 1))
    proba[np.arange(pred.size), pred] = confidence
    return proba


def with_errors(y: np.ndarray, k: int, error_rate: float, seed: int = 0) -> np.ndarray:
    """Predictions equal to ``y`` except an exact share of random examples moved to the next class."""
    rng = np.random.default_rng(seed)
    pred = y.copy()
    wrong = rng.choice(y.size, size=round(error_rate * y.size), replace=False)
    pred[wrong] = (y[wrong] + 1) % k
    return pred


def exactly_correct(n: int, n_correct: int, rng: np.random.Generator) -> np.ndarray:
    correct = np.zeros(n, dtype=bool)
    correct[rng.choice(n, size=n_correct, replace=False)] = True
    return correct


def paired(b: int, c: int, both_right: int = 50, both_wrong: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(challenger, champion) correctness with ``b`` challenger-only and ``c`` champion-only wins."""
    challenger = np.array([True] * b + [False] * c + [True] * both_right + [False] * both_wrong)
    champion = np.array([False] * b + [True] * c + [True] * both_right + [False] * both_wrong)
    order = np.random.default_rng(b * 1000 + c).permutation(challenger.size)
    return challenger[order], champion[order]


def failed_names(decision) -> list[str]:
    return [check["name"] for check in decision.checks if not check["passed"]]


# ------------------------------------------------------------------------------------------ evaluate


def test_perfect_predictions() -> None:
    y = np.arange(300) % len(CLASSES)
    ev = evaluate(y, proba_for(y, len(CLASSES)), CLASSES, n_bootstrap=200)

    assert (ev.accuracy.value, ev.accuracy.low, ev.accuracy.high) == (1.0, 1.0, 1.0)
    assert ev.f1_macro.value == 1.0
    confusion = np.array(ev.confusion)
    assert np.array_equal(confusion, np.diag(np.bincount(y, minlength=len(CLASSES))))
    assert ev.support == {name: 60 for name in CLASSES}
    assert ev.correct.dtype == bool and ev.correct.all()
    assert ev.roc_auc_macro is not None and ev.roc_auc_macro.value == 1.0

    decision = gate(ev, ACCEPTANCE)
    assert decision.passed
    assert failed_names(decision) == []
    assert len(decision.reasons) == 1 and "no champion yet" in decision.reasons[0]
    assert any(check["name"] == "no_champion" and check["passed"] for check in decision.checks)


def test_metrics_match_sklearn_including_a_class_never_predicted(capsys: pytest.CaptureFixture) -> None:
    classes = ["cat", "dog", "bird", "fish"]
    y = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3])
    pred = np.array([0, 0, 0, 1, 2, 1, 1, 0, 1, 2, 2, 2, 0, 1, 2, 0, 2, 1])  # "fish" never predicted
    labels = list(range(len(classes)))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ev = evaluate(y, proba_for(pred, len(classes)), classes, n_bootstrap=300)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""

    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    for i, name in enumerate(classes):
        assert ev.precision[name].value == pytest.approx(precision[i])
        assert ev.recall[name].value == pytest.approx(recall[i])
        assert ev.f1[name].value == pytest.approx(f1[i])
        assert ev.support[name] == support[i]
    assert ev.precision["fish"].value == 0.0
    assert ev.accuracy.value == pytest.approx(accuracy_score(y, pred))
    f1_macro = f1_score(y, pred, labels=labels, average="macro", zero_division=0)
    assert ev.f1_macro.value == pytest.approx(f1_macro)
    assert ev.confusion == confusion_matrix(y, pred, labels=labels).tolist()
    assert np.array_equal(ev.correct, y == pred)


def test_roc_auc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(3)
    k, n = 4, 600
    y = rng.integers(0, k, n)
    palette = rng.dirichlet(np.ones(k), size=12)  # few distinct rows -> many tied scores
    rows = np.where(rng.random(n) < 0.6, y, rng.integers(0, k, n)) * 3 + rng.integers(0, 3, n)
    proba = palette[rows % len(palette)]

    ev = evaluate(y, proba, ["a", "b", "c", "d"], n_bootstrap=100)

    expected = roc_auc_score(y, proba, multi_class="ovr", average="macro")
    assert ev.roc_auc_macro is not None
    assert ev.roc_auc_macro.value == pytest.approx(expected, abs=1e-12)
    assert ev.roc_auc_macro.low <= ev.roc_auc_macro.value <= ev.roc_auc_macro.high


def test_roc_auc_is_none_with_a_single_class_present() -> None:
    y = np.zeros(50, dtype=int)
    ev = evaluate(y, proba_for(y, 3), ["a", "b", "c"], n_bootstrap=50)
    assert ev.roc_auc_macro is None
    assert "roc_auc_macro" not in ev.flat_metrics()
    json.dumps(ev.to_dict())


def test_ci_contains_the_estimate_and_narrows_with_n() -> None:
    k = len(CLASSES)
    widths = {}
    for n in (200, 5000):
        y = np.arange(n) % k
        ev = evaluate(y, proba_for(with_errors(y, k, 0.10, seed=n), k), CLASSES, seed=1)
        assert ev.accuracy.value == pytest.approx(0.90)
        metrics = [ev.accuracy, ev.f1_macro, *ev.precision.values(), *ev.recall.values(), *ev.f1.values()]
        for metric in metrics:
            assert metric.low <= metric.value <= metric.high
        widths[n] = ev.accuracy.high - ev.accuracy.low
        # the percentile bootstrap of a proportion is close to the normal-approximation interval
        normal_width = 2 * stats.norm.ppf(0.975) * math.sqrt(0.9 * 0.1 / n)
        assert widths[n] == pytest.approx(normal_width, rel=0.25)
    assert widths[200] > 3 * widths[5000]


def test_bootstrap_is_reproducible_per_seed() -> None:
    y = np.arange(400) % 4
    proba = proba_for(with_errors(y, 4, 0.2), 4)
    first = evaluate(y, proba, ["a", "b", "c", "d"], n_bootstrap=200, seed=7)
    again = evaluate(y, proba, ["a", "b", "c", "d"], n_bootstrap=200, seed=7)
    other = evaluate(y, proba, ["a", "b", "c", "d"], n_bootstrap=200, seed=8)
    assert first.to_dict() == again.to_dict()
    assert first.accuracy.value == other.accuracy.value
    assert (first.accuracy.low, first.accuracy.high) != (other.accuracy.low, other.accuracy.high)


def test_no_bootstrap_gives_zero_width_intervals() -> None:
    y = np.arange(100) % 4
    ev = evaluate(y, proba_for(with_errors(y, 4, 0.3), 4), ["a", "b", "c", "d"], n_bootstrap=0)
    assert ev.accuracy.low == ev.accuracy.value == ev.accuracy.high
    assert ev.roc_auc_macro is not None and ev.roc_auc_macro.low == ev.roc_auc_macro.high


def test_bootstrap_of_5000_examples_1000_times_is_fast() -> None:
    rng = np.random.default_rng(0)
    n, k = 5000, 10
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 2.0
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)

    start = time.perf_counter()
    ev = evaluate(y, proba, [f"class{i}" for i in range(k)], n_bootstrap=1000)
    elapsed = time.perf_counter() - start

    assert elapsed < 3.0, f"evaluate took {elapsed:.2f} s"
    assert ev.accuracy.low < ev.accuracy.value < ev.accuracy.high


@pytest.mark.parametrize(
    ("y", "proba", "message"),
    [
        (np.array([0, 1]), np.array([[0.5, 0.5]]), "shape"),
        (np.array([0, 3]), np.array([[0.5, 0.5], [0.5, 0.5]]), "outside"),
        (np.array([0, 1]), np.array([[2.0, -1.0], [0.3, 0.1]]), "sum to 1"),
        (np.array([0.5, 1.0]), np.array([[0.5, 0.5], [0.5, 0.5]]), "integer"),
    ],
)
def test_bad_inputs_are_rejected(y: np.ndarray, proba: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate(y, proba, ["a", "b"], n_bootstrap=10)


# ------------------------------------------------------------------------------------------ reports


def small_evaluation(classes: list[str]) -> Evaluation:
    k = len(classes)
    y = np.arange(200) % k
    return evaluate(y, proba_for(with_errors(y, k, 0.15), k), classes, n_bootstrap=100)


def test_report_text_and_png() -> None:
    ev = small_evaluation(CLASSES)
    text = classification_report_text(ev)
    for name in CLASSES:
        assert name in text
    assert "accuracy" in text and "macro" in text and "95%" in text

    png = confusion_matrix_png(ev)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and min(image.size) > 100


def test_to_dict_is_json_and_flat_metrics_are_sanitised() -> None:
    classes = ["t-shirt", "toys & games", "bags"]
    ev = small_evaluation(classes)

    as_dict = json.loads(json.dumps(ev.to_dict()))
    assert "correct" not in as_dict
    assert as_dict["precision"]["toys & games"]["value"] == round(ev.precision["toys & games"].value, 4)
    assert as_dict["confusion"] == ev.confusion

    flat = ev.flat_metrics()
    assert all(re.fullmatch(r"[A-Za-z0-9_]+", key) for key in flat)
    assert all(type(value) is float for value in flat.values())
    for key in ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "f1_macro", "roc_auc_macro"):
        assert key in flat
    assert flat["recall_toys___games"] == ev.recall["toys & games"].value
    assert flat["precision_t_shirt"] == ev.precision["t-shirt"].value
    per_class = [key for key in flat if key.startswith("f1_") and key not in ("f1_macro", "f1_score")]
    assert len(per_class) == len(classes)


def test_a_class_named_like_a_headline_metric_does_not_overwrite_it() -> None:
    classes = ["macro", "score", "macro_0", "a b", "a_b"]
    rng = np.random.default_rng(3)
    y = np.concatenate([np.arange(5)] * 20)
    proba = rng.dirichlet(np.ones(5), y.size)
    proba[np.arange(y.size), y] += 0.5  # better than chance, not perfect
    proba /= proba.sum(axis=1, keepdims=True)
    ev = evaluate(y, proba, classes, n_bootstrap=0)
    flat = ev.flat_metrics()
    assert flat["f1_macro"] == flat["f1_score"] == pytest.approx(ev.f1_macro.value)
    assert flat["f1_macro"] == pytest.approx(np.mean([ev.f1[name].value for name in classes]))
    per_class = {key for key in flat if key.startswith("f1_")} - {"f1_macro", "f1_score"}
    assert len(per_class) == len(classes)
    for name, key in zip(classes, metric_keys(classes), strict=True):
        assert flat[f"f1_{key}"] == ev.f1[name].value
    assert metric_keys(classes) == ["macro_0", "score_1", "macro_0_2", "a_b", "a_b_4"]


# ------------------------------------------------------------------------------------------ paired tests


def test_mcnemar_exact_small_counts() -> None:
    result = mcnemar(*paired(b=10, c=0))
    assert (result.b, result.c) == (10, 0)
    assert result.p_value < 0.01
    assert result.p_value == pytest.approx(2 * 0.5**10)

    assert mcnemar(*paired(b=12, c=12)).p_value == pytest.approx(1.0)
    assert mcnemar(*paired(b=0, c=0)).p_value == 1.0


@pytest.mark.parametrize(("b", "c"), [(3, 21), (20, 4), (9, 15)])
def test_mcnemar_exact_matches_scipy_binomtest(b: int, c: int) -> None:
    assert b + c < 25
    assert mcnemar(*paired(b, c)).p_value == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue)


@pytest.mark.parametrize(("b", "c"), [(60, 30), (30, 60), (13, 12), (200, 170)])
def test_mcnemar_chi_square_with_continuity_correction(b: int, c: int) -> None:
    result = mcnemar(*paired(b, c))
    statistic = max(abs(b - c) - 1, 0) ** 2 / (b + c)
    assert (result.b, result.c) == (b, c)
    assert result.statistic == pytest.approx(statistic)
    assert result.p_value == pytest.approx(stats.chi2.sf(statistic, df=1))


def test_mcnemar_equal_disagreements_large() -> None:
    assert mcnemar(*paired(b=40, c=40)).p_value > 0.9


def test_mcnemar_rejects_misaligned_arrays() -> None:
    with pytest.raises(ValueError, match="aligned"):
        mcnemar(np.ones(5, dtype=bool), np.ones(6, dtype=bool))


def test_non_inferiority_identical_models() -> None:
    correct = np.random.default_rng(0).random(5000) < 0.9
    result = non_inferiority(correct, correct.copy(), margin=0.02)
    assert result.difference == 0.0
    assert result.non_inferior


def test_non_inferiority_ten_points_worse_fails() -> None:
    rng = np.random.default_rng(1)
    n = 2000
    champion = exactly_correct(n, int(0.9 * n), rng)
    challenger = champion.copy()
    challenger[rng.choice(np.flatnonzero(champion), size=int(0.1 * n), replace=False)] = False

    result = non_inferiority(challenger, champion, margin=0.02)
    assert result.difference == pytest.approx(-0.10)
    assert not result.non_inferior
    assert result.lower_bound <= -0.02 and result.p_value >= 0.05


def test_non_inferiority_one_point_worse_on_a_large_set_passes() -> None:
    rng = np.random.default_rng(2)
    n = 20_000
    champion = exactly_correct(n, 18_000, rng)
    challenger = exactly_correct(n, 17_800, rng)  # independent errors, 1 point worse

    result = non_inferiority(challenger, champion, margin=0.02, alpha=0.05)

    d = challenger.astype(float) - champion.astype(float)
    se = d.std(ddof=1) / math.sqrt(n)
    assert result.difference == pytest.approx(-0.01)
    assert result.p_value == pytest.approx(stats.norm.sf((d.mean() + 0.02) / se))
    assert result.lower_bound == pytest.approx(d.mean() - stats.norm.ppf(0.95) * se)
    assert result.non_inferior and result.lower_bound > -0.02


def test_non_inferiority_borderline_depends_on_alpha() -> None:
    rng = np.random.default_rng(3)
    n = 2000
    champion = exactly_correct(n, 1800, rng)
    challenger = exactly_correct(n, 1770, rng)  # 1.5 points worse: inconclusive at this size

    strict = non_inferiority(challenger, champion, margin=0.02, alpha=0.05)
    lenient = non_inferiority(challenger, champion, margin=0.02, alpha=0.45)

    assert 0.05 < strict.p_value < 0.45
    assert strict.p_value == lenient.p_value
    assert not strict.non_inferior and strict.lower_bound <= -0.02
    assert lenient.non_inferior and lenient.lower_bound > -0.02


def test_non_inferiority_without_spread_uses_the_sign() -> None:
    worse = non_inferiority(np.zeros(100, dtype=bool), np.ones(100, dtype=bool))
    assert not worse.non_inferior and worse.p_value == 1.0


# ------------------------------------------------------------------------------------------ the gate


def test_gate_fails_a_model_that_is_bad_on_one_class() -> None:
    k = len(CLASSES)
    toys = CLASSES.index("toys")
    y = np.repeat(np.arange(k), 400)
    pred = y.copy()
    for cls in range(k):
        rows = np.flatnonzero(y == cls)
        others = [other for other in range(k) if other != cls]
        wrong = 160 if cls == toys else 8  # recall 0.60 for toys, 0.98 elsewhere
        pred[rows[:wrong]] = np.resize(others, wrong)
    ev = evaluate(y, proba_for(pred, k), CLASSES, n_bootstrap=200)
    assert ev.accuracy.value >= ACCEPTANCE.accuracy_min
    assert ev.f1_macro.value >= ACCEPTANCE.f1_macro_min

    decision = gate(ev, ACCEPTANCE)

    assert not decision.passed
    assert failed_names(decision) == ["recall[toys]"]
    assert len(decision.reasons) == 1
    assert "recall" in decision.reasons[0] and "'toys'" in decision.reasons[0]
    assert "0.60 < 0.80" in decision.reasons[0]


def test_gate_explains_a_class_never_predicted_and_a_class_without_examples() -> None:
    y = np.repeat([0, 1, 2], 50)  # "lamps" has no test examples
    pred = np.where(y == 2, 0, y)  # "toys" is never predicted
    decision = gate(evaluate(y, proba_for(pred, 4), ["shoes", "bags", "toys", "lamps"]), ACCEPTANCE)

    assert not decision.passed
    assert "precision for 'toys' 0.00 < 0.80 (never predicted)" in decision.reasons
    assert "recall for 'lamps' 0.00 < 0.80 (no test examples of this class)" in decision.reasons


def test_gate_fails_random_predictions_on_several_checks() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, len(CLASSES), 2000)
    proba = rng.dirichlet(np.ones(len(CLASSES)), size=y.size)  # unrelated to the labels
    decision = gate(evaluate(y, proba, CLASSES, n_bootstrap=100), ACCEPTANCE)

    failed = failed_names(decision)
    assert not decision.passed
    assert {"accuracy", "f1_macro"} <= set(failed)
    assert len(failed) >= 5
    assert len(decision.reasons) == len(failed)
    json.dumps(decision.to_dict())


def test_gate_fails_a_challenger_significantly_worse_than_the_champion() -> None:
    k, n = 4, 2000
    y = np.arange(n) % k
    challenger = evaluate(y, proba_for(with_errors(y, k, 0.09, seed=1), k), list("abcd"), n_bootstrap=100)
    champion_correct = with_errors(y, k, 0.02, seed=2) == y
    assert gate(challenger, ACCEPTANCE).passed  # good enough on its own

    decision = gate(challenger, ACCEPTANCE, champion_correct)

    assert not decision.passed
    assert set(failed_names(decision)) == {"non_inferiority", "mcnemar"}
    text = " ".join(decision.reasons)
    assert "champion" in text and "McNemar p=" in text and "margin" in text
    for check in decision.checks:
        assert set(check) == {"name", "value", "threshold", "passed", "detail"}
    json.dumps(decision.to_dict())


def test_gate_takes_margin_and_alpha_from_the_config_unless_given() -> None:
    k, n = 4, 2000
    y = np.arange(n) % k
    challenger = evaluate(y, proba_for(with_errors(y, k, 0.09, seed=1), k), list("abcd"), n_bootstrap=50)
    champion_correct = with_errors(y, k, 0.06, seed=2) == y  # 3 points better than the challenger

    def check(decision, name: str) -> dict:
        return next(c for c in decision.checks if c["name"] == name)

    default = gate(challenger, ACCEPTANCE, champion_correct)
    loose_config = ACCEPTANCE.model_copy(update={"non_inferiority_margin": 0.10})
    loose = gate(challenger, loose_config, champion_correct)
    explicit = gate(challenger, ACCEPTANCE, champion_correct, margin=0.10)

    assert check(default, "non_inferiority")["threshold"] == -0.02
    assert not check(default, "non_inferiority")["passed"]
    for decision in (loose, explicit):
        assert check(decision, "non_inferiority")["threshold"] == -0.10
        assert check(decision, "non_inferiority")["passed"]
    tiny_alpha = gate(challenger, ACCEPTANCE, champion_correct, alpha=1e-12)
    assert check(default, "mcnemar")["passed"] is False
    assert check(tiny_alpha, "mcnemar")["passed"] is True


def test_gate_passes_a_challenger_significantly_better_than_the_champion() -> None:
    k, n = 4, 2000
    y = np.arange(n) % k
    challenger = evaluate(y, proba_for(with_errors(y, k, 0.02, seed=5), k), list("abcd"), n_bootstrap=100)
    champion_correct = with_errors(y, k, 0.09, seed=6) == y
    assert mcnemar(challenger.correct, champion_correct).p_value < 0.05

    decision = gate(challenger, ACCEPTANCE, champion_correct)

    assert decision.passed, decision.reasons
    assert failed_names(decision) == []


def test_gate_passes_a_challenger_as_good_as_the_champion() -> None:
    k, n = 4, 3000
    y = np.arange(n) % k
    challenger = evaluate(y, proba_for(with_errors(y, k, 0.05, seed=3), k), list("abcd"), n_bootstrap=100)
    champion_correct = with_errors(y, k, 0.055, seed=4) == y

    decision = gate(challenger, ACCEPTANCE, champion_correct)

    assert decision.passed, decision.reasons
    assert {"non_inferiority", "mcnemar"} <= {check["name"] for check in decision.checks}
    assert len(decision.reasons) == 1 and "non-inferior" in decision.reasons[0]


def test_gate_decision_takes_further_checks() -> None:
    y = np.arange(200) % len(CLASSES)
    decision = gate(evaluate(y, proba_for(y, len(CLASSES)), CLASSES, n_bootstrap=50), ACCEPTANCE)
    assert decision.passed

    decision.add_check("onnx_parity", 1e-5, 1e-3, True, "ONNX matches PyTorch")
    assert decision.passed and len(decision.reasons) == 1 and decision.reasons[0].startswith("passed")

    decision.add_check("onnx_parity", 0.2, 1e-3, False, "ONNX differs from PyTorch by 2.00e-01")
    decision.add_check("latency", 900.0, 500.0, False, "p99 latency 900 ms > 500 ms")
    assert not decision.passed
    assert decision.reasons == ["ONNX differs from PyTorch by 2.00e-01", "p99 latency 900 ms > 500 ms"]
    assert [check["name"] for check in decision.failed] == ["onnx_parity", "latency"]
    json.dumps(decision.to_dict())


def test_gate_rejects_champion_correctness_of_another_length() -> None:
    ev = small_evaluation(CLASSES)
    with pytest.raises(ValueError, match="same"):
        gate(ev, ACCEPTANCE, np.ones(ev.n + 1, dtype=bool))


def test_the_specs_metric_names_are_logged_as_scikit_learn_computes_them() -> None:
    rng = np.random.default_rng(5)
    classes = ["a", "b", "c", "d"]
    y = rng.integers(0, 4, 300)
    proba = rng.dirichlet(np.ones(4), 300)
    proba[np.arange(300), y] += rng.random(300)  # better than chance, not perfect
    proba /= proba.sum(axis=1, keepdims=True)
    proba[0] = [0.0, 0.0, 0.0, 0.0]
    proba[0, (y[0] + 1) % 4] = 1.0  # the true class at probability 0: a finite loss
    flat = evaluate(y, proba, classes, n_bootstrap=0).flat_metrics()
    pred = proba.argmax(axis=1)
    precision, recall, f1, _ = precision_recall_fscore_support(y, pred, average="macro", zero_division=0)
    assert flat["precision"] == pytest.approx(precision) and flat["recall"] == pytest.approx(recall)
    assert flat["f1_score"] == pytest.approx(f1) == flat["f1_macro"]
    assert flat["loss"] == pytest.approx(log_loss(y, np.clip(proba, 1e-12, 1), labels=range(4)), rel=1e-6)


def test_probabilities_are_read_in_the_configured_class_order_or_refused() -> None:
    from ml.training.evaluate import ClassesDiffer, in_class_order

    proba = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])  # columns a, b, c
    assert in_class_order(proba, ["a", "b", "c"], ["a", "b", "c"]) is proba
    assert in_class_order(proba, ["a", "b", "c"], ["c", "a", "b"]).tolist() == [
        [0.1, 0.7, 0.2],
        [0.6, 0.1, 0.3],
    ]
    for ours in (["a", "b", "d"], ["a", "b"], ["a", "b", "c", "d"]):
        with pytest.raises(ClassesDiffer, match="this dataset's classes"):
            in_class_order(proba, ["a", "b", "c"], ours)
