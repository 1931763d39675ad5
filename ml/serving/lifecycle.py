"""A service worker's start and stop: refuse an open endpoint, and stop without dropping requests.

``refuse_open_endpoint``: a worker listening beyond loopback with no API key configured refuses
to start (the socket it was handed says where it listens; the config is the fallback).

``stop_gracefully``: on SIGTERM (circus stops a worker with it, also when ``mlops serve
--reload`` restarts the workers) the worker first stops accepting connections while the
listening socket stays open in the arbiter and the other workers, serves what it accepted for
``drain_seconds`` and only then lets uvicorn shut down. Without the pause uvicorn closes a
connection it accepted but whose request it has not read yet, and that client sees a reset.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from ml.serving.auth import KeyConfigError, is_loopback

log = logging.getLogger(__name__)


def listening_hosts(argv: Sequence[str] | None = None) -> list[str]:
    """Addresses of the sockets a BentoML worker was handed (``--fd N``); [] outside a worker."""
    args = list(sys.argv if argv is None else argv)
    hosts = []
    for flag, value in zip(args, args[1:], strict=False):
        if flag == "--fd" and value.isdigit():
            try:
                with socket.socket(fileno=os.dup(int(value))) as sock:
                    hosts.append(str(sock.getsockname()[0]))
            except OSError:
                continue
    return hosts


def refuse_open_endpoint(configured_host: str, has_keys: bool, hosts: Sequence[str] | None = None) -> None:
    """``KeyConfigError`` when the service would answer beyond loopback with no API key."""
    if has_keys:
        return
    seen = list(listening_hosts() if hosts is None else hosts) or [configured_host]
    open_to = [host for host in seen if not is_loopback(host)]
    if open_to:
        raise KeyConfigError(
            f"no API key configured and the service listens on {open_to[0]} (beyond loopback): refusing to "
            "start. Set MLOPS_API_KEYS or serving.api_keys_file, or serve on 127.0.0.1"
        )


def stop_gracefully(drain_seconds: float) -> bool:
    """Install the SIGTERM pause described above; False when uvicorn's handler is not in place."""
    previous = signal.getsignal(signal.SIGTERM)
    server = getattr(previous, "__self__", None)  # uvicorn's Server (its bound handle_exit)
    if drain_seconds <= 0 or server is None or not hasattr(server, "should_exit"):
        return False
    loop = asyncio.get_running_loop()

    def stop_accepting() -> None:
        for listener in getattr(server, "servers", []):  # set once uvicorn listens, after this hook
            listener.close()  # this process stops accepting; the socket stays open elsewhere
        log.warning("stopping: no new connections here; serving accepted ones for %.1f s", drain_seconds)
        loop.call_later(drain_seconds, previous, signal.SIGTERM, None)

    def on_term(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, previous)  # a second SIGTERM stops at once
        loop.call_soon_threadsafe(stop_accepting)

    signal.signal(signal.SIGTERM, on_term)
    return True
