"""Keep-alive connections spread over the service's worker processes.

The workers share one listening socket, and the worker that wakes first may accept every
connection a client opens at once: a client with a pool of 4 or 8 persistent connections can pin
them all on one worker while the other core idles (measured: ~145 instead of ~195 req/s on 2
workers; BentoML issue 5426). So each worker counts its active connections (client addresses
with a request in the last ``window_seconds``) and publishes the count in a small file its
sibling workers map too (one slot per worker index). A worker holding at least two more than
the least loaded of the others (an eighth more, with over 16) answers one request with
``Connection: close``, at most one every
``pace_seconds``: that client reconnects, and the idle worker, waiting in accept, is the likelier
to take the new connection. Nothing else changes; an answer is never withheld.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ml.data.spool import process_alive

log = logging.getLogger(__name__)

SLOT = struct.Struct("<dq")  # (monotonic time of the last update, active connections)
MAX_WORKERS = 64

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class LoadBoard:
    """Each worker's active-connection count in a file the workers of one server map together."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        size = SLOT.size * (MAX_WORKERS + 1)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)  # every worker asks for the same size: a race is harmless
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.path = path

    @classmethod
    def for_server(cls, state_dir: Path) -> LoadBoard:
        """The board of the server this worker belongs to (its parent, the arbiter, names it);
        boards of arbiters that are gone are removed."""
        folder = state_dir / "workers"
        if folder.is_dir():
            for stale in folder.glob("*.load"):
                if stale.stem.isdigit() and not process_alive(int(stale.stem)):
                    stale.unlink(missing_ok=True)
        return cls(folder / f"{os.getppid()}.load")

    def publish(self, worker: int, count: int, now: float) -> None:
        SLOT.pack_into(self._map, SLOT.size * worker, now, count)

    def count(self, worker: int, now: float, max_age: float) -> int:
        """A worker's published count; 0 when it has published nothing for ``max_age`` (idle or gone)."""
        updated, count = SLOT.unpack_from(self._map, SLOT.size * worker)
        return count if now - updated <= max_age else 0

    def close(self) -> None:
        self._map.close()


class ConnectionBalancer:
    """One worker's side: counts its connections, publishes, decides when to close one."""

    def __init__(
        self,
        board: LoadBoard,
        worker: int,
        workers: int,
        window_seconds: float = 1.0,
        pace_seconds: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= worker <= MAX_WORKERS or workers > MAX_WORKERS:
            raise ValueError(f"worker {worker} of {workers}: at most {MAX_WORKERS} workers, numbered from 1")
        self.board, self.worker, self.workers = board, worker, workers
        self.window, self.pace, self.clock = window_seconds, pace_seconds, clock
        self._seen: dict[Any, float] = {}  # client address -> time of its last request here
        self._pruned = self._closed_at = float("-inf")
        self.closed = 0

    def should_close(self, client: Any) -> bool:
        """Note a request from ``client``; True when its connection should be closed after the answer."""
        now = self.clock()
        self._seen[client] = now
        if now - self._pruned >= self.window / 4:
            self._seen = {peer: at for peer, at in self._seen.items() if now - at <= self.window}
            self._pruned = now
        mine = len(self._seen)
        others = [w for w in range(1, self.workers + 1) if w != self.worker]
        least = min((self.board.count(w, now, self.window) for w in others), default=mine)
        close = mine - least >= excess_allowed(mine) and now - self._closed_at >= self.pace
        if close:
            del self._seen[client]
            mine, self._closed_at = mine - 1, now
            self.closed += 1
        self.board.publish(self.worker, mine, now)
        return close


def excess_allowed(mine: int) -> int:
    """How many more connections than the least loaded sibling make one too many: 2, or an eighth of
    this worker's own once it holds more than 16 (so a large, randomly split pool is not churned)."""
    return max(2, mine // 8)


class BalancingMiddleware:
    """ASGI middleware: POST requests feed ``balancer``; a chosen answer gets ``Connection: close``."""

    def __init__(self, app: Any, balancer: ConnectionBalancer | None) -> None:
        self.app, self.balancer = app, balancer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        if (
            self.balancer is None
            or scope["type"] != "http"
            or scope["method"] != "POST"
            or client is None
            or not self.balancer.should_close(tuple(client))
        ):
            await self.app(scope, receive, send)
            return

        async def closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing)


def worker_balancer(state_dir: Path, worker: int, workers: int) -> ConnectionBalancer | None:
    """This worker's balancer, or None where there is nothing to balance (one worker, no index)."""
    if workers < 2 or not 1 <= worker <= MAX_WORKERS:
        return None
    try:
        return ConnectionBalancer(LoadBoard.for_server(state_dir), worker, workers)
    except OSError as exc:
        log.warning("connections are not balanced over the workers: %s", exc)
        return None
