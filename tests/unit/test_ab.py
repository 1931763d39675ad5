"""A/B comparison: each statistic against an independent computation, verdicts on generated traffic."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from ml.config import AbConfig, load_settings
from ml.monitoring.ab import (
    ACCURACY,
    ERROR_RATE,
    LATENCY,
    Verdict,
    ab_report,
    bootstrap_median_difference,
    bootstrap_medians,
    mann_whitney_p,
    measure_ab,
    newcombe_interval,
    promotion_allowed,
    two_proportion_p,
    wilson_interval,
)

CONFIG = AbConfig()
CONTROL, CHALLENGER = "3", "4"
T0 = dt.datetime(2026, 6, 1, 12, tzinfo=dt.UTC)


def traffic(
    seed: int,
    requests: int,
    accuracy: tuple[float, float] = (0.92, 0.92),  # (control, challenger)
    median_ms: tuple[float, float] = (50.0, 50.0),
    error_rate: tuple[float, float] = (0.002, 0.002),
    share: float = 0.2,  # of requests routed to the challenger
    labelled: float = 1.0,  # share of answers that get a bound label
    start: dt.datetime = T0,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Prediction and feedback log records of ``requests`` independent requests (seeded)."""
    rng = np.random.default_rng(seed)
    canary = rng.random(requests) < share
    arm = canary.astype(int)
    correct = rng.random(requests) < np.array(accuracy)[arm]
    failed = rng.random(requests) < np.array(error_rate)[arm]
    latency = np.array(median_ms)[arm] * np.exp(0.3 * rng.standard_normal(requests))
    label = rng.random(requests) < labelled
    seconds = np.sort(rng.uniform(0, 3600, requests))
    times, later = _iso(start, seconds), _iso(start, seconds + 300)  # labels come five minutes later
    predictions, feedback = [], []
    for i, (is_canary, hit, fail, ms, has_label) in enumerate(
        zip(
            canary.tolist(),
            correct.tolist(),
            failed.tolist(),
            latency.round(3).tolist(),
            label.tolist(),
            strict=True,
        )
    ):
        record: dict[str, Any] = {
            "request_id": f"r{i}",
            "time": times[i],
            "model_version": CHALLENGER if is_canary else CONTROL,
            "track": "canary" if is_canary else "stable",
            "latency_ms": ms,
        }
        if fail:
            predictions.append(record | {"status": 500, "error": "RuntimeError"})
            continue
        predictions.append(record | {"predicted_class": "toys" if hit else "books", "confidence": 0.9})
        if has_label:
            feedback.append({"request_id": f"r{i}", "label": "toys", "time": later[i], "bound": True})
    return predictions, feedback


def _iso(start: dt.datetime, seconds: np.ndarray) -> list[str]:
    """UTC times ``start + seconds`` as the service writes them (``2026-06-01T12:00:00.123+00:00``)."""
    base = np.datetime64(start.astimezone(dt.UTC).replace(tzinfo=None), "ms")
    moments = np.datetime_as_string(base + (seconds * 1000).astype("timedelta64[ms]"), unit="ms")
    return [f"{moment}+00:00" for moment in moments.tolist()]


def report_for(seed: int, requests: int, config: AbConfig = CONFIG, **kwargs: Any):
    predictions, feedback = traffic(seed, requests, **kwargs)
    return ab_report(predictions, feedback, CONTROL, CHALLENGER, config)


# ---------------------------------------------------------------- the statistics, independently


@pytest.mark.parametrize(("successes", "n"), [(0, 10), (3, 10), (10, 10), (181, 200), (9170, 10000)])
def test_wilson_interval_matches_scipy(successes: int, n: int) -> None:
    expected = stats.binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(successes, n) == pytest.approx((expected.low, expected.high), abs=1e-12)


@pytest.mark.parametrize(
    "counts", [(56, 70, 48, 80), (9, 10, 3, 10), (0, 10, 0, 20), (1840, 2000, 7390, 8000), (5, 300, 40, 1200)]
)
def test_newcombe_interval_matches_statsmodels_and_hand_formula(counts: tuple[int, int, int, int]) -> None:
    from statsmodels.stats.proportion import confint_proportions_2indep

    x1, n1, x2, n2 = counts
    expected = confint_proportions_2indep(x1, n1, x2, n2, method="newcomb", compare="diff", alpha=0.05)
    assert newcombe_interval(*counts) == pytest.approx(expected, abs=1e-10)
    # the hand formula on scipy's Wilson intervals
    ci1 = stats.binomtest(x1, n1).proportion_ci(method="wilson")
    ci2 = stats.binomtest(x2, n2).proportion_ci(method="wilson")
    p1, p2 = x1 / n1, x2 / n2
    low = p1 - p2 - np.hypot(p1 - ci1.low, ci2.high - p2)
    high = p1 - p2 + np.hypot(ci1.high - p1, p2 - ci2.low)
    assert newcombe_interval(*counts) == pytest.approx((low, high), abs=1e-10)


def test_newcombe_published_example() -> None:
    """Newcombe (1998), Stat Med 17:873, example (a): 56/70 - 48/80, method 10 gives 0.0524 to 0.3339."""
    low, high = newcombe_interval(56, 70, 48, 80)
    assert (round(low, 4), round(high, 4)) == (0.0524, 0.3339)


@pytest.mark.parametrize(
    "counts", [(56, 70, 48, 80), (1840, 2000, 7390, 8000), (0, 100, 0, 400), (3, 10, 3, 10)]
)
def test_two_proportion_p_matches_chi_square_and_statsmodels(counts: tuple[int, int, int, int]) -> None:
    from statsmodels.stats.proportion import proportions_ztest

    x1, n1, x2, n2 = counts
    table = [[x1, n1 - x1], [x2, n2 - x2]]
    if x1 + x2 == 0:
        assert two_proportion_p(*counts) == 1.0
        return
    chi = stats.chi2_contingency(table, correction=False)
    _, z_p = proportions_ztest([x1, x2], [n1, n2])
    assert two_proportion_p(*counts) == pytest.approx(chi.pvalue, rel=1e-9)
    assert two_proportion_p(*counts) == pytest.approx(z_p, rel=1e-9)


def test_newcombe_interval_covers_the_true_difference_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(1)
    p1, n1, p2, n2, runs = 0.88, 250, 0.92, 1000, 4000
    hits = 0
    for x1, x2 in zip(rng.binomial(n1, p1, runs), rng.binomial(n2, p2, runs), strict=True):
        low, high = newcombe_interval(int(x1), n1, int(x2), n2)
        hits += low <= p1 - p2 <= high
    # 4000 runs: a 95% interval's coverage is estimated to within about +-0.7 points (2 sd)
    assert 0.935 <= hits / runs <= 0.965


@pytest.mark.parametrize("n", [101, 100])
def test_exact_bootstrap_medians_have_the_distribution_of_resampled_medians(n: int) -> None:
    rng = np.random.default_rng(2)
    values = np.round(rng.lognormal(np.log(50), 0.4, n), 0)  # rounded: ties, as logged latencies have
    exact = bootstrap_medians(values, 20_000, np.random.default_rng(3))
    brute = np.median(values[rng.integers(0, n, (20_000, n))], axis=1)
    assert stats.ks_2samp(exact, brute).pvalue > 0.001
    assert np.quantile(exact, [0.025, 0.5, 0.975]) == pytest.approx(
        np.quantile(brute, [0.025, 0.5, 0.975]), abs=1.0
    )


def test_bootstrap_median_difference_matches_scipy_bootstrap() -> None:
    rng = np.random.default_rng(4)
    challenger, control = rng.lognormal(np.log(80), 0.3, 400), rng.lognormal(np.log(50), 0.3, 1600)
    ours = bootstrap_median_difference(challenger, control, 5000, 0.95, seed=5)
    theirs = stats.bootstrap(
        (challenger, control),
        lambda a, b, axis: np.median(a, axis=axis) - np.median(b, axis=axis),
        n_resamples=5000,
        method="percentile",
        vectorized=True,
        random_state=6,
    ).confidence_interval
    # two Monte Carlo runs of the same bootstrap: the bounds agree to well within one ms
    assert ours == pytest.approx((theirs.low, theirs.high), abs=0.8)
    assert bootstrap_median_difference(challenger, control, 5000, 0.95, seed=5) == ours  # seeded


def test_bootstrap_interval_covers_the_true_median_difference() -> None:
    rng = np.random.default_rng(7)
    runs, hits = 300, 0
    for seed in range(runs):
        a, b = rng.lognormal(np.log(60), 0.3, 300), rng.lognormal(np.log(50), 0.3, 1200)
        low, high = bootstrap_median_difference(a, b, 2000, 0.95, seed)
        hits += low <= 10.0 <= high
    assert 0.91 <= hits / runs <= 0.985  # 300 runs: coverage within about +-2.5 points of 95%


def test_mann_whitney_p_matches_the_hand_normal_approximation() -> None:
    rng = np.random.default_rng(8)
    a = np.round(rng.lognormal(np.log(52), 0.3, 300))
    b = np.round(rng.lognormal(np.log(50), 0.3, 1200))  # rounded: ties
    n1, n2 = len(a), len(b)
    ranks = stats.rankdata(np.concatenate([a, b]))
    u1 = ranks[:n1].sum() - n1 * (n1 + 1) / 2
    assert u1 == pytest.approx(np.sum(a[:, None] > b) + 0.5 * np.sum(a[:, None] == b))  # pairs counted
    _, ties = np.unique(np.concatenate([a, b]), return_counts=True)
    n = n1 + n2
    sigma = np.sqrt(n1 * n2 / 12 * ((n + 1) - np.sum(ties**3 - ties) / (n * (n - 1))))
    z = (max(u1, n1 * n2 - u1) - n1 * n2 / 2 - 0.5) / sigma
    assert mann_whitney_p(a, b) == pytest.approx(2 * stats.norm.sf(z), rel=1e-9)


# ---------------------------------------------------------------- verdicts on generated traffic


def test_a_truly_worse_challenger_is_worse_and_may_not_be_promoted() -> None:
    report = report_for(0, 10_000, accuracy=(0.92, 0.80))
    accuracy = report.metric(ACCURACY)
    assert accuracy.verdict == Verdict.WORSE and report.verdict == Verdict.WORSE
    assert accuracy.difference == pytest.approx(-0.12, abs=0.03) and accuracy.ci[1] < -0.02
    assert accuracy.p_value < 1e-9
    assert "accuracy" in report.reason and report.reason.startswith("worse:")
    allowed, why = promotion_allowed(report, CONFIG)
    assert not allowed and "worse" in why


def _verdict_counts(requests: int, seeds: int) -> tuple[Counter[str], Counter[str]]:
    overall, accuracy = Counter(), Counter()
    for seed in range(seeds):
        report = report_for(seed, requests, accuracy=(0.97, 0.97))
        overall[str(report.verdict)] += 1
        accuracy[str(report.metric(ACCURACY).verdict)] += 1
    return overall, accuracy


def test_equal_arms_are_never_better_over_200_seeds() -> None:
    overall, accuracy = _verdict_counts(5000, 200)  # about 1000 labelled challenger answers
    assert overall["better"] == 0 and accuracy["better"] == 0
    assert overall["worse"] == 0 and accuracy["worse"] == 0
    # theory (normal approximation): accuracy shows non-inferiority about 91% of the time here
    assert accuracy["not worse"] >= 160 and overall["not worse"] + overall["not enough data"] == 200
    small_overall, small_accuracy = _verdict_counts(1200, 200)  # about 240 labelled challenger answers
    assert small_overall == Counter({"not enough data": 200})  # 240 answers < ab.min_requests
    assert small_accuracy["better"] == 0 and small_accuracy["worse"] == 0


@pytest.mark.parametrize(("n_challenger", "n_control"), [(200, 800), (200, 200)])
def test_better_on_equal_arms_is_rare_even_at_the_least_data_judged(
    n_challenger: int, n_control: int
) -> None:
    """Exact, by summing over every binomial outcome: P(accuracy "better" | both arms 92%)."""
    p, config = 0.92, AbConfig()
    assert n_challenger == config.min_labelled  # the least labelled data accuracy is judged on
    x1, x2 = np.arange(n_challenger + 1), np.arange(n_control + 1)
    w1, w2 = stats.binom.pmf(x1, n_challenger, p), stats.binom.pmf(x2, n_control, p)
    better = worse = 0.0
    for a in x1[w1 > 1e-12].tolist():
        for b in x2[w2 > 1e-12].tolist():
            low, high = newcombe_interval(a, n_challenger, b, n_control)
            better += w1[a] * w2[b] * (low > config.superiority_margin)
            worse += w1[a] * w2[b] * (high < -config.non_inferiority_margin)
    assert 0 < better < 0.004 and 0 < worse < 0.004  # "better" needs more than chance at 95%: < 2.5%


def test_too_little_data_is_not_enough_data_whatever_it_shows() -> None:
    report = report_for(0, 300, accuracy=(0.92, 0.50))  # a terrible challenger on 60 requests
    assert report.verdict == Verdict.NOT_ENOUGH_DATA
    assert {m.verdict for m in report.metrics} == {Verdict.NOT_ENOUGH_DATA}
    assert "per arm needed" in report.metric(ACCURACY).reason
    assert report.metric(ACCURACY).difference < 0  # still measured and reported
    assert promotion_allowed(report, CONFIG)[0] is True
    strict = CONFIG.model_copy(update={"require_not_worse_to_promote": True})
    allowed, why = promotion_allowed(report, strict)
    assert not allowed and "not shown" in why


def test_no_labels_at_all_leave_accuracy_unmeasured() -> None:
    predictions, _ = traffic(0, 5000)
    report = ab_report(predictions, [], CONTROL, CHALLENGER, CONFIG)
    accuracy = report.metric(ACCURACY)
    assert accuracy.verdict == Verdict.NOT_ENOUGH_DATA and accuracy.ci is None and accuracy.difference is None
    assert report.metric(LATENCY).verdict == Verdict.NOT_WORSE


def test_a_truly_better_challenger_with_plenty_of_traffic_is_better() -> None:
    report = report_for(0, 20_000, accuracy=(0.90, 0.96))
    assert report.metric(ACCURACY).verdict == Verdict.BETTER and report.verdict == Verdict.BETTER
    assert report.metric(ACCURACY).ci[0] > CONFIG.superiority_margin
    assert promotion_allowed(report, CONFIG)[0] is True


def test_a_slower_challenger_is_worse_on_latency() -> None:
    report = report_for(0, 10_000, median_ms=(50.0, 80.0))
    latency = report.metric(LATENCY)
    assert latency.verdict == Verdict.WORSE and report.verdict == Verdict.WORSE
    assert latency.difference == pytest.approx(30.0, abs=3.0) and latency.ci[0] > CONFIG.latency_margin_ms
    assert latency.p_value < 1e-12
    assert report.metric(ACCURACY).verdict != Verdict.WORSE  # same accuracy: worse only on latency
    assert promotion_allowed(report, CONFIG)[0] is True  # promotion reads accuracy only


def test_a_faster_challenger_is_better_on_latency() -> None:
    report = report_for(0, 10_000, median_ms=(50.0, 35.0), accuracy=(0.97, 0.97))
    assert report.metric(LATENCY).verdict == Verdict.BETTER
    assert report.metric(LATENCY).ci[1] < -CONFIG.latency_superiority_ms


def test_a_failing_challenger_is_worse_on_errors_and_errors_never_count_as_better() -> None:
    report = report_for(0, 10_000, error_rate=(0.002, 0.05))
    assert report.metric(ERROR_RATE).verdict == Verdict.WORSE and report.verdict == Verdict.WORSE
    report = report_for(0, 20_000, error_rate=(0.05, 0.0), accuracy=(0.97, 0.97))
    assert report.metric(ERROR_RATE).verdict == Verdict.NOT_WORSE  # a guardrail: never "better"
    assert report.metric(ERROR_RATE).ci[1] < 0


def test_the_80_20_split_and_the_counts_are_reported() -> None:
    predictions, feedback = traffic(0, 10_000, share=0.0, error_rate=(0.0, 0.0))
    for i, record in enumerate(predictions):  # exactly every fifth request to the challenger
        record["model_version"] = CHALLENGER if i % 5 == 0 else CONTROL
    report = ab_report(predictions, feedback, CONTROL, CHALLENGER, CONFIG)
    assert (report.control.share, report.challenger.share) == (0.8, 0.2)
    assert (report.control.requests, report.challenger.requests) == (8000, 2000)
    out = report.to_dict()
    assert (out["control"]["share"], out["challenger"]["share"]) == (0.8, 0.2)
    hits = sum(r["predicted_class"] == "toys" for i, r in enumerate(predictions) if i % 5 == 0)
    assert out["challenger"]["correct"] == hits and out["challenger"]["labelled"] == 2000


def test_only_bound_feedback_counts_and_errors_other_versions_and_shadows_are_handled() -> None:
    predictions, feedback = traffic(0, 4000, error_rate=(0.0, 0.1))
    unbound = [{"request_id": r["request_id"], "label": "books", "bound": False} for r in predictions]
    others = [r | {"model_version": "9"} for r in predictions[:500]]
    shadows = [r | {"track": "shadow"} for r in predictions[:500]]
    report = ab_report(predictions + others + shadows, unbound + feedback, CONTROL, CHALLENGER, CONFIG)
    canary = [r for r in predictions if r["model_version"] == CHALLENGER]
    failed = sum(r.get("status") == 500 for r in canary)
    assert report.challenger.requests == len(canary) and report.challenger.errors == failed
    assert report.challenger.answered == len(canary) - failed == report.challenger.labelled
    assert report.challenger.latency_ms.size == report.challenger.answered
    assert report.control.requests + report.challenger.requests == 4000
    alone = ab_report(predictions, feedback, CONTROL, CHALLENGER, CONFIG)
    assert report.to_dict() == alone.to_dict()  # unbound labels, v9 and shadow answers change nothing


def test_the_report_is_json_with_every_metric_and_the_margins() -> None:
    out = json.loads(json.dumps(report_for(0, 5000).to_dict()))
    assert set(out["metrics"]) == {ACCURACY, LATENCY, ERROR_RATE}
    for metric in out["metrics"].values():
        assert {"difference", "ci", "p_value", "verdict", "reason", "method"} <= set(metric)
    assert out["verdict"] in {v.value for v in Verdict} and out["reason"].endswith(".")
    assert out["margins"]["accuracy_non_inferiority"] == CONFIG.non_inferiority_margin


def test_control_and_challenger_must_differ() -> None:
    with pytest.raises(ValueError, match="same version"):
        ab_report([], [], "3", "3", CONFIG)


def test_params_yaml_holds_the_code_defaults() -> None:
    assert load_settings(environ={}).ab == AbConfig()


# ---------------------------------------------------------------- storage and the CLI


def write_logs(root: Path, predictions: list[dict[str, Any]], feedback: list[dict[str, Any]]) -> None:
    from ml.layout import FEEDBACK_PREFIX, PREDICTIONS_PREFIX, log_batch_key
    from ml.storage import LocalStorage

    storage = LocalStorage(root)
    for prefix, records in ((PREDICTIONS_PREFIX, predictions), (FEEDBACK_PREFIX, feedback)):
        by_day: dict[str, list[str]] = {}
        for record in records:
            by_day.setdefault(record["time"][:10], []).append(json.dumps(record))
        for day, lines in by_day.items():
            storage.write_bytes(log_batch_key(prefix, day, "test", 1), ("\n".join(lines) + "\n").encode())


def test_measure_ab_reads_the_window_and_labels_up_to_a_day_late(tmp_path: Path, make_settings) -> None:
    from ml.storage import LocalStorage

    start = dt.datetime(2026, 6, 1, 23, 30, tzinfo=dt.UTC)  # the window crosses midnight
    predictions, feedback = traffic(0, 5000, start=start)
    late = [r | {"time": (start + dt.timedelta(hours=20)).isoformat()} for r in feedback[:100]]
    before, _ = traffic(1, 500, start=start - dt.timedelta(hours=3))  # outside the window
    write_logs(tmp_path, before + predictions, late + feedback[100:])
    end = start + dt.timedelta(hours=1)
    report = measure_ab(make_settings(), LocalStorage(tmp_path), CONTROL, CHALLENGER, start, end)
    expected = ab_report(predictions, feedback, CONTROL, CHALLENGER, AbConfig())
    assert report.to_dict() == expected.to_dict() | {"window": [start.isoformat(), end.isoformat()]}


@pytest.fixture
def live_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from ml.serving.state import DeploymentState, write_state
    from ml.storage import LocalStorage

    monkeypatch.setenv("MLOPS__STORAGE__ROOT", str(tmp_path / "store"))
    monkeypatch.setenv("MLOPS__SERVING__STATE_DIR", str(tmp_path / "serving"))
    write_state(LocalStorage(tmp_path / "store"), DeploymentState(stable=CONTROL, canary=CHALLENGER))
    return tmp_path / "store"


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    from ml.cli import main

    code = main(list(argv))
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_ab_compares_the_deployed_canary_with_the_stable_model(live_world: Path, capsys) -> None:
    start = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1, minutes=10)
    write_logs(live_world, *traffic(0, 10_000, accuracy=(0.92, 0.80), start=start))
    code, out = _run(capsys, "ab", "--json")
    assert code == 0 and out["verdict"] == "worse"
    assert (out["control"]["version"], out["challenger"]["version"]) == (CONTROL, CHALLENGER)
    assert out["control"]["requests"] + out["challenger"]["requests"] == 10_000
    assert out["metrics"]["accuracy"]["verdict"] == "worse"
    code, out = _run(capsys, "ab", "--hours", "0.5", "--json")  # only the last half hour of traffic
    assert code == 0 and 3000 < out["control"]["requests"] + out["challenger"]["requests"] < 6000
    code, swapped = _run(capsys, "ab", "--control", CHALLENGER, "--challenger", CONTROL, "--json")
    assert code == 0 and swapped["metrics"]["accuracy"]["verdict"] == "better"


def test_cli_ab_without_a_challenger_or_with_a_bad_window_is_a_usage_error(live_world: Path, capsys) -> None:
    from ml.serving.state import DeploymentState, write_state
    from ml.storage import LocalStorage

    code, out = _run(capsys, "ab", "--hours", "0", "--json")
    assert code == 2 and "--hours must be positive" in out["error"]
    write_state(LocalStorage(live_world), DeploymentState(stable=CONTROL))
    code, out = _run(capsys, "ab", "--json")
    assert code == 2 and "no challenger" in out["error"] and "--challenger" in out["error"]
