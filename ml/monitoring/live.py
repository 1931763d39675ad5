"""Live monitoring of the prediction endpoint: measure, judge the alert rules, alert once, roll back.

A check (hourly ``monitor_serving``, or ``mlops monitor``) judges what happened since the
previous check, at most ``serving_monitor.lookback_minutes`` back:

- ``/metrics``: requests and 5xx answers on the served endpoints (counter deltas since the last
  scrape; a restarted service starts its counters again);
- the prediction log: p50/p99 latency and throughput;
- the feedback log joined to the predictions on ``request_id``: live accuracy of the stable model;
- the stable model's served traffic against its training reference (Evidently, as ``drift``).

Every rule in ``alerts.rules`` is then ``firing``, ``ok`` or ``unknown`` (too little data to
judge). A rule that starts firing is sent once (again only after ``repeat_hours``); one that
stops firing is sent as resolved. A rule marked ``auto_rollback`` that fires for a stable model
with no good check since it was deployed (every such rule measured and passing) returns the
endpoint to the previous champion through the injected ``rollback`` (release owns the deploy
state; ``ml.release.guard`` wires the two), and the alert says so. State and each check's
record live in storage under ``monitoring/serving/``.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ml.alerts import Notice, judge
from ml.config import AlertRule, Settings
from ml.http import http
from ml.layout import (
    FEEDBACK_PREFIX,
    LIVE_MONITOR_STATE_KEY,
    PREDICTIONS_PREFIX,
    SERVING_DRIFT_REPORTS_PREFIX,
    live_check_key,
)
from ml.monitoring.logs import iso, log_records, parse_time
from ml.storage import Storage, update_json

SERVED_ENDPOINTS = ("/predict", "/predict_batch", "/feedback")

NotifyNotice = Callable[[Notice], dict[str, str]]
RollBack = Callable[[str], dict[str, Any]]  # reason -> the rollback's result (its new state, live or not)
Withdraw = Callable[[str], str]  # canary version -> what was done


@dataclass(frozen=True)
class LiveDeployment:
    """What the endpoint is meant to serve, as the deployment state and its audit say."""

    stable: str | None
    canary: str | None = None
    previous: str | None = None
    since: str = ""  # when ``stable`` last became the stable model


# ---------------------------------------------------------------- measuring


def scrape(url: str, timeout: float, ca_file: str | None = None, key: str = "") -> dict[str, float]:
    """Requests, 4xx and 5xx answers on the served endpoints, from BentoML's request counter.

    ``/metrics`` is open to loopback only; from elsewhere ``key`` must have the admin role.
    """
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    status, body = http("GET", f"{url}/metrics", timeout=timeout, ca_file=ca_file, headers=headers)
    if status != 200:
        raise OSError(f"{url}/metrics answered {status}")
    counters = {"requests": 0.0, "client_errors": 0.0, "server_errors": 0.0}
    for family in text_string_to_metric_families(body.decode()):
        if family.name != "bentoml_service_request":
            continue
        for sample in family.samples:
            if not sample.name.endswith("_total") or sample.labels.get("endpoint") not in SERVED_ENDPOINTS:
                continue
            code = int(sample.labels.get("http_response_code") or 0)
            counters["requests"] += sample.value
            if code >= 500:
                counters["server_errors"] += sample.value
            elif code >= 400:
                counters["client_errors"] += sample.value
    return counters


def counter_delta(now: dict[str, float], before: dict[str, float] | None) -> dict[str, float]:
    """Counts since the previous scrape; everything when there was none or the service restarted."""
    if before is None or any(now[key] < before.get(key, 0.0) for key in now):
        return dict(now)
    return {key: now[key] - before.get(key, 0.0) for key in now}


def live_accuracy(
    predictions: list[dict[str, Any]], feedback: list[dict[str, Any]]
) -> dict[str, dict[str, float | int]]:
    """Per model version: labelled predictions and the share predicted right.

    Only labels bound to their prediction count (the service checked that the key that asked
    for the prediction gave the label, once); an unbound record is ignored.
    """
    labels = {record["request_id"]: record["label"] for record in feedback if record.get("bound") is True}
    by_version: dict[str, list[bool]] = {}
    for record in predictions:
        if record["request_id"] in labels:
            correct = record["predicted_class"] == labels[record["request_id"]]
            by_version.setdefault(str(record["model_version"]), []).append(correct)
    return {
        version: {"feedback": len(hits), "accuracy": round(float(np.mean(hits)), 4)}
        for version, hits in by_version.items()
    }


def errors_by_version(records: list[dict[str, Any]]) -> dict[str, dict[str, float | int]]:
    """Per model version: requests it answered or failed, and the share that failed (5xx)."""
    counts: dict[str, list[int]] = {}
    for record in records:
        tally = counts.setdefault(str(record.get("model_version")), [0, 0])
        tally[0] += 1
        tally[1] += int(int(record.get("status") or 200) >= 500)
    return {
        version: {"requests": total, "errors": failed, "error_rate": round(failed / total, 4)}
        for version, (total, failed) in counts.items()
    }


def served_drift(
    settings: Settings, storage: Storage, records: list[dict[str, Any]], version: str, at: dt.datetime
) -> dict[str, Any]:
    """Drift of model ``version``'s served traffic against its training reference; writes the report."""
    import pandas as pd

    from ml.monitoring.drift import compare, drift_verdict, load_reference, prediction_kl, write_report
    from ml.training.reference import PROPERTY_COLUMNS

    reference = load_reference(settings, version)
    frame = pd.DataFrame(records)
    embedding = [c for c in reference.frame.columns if c.startswith("embedding_pc") and c in frame]
    current = frame[[*PROPERTY_COLUMNS, *embedding]].astype(float)
    current["predicted_class"] = frame["predicted_class"].astype(str)
    current["confidence"] = frame["confidence"].astype(float)
    snapshot, columns = compare(current, reference, settings.monitoring)
    kl = prediction_kl(current["predicted_class"], reference.frame["predicted_class"], reference.classes)
    score, _, _, _, reasons = drift_verdict(columns, kl, settings.monitoring)
    stamp = at.strftime("%Y-%m-%dT%H%M%SZ")
    report, _, _ = write_report(storage, stamp, snapshot, prefix=SERVING_DRIFT_REPORTS_PREFIX)
    drifted = [c.column for c in columns if c.drifted]
    return {
        "drift_score": round(score, 4),
        "prediction_kl": round(kl, 4),
        "drifted_columns": drifted,
        "reasons": reasons,
        "report": report,
        "rows": len(current),
    }


METRICS = (
    "service_up",
    "error_rate",
    "p99_latency_ms",
    "p50_latency_ms",
    "throughput_rps",
    "accuracy",
    "drift_score",
)


def _scrape_all(
    urls: list[str], timeout: float, ca_file: str | None, key: str
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Counters of every replica that answered, and why each other one did not."""
    scraped, errors = {}, {}
    for url in urls:
        try:
            scraped[url] = scrape(url, timeout, ca_file, key)
        except OSError as exc:
            errors[url] = f"{type(exc).__name__}: {exc}"
    return scraped, errors


def _measure_endpoint(
    settings: Settings,
    stable: str | None,
    last_scrape: dict[str, Any] | None,
    metrics: dict[str, float | None],
    facts: dict[str, Any],
    scrape_key: str = "",
    urls: list[str] | None = None,
) -> None:
    """The share of replicas that answer, and their 5xx share since the last scrape (summed).

    ``urls``: every live replica (from their heartbeats); default the configured endpoint.
    """
    watch, serving = settings.serving_monitor, settings.serving
    targets = urls or [serving.live_url]
    scraped, errors = _scrape_all(targets, watch.scrape_timeout_seconds, serving.ca_file, scrape_key)
    if errors:
        facts["scrape_error"] = "; ".join(f"{url}: {why}" for url, why in errors.items())
    if not scraped:
        metrics["service_up"] = 0.0 if stable else None  # nothing deployed: nothing should answer
        return
    metrics["service_up"] = round(len(scraped) / len(targets), 4)
    before = last_scrape if isinstance(last_scrape, dict) and "requests" not in last_scrape else {}
    # what the next check compares with: a replica that did not answer keeps its last counters, so its
    # next answer counts from there (not everything since it started: an old 5xx burst would page again)
    facts["scrape"] = {**(before or {}), **scraped}
    deltas = [counter_delta(counters, (before or {}).get(url)) for url, counters in scraped.items()]
    delta = {key: sum(d[key] for d in deltas) for key in deltas[0]}
    facts["requests"] = delta
    if delta["requests"] >= watch.min_requests:
        metrics["error_rate"] = round(delta["server_errors"] / delta["requests"], 4)


def _measure_logs(
    settings: Settings,
    storage: Storage,
    stable: str | None,
    window: tuple[dt.datetime, dt.datetime],
    metrics: dict[str, float | None],
    facts: dict[str, Any],
) -> None:
    """Latency, throughput, live accuracy and served drift from the prediction and feedback logs."""
    watch, (start, end) = settings.serving_monitor, window
    # a label can come long after its prediction: predictions are read a day further back for the join
    labelled = log_records(storage, PREDICTIONS_PREFIX, start - dt.timedelta(days=1), end)
    predictions = [r for r in labelled if parse_time(r["time"]) > start]
    answered = [r for r in predictions if "predicted_class" in r]
    latencies = np.array([float(r["latency_ms"]) for r in answered])
    facts["predictions"] = len(answered)
    metrics["throughput_rps"] = round(len(answered) / max((end - start).total_seconds(), 1.0), 3)
    if len(latencies) >= watch.min_requests:
        metrics["p99_latency_ms"] = round(float(np.percentile(latencies, 99)), 1)
        metrics["p50_latency_ms"] = round(float(np.percentile(latencies, 50)), 1)
    feedback = log_records(storage, FEEDBACK_PREFIX, start, end)
    facts["feedback"] = len(feedback)
    facts["accuracy_by_version"] = live_accuracy(labelled, feedback)
    judged = facts["accuracy_by_version"].get(str(stable), {})
    if judged.get("feedback", 0) >= watch.min_feedback:
        metrics["accuracy"] = judged["accuracy"]
    facts["errors_by_version"] = errors_by_version(predictions)
    served = [r for r in predictions if str(r["model_version"]) == str(stable) and "predicted_class" in r]
    if stable and len(served) >= watch.min_drift_rows:
        try:
            facts["drift"] = served_drift(settings, storage, served, str(stable), end)
            metrics["drift_score"] = facts["drift"]["drift_score"]
        except Exception as exc:  # noqa: BLE001 - MLflow down or a missing reference: drift unknown, the rest judged
            facts["drift_error"] = f"{type(exc).__name__}: {exc}"


def measure_window(
    settings: Settings,
    storage: Storage,
    stable: str | None,
    start: dt.datetime,
    end: dt.datetime,
    last_scrape: dict[str, Any] | None,
    scrape_key: str = "",
    urls: list[str] | None = None,
) -> tuple[dict[str, float | None], dict[str, Any]]:
    """(metric -> value or None when too little data, facts behind them) for the window."""
    metrics: dict[str, float | None] = dict.fromkeys(METRICS)
    facts: dict[str, Any] = {"window": [iso(start), iso(end)], "model_version": stable}
    _measure_endpoint(settings, stable, last_scrape, metrics, facts, scrape_key, urls)
    _measure_logs(settings, storage, stable, (start, end), metrics, facts)
    return metrics, facts


# ---------------------------------------------------------------- judging and acting


def describe(rule: AlertRule, value: float, facts: dict[str, Any]) -> str:
    """One line: the measured value against the rule, and what it was measured on."""
    version = facts.get("model_version")
    if rule.metric == "accuracy":
        basis = f"{facts['accuracy_by_version'][str(version)]['feedback']} labelled predictions of v{version}"
    elif rule.metric == "drift_score":
        drift = facts["drift"]
        columns = ", ".join(drift["drifted_columns"]) or "no column"
        basis = f"{drift['rows']} served images of v{version}; drifted: {columns}; report {drift['report']}"
    elif rule.metric == "error_rate":
        basis = (
            f"{facts['requests']['server_errors']:.0f} 5xx of {facts['requests']['requests']:.0f} requests"
        )
    elif rule.metric == "service_up":
        basis = facts.get("scrape_error", "/metrics answered")
    else:
        basis = f"{facts['predictions']} predictions"
    window = " to ".join(facts["window"])
    return f"{rule.metric} {value:g} {rule.op} {rule.threshold:g} ({basis}; {window})"


def proven_good(state: dict[str, Any], version: str | None, since: str) -> bool:
    """Has ``version`` passed a check (every auto-rollback rule measured ok) since ``since``?"""
    good = state.get("last_good") or {}
    return bool(version) and good.get("version") == str(version) and good.get("at", "") >= since


def read_monitor_state(storage: Storage) -> dict[str, Any]:
    return (
        json.loads(storage.read_bytes(LIVE_MONITOR_STATE_KEY))
        if storage.exists(LIVE_MONITOR_STATE_KEY)
        else {}
    )


@dataclass(frozen=True)
class Verdicts:
    """One check's measurements and what every rule made of them."""

    rules: list[AlertRule]
    outcomes: dict[str, str]  # rule name -> firing | ok | unknown
    metrics: dict[str, float | None]
    facts: dict[str, Any]
    at: dt.datetime

    def describe(self, rule: AlertRule) -> str:
        return describe(rule, self.metrics[rule.metric], self.facts)  # type: ignore[arg-type]


@dataclass(frozen=True)
class RollbackDecision:
    """The rules that asked for a rollback, what was done about it, and the rollback's result."""

    triggers: list[AlertRule]
    note: str = ""
    result: dict[str, Any] | None = None


def decide_rollback(
    verdicts: Verdicts,
    deployment: LiveDeployment,
    state: dict[str, Any],
    rollback: RollBack | None,
    wanted: bool,
) -> RollbackDecision:
    """Roll back a stable model that is not yet proven good when a guarding rule fires."""
    stable = deployment.stable
    triggers = [
        rule for rule in verdicts.rules if rule.auto_rollback and verdicts.outcomes[rule.name] == "firing"
    ]
    if not (triggers and stable):
        return RollbackDecision(triggers)
    if proven_good(state, stable, deployment.since):
        return RollbackDecision(triggers, f"no automatic rollback: v{stable} checked good since its deploy")
    if not wanted or rollback is None:
        return RollbackDecision(triggers, "automatic rollback is off")
    if not deployment.previous:
        return RollbackDecision(
            triggers, f"no automatic rollback: v{stable} has no previous version to return to"
        )
    why = "; ".join(f"{rule.name}: {verdicts.describe(rule)}" for rule in triggers)
    try:
        rolled = rollback(why)
    except Exception as exc:  # noqa: BLE001 - a failed rollback is reported in the critical notice, not lost
        return RollbackDecision(
            triggers, f"automatic rollback of v{stable} FAILED: {type(exc).__name__}: {exc}"
        )
    note = (
        f"ROLLED BACK automatically: the live endpoint serves v{rolled['state']['stable']} again "
        f"(was v{stable}, deployed {deployment.since})"
    )
    # the version returned to is the one that served well before: the next check must not remove it
    state["last_good"] = {"version": rolled["state"]["stable"], "at": rolled["audit"]["at"]}
    return RollbackDecision(triggers, note, rolled)


@dataclass(frozen=True)
class CanaryVerdict:
    """The canary judged on its own traffic by the rules that guard the stable model."""

    version: str | None
    metrics: dict[str, float | None]
    outcomes: dict[str, str]
    withdrawn: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def judge_canary(
    settings: Settings, deployment: LiveDeployment, facts: dict[str, Any], withdraw: Withdraw | None
) -> CanaryVerdict:
    """Live accuracy and error rate of the canary alone; a guarding rule firing withdraws it."""
    canary, watch = deployment.canary, settings.serving_monitor
    if not canary:
        return CanaryVerdict(None, {}, {})
    labelled = facts.get("accuracy_by_version", {}).get(str(canary), {})
    answered = facts.get("errors_by_version", {}).get(str(canary), {})
    metrics: dict[str, float | None] = {
        "accuracy": labelled["accuracy"] if labelled.get("feedback", 0) >= watch.min_feedback else None,
        "error_rate": answered["error_rate"] if answered.get("requests", 0) >= watch.min_requests else None,
    }
    guarding = [rule for rule in settings.alerts.rules if rule.auto_rollback and rule.metric in metrics]
    outcomes = {rule.name: judge(rule, metrics[rule.metric]) for rule in guarding}
    firing = [rule for rule in guarding if outcomes[rule.name] == "firing"]
    if not firing or withdraw is None:
        return CanaryVerdict(canary, metrics, outcomes)
    try:
        withdrawn = withdraw(str(canary))
    except Exception as exc:  # noqa: BLE001 - reported in the notice
        withdrawn = f"withdrawal of canary v{canary} FAILED: {type(exc).__name__}: {exc}"
    return CanaryVerdict(canary, metrics, outcomes, withdrawn)


def canary_notices(
    verdict: CanaryVerdict,
    settings: Settings,
    alerts: dict[str, dict[str, Any]] | None = None,
    at: dt.datetime | None = None,
) -> list[Notice]:
    """A notice per guarding rule the canary fails, saying what was done: once, then again after
    ``repeat_hours`` (``alerts``: what was sent, ``canary_alert_state``); a resolve once it no longer
    fails (it passes, or it was withdrawn), so its incident closes and the next canary's opens anew."""
    alerts, at = alerts or {}, at or dt.datetime.now(dt.UTC)
    repeat = dt.timedelta(hours=settings.serving_monitor.repeat_hours)
    notices = []
    for rule in settings.alerts.rules:
        name, before = f"canary_{rule.name}", alerts.get(f"canary_{rule.name}", {})
        if verdict.outcomes.get(rule.name) == "firing":
            last = before.get("last_sent")
            same = before.get("version") == verdict.version and last is not None
            if same and not (repeat and at - parse_time(last) >= repeat):
                continue
            value = verdict.metrics[rule.metric]
            reason = (
                f"canary v{verdict.version}: {rule.metric} {value:g} {rule.op} {rule.threshold:g} on its own "
                f"traffic. {verdict.withdrawn or 'not withdrawn (automatic rollback is off)'}"
            )
            notices.append(Notice(name, rule.severity, "trigger", reason, {"value": value}))
        elif before and (verdict.version != before.get("version") or verdict.outcomes.get(rule.name) == "ok"):
            now_serving = f"canary v{verdict.version}" if verdict.version else "no canary"
            reason = f"resolved: canary v{before.get('version')} no longer fails {rule.name} ({now_serving})"
            notices.append(Notice(name, rule.severity, "resolve", reason, {}))
    return notices


def canary_alert_state(
    alerts: dict[str, dict[str, Any]],
    notices: list[Notice],
    verdict: CanaryVerdict,
    at: dt.datetime,
    reached: set[str],
) -> dict[str, dict[str, Any]]:
    """What the next check's ``canary_notices`` needs: each canary rule's last delivered trigger."""
    updated = dict(alerts)
    for notice in notices:
        if notice.rule not in reached:
            continue  # not delivered: sent again next check
        if notice.action == "trigger":
            updated[notice.rule] = {"version": verdict.version, "last_sent": iso(at)}
        else:
            updated.pop(notice.rule, None)
    return updated


def ab_of_canary(
    settings: Settings, storage: Storage, deployment: LiveDeployment, end: dt.datetime
) -> dict[str, Any] | None:
    """The A/B report of the canary against the stable model over ``ab.window_hours`` (None: no canary)."""
    from ml.monitoring.ab import measure_ab

    if not (deployment.canary and deployment.stable):
        return None
    start = end - dt.timedelta(hours=settings.ab.window_hours)
    try:
        return measure_ab(settings, storage, deployment.stable, deployment.canary, start, end).to_dict()
    except Exception as exc:  # noqa: BLE001 - a report that fails never stops the check
        return {"error": f"{type(exc).__name__}: {exc}"}


def delivered(outcome: dict[str, str]) -> bool:
    """A notice reached every configured channel (a channel that failed is retried next check)."""
    return not any(str(result).startswith("failed") for result in outcome.values())


def check_endpoint(
    settings: Settings,
    storage: Storage,
    deployment: LiveDeployment,
    *,
    notify: NotifyNotice | None = None,
    rollback: RollBack | None = None,
    withdraw: Withdraw | None = None,
    allow_rollback: bool | None = None,
    now: dt.datetime | None = None,
    run_id: str = "",
    scrape_key: str = "",
    scrape_urls: list[str] | None = None,
) -> dict[str, Any]:
    """One monitoring check: measure, judge every rule, notify changes, roll back or withdraw if it must."""
    end = now or dt.datetime.now(dt.UTC)
    state = read_monitor_state(storage)
    lookback = end - dt.timedelta(minutes=settings.serving_monitor.lookback_minutes)
    start = max(parse_time(state["last_check_at"]), lookback) if state.get("last_check_at") else lookback
    stable = deployment.stable
    metrics, facts = measure_window(
        settings, storage, stable, start, end, state.get("last_scrape"), scrape_key, scrape_urls
    )
    rules = settings.alerts.rules
    verdicts = Verdicts(rules, {r.name: judge(r, metrics.get(r.metric)) for r in rules}, metrics, facts, end)
    guarding = [rule for rule in rules if rule.auto_rollback]
    if stable and guarding and all(verdicts.outcomes[rule.name] == "ok" for rule in guarding):
        state["last_good"] = {"version": stable, "at": iso(end)}
    wanted = settings.serving_monitor.auto_rollback if allow_rollback is None else allow_rollback
    decision = decide_rollback(verdicts, deployment, state, rollback, wanted)
    if decision.result:  # kept at once: a retry of a check that fails after this must not roll back again
        rolled = {**state, "last_check_at": iso(end)}
        if "scrape" in facts:
            rolled["last_scrape"] = facts["scrape"]
        save_monitor_state(storage, rolled)
    canary = judge_canary(settings, deployment, facts, withdraw if wanted and not decision.result else None)
    notices = plan_notices(verdicts, state.get("alerts", {}), settings.serving_monitor.repeat_hours, decision)
    planned_canary = canary_notices(canary, settings, state.get("canary_alerts"), end)
    notices += planned_canary
    sent = [
        {"notice": asdict(n), "outcome": notify(n) if notify else {"log": "no channels"}} for n in notices
    ]
    reached = {item["notice"]["rule"] for item in sent if delivered(item["outcome"])}
    state["alerts"] = next_alert_state(verdicts, state.get("alerts", {}), notices, stable, reached)
    state["canary_alerts"] = canary_alert_state(
        state.get("canary_alerts", {}), planned_canary, canary, end, reached
    )
    state["last_check_at"] = iso(end)
    if "scrape" in facts:
        state["last_scrape"] = facts["scrape"]
    record = check_record(verdicts, deployment, run_id, sent, decision) | {"canary": canary.to_dict()}
    record["ab"] = ab_of_canary(settings, storage, deployment, end)
    key = live_check_key(end)
    storage.write_bytes(key, json.dumps(record, indent=2, default=str).encode())
    save_monitor_state(storage, state)
    return record | {"record": storage.url(key)}


def save_monitor_state(storage: Storage, state: dict[str, Any]) -> None:
    """Write this check's state compare-and-swap; an older check never overwrites a newer one's."""

    def newer(current: dict[str, Any] | None) -> dict[str, Any]:
        if current and current.get("last_check_at", "") > state["last_check_at"]:
            return current
        return state

    update_json(storage, LIVE_MONITOR_STATE_KEY, newer)


def check_record(
    verdicts: Verdicts,
    deployment: LiveDeployment,
    run_id: str,
    sent: list[dict[str, Any]],
    decision: RollbackDecision,
) -> dict[str, Any]:
    """What one check stores: the deployment, every metric and rule verdict, the notices, a rollback."""
    rolled = decision.result
    return {
        "at": iso(verdicts.at),
        "run_id": run_id,
        "deployment": {"stable": deployment.stable, "canary": deployment.canary, "since": deployment.since},
        "metrics": verdicts.metrics,
        "rules": {
            rule.name: {
                "outcome": verdicts.outcomes[rule.name],
                "value": verdicts.metrics.get(rule.metric),
                "rule": f"{rule.metric} {rule.op} {rule.threshold:g}",
                "severity": rule.severity,
            }
            for rule in verdicts.rules
        },
        "facts": verdicts.facts,
        "notices": sent,
        "rollback": rolled
        and {"from": deployment.stable, "to": rolled["state"]["stable"], "live": rolled["live"]},
    }


def rule_lines(record: dict[str, Any]) -> list[str]:
    """One line per rule of a check record, for a task log."""
    return [
        f"{name:<24} {rule['outcome']:<8} {rule['value']!s:>10}  ({rule['rule']})"
        for name, rule in record["rules"].items()
    ]


def plan_notices(
    verdicts: Verdicts, alerts: dict[str, dict[str, Any]], repeat_hours: float, decision: RollbackDecision
) -> list[Notice]:
    """New firing rules, repeats past ``repeat_hours``, undelivered ones again, resolutions, rollbacks."""
    repeat = dt.timedelta(hours=repeat_hours)
    notices = []
    for rule in verdicts.rules:
        outcome, before = verdicts.outcomes[rule.name], alerts.get(rule.name, {})
        value = verdicts.metrics.get(rule.metric)
        if outcome == "firing":
            last = before.get("last_sent")
            stale = bool(repeat) and last is not None and verdicts.at - parse_time(last) >= repeat
            triggered = rule in decision.triggers
            again = stale or before.get("undelivered") or (decision.result and triggered)
            if before.get("firing") and not again:
                continue
            reason = verdicts.describe(rule)
            if triggered and decision.note:
                reason = f"{reason}. {decision.note}"
            if before.get("firing") and not before.get("undelivered"):
                reason = f"still firing since {before.get('since')}: {reason}"
            notices.append(Notice(rule.name, rule.severity, "trigger", reason, {"value": value}))
        elif outcome == "ok" and before.get("firing"):
            reason = f"resolved: {verdicts.describe(rule)}; firing since {before.get('since')}"
            notices.append(Notice(rule.name, rule.severity, "resolve", reason, {"value": value}))
    return notices


def next_alert_state(
    verdicts: Verdicts,
    alerts: dict[str, dict[str, Any]],
    notices: list[Notice],
    stable: str | None,
    reached: set[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Each rule's alert state after this check; a notice that did not reach its channels stays owed."""
    planned = {notice.rule: notice.action for notice in notices}
    reached = set(planned) if reached is None else reached
    now = verdicts.at
    updated = {}
    for rule in verdicts.rules:
        before, outcome = dict(alerts.get(rule.name, {})), verdicts.outcomes[rule.name]
        if outcome == "firing":
            sent = planned.get(rule.name) == "trigger" and rule.name in reached
            owed = planned.get(rule.name) == "trigger" and rule.name not in reached
            updated[rule.name] = {
                "firing": True,
                "since": before.get("since") if before.get("firing") else iso(now),
                "last_sent": iso(now) if sent else before.get("last_sent"),
                "undelivered": owed or (bool(before.get("undelivered")) and not sent),
                "value": verdicts.metrics.get(rule.metric),
                "model_version": stable,
            }
        elif outcome == "ok" and planned.get(rule.name) == "resolve" and rule.name not in reached:
            updated[rule.name] = before  # the resolution did not get through: send it again next time
        elif outcome == "ok":
            updated[rule.name] = {
                "firing": False,
                "value": verdicts.metrics.get(rule.metric),
                "resolved_at": iso(now),
            }
        else:
            updated[rule.name] = before  # too little data: keep what we knew
    return updated
