"""What the page's status panel shows: the deployment and its A/B test, the replicas, the live checks,
drift per day.

Everything is read from storage, where deploys, replicas (heartbeats), the serving monitor (one
record per check) and the drift monitor (one summary per day) already write it; the service adds
no state of its own. A record that cannot be read is skipped, so one bad file never blanks the page.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ml.layout import DRIFT_REPORTS_PREFIX, LIVE_CHECKS_PREFIX, drift_report_key
from ml.serving.replica import live_heartbeats
from ml.serving.state import read_state
from ml.storage import Storage, StorageError

CHECKS_SHOWN = 48  # the newest live checks charted (one per monitor run)
DRIFT_DAYS_SHOWN = 30
ALERTS_SHOWN = 20

LinkOf = Callable[[str], str]  # storage key -> a URL a person can open


@dataclass(frozen=True)
class CheckPoint:
    at: str
    stable: str | None
    accuracy: float | None
    p99_latency_ms: float | None
    error_rate: float | None
    drift_score: float | None


@dataclass(frozen=True)
class DriftPoint:
    day: str
    model_version: str
    drift_score: float
    drift_detected: bool
    report: str


@dataclass(frozen=True)
class SentAlert:
    at: str
    rule: str
    severity: str
    action: str  # "trigger" | "resolve"
    reason: str
    delivered: list[str]


@dataclass(frozen=True)
class ServiceStatus:
    deployment: dict[str, Any] | None
    replicas: list[dict[str, Any]]
    checks: list[CheckPoint] = field(default_factory=list)
    drift: list[DriftPoint] = field(default_factory=list)
    alerts: list[SentAlert] = field(default_factory=list)
    links: dict[str, str] = field(default_factory=dict)
    ab: dict[str, Any] | None = None  # the newest check's A/B test of the canary against the stable model

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _json(storage: Storage, key: str) -> dict[str, Any] | None:
    try:
        found = json.loads(storage.read_bytes(key))
    except (StorageError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def newest_keys(storage: Storage, prefix: str, suffix: str, count: int) -> list[str]:
    """The last ``count`` keys under ``prefix`` ending in ``suffix``, oldest first (keys sort by time)."""
    return sorted(key for key in storage.list(prefix) if key.endswith(suffix))[-count:]


def kept(build: Callable[[dict[str, Any]], list[Any]], records: list[dict[str, Any]]) -> list[Any]:
    """What ``build`` makes of each record, skipping a record it cannot read (an odd or older shape)."""
    found = []
    for record in records:
        try:
            found.extend(build(record))
        except (AttributeError, KeyError, TypeError, ValueError):
            continue
    return found


def ab_summary(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The newest A/B verdict a check recorded (control, challenger, verdict, reason, when)."""
    for record in reversed(records):
        ab = record.get("ab")
        if isinstance(ab, dict) and "verdict" in ab:
            return {
                "at": str(record.get("at", "")),
                "control": str((ab.get("control") or {}).get("version", "")),
                "challenger": str((ab.get("challenger") or {}).get("version", "")),
                "verdict": str(ab["verdict"]),
                "reason": str(ab.get("reason", "")),
            }
    return None


def check_point(record: dict[str, Any]) -> CheckPoint:
    metrics = record.get("metrics") or {}
    return CheckPoint(
        at=str(record.get("at", "")),
        stable=(record.get("deployment") or {}).get("stable"),
        accuracy=_number(metrics.get("accuracy")),
        p99_latency_ms=_number(metrics.get("p99_latency_ms")),
        error_rate=_number(metrics.get("error_rate")),
        drift_score=_number(metrics.get("drift_score")),
    )


def sent_alerts(record: dict[str, Any]) -> list[SentAlert]:
    """The notices one check sent, with the channels that took each."""
    found = []
    for item in record.get("notices") or []:
        notice, outcome = item.get("notice") or {}, item.get("outcome") or {}
        delivered = sorted(channel for channel, result in outcome.items() if str(result).startswith("sent"))
        found.append(
            SentAlert(
                at=str(record.get("at", "")),
                rule=str(notice.get("rule", "")),
                severity=str(notice.get("severity", "")),
                action=str(notice.get("action", "")),
                reason=str(notice.get("reason", "")),
                delivered=delivered,
            )
        )
    return found


def drift_point(summary: dict[str, Any], link_of: LinkOf) -> DriftPoint:
    day = str(summary.get("day", ""))
    return DriftPoint(
        day=day,
        model_version=str(summary.get("model_version", "")),
        drift_score=float(summary.get("drift_score", 0.0)),
        drift_detected=bool(summary.get("drift_detected", False)),
        report=link_of(drift_report_key(day)) if summary.get("report") else "",
    )


def service_status(
    storage: Storage, heartbeat_max_age: float, link_of: LinkOf, now: dt.datetime | None = None
) -> ServiceStatus:
    """The status panel's data, read from storage now."""
    state = read_state(storage)
    beats = live_heartbeats(storage, heartbeat_max_age, now)
    replicas = [
        {"replica": b.replica, "worker": b.worker, "stable": b.stable, "canary": b.canary, "at": b.at}
        for b in beats
    ]
    records = [
        r
        for r in (_json(storage, k) for k in newest_keys(storage, LIVE_CHECKS_PREFIX, ".json", CHECKS_SHOWN))
        if r
    ]
    summaries = [
        s
        for s in (
            _json(storage, k)
            for k in newest_keys(storage, DRIFT_REPORTS_PREFIX, "/summary.json", DRIFT_DAYS_SHOWN)
        )
        if s
    ]
    drift = kept(lambda summary: [drift_point(summary, link_of)], summaries)
    alerts = kept(sent_alerts, records)[-ALERTS_SHOWN:]
    links = {"latest_drift_report": drift[-1].report} if drift and drift[-1].report else {}
    deployment = None
    if state is not None:
        deployment = {
            "stable": state.stable,
            "canary": state.canary,
            "canary_share": state.canary_share,
            "shadow": state.shadow,
            "previous": state.previous,
            "revision": state.revision,
            "updated_at": state.updated_at,
            "updated_by": state.updated_by,
        }
    checks = kept(lambda record: [check_point(record)], records)
    return ServiceStatus(deployment, replicas, checks, drift, alerts, links, ab_summary(records))
