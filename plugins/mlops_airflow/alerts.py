"""Alert senders through Airflow connections, and the callbacks every task uses.

Routing (severity -> channels) and the alert itself live in ``ml.alerts``; this module supplies
the senders: Slack through the provider's webhook notifier, PagerDuty through the provider's
events hook, email through the SMTP connection (``ml.alerts.smtp_sender``, with the timeout every
channel has). Connections come from the environment (``AIRFLOW_CONN_SLACK_ALERTS``,
``AIRFLOW_CONN_PAGERDUTY_ALERTS``, ``AIRFLOW_CONN_SMTP_ALERTS``). A channel that is missing or fails
is logged and reported, never raised: alerting never fails a DAG.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from ml.alerts import (
    PAGERDUTY_EVENTS_URL,
    Alert,
    Connection,
    Sender,
    channel_connections,
    link_in,
    notice_alert,
    route,
    smtp_sender,
)
from ml.config import Settings, get_settings
from ml.storage import browsable_link

__all__ = ["Alert", "failure_callback", "landing_timeout_callback", "notice_alert", "send_alert"]

log = logging.getLogger(__name__)


def _connection(conn_id: str) -> Any | None:
    from airflow.sdk import BaseHook

    try:
        return BaseHook.get_connection(conn_id)
    except Exception:  # noqa: BLE001 - any lookup failure means "not configured"
        return None


def slack_sender(conn_id: str, timeout: float) -> Sender:
    def send(alert: Alert) -> None:
        from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

        # .notify() sends text and blocks as given (no Jinja rendering of user-supplied reasons).
        message = alert.slack_message()
        notifier = SlackWebhookNotifier(
            slack_webhook_conn_id=conn_id,
            text=message["text"],
            blocks=message["blocks"],
            timeout=timeout,
        )
        notifier.notify({})

    return send


def pagerduty_sender(conn_id: str, conn: Any, timeout: float) -> Sender:
    """Events through the provider's hook; the ``events_url`` extra overrides the Events API host.

    The async hook is used because the sync client only accepts the https PagerDuty host (a
    PagerDuty-compatible relay, or a local receiver in tests, needs another).
    """

    def send(alert: Alert) -> None:
        from airflow.providers.pagerduty.hooks.pagerduty_events import PagerdutyEventsAsyncHook

        hook = PagerdutyEventsAsyncHook(pagerduty_events_conn_id=conn_id)
        hook.base_url = conn.extra_dejson.get("events_url") or PAGERDUTY_EVENTS_URL
        event = alert.pagerduty_event("")
        sending = hook.send_event(
            summary=event["payload"]["summary"],
            severity=event["payload"]["severity"],
            source=event["payload"]["source"],
            action=alert.action,
            component=event["payload"]["component"],
            dedup_key=alert.dedup_key,
            custom_details=event["payload"]["custom_details"],
            links=event.get("links"),
        )
        # the hook has no timeout of its own: a stuck Events API must cost seconds, not the task
        asyncio.run(asyncio.wait_for(sending, timeout=timeout))

    return send


def airflow_senders(settings: Settings) -> dict[str, Sender | None]:
    """A sender per channel whose Airflow connection exists (None where it does not)."""
    connections, timeout = channel_connections(settings), settings.alerts.send_timeout_seconds
    slack, pagerduty = _connection(connections["slack"]), _connection(connections["pagerduty"])
    email = _connection(connections["email"])
    return {
        "slack": slack_sender(connections["slack"], timeout) if slack else None,
        "pagerduty": pagerduty_sender(connections["pagerduty"], pagerduty, timeout) if pagerduty else None,
        "email": smtp_sender(_plain(email), settings.alerts.email_to, timeout) if email else None,
    }


def _plain(conn: Any) -> Connection:
    """An Airflow connection as the parts ``ml.alerts`` senders read."""
    return Connection(
        str(conn.conn_type or ""),
        str(conn.host or ""),
        str(conn.password or ""),
        dict(conn.extra_dejson),
        int(conn.port) if conn.port else None,
        str(conn.login or ""),
    )


def send_alert(alert: Alert, settings: Settings | None = None) -> dict[str, str]:
    """Send ``alert`` to every channel its severity maps to; return channel -> outcome."""
    settings = settings or get_settings()
    return route(alert, settings, airflow_senders(settings))


def task_log_url(ti: Any) -> str:
    """The task instance's log page in the Airflow UI ("" when there is none to name)."""
    try:
        return str(getattr(ti, "log_url", "") or "")
    except Exception:  # noqa: BLE001 - a half-built task instance must not cost the alert
        return ""


def current_log_url() -> str:
    """The log page of the task running now ("" outside a task)."""
    from airflow.sdk import get_current_context

    try:
        return task_log_url(get_current_context().get("ti"))
    except Exception:  # noqa: BLE001 - outside a task there is no context
        return ""


def notifier(settings: Settings) -> Any:
    """``send_alert`` bound to ``settings``: what ``ml`` steps take as ``notify``.

    Alerts sent from inside a task carry that task's Airflow log link."""
    log_url = current_log_url()

    def notify(alert: Alert) -> dict[str, str]:
        return send_alert(alert if alert.log_url else dataclasses.replace(alert, log_url=log_url), settings)

    return notify


def alert_from_context(
    context: Any, title: str, severity: str, reason: str, link: str = "", run_url: str = ""
) -> Alert:
    """An alert about the task in ``context``, with its Airflow log link."""
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
        log_url=task_log_url(ti),
        run_url=run_url,
    )


def openable(url: str, settings: Settings) -> str:
    """A storage URL named in an error, as a link a person can open (unchanged when it cannot be)."""
    if not url:
        return url
    try:
        from mlops_airflow.storage import dag_storage

        return browsable_link(dag_storage(settings), url, settings)
    except Exception:  # the alert matters more than the link (log.exception keeps the trace)
        log.exception("could not make %s openable", url)
        return url


def failure_callback(context: Any) -> None:
    """``on_failure_callback`` for every task: route the failure with its reason."""
    try:
        settings = get_settings()
        exception = context.get("exception")
        reason = f"{type(exception).__name__}: {exception}" if exception else "task failed"
        link = openable(link_in(str(exception or "")), settings)
        alert = alert_from_context(context, "Task failed", settings.alerts.failure_severity, reason, link)
        send_alert(alert, settings)
    except Exception:
        log.exception("failure callback could not send its alert")


def landing_timeout_callback(context: Any) -> None:
    """``on_failure_callback`` of the landing sensor: say which file never arrived."""
    try:
        from ml.layout import DayLayout
        from ml.runs import run_day
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
        # no link: the object never arrived, so there is nothing to open; the log link says more
        send_alert(alert_from_context(context, "No data landed", settings.alerts.failure_severity, reason))
    except Exception:  # the callback itself must never raise; log.exception keeps the trace
        log.exception("landing timeout callback could not send its alert")
        failure_callback(context)
