"""Replica heartbeats: what each worker of each replica serves, and when it last looked.

Every worker writes ``serving/replicas/<replica>-w<worker>.json`` after each change and every
``serving.heartbeat_seconds``: the state revision it has loaded, its stable and canary versions,
its bento and any load error. Release waits on them (every live replica must report a deploy);
``mlops status`` lists them. A heartbeat older than ``serving.heartbeat_max_age_seconds`` is a
replica that is gone; a worker that stops cleanly removes its own.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
from dataclasses import asdict, dataclass
from typing import Any

from ml.layout import REPLICAS_PREFIX, heartbeat_key
from ml.storage import Storage, StorageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Heartbeat:
    """One worker's report."""

    replica: str
    worker: int
    url: str
    revision: int  # of the deployment state it has loaded (-1: none)
    stable: str | None
    canary: str | None
    canary_share: float
    shadow: str | None
    bento_tag: str
    load_error: str  # an incident id when the wanted state could not be loaded, else ""
    wanted_revision: int  # the newest revision it has seen
    at: str  # when it wrote this
    host: str = ""
    pid: int = 0

    def age_seconds(self, now: dt.datetime) -> float:
        return (now - dt.datetime.fromisoformat(self.at)).total_seconds()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def write_heartbeat(storage: Storage, beat: Heartbeat) -> None:
    """Publish a heartbeat; a storage outage is logged, never raised (it only delays a deploy's wait)."""
    try:
        storage.write_bytes(heartbeat_key(beat.replica, beat.worker), json.dumps(beat.to_dict()).encode())
    except Exception as exc:  # noqa: BLE001 - serving must outlive its storage
        log.warning("heartbeat of %s-w%s not written: %s", beat.replica, beat.worker, exc)


def remove_heartbeat(storage: Storage, replica: str, worker: int) -> None:
    try:
        storage.delete(heartbeat_key(replica, worker))
    except Exception as exc:  # noqa: BLE001 - a left-over heartbeat goes stale on its own
        log.warning("heartbeat of %s-w%s not removed: %s", replica, worker, exc)


def read_heartbeats(storage: Storage) -> list[Heartbeat]:
    """Every heartbeat in storage (stale ones included), in key order."""
    beats = []
    for key in storage.list(REPLICAS_PREFIX):
        try:
            raw = json.loads(storage.read_bytes(key))
            beats.append(Heartbeat(**{k: raw[k] for k in Heartbeat.__dataclass_fields__ if k in raw}))
        except (StorageError, ValueError, TypeError):  # removed meanwhile, or half a file from an old writer
            continue
    return beats


def live_heartbeats(
    storage: Storage, max_age_seconds: float, now: dt.datetime | None = None
) -> list[Heartbeat]:
    """The heartbeats younger than ``max_age_seconds``: the replicas that are up."""
    moment = now or dt.datetime.now(dt.UTC)
    return [beat for beat in read_heartbeats(storage) if beat.age_seconds(moment) <= max_age_seconds]


def this_host() -> tuple[str, int]:
    return socket.gethostname(), os.getpid()
