"""The fault suite: real faults (a stopped server, a killed process, a receiver that answers 500
or hangs), each test asserting what was kept: objects, alerts, requests.

``MlflowServer`` is a real ``mlflow server`` process (SQLite store, served artifacts) that a test
can stop and start again; ``FaultyProxy`` sits in front of it and answers 500 for the paths a
test names, which is how a half-broken tracking server looks to its clients.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ml.http import free_port, wait_ready

MLFLOW_FAST_FAILURE = {  # a client facing a dead server fails in seconds, not after minutes of retries
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


class MlflowServer:
    """``mlflow server`` on a free port, in its own process group; ``stop()`` and ``start()`` again."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        argv = [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination",
            (self.root / "artifacts").as_uri(),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        with (self.root / "server.log").open("ab") as log:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_ready(self.url, self.process, timeout, path="/health")
        return self

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


class FaultyProxy:
    """Forwards every request to ``upstream``, except those whose ``METHOD path`` contains one of
    ``failing`` (a path part, or ``"POST /api/..."`` for one method): HTTP 500."""

    def __init__(self, upstream: str) -> None:
        self.failing: set[str] = set()
        self.failed: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                if any(part in f"{self.command} {self.path}" for part in outer.failing):
                    outer.failed.append(self.path)
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b'{"error_code": "INTERNAL_ERROR", "message": "injected fault"}')
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")
                }
                request = urllib.request.Request(upstream + self.path, body, headers, method=self.command)
                try:
                    with urllib.request.urlopen(request, timeout=120) as answer:
                        status, payload, kind = (
                            answer.status,
                            answer.read(),
                            answer.headers.get("Content-Type"),
                        )
                except urllib.error.HTTPError as exc:
                    status, payload, kind = exc.code, exc.read(), exc.headers.get("Content-Type")
                self.send_response(status)
                self.send_header("Content-Type", kind or "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_until(predicate, timeout: float, every: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return bool(predicate())
