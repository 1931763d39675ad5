"""A day validated by several workers: a plan, one inspection task per shard, one merge that publishes.

``plan_day`` lists the day once and writes the plan (the listing and the shard count) to the day's
staging area; every shard and the merge read that listing, so they agree on what landed. A
shard (``inspect_shard``) downloads only its images (a stable hash of the key picks the shard),
inspects them on this host as the single-process ingest does, stages each curated image in
storage (``PUBLISH_THREADS`` writes in flight) and writes its results; a retried shard writes
the same objects again. The merge is ``ingest_day`` with the staged results (``staged_day``):
the manifest, the Great Expectations suites on the whole day, dedupe, splits, the batch gate and
the publication run once, as in the single-process path, so the ledger and the catalog come out
the same. The staging area is removed once the day is published.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from ml.config import Settings
from ml.data.images import ImageReport
from ml.data.ingest import (
    Batch,
    BatchRejected,
    IngestResult,
    StagedDay,
    in_flight,
    ingest_day,
    load_batch,
    local_inspection,
    quarantine_from_listing,
    spool_parent,
)
from ml.data.inspection import FileInspection
from ml.data.spool import Spool
from ml.layout import DayLayout
from ml.storage import ObjectInfo, Storage, StorageError, UnreadableObject


class ShardMissing(RuntimeError):
    """The merge found a shard without results: it did not run or did not finish (retry it)."""


def shard_of(key: str, shards: int) -> int:
    """The shard a landed key belongs to: stable across runs and hosts."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % shards


@dataclass(frozen=True)
class ShardPlan:
    day: dt.date
    shards: int
    listing: list[ObjectInfo]

    def to_dict(self) -> dict[str, Any]:
        return {
            "day": self.day.isoformat(),
            "shards": self.shards,
            "listing": [{"key": info.key, "size": info.size} for info in self.listing],
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ShardPlan:
        listing = [ObjectInfo(item["key"], int(item["size"])) for item in raw["listing"]]
        return cls(dt.date.fromisoformat(raw["day"]), int(raw["shards"]), listing)


def plan_day(settings: Settings, storage: Storage, day: dt.date, shards: int | None = None) -> ShardPlan:
    """List the day once and write the plan every shard and the merge follow; returns it."""
    load_batch(storage, day)  # raises NothingLanded before anything is planned
    layout = DayLayout(day)
    plan = ShardPlan(day, shards or settings.ingest.shards, storage.list_objects(layout.landing))
    storage.write_bytes(layout.shard_plan, json.dumps(plan.to_dict()).encode())
    return plan


def read_plan(storage: Storage, day: dt.date) -> ShardPlan:
    try:
        return ShardPlan.from_dict(json.loads(storage.read_bytes(DayLayout(day).shard_plan)))
    except StorageError:
        raise ShardMissing(f"no shard plan for {day}: run the plan step first") from None


def shard_batch(storage: Storage, plan: ShardPlan, shard: int, max_file_bytes: int) -> Batch:
    """The day's batch with only this shard's images left to download."""
    batch, _ = load_batch(storage, plan.day, plan.listing)
    quarantine_from_listing(batch, max_file_bytes)
    mine = {name: key for name, key in batch.files.items() if shard_of(key, plan.shards) == shard}
    batch.landing.files.clear()
    batch.landing.files.update(mine)
    return batch


@dataclass(frozen=True)
class ShardSummary:
    day: str
    shard: int
    shards: int
    images: int
    rejected: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inspect_shard(settings: Settings, storage: Storage, day: dt.date, shard: int) -> ShardSummary:
    """Download, inspect and stage this shard's images; write its results (a rerun rewrites them)."""
    import time

    started = time.perf_counter()
    plan = read_plan(storage, day)
    if not 0 <= shard < plan.shards:
        raise ValueError(f"shard {shard} is not one of the plan's {plan.shards}")
    layout = DayLayout(day)
    max_bytes = settings.ingest.max_file_bytes
    batch = shard_batch(storage, plan, shard, max_bytes)
    sizes = {info.key: info.size for info in plan.listing}
    wanted = [key for key in batch.files.values() if sizes.get(key, 0) <= max_bytes]
    results: dict[str, dict[str, Any]] = {}
    unreadable: dict[str, str] = {}  # landed key -> why storage would not give it (the merge quarantines it)
    with Spool(spool_parent(settings)) as spool:

        def note_unreadable(key: str, exc: UnreadableObject) -> None:
            unreadable[key] = str(exc)

        batch.spooled = spool.fetch(storage, wanted, unreadable=note_unreadable)
        with local_inspection(settings, batch, spool) as inspection:
            inspected = inspection.results(name for name, key in batch.files.items() if key in batch.spooled)
        staged = {
            name: layout.staged_curated(found.report.sha256, found.report.curated_ext)
            for name, found in inspected.items()
            if found.curated_path is not None
        }

        def stage(name: str) -> None:
            path = inspected[name].curated_path
            storage.upload(path, staged[name])  # type: ignore[arg-type]

        in_flight(stage, sorted(staged), storage)  # the first failure raised: no results written
        for name, found in sorted(inspected.items()):
            results[name] = {"report": asdict(found.report), "staged": staged.get(name)}
        names = {key: name for name, key in batch.files.items()}
        for key, why in sorted(unreadable.items()):
            results[names[key]] = {"unreadable": why, "key": key}
    storage.write_bytes(layout.shard_result(shard), json.dumps(results, sort_keys=True).encode())
    rejected = sum(1 for item in results.values() if "unreadable" in item or item["report"]["reason"])
    return ShardSummary(
        str(day), shard, plan.shards, len(results), rejected, round(time.perf_counter() - started, 2)
    )


class StagedInspection:
    """The shards' results of one day, answering like a local ``Inspection``."""

    def __init__(self, found: dict[str, FileInspection]) -> None:
        self.found = found

    def results(self, names: Any) -> dict[str, FileInspection]:
        missing = [name for name in names if name not in self.found]
        if missing:
            raise ShardMissing(f"no shard result for {len(missing)} image(s), e.g. {missing[0]!r}")
        return {name: self.found[name] for name in names}


def staged_day(storage: Storage, day: dt.date) -> StagedDay:
    """The plan's listing and every shard's results, for ``ingest_day(..., staged=...)``."""
    plan = read_plan(storage, day)
    layout = DayLayout(day)
    found: dict[str, FileInspection] = {}
    unreadable: dict[str, str] = {}
    for shard in range(plan.shards):
        try:
            raw = json.loads(storage.read_bytes(layout.shard_result(shard)))
        except StorageError:
            raise ShardMissing(f"shard {shard} of {plan.shards} for {day} has no results: retry it") from None
        for name, item in raw.items():
            if "unreadable" in item:
                unreadable[item["key"]] = item["unreadable"]
            else:
                found[name] = FileInspection(ImageReport(**item["report"]), None, item["staged"])
    return StagedDay(plan.listing, StagedInspection(found), unreadable)


def clear_staging(storage: Storage, day: dt.date) -> int:
    """Remove the day's staging area (after it was published); returns how many objects went."""
    keys = storage.list(DayLayout(day).staging)
    storage.delete_many(keys)
    return len(keys)


def merge_day(settings: Settings, storage: Storage, day: dt.date) -> IngestResult:
    """The merge: ``ingest_day`` on the shards' results. The staging area goes once the day is decided
    (published or rejected); after any other error it stays, so a retried merge needs no shard again."""
    try:
        result = ingest_day(settings, storage, day, staged=staged_day(storage, day))
    except BatchRejected:
        clear_staging(storage, day)
        raise
    clear_staging(storage, day)
    return result
