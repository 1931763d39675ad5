"""Alert routing: severity -> channels, through the providers' Slack and PagerDuty integrations.

Warnings go to Slack (webhook connection), critical alerts to Slack and PagerDuty (events
connection); the mapping lives in the config (``alerts.channels``). Connections come from the
environment (``AIRFLOW_CONN_SLACK_ALERTS``, ``AIRFLOW_CONN_PAGERDUTY_ALERTS``). A channel that is
not configured or fails is logged and reported, never raised: alerting never fails a DAG.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from ml.config import Settings, get_settings

log = logging.getLogger(__name__)
PAGERDUTY_EVENTS_URL = "https://events.pagerduty.com"


@dataclass(frozen=True)
class Alert:
    """One alert: what happened, where, and where to look."""

    title: str
    severity: str  # "warning" | "critical"
    reason: str
    dag_id: str = ""
    task_id: str = ""
    date: str = ""
    link: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    action: str = "trigger"  # "resolve" closes the incident opened under the same dedup key
    key: str = ""  # dedup key; default: DAG/task/date/title

    @property
    def dedup_key(self) -> str:
        return self.key or f"{self.dag_id}/{self.task_id}/{self.date}/{self.title}"

    def text(self) -> str:
        if self.action == "resolve":
            lines = [f":white_check_mark: [RESOLVED] {self.title}"]
        else:
            icon = ":rotating_light:" if self.severity == "critical" else ":warning:"
            lines = [f"{icon} [{self.severity.upper()}] {self.title}"]
        where = ", ".join(
            part
            for part in (
                f"DAG {self.dag_id}" if self.dag_id else "",
                f"task {self.task_id}" if self.task_id else "",
                f"date {self.date}" if self.date else "",
            )
            if part
        )
        if where:
            lines.append(where)
        lines.append(f"Reason: {self.reason}")
        if self.link:
            lines.append(f"Report: {self.link}")
        return "\n".join(lines)


def _connection(conn_id: str) -> Any | None:
    from airflow.sdk import BaseHook

    try:
        return BaseHook.get_connection(conn_id)
    except Exception:  # noqa: BLE001 - any lookup failure means "not configured"
        return None


def send_slack(conn_id: str, alert: Alert) -> None:
    from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

    # .notify() sends the text as given (no Jinja rendering of user-supplied reasons).
    SlackWebhookNotifier(slack_webhook_conn_id=conn_id, text=alert.text(), timeout=10).notify({})


def send_pagerduty(conn_id: str, alert: Alert) -> None:
    """Trigger a PagerDuty event with the provider's events hook.

    The connection's ``events_url`` extra overrides the Events API host (a PagerDuty-compatible
    relay, or a local receiver in tests); the async hook is used because the sync client only
    accepts the https PagerDuty host.
    """
    from airflow.providers.pagerduty.hooks.pagerduty_events import PagerdutyEventsAsyncHook

    conn = _connection(conn_id)
    hook = PagerdutyEventsAsyncHook(pagerduty_events_conn_id=conn_id)
    hook.base_url = (conn.extra_dejson.get("events_url") if conn else None) or PAGERDUTY_EVENTS_URL
    links = (
        [{"href": alert.link, "text": "report"}] if alert.link.startswith(("http://", "https://")) else None
    )
    asyncio.run(
        hook.send_event(
            summary=alert.text().splitlines()[0][:1024],
            severity="critical" if alert.severity == "critical" else "warning",
            source=alert.dag_id or "mlops",
            action=alert.action,
            component=alert.task_id or None,
            dedup_key=alert.dedup_key,
            custom_details={"reason": alert.reason, "date": alert.date, "link": alert.link, **alert.details},
            links=links,
        )
    )


def send_alert(alert: Alert, settings: Settings | None = None) -> dict[str, str]:
    """Send ``alert`` to every channel its severity maps to; return channel -> outcome."""
    settings = settings or get_settings()
    senders = {
        "slack": (settings.alerts.slack_conn_id, send_slack),
        "pagerduty": (settings.alerts.pagerduty_conn_id, send_pagerduty),
    }
    outcomes: dict[str, str] = {}
    for channel in settings.alerts.channels.get(alert.severity, []):
        conn_id, sender = senders[channel]
        if _connection(conn_id) is None:
            outcomes[channel] = f"not configured (no connection {conn_id!r})"
            log.warning("alert channel %s not configured; alert was: %s", channel, alert.text())
            continue
        try:
            sender(conn_id, alert)
            outcomes[channel] = "sent"
        except Exception as exc:  # noqa: BLE001 - a failing channel must never fail the DAG
            outcomes[channel] = f"failed: {type(exc).__name__}: {exc}"
            log.error("alert channel %s failed: %s; alert was: %s", channel, exc, alert.text())
    return outcomes


def notice_alert(notice: Any, dag_id: str = "monitor_serving", task_id: str = "check") -> Alert:
    """An ``ml.monitor.Notice`` as an Alert; one dedup key per rule, so PagerDuty resolves what it opened."""
    return Alert(
        title=notice.rule,
        severity=notice.severity,
        reason=notice.reason,
        dag_id=dag_id,
        task_id=task_id,
        details=notice.details,
        action=notice.action,
        key=f"{dag_id}/{notice.rule}",
    )


def alert_from_context(context: Any, title: str, severity: str, reason: str, link: str = "") -> Alert:
    ti = context.get("ti") or context.get("task_instance")
    dag_run = context.get("dag_run")
    params = context.get("params") or {}
    date = params.get("date") or context.get("ds") or ""
    return Alert(
        title=title,
        severity=severity,
        reason=reason,
        dag_id=getattr(ti, "dag_id", "") or getattr(dag_run, "dag_id", ""),
        task_id=getattr(ti, "task_id", ""),
        date=str(date),
        link=link,
        details={"run_id": getattr(dag_run, "run_id", "") or ""},
    )


def failure_callback(context: Any) -> None:
    """``on_failure_callback`` for every task: route the failure with its reason."""
    try:
        settings = get_settings()
        exception = context.get("exception")
        reason = f"{type(exception).__name__}: {exception}" if exception else "task failed"
        link = ""
        for word in str(exception or "").split():
            if word.startswith(("file://", "s3://", "http://", "https://")):
                link = word.rstrip(".,;")
        alert = alert_from_context(context, "Task failed", settings.alerts.failure_severity, reason, link)
        send_alert(alert, settings)
    except Exception:
        log.exception("failure callback could not send its alert")


def landing_timeout_callback(context: Any) -> None:
    """``on_failure_callback`` of the landing sensor: say which file never arrived."""
    try:
        from ml.ingest import DayLayout
        from mlops_airflow.defaults import run_day
        from mlops_airflow.storage import dag_storage

        settings = get_settings()
        exception = context.get("exception")
        day = run_day(context.get("params"), context.get("data_interval_start"))
        url = dag_storage(settings).url(DayLayout(day).labels)
        reason = (
            f"nothing landed for {day}: {url} did not appear within "
            f"{settings.ingest.sensor_timeout_seconds} s ({type(exception).__name__}). "
            "Images land first and labels.csv last; check the upload job."
        )
        send_alert(
            alert_from_context(context, "No data landed", settings.alerts.failure_severity, reason, url)
        )
    except Exception:  # the callback itself must never raise; log.exception keeps the trace
        log.exception("landing timeout callback could not send its alert")
        failure_callback(context)
