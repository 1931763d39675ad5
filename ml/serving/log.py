"""The prediction log: every answer, feedback label, admin request and (optionally) request image,
buffered in memory and written to storage by a background thread.

``add`` and ``add_blob`` only append under a lock and wake the flusher: a request never waits for
storage. The flusher writes JSONL batches (every ``flush_rows`` rows or ``flush_seconds``) and
blobs one object each; a failed write keeps what it held for the next try. The buffer is capped
(rows and blob bytes): beyond the cap new entries are dropped and counted (``on_drop``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ml.layout import log_batch_key
from ml.storage import Storage

log = logging.getLogger(__name__)

DropCounter = Callable[[str, int], None]  # (what: "rows" or "images", how many)


@dataclass
class _Buffer:
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    blobs: list[tuple[str, bytes]] = field(default_factory=list)
    row_count: int = 0
    blob_bytes: int = 0


def by_day(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """``rows`` grouped by the UTC day of their ``time``, in order (readers look a record up by its day:
    a batch filed under its first row's day hid a row from just after midnight from every reader)."""
    days: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        days.setdefault(row["time"][:10], []).append(row)
    return list(days.values())


@dataclass
class PredictionLog:
    """Buffers records and blobs; a daemon thread writes them to storage."""

    storage: Storage
    flush_rows: int = 256
    flush_seconds: float = 5.0
    max_buffer_rows: int = 50_000
    max_buffer_bytes: int = 100_000_000
    on_drop: DropCounter | None = None
    writer_id: str = field(default_factory=lambda: f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
    dropped_rows: int = 0
    dropped_blobs: int = 0
    write_failures: int = 0
    _buffer: _Buffer = field(default_factory=_Buffer)
    _writing: _Buffer = field(default_factory=_Buffer)  # taken by a write in progress (counts to the cap)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _write_lock: threading.Lock = field(default_factory=threading.Lock)  # one write at a time
    _wake: threading.Condition = field(default_factory=threading.Condition)
    _last_flush: float = field(default_factory=time.monotonic)
    _retry_at: float = 0.0
    _sequence: int = 0
    _thread: threading.Thread | None = None
    _closed: bool = False

    # -- the request path: append and wake, nothing else ----------------------------------------
    def add(self, prefix: str, record: dict[str, Any]) -> bool:
        """Buffer one record under ``prefix``; False when the buffer is full and it was dropped."""
        with self._lock:
            if self._buffer.row_count + self._writing.row_count >= self.max_buffer_rows:
                self.dropped_rows += 1
                dropped = True
            else:
                self._buffer.rows.setdefault(prefix, []).append(record)
                self._buffer.row_count += 1
                dropped = False
            full_batch = self._buffer.row_count >= self.flush_rows
        return self._after_add(dropped, "rows", full_batch)

    def add_blob(self, key: str, data: bytes) -> bool:
        """Buffer one object (a request image); False when the byte cap would be passed."""
        with self._lock:
            held = self._buffer.blob_bytes + self._writing.blob_bytes
            dropped = held + len(data) > self.max_buffer_bytes
            if dropped:
                self.dropped_blobs += 1
            else:
                self._buffer.blobs.append((key, data))
                self._buffer.blob_bytes += len(data)
        return self._after_add(dropped, "images", not dropped)

    def _after_add(self, dropped: bool, what: str, wake: bool) -> bool:
        if dropped and self.on_drop is not None:
            self.on_drop(what, 1)
        self._ensure_thread()
        if wake:
            with self._wake:
                self._wake.notify()
        return not dropped

    def pending(self) -> tuple[int, int]:
        """(rows, blobs) not confirmed written: buffered, or taken by a write still in progress."""
        with self._lock:
            return (
                self._buffer.row_count + self._writing.row_count,
                len(self._buffer.blobs) + len(self._writing.blobs),
            )

    def in_flight(self) -> tuple[int, int]:
        """(rows, blobs) taken by a write still in progress (a hung storage holds them here)."""
        with self._lock:
            return self._writing.row_count, len(self._writing.blobs)

    # -- the flusher ----------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is None and not self._closed:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
                    self._thread.start()

    def _due(self, now: float) -> bool:
        with self._lock:
            rows, blobs = self._buffer.row_count, len(self._buffer.blobs)
        if not (rows or blobs) or now < self._retry_at:
            return False
        return rows >= self.flush_rows or blobs > 0 or now - self._last_flush >= self.flush_seconds

    def _run(self) -> None:
        while not self._closed:
            with self._wake:
                self._wake.wait(timeout=min(self.flush_seconds, 0.5))
            if self._closed or not self._due(time.monotonic()):
                continue
            try:
                written = self.write_pending()
            except Exception:
                log.exception("prediction log: flush failed")
                written = False
            if not written:
                self._retry_at = time.monotonic() + self.flush_seconds  # storage is down: back off

    def _take(self) -> _Buffer:
        with self._lock:
            taken, self._buffer = self._buffer, _Buffer()
            self._writing = _Buffer(row_count=taken.row_count, blob_bytes=taken.blob_bytes, blobs=taken.blobs)
            self._last_flush = time.monotonic()
            return taken

    def _give_back(self, rows: dict[str, list[dict[str, Any]]], blobs: list[tuple[str, bytes]]) -> None:
        """Put unwritten entries back in front of what arrived meanwhile."""
        with self._lock:
            self._writing = _Buffer()
            for prefix, kept in rows.items():
                self._buffer.rows.setdefault(prefix, [])[:0] = kept
                self._buffer.row_count += len(kept)
            self._buffer.blobs[:0] = blobs
            self._buffer.blob_bytes += sum(len(data) for _, data in blobs)

    def _batch_key(self, prefix: str, rows: list[dict[str, Any]]) -> str:
        with self._lock:  # keys are numbered under the lock: two flushes never write the same file
            self._sequence += 1
            return log_batch_key(prefix, rows[0]["time"][:10], self.writer_id, self._sequence)

    def write_pending(self) -> bool:
        """Write everything buffered now; True when every write succeeded (failures are kept)."""
        with self._write_lock:
            return self._write_taken(self._take())

    def _write_taken(self, taken: _Buffer) -> bool:
        """Rows first (they are small and the monitor reads them), then blobs; after the first failed
        write the rest is kept without trying (storage is down: each try could wait for a timeout)."""
        failed_rows: dict[str, list[dict[str, Any]]] = {}
        failed_blobs: list[tuple[str, bytes]] = []
        for prefix, rows in taken.rows.items():
            for day_rows in by_day(rows):  # a batch never straddles midnight: each row is under its own day
                body = "".join(json.dumps(row, sort_keys=True) + "\n" for row in day_rows).encode()
                if failed_rows or not self._write(self._batch_key(prefix, day_rows), body):
                    failed_rows.setdefault(prefix, []).extend(day_rows)
        for key, data in taken.blobs:
            if failed_rows or failed_blobs or not self._write(key, data):
                failed_blobs.append((key, data))
        self._give_back(failed_rows, failed_blobs)
        return not (failed_rows or failed_blobs)

    def _write(self, key: str, data: bytes) -> bool:
        try:
            self.storage.write_bytes(key, data)
            return True
        except Exception:
            self.write_failures += 1
            log.warning("prediction log: could not write %s; keeping it for the next try", key, exc_info=True)
            return False

    def flush(self) -> bool:
        """Write what is buffered now, from the caller's thread (tests, shutdown)."""
        return self.write_pending()

    def close(self, timeout: float = 10.0) -> bool:
        """Stop the flusher and write what is left; False when something could not be written."""
        self._closed = True
        with self._wake:
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        written = self.write_pending()
        if not written:
            rows, blobs = self.pending()
            log.error("prediction log closed with %d rows and %d images unwritten", rows, blobs)
        return written


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
