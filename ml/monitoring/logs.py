"""Reading the serving logs by time: the window a check or a report looks at."""

from __future__ import annotations

import datetime as dt
from typing import Any

from ml.storage import Storage, read_jsonl


def parse_time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="seconds")


def log_records(storage: Storage, prefix: str, start: dt.datetime, end: dt.datetime) -> list[dict[str, Any]]:
    """Records of a serving log with ``start < time <= end``."""
    span = (end.date() - start.date()).days
    days = [(start.date() + dt.timedelta(days=n)).isoformat() for n in range(span + 1)]
    return [r for r in read_jsonl(storage, prefix, days) if start < parse_time(r["time"]) <= end]
