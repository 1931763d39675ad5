"""HTTP with the standard library: one request, a multipart body, waiting for a server, a free port.

Used wherever the pipeline talks to its own servers (the service, Airflow's API, the MLflow UI)
and to webhook receivers, so nothing here needs more than ``urllib``.
"""

from __future__ import annotations

import secrets
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request


class NotReady(RuntimeError):
    """A server did not become ready (or its process exited first)."""


def http(
    method: str,
    url: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
    ca_file: str | None = None,
) -> tuple[int, bytes]:
    """One HTTP request; (status, body) whatever the status. Connection errors raise ``OSError``.

    ``ca_file``: the CA bundle an https server's certificate must chain to (for a self-signed
    certificate, the certificate itself); None trusts the system's CAs.
    """
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"only http(s) URLs are requested, not {url.split(':', 1)[0]!r}")
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})  # noqa: S310 - scheme checked above
    context = ssl.create_default_context(cafile=ca_file) if ca_file else None
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:  # noqa: S310
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def multipart(field_name: str, files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body with one part per file under ``field_name``; (body, content type)."""
    boundary = secrets.token_hex(12)
    parts = []
    for filename, data in files:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def wait_ready(
    url: str,
    process: subprocess.Popen[bytes] | None,
    timeout: float,
    path: str = "/readyz",
    ca_file: str | None = None,
) -> None:
    """Poll ``url + path`` until it answers 200; ``NotReady`` if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise NotReady(f"the service exited with code {process.returncode} before it was ready")
        try:
            if http("GET", f"{url}{path}", timeout=2, ca_file=ca_file)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise NotReady(f"{url} was not ready within {timeout:.0f} s")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
