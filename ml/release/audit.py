"""The serving audit trail: every deploy, withdrawal and rollback, one record each, in storage."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from ml.layout import SERVING_AUDIT_PREFIX
from ml.storage import Storage


def audit(storage: Storage, action: str, record: dict[str, Any]) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC)
    entry = {"action": action, "at": now.isoformat(timespec="seconds"), **record}
    storage.write_bytes(
        f"{SERVING_AUDIT_PREFIX}/{now.strftime('%Y%m%dT%H%M%S%fZ')}-{action}.json",
        json.dumps(entry, indent=2).encode(),
    )
    return entry


def audit_log(storage: Storage) -> list[dict[str, Any]]:
    return [json.loads(storage.read_bytes(key)) for key in storage.list(SERVING_AUDIT_PREFIX)]


def deployed_at(storage: Storage, version: str) -> str:
    """When ``version`` last became the stable model (deploy or rollback audit record)."""
    times = [
        entry["at"]
        for entry in audit_log(storage)
        if entry.get("action") in ("deploy-full", "rollback") and str(entry.get("to")) == str(version)
    ]
    return max(times, default="")
