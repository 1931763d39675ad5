"""Alert channels that fail for real: Slack and PagerDuty receivers answering 500, or hanging; a mail
relay refusing every message, or never greeting.

The live check finds the endpoint down (a deployed model, no service answering): a critical
``service_down``. Nothing may be lost: a delivery that failed is not recorded as sent, and the
next check delivers it once the channel works; a hanging channel costs its timeout, not the check.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest

from ml.alerts import env_notify
from ml.release.guard import check_live
from ml.serving.state import DeploymentState, write_state
from ml.storage import LocalStorage
from tests.receivers import Receiver, SilentPeer, SmtpReceiver, connect_alerts

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.fault]
T0 = dt.datetime(2026, 10, 1, 12, 0, tzinfo=dt.UTC)
SEND_TIMEOUT = 2  # seconds a hanging channel may cost, per alert (alerts.send_timeout_seconds)


@pytest.fixture
def world(tmp_path: Path, make_settings):
    from ml.http import free_port

    settings = make_settings(
        storage__root=str(tmp_path / "store"),
        serving__state_dir=str(tmp_path / "serving"),
        serving__port=free_port(),  # nothing listens: the endpoint is down
        serving_monitor__scrape_timeout_seconds=2,
        alerts__send_timeout_seconds=SEND_TIMEOUT,
    )
    storage = LocalStorage(tmp_path / "store")
    write_state(storage, DeploymentState(stable="1"))
    return settings, storage


def pages(receiver: Receiver, rule: str) -> list[dict]:
    return [e.json() for e in receiver.on("/v2/enqueue") if e.json()["dedup_key"].endswith(rule)]


def slacks(receiver: Receiver, rule: str) -> list[str]:
    return [m.json()["text"] for m in receiver.on("/slack/") if rule in m.json()["text"]]


def test_an_alert_a_failing_channel_refused_is_delivered_by_the_next_check(world, monkeypatch) -> None:
    settings, storage = world
    with Receiver(fail=True) as failing:
        connect_alerts(monkeypatch, failing.url)
        first = check_live(settings, storage, notify=env_notify(settings), now=T0)
    assert first["rules"]["service_down"]["outcome"] == "firing"
    (attempt,) = [n for n in first["notices"] if n["notice"]["rule"] == "service_down"]
    assert attempt["outcome"]["slack"].startswith("failed") and attempt["outcome"]["pagerduty"].startswith(
        "failed"
    )
    assert slacks(failing, "service_down") and pages(failing, "service_down")  # they were tried

    with Receiver() as working:
        connect_alerts(monkeypatch, working.url)
        check_live(settings, storage, notify=env_notify(settings), now=T0 + dt.timedelta(hours=1))
        check_live(settings, storage, notify=env_notify(settings), now=T0 + dt.timedelta(hours=2))
    assert (
        len(slacks(working, "service_down")) == 1
        and "[CRITICAL] service_down" in slacks(working, "service_down")[0]
    )
    (page,) = pages(working, "service_down")
    assert page["event_action"] == "trigger"  # delivered once, after the outage; not repeated


def test_a_hanging_channel_costs_its_timeout_and_the_alert_still_arrives(world, monkeypatch) -> None:
    settings, storage = world
    with Receiver(hang=30) as stuck:
        connect_alerts(monkeypatch, stuck.url)
        started = time.monotonic()
        first = check_live(settings, storage, notify=env_notify(settings), now=T0)
        took = time.monotonic() - started
    # each of the two channels waited its timeout, and no longer (the receiver holds requests 30 s)
    assert 2 * SEND_TIMEOUT <= took < 2 * SEND_TIMEOUT + 8, f"the check took {took:.1f} s"
    (attempt,) = [n for n in first["notices"] if n["notice"]["rule"] == "service_down"]
    assert all(outcome.startswith("failed") for outcome in attempt["outcome"].values()), attempt
    with Receiver() as working:
        connect_alerts(monkeypatch, working.url)
        check_live(settings, storage, notify=env_notify(settings), now=T0 + dt.timedelta(hours=1))
    assert len(slacks(working, "service_down")) == 1 and len(pages(working, "service_down")) == 1


def test_the_airflow_senders_time_out_on_a_hanging_channel_too(monkeypatch) -> None:
    from mlops_airflow.alerts import send_alert

    from ml.alerts import Alert
    from ml.config import load_settings

    settings = load_settings(environ={"MLOPS__ALERTS__SEND_TIMEOUT_SECONDS": str(SEND_TIMEOUT)})
    alert = Alert("Task failed", "critical", "boom", "ingest_daily", "ingest", "2026-01-06")
    with Receiver(hang=60) as stuck:
        connect_alerts(monkeypatch, stuck.url)
        started = time.monotonic()
        outcomes = send_alert(alert, settings)
        took = time.monotonic() - started
    # the Slack notifier and the PagerDuty hook each gave up after the timeout (the receiver holds 60 s)
    assert 2 * SEND_TIMEOUT <= took < 2 * SEND_TIMEOUT + 8, f"the Airflow senders took {took:.1f} s"
    assert outcomes["slack"].startswith("failed") and outcomes["pagerduty"].startswith("failed")


EMAIL_CHANNELS = '{"warning": ["slack"], "critical": ["slack", "pagerduty", "email"]}'


@pytest.mark.parametrize("path", ["airflow", "cli"])
def test_a_refusing_or_silent_mail_relay_fails_only_the_email_channel(monkeypatch, path: str) -> None:
    from mlops_airflow.alerts import send_alert

    from ml.alerts import Alert
    from ml.config import load_settings

    settings = load_settings(
        environ={
            "MLOPS__ALERTS__SEND_TIMEOUT_SECONDS": str(SEND_TIMEOUT),
            "MLOPS__ALERTS__CHANNELS": EMAIL_CHANNELS,
            "MLOPS__ALERTS__EMAIL_TO": '["oncall@example.com"]',
        }
    )
    alert = Alert("Task failed", "critical", "boom", "ingest_daily", "ingest", "2026-01-06")

    def send() -> dict[str, str]:  # the connections as the environment has them now
        return send_alert(alert, settings) if path == "airflow" else env_notify(settings)(alert)

    with Receiver() as working, SmtpReceiver(refuse=True) as refusing, SilentPeer() as silent:
        connect_alerts(monkeypatch, working.url)
        monkeypatch.setenv("AIRFLOW_CONN_SMTP_ALERTS", refusing.connection())
        refused = send()
        assert refused["email"].startswith("failed: SMTPDataError") and "451" in refused["email"]
        assert refused["slack"] == refused["pagerduty"] == "sent" and not refusing.mails

        monkeypatch.setenv("AIRFLOW_CONN_SMTP_ALERTS", silent_connection(silent.port))
        started = time.monotonic()
        hung = send()
        took = time.monotonic() - started
    # the relay accepted the connection and never greeted: the channel waited its timeout, no longer
    assert SEND_TIMEOUT <= took < SEND_TIMEOUT + 6, f"the silent relay cost {took:.1f} s"
    assert hung["email"].startswith("failed") and hung["slack"] == hung["pagerduty"] == "sent"
    assert len(slacks(working, "Task failed")) == 2


def silent_connection(port: int) -> str:
    import json

    from tests.receivers import PLAIN_SMTP

    return json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": port, "extra": PLAIN_SMTP})
