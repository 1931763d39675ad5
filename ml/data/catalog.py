"""The dataset catalog: one row per curated image, one partition per landing day, versioned.

Layout under the storage root (keys in ``ml.layout``)::

    catalog/days/YYYY-MM-DD.parquet     accepted images of that day (sha256, label, split, props)
    catalog/versions/YYYY-MM-DD.json    the day's current dataset version: every partition up to it, hashed
    catalog/versions/by_id/ID.json      every version by its id, written once and never rewritten
    catalog/LATEST                      the newest version's day (written last)
    catalog/partition_summaries.json    a cache: each partition's sha256 and counts, by listing tag

A version lists its partitions with their sha256; reading a version reads exactly those
partitions and checks each hash, so a version id always means the same rows, or a clear error.

Erasing an image (``remove_images``) rewrites its day's partition without it and writes new versions
of that day and every later one. Versions written before keep their ids and hashes: reading one
raises ``DatasetIntegrityError`` (the erased rows are never served again), and lineage still reads
its days and counts from the version document.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from ml.data.near_duplicates import NearestHash
from ml.layout import (
    CATALOG_DAYS_PREFIX,
    CATALOG_ERASURES_KEY,
    CATALOG_LATEST_KEY,
    CATALOG_SUMMARIES_KEY,
    CATALOG_VERSIONS_PREFIX,
    partition_key,
    version_id_key,
    version_key,
)
from ml.storage import ObjectInfo, Storage, StorageError, UnsafeKeyError, io_map, safe_key

SPLITS = ("train", "val", "test")

READ_THREADS = 8  # partitions read at once where storage gains from it (below botocore's pool of 10)
CATALOG_COLUMNS = [
    "sha256",
    "label",
    "split",
    "day",
    "curated_key",
    "source_key",
    "source_sha256",
    "format",
    "width",
    "height",
    "file_bytes",
    "brightness",
    "contrast",
    "blur",
    "phash",
    "metadata",  # the labels.csv row's other columns (source, camera, ...) as a JSON object
]


def metadata_json(values: dict[str, Any]) -> str:
    """A manifest row's extra columns as canonical JSON (missing values left out)."""
    kept = {str(k): str(v) for k, v in values.items() if v is not None and not pd.isna(v)}
    return json.dumps(kept, sort_keys=True, separators=(",", ":"))


def metadata_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """The ``metadata`` column expanded to one column per key (rows from before it: no values)."""
    column = rows["metadata"] if "metadata" in rows else pd.Series([None] * len(rows), index=rows.index)
    parsed = [json.loads(value) if isinstance(value, str) and value else {} for value in column]
    return pd.DataFrame(parsed, index=rows.index)


def to_parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False, compression="zstd")
    return buffer.getvalue()


def write_partition(storage: Storage, day: dt.date, data: bytes) -> bytes | None:
    """Write ``day``'s partition unless it holds these bytes already (a re-run leaves it untouched, and so
    its listing tag, by which its summary is cached); returns the bytes it held before (None: none)."""
    key = partition_key(day)
    previous = None
    with contextlib.suppress(StorageError):
        previous = storage.read_bytes(key)
    if previous != data:
        storage.write_bytes(key, data)
    return previous


def partition_hashes(data: bytes | None) -> set[str]:
    """The images (``sha256``) a partition's bytes hold."""
    return set() if data is None else set(parse_partition("partition", data, ["sha256"])["sha256"])


def partition_listing(storage: Storage) -> dict[dt.date, ObjectInfo]:
    """Each day that has a partition, with its listed object, in day order."""
    found = {}
    for info in storage.list_objects(CATALOG_DAYS_PREFIX):
        name = info.key.rsplit("/", 1)[-1]
        if name.endswith(".parquet"):
            found[dt.date.fromisoformat(name.removesuffix(".parquet"))] = info
    return dict(sorted(found.items()))


def partition_days(storage: Storage) -> list[dt.date]:
    return list(partition_listing(storage))


def empty_catalog(columns: Sequence[str] = CATALOG_COLUMNS) -> pd.DataFrame:
    """No rows, with ``columns`` (the catalog's by default)."""
    return pd.DataFrame({column: pd.Series(dtype=object) for column in columns})


class CatalogPartitionError(ValueError):
    """A partition's bytes are not a catalog partition (not parquet, or without a column asked for)."""


def parse_partition(
    key: str,
    data: bytes,
    columns: Sequence[str] | None = None,
    filters: list[list[tuple[str, str, Any]]] | None = None,
) -> pd.DataFrame:
    """A partition's rows from its bytes; bytes this code did not write fail naming their key."""
    try:
        return pd.read_parquet(io.BytesIO(data), columns=columns, filters=filters)
    except pa.ArrowException as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CatalogPartitionError(f"{key} is not a catalog partition: {reason}") from exc


def read_partition(storage: Storage, day: dt.date) -> pd.DataFrame:
    """One day's curated rows (empty, with the catalog's columns, when the day has none)."""
    key = partition_key(day)
    if not storage.exists(key):
        return empty_catalog()
    return parse_partition(key, storage.read_bytes(key))


def load_catalog(
    storage: Storage,
    *,
    before: dt.date | None = None,
    upto: dt.date | None = None,
    other_than: dt.date | None = None,
    columns: Sequence[str] | None = None,
    filters: list[list[tuple[str, str, Any]]] | None = None,
) -> pd.DataFrame:
    """Concatenate partitions (strictly before ``before`` and/or up to ``upto`` inclusive, every day but
    ``other_than`` when given), of ``columns``
    only when given (a parquet file decodes only the columns asked for: a day's lookups need 4 of 16, at
    about a third of the CPU and memory, ``bench/catalog_growth.py``), and of the rows ``filters`` keeps
    when given (pyarrow's filters: OR of ANDs of ``(column, op, value)``; other rows never reach pandas).
    Partitions are read ``READ_THREADS`` at a time where the storage gains from it (S3: one request each)."""
    wanted = None if columns is None else list(columns)
    days = [
        day
        for day in partition_days(storage)
        if not ((before is not None and day >= before) or (upto is not None and day > upto))
        and day != other_than
    ]

    def read(day: dt.date) -> pd.DataFrame:
        key = partition_key(day)
        return parse_partition(key, storage.read_bytes(key), wanted, filters)

    frames = list(io_map(storage, read, days, READ_THREADS))
    if not frames:
        return empty_catalog(CATALOG_COLUMNS if wanted is None else wanted)
    return pd.concat(frames, ignore_index=True)


def split_from_hash(sha256: str, fractions: Sequence[float]) -> str:
    """Deterministic split from the content hash: uniform in [0, 1) against cumulative fractions."""
    unit = int(sha256[:16], 16) / float(1 << 64)
    cumulative = 0.0
    for name, fraction in zip(SPLITS, fractions, strict=True):
        cumulative += fraction
        if unit < cumulative:
            return name
    return SPLITS[-1]


@dataclass(frozen=True)
class SplitCandidate:
    sha256: str
    phash: str


def assign_splits(
    candidates: Sequence[SplitCandidate],
    known_phashes: Sequence[str],
    known_splits: Sequence[str],
    fractions: Sequence[float],
    max_distance: int,
) -> dict[str, str]:
    """Split for each new image: a near-duplicate's split if one is known, else from its hash.

    Candidates are visited in sha256 order so the answer does not depend on listing order, and
    each assignment becomes known to the next, so near-duplicates within a batch share a split.
    """
    ordered = sorted(candidates, key=lambda c: c.sha256)
    known = np.array([int(h, 16) for h in known_phashes], dtype=np.uint64)
    hashes = NearestHash(known, max_distance, adds=len(ordered))
    splits = list(known_splits)
    assigned: dict[str, str] = {}
    for candidate in ordered:
        target = int(candidate.phash, 16)
        nearest = hashes.nearest(target)
        split = splits[nearest] if nearest is not None else split_from_hash(candidate.sha256, fractions)
        assigned[candidate.sha256] = split
        hashes.add(target)
        splits.append(split)
    return assigned


class UnknownDatasetVersion(ValueError):
    """No dataset version has this id."""


class DatasetIntegrityError(RuntimeError):
    """A partition no longer has the bytes its dataset version recorded (that day was re-ingested)."""


@dataclass(frozen=True)
class PartitionSummary:
    """One partition as a version records it: its day, key and sha256, and its row counts."""

    day: dt.date
    key: str
    sha256: str
    per_split: dict[str, int]
    per_class: dict[str, int]


def summarise_partition(storage: Storage, day: dt.date) -> PartitionSummary:
    key = partition_key(day)
    data = storage.read_bytes(key)
    frame = parse_partition(key, data, ["split", "label"])
    return PartitionSummary(
        day,
        key,
        hashlib.sha256(data).hexdigest(),
        {str(k): int(v) for k, v in frame["split"].value_counts().items()},
        {str(k): int(v) for k, v in frame["label"].value_counts().items()},
    )


SUMMARIES_FORMAT = 1


def _read_summaries(storage: Storage) -> dict[str, Any]:
    """The cached partition summaries by key ({} when there are none or they cannot be read)."""
    try:
        document = json.loads(storage.read_bytes(CATALOG_SUMMARIES_KEY))
    except (StorageError, ValueError):
        return {}
    if not isinstance(document, dict) or document.get("format") != SUMMARIES_FORMAT:
        return {}
    partitions = document.get("partitions")
    return partitions if isinstance(partitions, dict) else {}


def _cached_summary(entry: Any, day: dt.date, info: ObjectInfo) -> PartitionSummary | None:
    """The cached summary of a partition, if it was read at the tag the partition is listed with now."""
    if not info.tag or not isinstance(entry, dict) or entry.get("tag") != info.tag:
        return None
    try:
        return PartitionSummary(
            day,
            info.key,
            str(entry["sha256"]),
            {str(k): int(v) for k, v in entry["per_split"].items()},
            {str(k): int(v) for k, v in entry["per_class"].items()},
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def partition_summaries(
    storage: Storage, listing: dict[dt.date, ObjectInfo], upto: dt.date | None = None
) -> list[PartitionSummary]:
    """Each listed partition (up to ``upto`` when given) summarised, sha256 and row counts, in day order.

    A partition is read only when the cache has no summary read at the tag it is listed with now (a
    partition written since, by anything, lists with a new tag), so a day's version reads the day's
    own partition, not the whole catalog again. A partition rewritten between listing and reading is
    cached under its old tag and read again next time: the cache can cost a read, never a wrong hash.
    """
    days = [day for day in listing if upto is None or day <= upto]
    cache = _read_summaries(storage)
    found: dict[dt.date, PartitionSummary] = {}
    for day in days:
        cached = _cached_summary(cache.get(listing[day].key), day, listing[day])
        if cached is not None:
            found[day] = cached
    unread = [day for day in days if day not in found]
    read = io_map(storage, lambda d: summarise_partition(storage, d), unread, READ_THREADS)
    found.update(zip(unread, read, strict=True))
    listed = {info.key for info in listing.values()}
    if unread or not set(cache) <= listed:
        entries = {key: entry for key, entry in cache.items() if key in listed}
        entries.update({found[day].key: _summary_entry(found[day], listing[day]) for day in unread})
        document = {"format": SUMMARIES_FORMAT, "partitions": entries}
        storage.write_bytes(CATALOG_SUMMARIES_KEY, json.dumps(document, sort_keys=True).encode())
    return [found[day] for day in days]


def _summary_entry(part: PartitionSummary, info: ObjectInfo) -> dict[str, Any]:
    return {"tag": info.tag, "sha256": part.sha256, "per_split": part.per_split, "per_class": part.per_class}


def build_version(day: dt.date, parts: Sequence[PartitionSummary]) -> dict[str, Any]:
    """The version of ``day``: every partition up to it with its hash, the id a hash of that list."""
    included = [part for part in parts if part.day <= day]
    partitions = [{"day": p.day.isoformat(), "key": p.key, "sha256": p.sha256} for p in included]
    per_split = {split: 0 for split in SPLITS}
    per_class: dict[str, int] = {}
    for part in included:
        for split, count in part.per_split.items():
            per_split[split] = per_split.get(split, 0) + count
        for label, count in part.per_class.items():
            per_class[label] = per_class.get(label, 0) + count
    fingerprint = hashlib.sha256(json.dumps(partitions, sort_keys=True).encode()).hexdigest()[:12]
    return {
        "version": f"{day.isoformat()}.{fingerprint}",
        "day": day.isoformat(),
        "partitions": partitions,
        "rows": sum(per_split.values()),
        "per_split": per_split,
        "per_class": per_class,
    }


def version_days(storage: Storage) -> list[dt.date]:
    """Days that have a dataset version (``catalog/versions/YYYY-MM-DD.json``)."""
    days = []
    for key in storage.list(CATALOG_VERSIONS_PREFIX):
        name = key.removeprefix(CATALOG_VERSIONS_PREFIX + "/")
        if "/" not in name and name.endswith(".json"):
            with contextlib.suppress(ValueError):
                days.append(dt.date.fromisoformat(name.removesuffix(".json")))
    return sorted(days)


def _store_version(storage: Storage, version: dict[str, Any]) -> None:
    data = json.dumps(version, indent=2, sort_keys=True).encode()
    storage.write_if(version_id_key(version["version"]), data, None)  # by id: created once, never rewritten
    storage.write_bytes(version_key(dt.date.fromisoformat(version["day"])), data)


def write_version(storage: Storage, day: dt.date) -> dict[str, Any]:
    """Write the dataset version of ``day``, and new versions of every later day that has one.

    A backfill (or re-ingest) of ``day`` changes what every later version contains, so each later
    day gets a new version (all partitions up to it); LATEST moves last, and only forward. Partitions
    are hashed as ``partition_summaries`` does: only those written since they were last read.
    """
    later = [other for other in version_days(storage) if other > day]
    parts = partition_summaries(storage, partition_listing(storage), upto=max([day, *later]))
    version = build_version(day, parts)
    _store_version(storage, version)
    for other in later:
        _store_version(storage, build_version(other, parts))
    latest = latest_day(storage)
    if latest is None or day >= latest:
        storage.write_bytes(CATALOG_LATEST_KEY, day.isoformat().encode())
    return version


def latest_day(storage: Storage) -> dt.date | None:
    try:
        return dt.date.fromisoformat(storage.read_bytes(CATALOG_LATEST_KEY).decode().strip())
    except StorageError:
        return None


def read_version(storage: Storage, day: dt.date | None = None) -> dict[str, Any]:
    """The dataset version of ``day`` (default: LATEST)."""
    day = day or latest_day(storage)
    if day is None:
        raise StorageError(f"no dataset version yet under {storage.url('catalog')}")
    return json.loads(storage.read_bytes(version_key(day)))


def read_version_id(storage: Storage, version_id: str) -> dict[str, Any]:
    """The dataset version with this id (``catalog/versions/by_id/ID.json``).

    Versions written before ids were stored are found through their day's version, if it still is that id.
    """
    try:
        return json.loads(storage.read_bytes(version_id_key(safe_key(version_id))))
    except (StorageError, UnsafeKeyError):
        pass
    with contextlib.suppress(StorageError, ValueError):
        version = read_version(storage, dt.date.fromisoformat(version_id.split(".", 1)[0]))
        if version["version"] == version_id:
            return version
    raise UnknownDatasetVersion(f"no dataset version {version_id!r} under {storage.url('catalog/versions')}")


def version_rows(storage: Storage, version: dict[str, Any]) -> pd.DataFrame:
    """Exactly the partitions ``version`` lists, each checked against the sha256 it recorded."""
    frames = []
    for part in version["partitions"]:
        try:
            data = storage.read_bytes(part["key"])
        except StorageError:
            raise DatasetIntegrityError(
                f"dataset version {version['version']}: partition {part['key']} is missing"
            ) from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != part["sha256"]:
            raise DatasetIntegrityError(
                f"dataset version {version['version']}: partition {part['key']} has sha256 {digest[:12]}..., "
                f"the version recorded {part['sha256'][:12]}... (day {part['day']} was re-ingested since); "
                "train on a current version (ingesting a day writes new versions of it and every later day)"
            )
        frames.append(parse_partition(part["key"], data))
    if not frames:
        return empty_catalog()
    return pd.concat(frames, ignore_index=True)


def dataset_rows(
    storage: Storage, day: dt.date | None = None, *, version: str | None = None
) -> tuple[dict[str, Any], pd.DataFrame]:
    """A dataset version (by id, by day, or LATEST) and exactly its rows, verified, sorted by sha256."""
    found = read_version_id(storage, version) if version else read_version(storage, day)
    return found, version_rows(storage, found).sort_values("sha256", ignore_index=True)


def split_rows(rows: pd.DataFrame, split: str) -> pd.DataFrame:
    """The catalog rows of one split (``train``, ``val`` or ``test``)."""
    return rows[rows["split"] == split].reset_index(drop=True)


def image_rows(storage: Storage, sha256: str) -> pd.DataFrame:
    """The current catalog rows of one image: its curated ``sha256`` or the ``source_sha256`` it landed as."""
    return load_catalog(storage, filters=[[("sha256", "==", sha256)], [("source_sha256", "==", sha256)]])


def partition_sha256(storage: Storage, day: dt.date) -> str | None:
    """The sha256 of a day's current partition bytes (None when the day has none)."""
    key = partition_key(day)
    return hashlib.sha256(storage.read_bytes(key)).hexdigest() if storage.exists(key) else None


def remove_images(storage: Storage, day: dt.date, sha256s: Sequence[str]) -> dict[str, Any] | None:
    """Rewrite ``day``'s partition without these images and write new dataset versions from ``day`` on.

    Returns the day's new version, or None when the partition held none of them (nothing written).
    """
    rows = read_partition(storage, day)
    kept = rows[~rows["sha256"].isin(list(sha256s))].reset_index(drop=True)
    if len(kept) == len(rows):
        return None
    storage.write_bytes(partition_key(day), to_parquet_bytes(kept))
    return write_version(storage, day)


def erasure_records(storage: Storage) -> list[dict[str, Any]]:
    """Every erasure ``mlops forget`` recorded, oldest first."""
    try:
        body = storage.read_bytes(CATALOG_ERASURES_KEY).decode()
    except StorageError:
        return []
    return [json.loads(line) for line in body.splitlines() if line]


def erased_images(storage: Storage) -> frozenset[str]:
    """Every sha256 (curated and as landed) ``mlops forget`` erased: ingest refuses them for good."""
    found: set[str] = set()
    for record in erasure_records(storage):
        found.add(str(record.get("sha256", "")))
        found.update(str(value) for value in record.get("source_sha256") or ())
    found.discard("")
    return frozenset(found)
