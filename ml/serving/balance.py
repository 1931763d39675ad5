"""Keep-alive connections spread over the service's worker processes.

The workers share one listening socket, and the worker that wakes first may accept every
connection a client opens at once: a client with a pool of 4 or 8 persistent connections can pin
them all on one worker while the other core idles (``bench/balance.py``: 138-161 instead of
188-218 req/s on 2 workers; BentoML issue 5426). So each worker counts its keep-alive
connections (client addresses of HTTP/1.1 POSTs in the last ``window_seconds``) and publishes the
count, with a heartbeat, in a small file its sibling workers map too (one slot per circus worker
id; a reload's new workers take ids up to twice the worker count). After a successful answer, a
worker holding ``excess_allowed`` more than the least loaded live sibling adds
``Connection: close`` (at most one every ``pace_seconds``): that client reconnects, and the idle
worker, waiting in accept, is the likelier to take the new connection. A sibling whose heartbeat
is older than the window (paused, starting, gone) is left out. The answer itself is never
withheld or changed otherwise.
"""

from __future__ import annotations

import logging
import mmap
import os
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ml.serving.guard import Message, Receive, Scope, Send

log = logging.getLogger(__name__)

SLOT = struct.Struct("<Q")  # (milliseconds stamp mod 2**32) << 32 | active connections: one 8-byte store
MAX_WORKERS = 64
MAX_WORKER_ID = 2 * MAX_WORKERS  # circus gives a reload's new workers ids up to 2 x numprocesses
Client = tuple[str, int]


def excess_allowed(mine: int) -> int:
    """How many more connections than the least loaded sibling are one too many: 2, or an eighth of
    this worker's own from 24 on (a large pool split at random is not churned)."""
    return max(2, mine // 8)


def board_folder() -> Path:
    """This user's folder for the boards (local temporary storage: writable in the container too)."""
    return Path(tempfile.gettempdir()) / f"mlops-balance-{os.getuid()}"


class LoadBoard:
    """Each worker's active-connection count and heartbeat, in a file the workers of one server map."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder = path.parent.lstat()
        if not stat.S_ISDIR(folder.st_mode) or folder.st_uid != os.getuid() or folder.st_mode & 0o077:
            raise OSError(f"{path.parent} is not a private folder of this user")
        size = SLOT.size * (MAX_WORKER_ID + 1)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)  # every worker asks for the same size: a race is harmless
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.path = path

    @classmethod
    def for_server(cls, folder: Path | None = None) -> LoadBoard:
        """The board of the server this worker belongs to (its parent, the arbiter, names it);
        boards of arbiters that are gone are removed."""
        folder = folder or board_folder()
        if folder.is_dir():
            for stale in folder.glob("*.load"):
                if stale.stem.isdigit() and not _process_alive(int(stale.stem)):
                    stale.unlink(missing_ok=True)
        return cls(folder / f"{os.getppid()}.load")

    def publish(self, worker: int, count: int, now: float) -> None:
        SLOT.pack_into(self._map, SLOT.size * worker, (_stamp(now) << 32) | min(count, 0xFFFFFFFF))

    def count(self, worker: int, now: float, max_age: float) -> int | None:
        """A worker's published count; None when its last heartbeat is older than ``max_age`` (or
        from the future: a board older than this boot)."""
        (word,) = SLOT.unpack_from(self._map, SLOT.size * worker)
        age_ms = (_stamp(now) - (word >> 32)) & 0xFFFFFFFF
        return word & 0xFFFFFFFF if word and age_ms <= max_age * 1000 else None


def _process_alive(pid: int) -> bool:
    # ml.data.spool has the same check; the bento carries only the serving code, not the spool
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stamp(now: float) -> int:
    return int(now * 1000) & 0xFFFFFFFF


class ConnectionBalancer:
    """One worker's side: notes its connections, publishes them, decides when to close one."""

    def __init__(
        self,
        board: LoadBoard,
        worker: int,
        workers: int,
        window_seconds: float = 1.0,
        pace_seconds: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= workers <= MAX_WORKERS or not 1 <= worker <= 2 * workers:
            raise ValueError(
                f"worker id {worker} of {workers}: ids run from 1 to twice the workers (<= {MAX_WORKERS})"
            )
        self.board, self.worker, self.workers = board, worker, workers
        self.window, self.pace, self.clock = window_seconds, pace_seconds, clock
        self._seen: dict[Client, float] = {}  # client address -> time of its last request here
        self._lock = threading.Lock()  # requests on the event loop, heartbeats on their own thread
        self._pruned = self._closed_at = float("-inf")
        self.closes = 0

    def note(self, client: Client) -> None:
        """A request arrived on ``client``'s connection."""
        with self._lock:
            now = self.clock()
            self._seen[client] = now
            self._publish(now)

    def heartbeat(self) -> None:
        """Publish the current count (connections gone quiet drop out), so siblings see this worker live."""
        with self._lock:
            self._publish(self.clock())

    def should_close(self, client: Client) -> bool:
        """True when ``client``'s connection is one too many here (it is then no longer counted)."""
        with self._lock:
            now = self.clock()
            least = self._least_loaded_sibling(now)
            mine = len(self._seen)
            if least is None or mine - least < excess_allowed(mine) or now - self._closed_at < self.pace:
                return False
            self._seen.pop(client, None)
            self._closed_at, self.closes = now, self.closes + 1
            self._publish(now)
            return True

    def _least_loaded_sibling(self, now: float) -> int | None:
        counts = (
            self.board.count(w, now, self.window) for w in range(1, 2 * self.workers + 1) if w != self.worker
        )
        return min((count for count in counts if count is not None), default=None)

    def _publish(self, now: float) -> None:
        if now - self._pruned >= self.window / 4:
            self._seen = {peer: at for peer, at in self._seen.items() if now - at <= self.window}
            self._pruned = now
        self.board.publish(self.worker, len(self._seen), now)

    def beat_forever(self) -> None:
        """The heartbeat loop (a daemon thread of the worker)."""
        while True:
            self.heartbeat()
            time.sleep(self.window / 4)


def keep_alive_client(scope: Scope) -> Client | None:
    """The client address of an HTTP/1.1 request that keeps its connection, else None (HTTP/1.0, a
    client that closes anyway, or an address a trusted proxy header rewrote: port 0)."""
    client = scope.get("client")
    if scope.get("http_version") != "1.1" or not client or not client[1]:
        return None
    closing = any(k.lower() == b"connection" and b"close" in v.lower() for k, v in scope.get("headers", ()))
    return None if closing else (str(client[0]), int(client[1]))


class BalancedConnections:
    """ASGI middleware: POSTs feed ``balancer``; a chosen successful answer gets ``Connection: close``."""

    def __init__(self, app: Any, balancer: ConnectionBalancer | None) -> None:
        self.app, self.balancer = app, balancer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        balancer = self.balancer
        client = keep_alive_client(scope) if balancer and scope["type"] == "http" else None
        if balancer is None or client is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        balancer.note(client)

        async def closing(message: Message) -> None:
            if (
                message["type"] == "http.response.start"
                and message["status"] < 400
                and balancer.should_close(client)
            ):
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing)


def worker_balancer(worker: int, workers: int, folder: Path | None = None) -> ConnectionBalancer | None:
    """This worker's balancer with its heartbeat running, or None where there is nothing to balance
    (one worker, no circus worker id) or no board could be made (said in the log)."""
    if workers < 2 or worker < 1:
        return None
    try:
        balancer = ConnectionBalancer(LoadBoard.for_server(folder), worker, workers)
    except (OSError, ValueError) as exc:
        log.warning("connections are not balanced over the workers: %s", exc)
        return None
    threading.Thread(target=balancer.beat_forever, name="connection-balance", daemon=True).start()
    return balancer
