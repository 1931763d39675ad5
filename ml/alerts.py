"""Alerts: what one says, where it goes (severity -> channels), and the rules that raise them.

Routing is independent of Airflow: the senders are injected. Inside Airflow they go through
the providers' Slack and PagerDuty connections and the SMTP connection (``mlops_airflow.alerts``);
outside it (the CLI) ``env_senders`` reads the same connections from their ``AIRFLOW_CONN_*``
environment variables and posts (or mails) with the standard library. A channel that is not
configured or fails is reported in the outcome and logged, never raised: alerting never fails a
pipeline step.
"""

from __future__ import annotations

import json
import logging
import operator
import os
import smtplib
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

from ml.config import AlertRule, Settings

log = logging.getLogger(__name__)

PAGERDUTY_EVENTS_URL = "https://events.pagerduty.com"


@dataclass(frozen=True)
class Alert:
    """One alert: what happened, where, and where to look (links a person can open)."""

    title: str
    severity: str  # "warning" | "critical"
    reason: str
    dag_id: str = ""
    task_id: str = ""
    date: str = ""
    link: str = ""  # the report (``ml.storage.browsable_url``: presigned or the stack's report server)
    details: dict[str, Any] = field(default_factory=dict)
    action: str = "trigger"  # "resolve" closes the incident opened under the same dedup key
    key: str = ""  # dedup key; default: DAG/task/date/title
    log_url: str = ""  # the Airflow task's log page
    run_url: str = ""  # the MLflow run page

    @property
    def dedup_key(self) -> str:
        return self.key or f"{self.dag_id}/{self.task_id}/{self.date}/{self.title}"

    def headline(self) -> str:
        if self.action == "resolve":
            return f":white_check_mark: [RESOLVED] {self.title}"
        icon = ":rotating_light:" if self.severity == "critical" else ":warning:"
        return f"{icon} [{self.severity.upper()}] {self.title}"

    def where(self) -> list[tuple[str, str]]:
        """(label, value) of the DAG, task and date that are set."""
        parts = (("DAG", self.dag_id), ("Task", self.task_id), ("Date", self.date))
        return [(label, value) for label, value in parts if value]

    def links(self) -> list[tuple[str, str]]:
        """(label, URL) of the report, the Airflow log and the MLflow run that are set."""
        parts = (("Report", self.link), ("Airflow log", self.log_url), ("MLflow run", self.run_url))
        return [(label, url) for label, url in parts if url]

    def text(self) -> str:
        """The plain-text message (Slack's notification fallback, logs)."""
        lines = [self.headline()]
        if self.where():
            lines.append(
                ", ".join(f"{label if label == 'DAG' else label.lower()} {v}" for label, v in self.where())
            )
        lines.append(f"Reason: {self.reason}")
        lines += [f"{label}: {url}" for label, url in self.links()]
        return "\n".join(lines)

    def slack_message(self) -> dict[str, Any]:
        """A Block Kit message with ``text`` as the fallback for notifications and old clients."""
        return {"text": slack_escape(self.text()), "blocks": slack_blocks(self)}  # the fallback is mrkdwn too

    def pagerduty_event(self, routing_key: str) -> dict[str, Any]:
        """The Events API v2 body for this alert; openable links go in ``links``."""
        links = [{"href": url, "text": label} for label, url in self.links() if is_openable(url)]
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
                    "log_url": self.log_url,
                    "run_url": self.run_url,
                    **self.details,
                },
            },
        }
        if links:
            event["links"] = links
        return event


SLACK_URL_MAX = 3000  # Block Kit's limit on a button URL
SLACK_TEXT_MAX = 3000  # ... on a section's or a context element's text


def is_openable(url: str) -> bool:
    """Whether a browser (and a Slack button) can open ``url``."""
    return url.startswith(("http://", "https://")) and len(url) <= SLACK_URL_MAX


def slack_escape(text: str) -> str:
    """Text for mrkdwn: ``&``, ``<`` and ``>`` escaped, so a reason cannot forge links or mentions."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def mrkdwn(text: str) -> dict[str, str]:
    return {"type": "mrkdwn", "text": text}


def slack_blocks(alert: Alert) -> list[dict[str, Any]]:
    """Header, the reason with DAG/task/date fields, a button per openable link, context."""
    reason = f"*Reason*\n{slack_escape(alert.reason)}"
    section: dict[str, Any] = {"type": "section", "text": mrkdwn(reason[:SLACK_TEXT_MAX])}
    if alert.where():
        section["fields"] = [mrkdwn(f"*{label}*\n{slack_escape(value)}") for label, value in alert.where()]
    blocks = [
        {"type": "header", "text": {"type": "plain_text", "text": alert.headline()[:150], "emoji": True}},
        section,
    ]
    buttons = [
        {
            "type": "button",
            "text": {"type": "plain_text", "text": label},
            "url": url,
            "action_id": f"open-{label.lower().replace(' ', '-')}",
        }
        for label, url in alert.links()
        if is_openable(url)
    ]
    if buttons:
        blocks.append({"type": "actions", "elements": buttons})
    shown = [f"{label}: `{slack_escape(url)}`" for label, url in alert.links() if not is_openable(url)]
    blocks.append(
        {
            "type": "context",
            "elements": [mrkdwn(line[:SLACK_TEXT_MAX]) for line in [*shown, f"dedup `{alert.dedup_key}`"]],
        }
    )
    return blocks


def mlflow_ui_url(settings: Settings, environ: Mapping[str, str] | None = None) -> str:
    """The MLflow UI people open: ``mlflow.ui_url``, an http(s) tracking URI, else the stack's UI."""
    if settings.mlflow.ui_url:
        return settings.mlflow.ui_url.rstrip("/")
    uri = settings.mlflow.tracking_uri or ""
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    env = os.environ if environ is None else environ
    return f"http://127.0.0.1:{env.get('MLOPS_MLFLOW_UI_PORT', '5000')}"  # as ml.ops.stack starts it


def mlflow_run_url(settings: Settings, run_id: str, experiment_id: str = "") -> str:
    """The run's page in the MLflow UI ("" without a run); without the experiment, the UI's run redirect."""
    if not run_id:
        return ""
    path = f"experiments/{experiment_id}/runs/{run_id}" if experiment_id else f"runs/{run_id}"
    return f"{mlflow_ui_url(settings)}/#/{path}"


Sender = Callable[[Alert], None]  # delivers one alert; raises when it could not
Notify = Callable[[Alert], dict[str, str]]  # routes one alert; channel -> outcome, never raises


def channel_connections(settings: Settings) -> dict[str, str]:
    """Channel -> the Airflow connection id that configures it."""
    alerts = settings.alerts
    return {
        "slack": alerts.slack_conn_id,
        "pagerduty": alerts.pagerduty_conn_id,
        "email": alerts.email_conn_id,
    }


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
    port: int | None = None
    login: str = ""


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
            int(data["port"]) if data.get("port") else None,
            str(data.get("login") or ""),
        )
    parsed = urllib.parse.urlsplit(raw)
    query = dict(urllib.parse.parse_qsl(parsed.query))
    extra = json.loads(query["__extra__"]) if "__extra__" in query else query
    return Connection(
        parsed.scheme.replace("-", "_"),
        parsed.hostname or "",
        urllib.parse.unquote(parsed.password or ""),
        extra,
        parsed.port,
        urllib.parse.unquote(parsed.username or ""),
    )


def _post_json(url: str, body: dict[str, Any], timeout: float) -> None:
    from ml.http import http

    status, answer = http(
        "POST",
        url,
        body=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        timeout=timeout,
    )
    if status >= 300:
        raise OSError(f"{url.split('?')[0]} answered HTTP {status}: {answer[:200]!r}")


def slack_webhook_sender(connection: Connection, timeout: float) -> Sender:
    """Posts the alert as Block Kit to the webhook URL (the connection's password, or https://host)."""
    url = connection.password or (f"https://{connection.host}" if connection.host else "")
    if not url.startswith(("http://", "https://")):
        raise ValueError("the Slack webhook connection holds no webhook URL (put it in the password)")
    return lambda alert: _post_json(url, alert.slack_message(), timeout)


def pagerduty_sender(connection: Connection, timeout: float) -> Sender:
    """Enqueues an Events API v2 event; the routing key is the password, ``events_url`` an extra."""
    base = str(connection.extra.get("events_url") or PAGERDUTY_EVENTS_URL).rstrip("/")
    return lambda alert: _post_json(f"{base}/v2/enqueue", alert.pagerduty_event(connection.password), timeout)


def _flag(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def email_message(alert: Alert, sender: str, recipients: Sequence[str]) -> EmailMessage:
    """The alert as a plain-text email; the dedup key in a header, so a mail rule can thread it."""
    message = EmailMessage()
    headline = alert.headline()
    message["Subject"] = headline.split(" ", 1)[1] if headline.startswith(":") else headline  # no Slack emoji
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["X-MLOps-Dedup-Key"] = alert.dedup_key
    message.set_content(alert.text())
    return message


def smtp_sender(connection: Connection, recipients: Sequence[str], timeout: float) -> Sender:
    """Mails the alert through an Airflow-style SMTP connection: host, port, login and password; extras
    ``from_email``, ``disable_ssl`` (SMTP over TLS from the start unless true, as Airflow's provider),
    ``disable_tls`` (STARTTLS unless true)."""
    if not connection.host:
        raise ValueError("the SMTP connection names no host")
    use_ssl = not _flag(connection.extra.get("disable_ssl", False))
    starttls = not use_ssl and not _flag(connection.extra.get("disable_tls", False))
    port = connection.port or (465 if use_ssl else 587 if starttls else 25)
    sender = str(connection.extra.get("from_email") or f"mlops-alerts@{connection.host}")

    def send(alert: Alert) -> None:
        if use_ssl:
            client: smtplib.SMTP = smtplib.SMTP_SSL(connection.host, port, timeout=timeout)
        else:
            client = smtplib.SMTP(connection.host, port, timeout=timeout)
        with client:
            if starttls:
                client.starttls()
            if connection.login:
                client.login(connection.login, connection.password)
            client.send_message(email_message(alert, sender, recipients))

    return send


def env_senders(settings: Settings, environ: Mapping[str, str] | None = None) -> dict[str, Sender | None]:
    """Senders for the CLI, from the same connections the DAGs use."""
    recipients = settings.alerts.email_to
    factories: dict[str, Callable[[Connection, float], Sender]] = {
        "slack": slack_webhook_sender,
        "pagerduty": pagerduty_sender,
        "email": lambda connection, timeout: smtp_sender(connection, recipients, timeout),
    }
    senders: dict[str, Sender | None] = {}
    for channel, conn_id in channel_connections(settings).items():
        connection = connection_from_env(conn_id, environ)
        senders[channel] = (
            factories[channel](connection, settings.alerts.send_timeout_seconds) if connection else None
        )
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


def notice_alert(
    notice: Notice, dag_id: str = "monitor_serving", task_id: str = "check", link: str = ""
) -> Alert:
    """A rule notice as an Alert; one dedup key per rule, so PagerDuty resolves what it opened."""
    return Alert(
        title=notice.rule,
        severity=notice.severity,
        reason=notice.reason,
        dag_id=dag_id,
        task_id=task_id,
        link=link,
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
