"""Alert routing through the providers' Slack and PagerDuty integrations to a local receiver, and
email through the SMTP connection to a real local SMTP server."""

from __future__ import annotations

import pytest
from mlops_airflow.alerts import Alert, failure_callback, send_alert

from ml.config import load_settings
from tests.receivers import Receiver, SmtpReceiver
from tests.receivers import connect_alerts as connect

pytestmark = pytest.mark.integration
SETTINGS = load_settings(environ={})
ALERT = Alert(
    title="Task failed",
    severity="warning",
    reason="rejected share 0.9 > 0.2",
    dag_id="ingest_daily",
    task_id="ingest",
    date="2026-01-06",
    link="s3://bucket/reports/data_docs/2026-01-06/index.html",
)


def test_warning_goes_to_slack_only_with_dag_task_date_reason_and_link(monkeypatch, receiver) -> None:
    connect(monkeypatch, receiver.url)
    assert send_alert(ALERT, SETTINGS) == {"slack": "sent"}
    (message,) = receiver.on("/slack/")
    text = message.json()["text"]
    for part in (
        "WARNING",
        "DAG ingest_daily",
        "task ingest",
        "date 2026-01-06",
        "rejected share",
        ALERT.link,
    ):
        assert part in text
    assert not receiver.on("/v2/enqueue")


def test_critical_pages_pagerduty_and_posts_to_slack(monkeypatch, receiver) -> None:
    connect(monkeypatch, receiver.url)
    critical = Alert(**{**ALERT.__dict__, "severity": "critical", "title": "Accuracy below 0.80"})
    assert send_alert(critical, SETTINGS) == {"slack": "sent", "pagerduty": "sent"}
    (event,) = receiver.on("/v2/enqueue")
    body = event.json()
    assert body["routing_key"] == "rk-123" and body["event_action"] == "trigger"
    assert body["payload"]["severity"] == "critical" and "Accuracy below 0.80" in body["payload"]["summary"]
    assert body["payload"]["custom_details"]["reason"] == ALERT.reason


def test_a_failing_or_missing_channel_never_raises(monkeypatch) -> None:
    with Receiver(fail=True) as failing:
        connect(monkeypatch, failing.url)
        critical = Alert(**{**ALERT.__dict__, "severity": "critical"})
        outcomes = send_alert(critical, SETTINGS)
        assert outcomes["slack"].startswith("failed") and outcomes["pagerduty"].startswith("failed")
    monkeypatch.delenv("AIRFLOW_CONN_SLACK_ALERTS")
    monkeypatch.delenv("AIRFLOW_CONN_PAGERDUTY_ALERTS")
    assert send_alert(ALERT, SETTINGS)["slack"].startswith("not configured")


def test_failure_callback_names_the_reason_and_the_report_link(monkeypatch, receiver) -> None:
    connect(monkeypatch, receiver.url)

    class TI:
        dag_id, task_id = "ingest_daily", "ingest"

    error = RuntimeError("ingest 2026-01-06 rejected: too much junk. Data Docs: file:///x/index.html")
    failure_callback({"ti": TI(), "exception": error, "params": {"date": "2026-01-06"}})
    (message,) = receiver.wait_for("/slack/")
    text = message.json()["text"]
    assert "too much junk" in text and "Report: file:///x/index.html" in text and "date 2026-01-06" in text
    failure_callback({})  # even an empty context must not raise


def test_outside_airflow_the_same_connections_reach_the_same_receivers(monkeypatch, receiver) -> None:
    """The CLI's senders read AIRFLOW_CONN_* themselves (ml never imports Airflow): same messages."""
    from ml.alerts import connection_from_env, env_senders, route

    connect(monkeypatch, receiver.url)
    critical = Alert(**{**ALERT.__dict__, "severity": "critical", "title": "Accuracy below 0.80"})
    assert route(critical, SETTINGS, env_senders(SETTINGS)) == {"slack": "sent", "pagerduty": "sent"}
    (message,) = receiver.on("/slack/")
    assert "CRITICAL" in message.json()["text"] and ALERT.link in message.json()["text"]
    (event,) = receiver.on("/v2/enqueue")
    body = event.json()
    assert body["routing_key"] == "rk-123" and body["event_action"] == "trigger"
    assert body["payload"]["custom_details"]["reason"] == ALERT.reason
    assert body["dedup_key"] == critical.dedup_key

    from urllib.parse import quote

    uri = f"slackwebhook://:{quote(receiver.url + '/slack/uri', safe='')}@"  # as Airflow writes a URI
    monkeypatch.setenv("AIRFLOW_CONN_SLACK_ALERTS", uri)
    assert connection_from_env("slack_alerts").password == f"{receiver.url}/slack/uri"
    assert route(ALERT, SETTINGS, env_senders(SETTINGS)) == {"slack": "sent"}
    assert receiver.on("/slack/uri")
    monkeypatch.delenv("AIRFLOW_CONN_SLACK_ALERTS")
    assert route(ALERT, SETTINGS, env_senders(SETTINGS))["slack"].startswith("not configured")
    with Receiver(fail=True) as failing:
        connect(monkeypatch, failing.url)
        assert route(critical, SETTINGS, env_senders(SETTINGS))["pagerduty"].startswith("failed")


def with_email(**alerts: object):
    """The default settings with email among the critical channels."""
    return load_settings(
        environ={
            "MLOPS__ALERTS__CHANNELS": '{"warning": ["slack"], "critical": ["slack", "pagerduty", "email"]}',
            "MLOPS__ALERTS__EMAIL_TO": '["oncall@example.com", "ml-team@example.com"]',
            **{f"MLOPS__ALERTS__{key.upper()}": str(value) for key, value in alerts.items()},
        }
    )


@pytest.mark.parametrize("path", ["airflow", "cli"])
def test_email_reaches_a_real_smtp_server_through_the_same_connection(monkeypatch, receiver, path) -> None:
    from ml.alerts import env_notify

    settings = with_email()
    critical = Alert(**{**ALERT.__dict__, "severity": "critical", "title": "Accuracy below 0.80"})
    with SmtpReceiver() as smtp:
        connect(monkeypatch, receiver.url)
        monkeypatch.setenv("AIRFLOW_CONN_SMTP_ALERTS", smtp.connection())
        outcomes = send_alert(critical, settings) if path == "airflow" else env_notify(settings)(critical)
    assert outcomes == {"slack": "sent", "pagerduty": "sent", "email": "sent"}
    (mail,) = smtp.mails
    assert mail.sender == "mlops@example.com"
    assert mail.recipients == ["oncall@example.com", "ml-team@example.com"]
    assert mail.message["Subject"] == "[CRITICAL] Accuracy below 0.80"
    assert mail.message["X-MLOps-Dedup-Key"] == critical.dedup_key
    body = mail.message.get_content()
    assert "Reason: rejected share 0.9 > 0.2" in body and ALERT.link in body and "DAG ingest_daily" in body


def test_an_email_channel_without_recipients_is_a_config_error() -> None:
    from ml.config import ConfigError

    with pytest.raises(ConfigError, match="alerts.email_to"):
        load_settings(environ={"MLOPS__ALERTS__CHANNELS": '{"warning": ["email"], "critical": ["email"]}'})
