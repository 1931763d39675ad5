"""The page's status panel reads what deploys, replicas and monitors wrote, and skips what it cannot read."""

from __future__ import annotations

import datetime as dt
import json

from ml.layout import drift_summary_key, live_check_key
from ml.serving.replica import Heartbeat, write_heartbeat
from ml.serving.state import DeploymentState, write_state
from ml.serving.status import service_status
from ml.storage import LocalStorage

NOW = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.UTC)


def beat(replica: str, at: dt.datetime) -> Heartbeat:
    return Heartbeat(replica, 0, "http://x", 3, "2", "3", 0.1, None, "b", "", 3, at.isoformat())


def check(at: dt.datetime, accuracy: float | None, p99: float) -> dict:
    notice = {"rule": "model_accuracy_drop", "severity": "critical", "action": "trigger", "reason": "acc 0.5"}
    return {
        "at": at.isoformat(),
        "deployment": {"stable": "2", "canary": "3"},
        "metrics": {"accuracy": accuracy, "p99_latency_ms": p99, "error_rate": 0.0, "drift_score": None},
        "notices": [{"notice": notice, "outcome": {"slack": "sent", "pagerduty": "failed: 500"}}],
        "ab": {
            "control": {"version": "2"},
            "challenger": {"version": "3"},
            "verdict": "keep",
            "reason": f"at {at.isoformat()}",
        },
    }


def test_status_reads_deployment_replicas_checks_drift_and_alerts(tmp_path) -> None:
    storage = LocalStorage(tmp_path)
    write_state(storage, DeploymentState(stable="2", canary="3", canary_share=0.1, revision=4))
    write_heartbeat(storage, beat("live", NOW - dt.timedelta(seconds=3)))
    write_heartbeat(storage, beat("gone", NOW - dt.timedelta(minutes=5)))
    for minutes, accuracy in ((20, 0.9), (10, None)):
        at = NOW - dt.timedelta(minutes=minutes)
        storage.write_bytes(live_check_key(at), json.dumps(check(at, accuracy, 40.0 + minutes)).encode())
    storage.write_bytes(live_check_key(NOW), b"{half a file")
    bad = {"day": "2026-12-01", "drift_score": None, "report": "x"}  # an odd summary skips itself only
    storage.write_bytes(drift_summary_key("2026-12-01"), json.dumps(bad).encode())
    for day, score in (("2026-12-02", 0.05), ("2026-12-03", 0.4)):
        summary = {"day": day, "model_version": "2", "drift_score": score, "drift_detected": score > 0.1}
        storage.write_bytes(
            drift_summary_key(day), json.dumps(summary | {"report": f"file:///x/{day}.html"}).encode()
        )

    status = service_status(storage, 15.0, lambda key: f"https://reports.example/{key}", now=NOW)

    assert status.deployment["stable"] == "2" and status.deployment["canary_share"] == 0.1
    assert [r["replica"] for r in status.replicas] == ["live"]  # the stale heartbeat is a replica gone
    assert [(c.accuracy, c.p99_latency_ms) for c in status.checks] == [(0.9, 60.0), (None, 50.0)]
    assert [(d.day, d.drift_detected) for d in status.drift] == [("2026-12-02", False), ("2026-12-03", True)]
    assert status.drift[-1].report == "https://reports.example/reports/drift/2026-12-03/report.html"
    assert [(a.rule, a.delivered) for a in status.alerts] == [("model_accuracy_drop", ["slack"])] * 2
    assert status.links == {"latest_drift_report": status.drift[-1].report}
    newest = (NOW - dt.timedelta(minutes=10)).isoformat()
    assert status.ab == {
        "at": newest,
        "control": "2",
        "challenger": "3",
        "verdict": "keep",
        "reason": f"at {newest}",
    }


def test_status_of_an_empty_store_is_empty(tmp_path) -> None:
    status = service_status(LocalStorage(tmp_path), 15.0, str, now=NOW)
    assert status.to_dict() == {
        "deployment": None,
        "replicas": [],
        "checks": [],
        "drift": [],
        "alerts": [],
        "links": {},
        "ab": None,
    }
