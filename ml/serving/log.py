"""The prediction log: every answer and every feedback label, buffered and written in batches."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ml.layout import log_batch_key
from ml.storage import Storage

log = logging.getLogger(__name__)


@dataclass
class PredictionLog:
    """Buffers prediction and feedback records; writes them to storage as JSONL files in batches."""

    storage: Storage
    flush_rows: int = 256
    flush_seconds: float = 5.0
    writer_id: str = field(default_factory=lambda: f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
    _rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _last_flush: float = field(default_factory=time.monotonic)
    _sequence: int = 0

    def add(self, prefix: str, record: dict[str, Any]) -> None:
        with self._lock:
            self._rows.setdefault(prefix, []).append(record)
            due = sum(map(len, self._rows.values())) >= self.flush_rows
        if due or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def due(self) -> bool:
        """Rows are waiting longer than ``flush_seconds`` (quiet traffic must not hold them back)."""
        return bool(self._rows) and time.monotonic() - self._last_flush >= self.flush_seconds

    def flush(self) -> list[str]:
        """Write what is buffered; return the keys written. Failures keep the rows for the next try."""
        with self._lock:  # keys are numbered under the lock: two flushes never write the same file
            pending, self._rows = self._rows, {}
            self._last_flush = time.monotonic()
            batches = []
            for prefix, rows in pending.items():
                if rows:
                    self._sequence += 1
                    key = log_batch_key(prefix, rows[0]["time"][:10], self.writer_id, self._sequence)
                    batches.append((prefix, key, rows))
        written = []
        for prefix, key, rows in batches:
            body = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode()
            try:
                self.storage.write_bytes(key, body)
                written.append(key)
            except Exception:  # storage outages must not fail predictions
                log.exception("prediction log: could not write %s; keeping %d rows", key, len(rows))
                with self._lock:
                    self._rows.setdefault(prefix, [])[:0] = rows
        return written


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
