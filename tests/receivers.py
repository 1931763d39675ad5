"""A local HTTP receiver standing in for the Slack webhook and the PagerDuty Events API."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


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
