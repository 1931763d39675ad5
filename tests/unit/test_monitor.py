"""Live monitoring logic: counter deltas, live accuracy, rule judgement, once-per-incident alerts."""

from __future__ import annotations

import datetime as dt

import pytest

from ml.alerts import judge
from ml.config import AlertRule, load_settings
from ml.monitoring.live import (
    RollbackDecision,
    Verdicts,
    counter_delta,
    live_accuracy,
    next_alert_state,
    plan_notices,
    proven_good,
)

T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
ACCURACY = AlertRule(
    name="model_accuracy_drop", metric="accuracy", op="<", threshold=0.8, severity="critical"
)
LATENCY = AlertRule(
    name="high_inference_latency", metric="p99_latency_ms", op=">", threshold=1000, severity="warning"
)
FACTS = {
    "window": ["a", "b"],
    "model_version": "2",
    "predictions": 120,
    "accuracy_by_version": {"2": {"feedback": 50, "accuracy": 0.5}},
}


def test_counter_delta_counts_since_the_last_scrape_and_restarts_from_zero() -> None:
    now = {"requests": 150.0, "server_errors": 3.0}
    assert counter_delta(now, None) == now
    assert counter_delta(now, {"requests": 100.0, "server_errors": 1.0}) == {
        "requests": 50.0,
        "server_errors": 2.0,
    }
    assert counter_delta(
        {"requests": 7.0, "server_errors": 0.0}, {"requests": 100.0, "server_errors": 1.0}
    ) == {
        "requests": 7.0,
        "server_errors": 0.0,
    }  # the service restarted: its counters began again


def test_live_accuracy_joins_feedback_to_predictions_per_version() -> None:
    predictions = [
        {"request_id": "a", "model_version": "1", "predicted_class": "toys"},
        {"request_id": "b", "model_version": "1", "predicted_class": "books"},
        {"request_id": "c", "model_version": "2", "predicted_class": "home"},
        {"request_id": "d", "model_version": "2", "predicted_class": "home"},  # no feedback
    ]
    feedback = [
        {"request_id": "a", "label": "toys"},
        {"request_id": "b", "label": "toys"},
        {"request_id": "c", "label": "books"},
        {"request_id": "c", "label": "home"},  # corrected: the last label wins
        {"request_id": "zzz", "label": "home"},  # its prediction is not in the log: ignored
    ]
    assert live_accuracy(predictions, feedback) == {
        "1": {"feedback": 2, "accuracy": 0.5},
        "2": {"feedback": 1, "accuracy": 1.0},
    }


@pytest.mark.parametrize(
    ("value", "outcome"), [(None, "unknown"), (0.79, "firing"), (0.8, "ok"), (0.95, "ok")]
)
def test_judge(value: float | None, outcome: str) -> None:
    assert judge(ACCURACY, value) == outcome


def step(alerts: dict, metrics: dict, at: dt.datetime, triggers=(), rolled=None, note=""):
    """One check's alerting: what it sends and the state it leaves."""
    settings = load_settings()
    rules = [ACCURACY, LATENCY]
    outcomes = {rule.name: judge(rule, metrics.get(rule.metric)) for rule in rules}
    verdicts = Verdicts(rules, outcomes, metrics, FACTS, at)
    decision = RollbackDecision(list(triggers), note, rolled)
    notices = plan_notices(verdicts, alerts, settings.serving_monitor.repeat_hours, decision)
    return notices, next_alert_state(verdicts, alerts, notices, "2")


def test_an_alert_is_sent_once_repeated_after_repeat_hours_and_resolved_once() -> None:
    hour = dt.timedelta(hours=1)
    sent, alerts = step({}, {"accuracy": 0.5, "p99_latency_ms": 90.0}, T0)
    assert [(n.rule, n.action, n.severity) for n in sent] == [("model_accuracy_drop", "trigger", "critical")]
    assert "accuracy 0.5 < 0.8 (50 labelled predictions of v2" in sent[0].reason
    for hours in range(1, 24):  # still firing every hour: nothing is re-sent
        sent, alerts = step(alerts, {"accuracy": 0.55, "p99_latency_ms": 90.0}, T0 + hours * hour)
        assert sent == []
    assert alerts["model_accuracy_drop"]["since"] == T0.isoformat(timespec="seconds")
    sent, alerts = step(alerts, {"accuracy": 0.6}, T0 + 24 * hour)  # repeat_hours (24) passed
    assert [n.action for n in sent] == ["trigger"] and "still firing since" in sent[0].reason
    sent, alerts = step(alerts, {"accuracy": None}, T0 + 25 * hour)  # too little feedback: no verdict
    assert sent == [] and alerts["model_accuracy_drop"]["firing"]
    sent, alerts = step(alerts, {"accuracy": 0.93}, T0 + 26 * hour)
    assert [(n.rule, n.action) for n in sent] == [("model_accuracy_drop", "resolve")]
    assert "resolved" in sent[0].reason and "firing since" in sent[0].reason
    sent, alerts = step(alerts, {"accuracy": 0.94}, T0 + 27 * hour)
    assert sent == []


def test_a_rollback_is_announced_even_when_the_rule_was_already_firing() -> None:
    _, alerts = step({}, {"accuracy": 0.5}, T0)
    rolled = {"state": {"stable": "1"}}
    sent, _ = step(
        alerts, {"accuracy": 0.5}, T0 + dt.timedelta(hours=1), [ACCURACY], rolled, "ROLLED BACK to v1"
    )
    assert len(sent) == 1 and "ROLLED BACK to v1" in sent[0].reason


def test_a_model_is_proven_good_only_by_a_check_after_its_deploy() -> None:
    state = {"last_good": {"version": "2", "at": "2026-03-01T12:00:00+00:00"}}
    assert proven_good(state, "2", "2026-03-01T11:00:00+00:00")
    assert not proven_good(state, "2", "2026-03-01T12:30:00+00:00")  # deployed again since
    assert not proven_good(state, "3", "2026-03-01T11:00:00+00:00")
    assert not proven_good({}, "2", "")
