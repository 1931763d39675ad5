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
        {"request_id": "a", "label": "toys", "bound": True},
        {"request_id": "b", "label": "toys", "bound": True},
        {"request_id": "c", "label": "books", "bound": True},
        {"request_id": "c", "label": "home", "bound": True},  # corrected: the last label wins
        {"request_id": "d", "label": "toys"},  # not bound to its prediction by the service: ignored
        {"request_id": "zzz", "label": "home", "bound": True},  # its prediction is not in the log: ignored
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


def test_a_notice_that_did_not_reach_its_channels_is_sent_again_next_check() -> None:
    settings = load_settings()
    rules = [ACCURACY]
    hour = dt.timedelta(hours=1)

    def check(alerts: dict, accuracy: float, at: dt.datetime, reached: set[str]):
        metrics = {"accuracy": accuracy}
        verdicts = Verdicts(rules, {r.name: judge(r, accuracy) for r in rules}, metrics, FACTS, at)
        notices = plan_notices(verdicts, alerts, settings.serving_monitor.repeat_hours, RollbackDecision([]))
        return notices, next_alert_state(verdicts, alerts, notices, "2", reached)

    sent, alerts = check({}, 0.5, T0, reached=set())  # Slack answered 500: not delivered
    assert [n.action for n in sent] == ["trigger"] and alerts["model_accuracy_drop"]["undelivered"]
    assert alerts["model_accuracy_drop"]["last_sent"] is None
    sent, alerts = check(alerts, 0.5, T0 + hour, reached={"model_accuracy_drop"})  # retried, delivered
    assert [n.action for n in sent] == ["trigger"] and "still firing" not in sent[0].reason
    assert not alerts["model_accuracy_drop"]["undelivered"]
    sent, alerts = check(alerts, 0.5, T0 + 2 * hour, reached=set())
    assert sent == []  # delivered once: not re-sent
    sent, alerts = check(alerts, 0.95, T0 + 3 * hour, reached=set())  # the resolution fails to go out
    assert [n.action for n in sent] == ["resolve"] and alerts["model_accuracy_drop"]["firing"]
    sent, alerts = check(alerts, 0.95, T0 + 4 * hour, reached={"model_accuracy_drop"})
    assert [n.action for n in sent] == ["resolve"] and not alerts["model_accuracy_drop"]["firing"]


def test_a_failed_rollback_is_reported_and_a_restored_model_counts_as_good() -> None:
    from ml.monitoring.live import LiveDeployment, decide_rollback

    guarding = ACCURACY.model_copy(update={"auto_rollback": True})
    verdicts = Verdicts([guarding], {guarding.name: "firing"}, {"accuracy": 0.5}, FACTS, T0)
    deployment = LiveDeployment("3", previous="2", since="2026-03-01T11:00:00+00:00")

    def broken(reason: str) -> dict:
        raise ConnectionError("MLflow at http://127.0.0.1:1 refused the connection")

    failed = decide_rollback(verdicts, deployment, {}, broken, wanted=True)
    assert failed.result is None and "automatic rollback of v3 FAILED" in failed.note
    assert "refused the connection" in failed.note
    state: dict = {}
    done = decide_rollback(
        verdicts, deployment, state, lambda reason: {"state": {"stable": "2"}, "audit": {"at": "t9"}}, True
    )
    assert done.result and state["last_good"] == {"version": "2", "at": "t9"}


def test_a_canary_failing_a_guarding_rule_on_its_own_traffic_is_withdrawn() -> None:
    from ml.monitoring.live import LiveDeployment, canary_notices, judge_canary

    settings = load_settings()
    facts = {
        "accuracy_by_version": {
            "2": {"feedback": 200, "accuracy": 0.97},
            "3": {"feedback": 40, "accuracy": 0.4},
        },
        "errors_by_version": {"3": {"requests": 60, "errors": 0, "error_rate": 0.0}},
    }
    withdrawn: list[str] = []

    def withdraw(version: str) -> str:
        withdrawn.append(version)
        return f"v{version} withdrawn from the canary"

    verdict = judge_canary(settings, LiveDeployment("2", canary="3"), facts, withdraw)
    assert withdrawn == ["3"] and verdict.outcomes["model_accuracy_drop"] == "firing"
    assert verdict.outcomes["high_error_rate"] == "ok"
    (notice,) = canary_notices(verdict, settings)
    assert notice.rule == "canary_model_accuracy_drop" and notice.severity == "critical"
    assert "canary v3: accuracy 0.4 < 0.8" in notice.reason and "withdrawn" in notice.reason
    few = {"accuracy_by_version": {"3": {"feedback": 5, "accuracy": 0.0}}}  # too little feedback: no verdict
    assert judge_canary(settings, LiveDeployment("2", canary="3"), few, withdraw).outcomes == {
        "model_accuracy_drop": "unknown",
        "high_error_rate": "unknown",
    }
    assert withdrawn == ["3"]


def test_a_second_firing_check_after_an_automatic_rollback_leaves_the_good_model_serving() -> None:
    """v3 is rolled back to v2; the next check still sees the rule firing (old traffic): v2 stays."""
    from ml.monitoring.live import LiveDeployment, decide_rollback

    guarding = ACCURACY.model_copy(update={"auto_rollback": True})
    verdicts = Verdicts([guarding], {guarding.name: "firing"}, {"accuracy": 0.5}, FACTS, T0)
    state: dict = {}
    calls: list[str] = []

    def rollback(reason: str) -> dict:
        calls.append(reason)
        return {"state": {"stable": "2"}, "audit": {"at": "2026-03-01T12:00:05+00:00"}}

    first = decide_rollback(
        verdicts, LiveDeployment("3", previous="2", since="2026-03-01T11:00:00+00:00"), state, rollback, True
    )
    assert first.result and len(calls) == 1
    restored = LiveDeployment(
        "2", previous="3", since="2026-03-01T12:00:05+00:00"
    )  # the rollback's audit time
    second = decide_rollback(verdicts, restored, state, rollback, True)
    assert second.result is None and len(calls) == 1 and "checked good since its deploy" in second.note


class MetricsPage:
    """A replica's /metrics over real HTTP: BentoML's request counter, as the monitor scrapes it."""

    def __init__(self) -> None:
        import http.server
        import threading

        page = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = page.text().encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:
                pass

        self.counts = {"200": 0, "500": 0}
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def text(self) -> str:
        lines = ["# TYPE bentoml_service_request_total counter"]  # as prometheus_client writes it
        for code, count in self.counts.items():
            lines.append(
                f'bentoml_service_request_total{{endpoint="/predict",http_method="POST",'
                f'http_response_code="{code}"}} {count}'
            )
        return "\n".join(lines) + "\n"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_replica_missing_from_one_scrape_counts_from_its_last_answer_not_from_its_start() -> None:
    from ml.monitoring.live import _measure_endpoint

    settings = load_settings(environ={"MLOPS__SERVING_MONITOR__MIN_REQUESTS": "20"})
    a, b = MetricsPage(), MetricsPage()
    try:
        a.counts, b.counts = {"200": 1000, "500": 0}, {"200": 900, "500": 100}  # b's old 5xx burst

        def check(last: dict | None, urls: list[str]) -> tuple[dict, dict]:
            metrics: dict = {}
            facts: dict = {}
            _measure_endpoint(settings, "2", last, metrics, facts, urls=urls)
            return metrics, facts

        _, facts = check(None, [a.url, b.url])
        dead = f"http://127.0.0.1:{b.server.server_address[1] + 1}"  # b's heartbeat names it, it is not there
        metrics, facts = check(facts["scrape"], [a.url, dead])
        assert metrics["service_up"] == 0.5 and b.url in facts["scrape"]  # kept for the next check
        a.counts["200"] += 200  # new traffic; b answers again with no new error
        b.counts["200"] += 100
        metrics, facts = check(facts["scrape"], [a.url, b.url])
        assert facts["requests"] == {"requests": 300.0, "client_errors": 0.0, "server_errors": 0.0}
        assert metrics["error_rate"] == 0.0
    finally:
        a.close()
        b.close()


def test_a_check_that_fails_after_rolling_back_does_not_roll_back_again_when_retried(tmp_path) -> None:
    from ml.layout import live_check_key
    from ml.monitoring.live import LiveDeployment, check_endpoint
    from ml.storage import LocalStorage

    settings = load_settings(environ={"MLOPS__SERVING_MONITOR__MIN_REQUESTS": "20"})
    storage = LocalStorage(tmp_path / "store")
    page = MetricsPage()
    page.counts = {"200": 50, "500": 50}  # v2 fails half its requests: high_error_rate fires
    rollbacks: list[str] = []

    def rollback(why: str) -> dict:
        rollbacks.append(why)
        return {"state": {"stable": "1"}, "audit": {"at": "2026-03-01T12:00:00+00:00"}, "live": True}

    at = T0 + dt.timedelta(hours=1)
    blocker = storage.root / live_check_key(at).rsplit("/", 1)[0]  # a file where the record's folder goes
    blocker.parent.mkdir(parents=True)
    blocker.write_bytes(b"")
    v2 = LiveDeployment(stable="2", previous="1", since=T0.isoformat())
    try:
        with pytest.raises(OSError):  # the check record cannot be written: the task fails and retries
            check_endpoint(settings, storage, v2, rollback=rollback, now=at, scrape_urls=[page.url])
        assert len(rollbacks) == 1
        blocker.unlink()
        v1 = LiveDeployment(stable="1", previous="2", since=at.isoformat())  # what the rollback left
        retried = check_endpoint(
            settings, storage, v1, rollback=rollback, now=at + dt.timedelta(minutes=5), scrape_urls=[page.url]
        )
    finally:
        page.close()
    assert len(rollbacks) == 1, rollbacks  # the retry found the rollback's state: v1 stays
    assert not retried["rollback"]


def test_a_failing_canary_is_announced_once_per_repeat_and_resolved_once() -> None:
    from ml.monitoring.live import CanaryVerdict, canary_alert_state, canary_notices

    settings = load_settings(environ={"MLOPS__SERVING_MONITOR__REPEAT_HOURS": "24"})
    failing = CanaryVerdict("3", {"accuracy": 0.4, "error_rate": 0.0}, {"model_accuracy_drop": "firing"})
    state: dict = {}
    sent = []
    for hour in range(4):  # automatic rollback off: the canary keeps failing, checked hourly
        at = T0 + dt.timedelta(hours=hour)
        notices = canary_notices(failing, settings, state, at)
        state = canary_alert_state(state, notices, failing, at, {n.rule for n in notices})
        sent += [(n.rule, n.action) for n in notices]
    assert sent == [("canary_model_accuracy_drop", "trigger")]
    later = T0 + dt.timedelta(hours=25)
    again = canary_notices(failing, settings, state, later)
    assert [(n.rule, n.action) for n in again] == [("canary_model_accuracy_drop", "trigger")]  # repeat_hours
    state = canary_alert_state(state, again, failing, later, set())  # not delivered: owed next check
    assert len(canary_notices(failing, settings, state, later + dt.timedelta(hours=1))) == 1

    unknown = CanaryVerdict("3", {"accuracy": None}, {"model_accuracy_drop": "unknown"})  # too little data
    assert canary_notices(unknown, settings, state, later) == []
    gone = CanaryVerdict(None, {}, {})  # withdrawn
    (resolve,) = canary_notices(gone, settings, state, later)
    assert resolve.action == "resolve" and "canary v3 no longer fails" in resolve.reason
    state = canary_alert_state(state, [resolve], gone, later, {resolve.rule})
    assert state == {} and canary_notices(gone, settings, state, later) == []


def test_a_failed_check_pages_and_the_next_good_one_resolves_the_page(tmp_path) -> None:
    from ml.layout import live_check_key
    from ml.release.guard import check_live
    from ml.storage import LocalStorage

    settings = load_settings(environ={"MLOPS__STORAGE__ROOT": str(tmp_path / "store")})
    storage = LocalStorage(tmp_path / "store")
    alerts = []
    at = T0 + dt.timedelta(hours=2)
    blocker = storage.root / live_check_key(at).rsplit("/", 1)[0]  # the check record cannot be written
    blocker.parent.mkdir(parents=True)
    blocker.write_bytes(b"")
    with pytest.raises(OSError):
        check_live(settings, storage, notify=lambda alert: alerts.append(alert) or {}, now=at)
    blocker.unlink()
    check_live(
        settings, storage, notify=lambda alert: alerts.append(alert) or {}, now=at + dt.timedelta(minutes=5)
    )
    check_live(
        settings, storage, notify=lambda alert: alerts.append(alert) or {}, now=at + dt.timedelta(minutes=10)
    )
    paged = [(a.title, a.action, a.key) for a in alerts if a.title == "monitor_check_failed"]
    assert paged == [
        ("monitor_check_failed", "trigger", "monitor_serving/check"),
        ("monitor_check_failed", "resolve", "monitor_serving/check"),  # once: the third check sends nothing
    ]
