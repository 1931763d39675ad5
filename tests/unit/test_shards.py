"""A sharded ingest (plan, shards, merge) against the single-process one on the same hostile day."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from ml.config import Settings
from ml.data import shards
from ml.data.ingest import ingest_day
from ml.layout import CATALOG_SUMMARIES_KEY, DayLayout
from ml.storage import LocalStorage, S3Storage, Storage
from tests.hostile import land_hostile_day

DAY = dt.date(2026, 3, 3)


@pytest.fixture
def settings(make_settings) -> Settings:
    return make_settings(ingest__workers=1)


def sharded(settings: Settings, storage: Storage, count: int) -> dict:
    plan = shards.plan_day(settings, storage, DAY, count)
    summaries = [shards.inspect_shard(settings, storage, DAY, shard) for shard in range(plan.shards)]
    assert sum(s.images for s in summaries) > 0 and all(s.images for s in summaries)  # every shard has work
    return shards.merge_day(settings, storage, DAY).to_dict()


def outputs(storage: Storage) -> dict[str, Any]:
    """Everything a day's ingest leaves behind, but the reports that carry run times, and the cached
    partition summaries without the write tags of this store."""
    layout = DayLayout(DAY)
    skip = (layout.data_docs, layout.result, CATALOG_SUMMARIES_KEY)
    found: dict[str, Any] = {
        key: storage.read_bytes(key) for key in storage.list() if not key.startswith(skip)
    }
    if storage.exists(CATALOG_SUMMARIES_KEY):
        summaries = json.loads(storage.read_bytes(CATALOG_SUMMARIES_KEY))["partitions"]
        found[CATALOG_SUMMARIES_KEY] = {key: entry | {"tag": None} for key, entry in summaries.items()}
    return found


def test_a_sharded_day_gives_the_same_ledger_catalog_and_quarantine_as_one_process(
    tmp_path: Path, settings: Settings
) -> None:
    single, fanned = LocalStorage(tmp_path / "single"), LocalStorage(tmp_path / "sharded")
    land_hostile_day(single, DAY)
    land_hostile_day(fanned, DAY)
    expected = json.dumps(ingest_day(settings, single, DAY).to_dict()).replace(single.root_url, "ROOT")
    found = json.dumps(sharded(settings, fanned, 3)).replace(fanned.root_url, "ROOT")
    assert found == expected  # counts, reasons, gate, reconciliation, dataset version
    assert outputs(fanned) == outputs(single)  # the same curated bytes, quarantine, ledger, catalog
    assert not fanned.list(DayLayout(DAY).staging)  # published: nothing staged is left


def test_a_shard_that_never_finished_stops_the_merge_and_a_retry_completes_it(
    tmp_path: Path, settings: Settings
) -> None:
    storage = LocalStorage(tmp_path)
    land_hostile_day(storage, DAY)
    plan = shards.plan_day(settings, storage, DAY, 2)
    shards.inspect_shard(settings, storage, DAY, 0)
    with pytest.raises(shards.ShardMissing, match="shard 1 of 2"):
        shards.merge_day(settings, storage, DAY)
    assert not storage.exists(f"catalog/days/{DAY}.parquet")  # nothing published
    assert storage.list(DayLayout(DAY).staging)  # shard 0's work is kept for the retry
    first = shards.inspect_shard(settings, storage, DAY, 1)
    again = shards.inspect_shard(settings, storage, DAY, 1)  # a retried shard rewrites the same results
    assert (first.images, first.rejected) == (again.images, again.rejected)
    result = shards.merge_day(settings, storage, DAY)
    assert result.gate.passed and result.reconciled and plan.shards == 2


def test_shards_split_by_a_stable_hash_and_the_plan_is_the_listing_every_step_uses(
    s3_endpoint: str, s3_bucket: str, settings: Settings
) -> None:
    import boto3

    storage = S3Storage(boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1"), s3_bucket, "r")
    land_hostile_day(storage, DAY)
    plan = shards.plan_day(settings, storage, DAY, 4)
    keys = [info.key for info in plan.listing]
    assert keys == [info.key for info in storage.list_objects(f"landing/{DAY}")]
    # the same shard on every host and in every process (no per-process salt, as Python's hash() has)
    assert [shards.shard_of(k, 4) for k in ("landing/2026-03-03/images/a.png", "x", "y")] == [1, 0, 0]
    assert len({shards.shard_of(k, 4) for k in keys}) == 4
    storage.write_bytes(f"landing/{DAY}/images/late.png", b"landed after the plan")
    for shard in range(4):
        shards.inspect_shard(settings, storage, DAY, shard)
    result = shards.merge_day(settings, storage, DAY).to_dict()
    ledger = json.dumps(result)
    assert "late.png" not in ledger and result["reconciled"]  # the plan's listing, not a new one
    assert result["landed"]["files"] == len(keys) - 1  # every listed key but labels.csv
