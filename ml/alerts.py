"""Alerts: what one says, where it goes (severity -> channels), and the rules that raise them.

Routing is independent of Airflow: the senders are injected. Inside Airflow they go through
the providers' Slack and PagerDuty connections (``mlops_airflow.alerts``); outside it (the CLI)
``env_senders`` reads the same connections from their ``AIRFLOW_CONN_*`` environment variables
and posts with the standard library. A channel that is not configured or fails is reported in
the outcome and logged, never raised: alerting never fails a pipeline step.
"""

from __future__ import annotations

import json
import logging
import operator
import os
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ml.config import AlertRule, Settings

log = logging.getLogger(__name__)

PAGERDUTY_EVENTS_URL = "https://events.pagerduty.com"
SEND_TIMEOUT_SECONDS = 10


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

    def pagerduty_event(self, routing_key: str) -> dict[str, Any]:
        """The Events API v2 body for this alert."""
        links = (
            [{"href": self.link, "text": "report"}] if self.link.startswith(("http://", "https://")) else []
        )
        event: dict[str, Any] = {
            "routing_key": routing_key,
            "event_action": self.action,
            "dedup_key": self.dedup_key,
            "payload": {
                "summary": self.text().splitlines()[0][:1024],
                "severity": "critical" if self.severity == "critical" else "warning",
                "source": self.dag_id or "mlops",
                "component": self.task_id or None,
                "custom_details": {
                    "reason": self.reason,
                    "date": self.date,
                    "link": self.link,
                    **self.details,
                },
            },
        }
        if links:
            event["links"] = links
        return event


Sender = Callable[[Alert], None]  # delivers one alert; raises when it could not
Notify = Callable[[Alert], dict[str, str]]  # routes one alert; channel -> outcome, never raises


def channel_connections(settings: Settings) -> dict[str, str]:
    """Channel -> the Airflow connection id that configures it."""
    return {"slack": settings.alerts.slack_conn_id, "pagerduty": settings.alerts.pagerduty_conn_id}


def route(alert: Alert, settings: Settings, senders: Mapping[str, Sender | None]) -> dict[str, str]:
    """Send ``alert`` to every channel its severity maps to; return channel -> outcome.

    ``senders[channel]`` is None when the channel is not configured.
    """
    connections = channel_connections(settings)
    outcomes: dict[str, str] = {}
    for channel in settings.alerts.channels.get(alert.severity, []):
        sender = senders.get(channel)
        if sender is None:
            outcomes[channel] = f"not configured (no connection {connections[channel]!r})"
            log.warning("alert channel %s not configured; alert was: %s", channel, alert.text())
            continue
        try:
            sender(alert)
            outcomes[channel] = "sent"
        except Exception as exc:  # noqa: BLE001 - a failing channel must never fail the step
            outcomes[channel] = f"failed: {type(exc).__name__}: {exc}"
            log.error("alert channel %s failed: %s; alert was: %s", channel, exc, alert.text())
    return outcomes


# -- senders outside Airflow: the same connections, read from the environment -----------------------


@dataclass(frozen=True)
class Connection:
    """The parts of an Airflow connection the senders use."""

    conn_type: str
    host: str = ""
    password: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def connection_from_env(conn_id: str, environ: Mapping[str, str] | None = None) -> Connection | None:
    """``AIRFLOW_CONN_<ID>`` as Airflow writes it: a JSON object or a connection URI; None if unset."""
    env = os.environ if environ is None else environ
    raw = env.get(f"AIRFLOW_CONN_{conn_id.upper()}", "").strip()
    if not raw:
        return None
    if raw.startswith("{"):
        data = json.loads(raw)
        extra = data.get("extra") or {}
        return Connection(
            str(data.get("conn_type", "")),
            str(data.get("host") or ""),
            str(data.get("password") or ""),
            json.loads(extra) if isinstance(extra, str) else dict(extra),
        )
    parsed = urllib.parse.urlsplit(raw)
    query = dict(urllib.parse.parse_qsl(parsed.query))
    extra = json.loads(query["__extra__"]) if "__extra__" in query else query
    return Connection(
        parsed.scheme.replace("-", "_"),
        parsed.hostname or "",
        urllib.parse.unquote(parsed.password or ""),
        extra,
    )


def _post_json(url: str, body: dict[str, Any]) -> None:
    from ml.http import http

    status, answer = http(
        "POST",
        url,
        body=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        timeout=SEND_TIMEOUT_SECONDS,
    )
    if status >= 300:
        raise OSError(f"{url.split('?')[0]} answered HTTP {status}: {answer[:200]!r}")


def slack_webhook_sender(connection: Connection) -> Sender:
    """Posts the alert text to the webhook URL (the connection's password, or https://host)."""
    url = connection.password or (f"https://{connection.host}" if connection.host else "")
    if not url.startswith(("http://", "https://")):
        raise ValueError("the Slack webhook connection holds no webhook URL (put it in the password)")
    return lambda alert: _post_json(url, {"text": alert.text()})


def pagerduty_sender(connection: Connection) -> Sender:
    """Enqueues an Events API v2 event; the routing key is the password, ``events_url`` an extra."""
    base = str(connection.extra.get("events_url") or PAGERDUTY_EVENTS_URL).rstrip("/")
    return lambda alert: _post_json(f"{base}/v2/enqueue", alert.pagerduty_event(connection.password))


def env_senders(settings: Settings, environ: Mapping[str, str] | None = None) -> dict[str, Sender | None]:
    """Senders for the CLI, from the same connections the DAGs use."""
    factories: dict[str, Callable[[Connection], Sender]] = {
        "slack": slack_webhook_sender,
        "pagerduty": pagerduty_sender,
    }
    senders: dict[str, Sender | None] = {}
    for channel, conn_id in channel_connections(settings).items():
        connection = connection_from_env(conn_id, environ)
        senders[channel] = factories[channel](connection) if connection else None
    return senders


def env_notify(settings: Settings) -> Notify:
    """Route alerts through the environment's connections (what ``mlops`` commands use)."""
    senders = env_senders(settings)
    return lambda alert: route(alert, settings, senders)


# -- rules on live metrics --------------------------------------------------------------------------

RULE_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


def judge(rule: AlertRule, value: float | None) -> str:
    """``firing``, ``ok``, or ``unknown`` when there was too little data to measure the metric."""
    if value is None:
        return "unknown"
    return "firing" if RULE_OPERATORS[rule.op](value, rule.threshold) else "ok"


@dataclass(frozen=True)
class Notice:
    """One message about a rule: it started firing, still fires, or resolved."""

    rule: str
    severity: str
    action: str  # "trigger" | "resolve"
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


def notice_alert(notice: Notice, dag_id: str = "monitor_serving", task_id: str = "check") -> Alert:
    """A rule notice as an Alert; one dedup key per rule, so PagerDuty resolves what it opened."""
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


def link_in(text: str) -> str:
    """The last URL (file, s3, http) named in a message, e.g. a Data Docs link in an error."""
    link = ""
    for word in text.split():
        if word.startswith(("file://", "s3://", "http://", "https://")):
            link = word.rstrip(".,;")
    return link
