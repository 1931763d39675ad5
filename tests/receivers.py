"""Local receivers: an HTTP one standing in for the Slack webhook and the PagerDuty Events API, and a
real SMTP server for the email channel."""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ml.http import free_port


@dataclass
class Received:
    path: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """Records POSTs; ``/slack/...`` answers like Slack ("ok"), ``/v2/enqueue`` like PagerDuty.

    ``fail``: answer 500. ``hang``: hold every request that long before answering (a stuck peer).
    """

    def __init__(self, fail: bool = False, hang: float = 0.0) -> None:
        self.requests: list[Received] = []
        self.fail = fail
        self.hang = hang
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.requests.append(Received(self.path, body))
                if outer.hang:
                    time.sleep(outer.hang)
                if outer.fail:
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b"boom")
                    return
                if self.path.startswith("/v2/enqueue"):
                    payload = json.dumps(
                        {"status": "success", "dedup_key": "k", "message": "Event processed"}
                    )
                    self.send_response(202)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(payload.encode())
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

            def handle(self) -> None:
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (a hanging receiver): nothing to answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True  # a hanging handler must not hold up shutdown
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def on(self, prefix: str) -> list[Received]:
        return [r for r in self.requests if r.path.startswith(prefix)]

    def wait_for(self, prefix: str, count: int = 1, timeout: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.on(prefix)) < count:
            time.sleep(0.05)
        return self.on(prefix)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def connect_alerts(monkeypatch: Any, url: str) -> None:
    """Point the Slack and PagerDuty Airflow connections at a local receiver."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_SLACK_ALERTS", json.dumps({"conn_type": "slackwebhook", "password": f"{url}/slack/x"})
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_PAGERDUTY_ALERTS",
        json.dumps({"conn_type": "pagerduty_events", "password": "rk-123", "extra": {"events_url": url}}),
    )


@dataclass
class Mail:
    sender: str
    recipients: list[str]
    message: EmailMessage


PLAIN_SMTP = {"disable_ssl": True, "disable_tls": True, "from_email": "mlops@example.com"}


class SmtpReceiver:
    """A real SMTP server on 127.0.0.1 (aiosmtpd) that keeps every message it accepts.

    ``refuse``: answer every message with a temporary failure (451), as a full or throttling relay.
    """

    def __init__(self, refuse: bool = False) -> None:
        from aiosmtpd.controller import Controller

        self.mails: list[Mail] = []
        outer = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                if refuse:
                    return "451 4.3.0 try again later"
                parsed = BytesParser(policy=policy.default).parsebytes(envelope.original_content)
                outer.mails.append(Mail(envelope.mail_from, list(envelope.rcpt_tos), parsed))
                return "250 OK"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)

    def connection(self, **extra: Any) -> str:
        """``AIRFLOW_CONN_SMTP_ALERTS`` for this server: plain SMTP, no TLS."""
        return json.dumps(
            {
                "conn_type": "smtp",
                "host": "127.0.0.1",
                "port": self.port,
                "extra": PLAIN_SMTP | extra,
            }
        )

    def __enter__(self) -> SmtpReceiver:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()


class SilentPeer:
    """Accepts TCP connections and never says a word (an SMTP relay that hangs before its greeting)."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]

    def __enter__(self) -> SilentPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.socket.close()
