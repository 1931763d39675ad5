"""The dataset catalog: one row per curated image, one partition per landing day, versioned.

Layout under the storage root (keys in ``ml.layout``)::

    catalog/days/YYYY-MM-DD.parquet     accepted images of that day (sha256, label, split, props)
    catalog/versions/YYYY-MM-DD.json    dataset version = every partition up to that day, hashed
    catalog/LATEST                      the newest version's day (written last)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ml.data.images import hamming_distances
from ml.layout import CATALOG_DAYS_PREFIX, CATALOG_LATEST_KEY, partition_key, version_key
from ml.storage import Storage, StorageError

SPLITS = ("train", "val", "test")

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
]


def to_parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False, compression="zstd")
    return buffer.getvalue()


def partition_days(storage: Storage) -> list[dt.date]:
    days = []
    for key in storage.list(CATALOG_DAYS_PREFIX):
        name = key.rsplit("/", 1)[-1]
        if name.endswith(".parquet"):
            days.append(dt.date.fromisoformat(name.removesuffix(".parquet")))
    return sorted(days)


def read_partition(storage: Storage, day: dt.date) -> pd.DataFrame:
    """One day's curated rows (empty, with the catalog's columns, when the day has none)."""
    key = partition_key(day)
    if not storage.exists(key):
        return pd.DataFrame({column: pd.Series(dtype=object) for column in CATALOG_COLUMNS})
    return pd.read_parquet(io.BytesIO(storage.read_bytes(key)))


def load_catalog(
    storage: Storage, *, before: dt.date | None = None, upto: dt.date | None = None
) -> pd.DataFrame:
    """Concatenate partitions (strictly before ``before`` and/or up to ``upto`` inclusive)."""
    frames = []
    for day in partition_days(storage):
        if (before is not None and day >= before) or (upto is not None and day > upto):
            continue
        frames.append(pd.read_parquet(io.BytesIO(storage.read_bytes(partition_key(day)))))
    if not frames:
        return pd.DataFrame({column: pd.Series(dtype=object) for column in CATALOG_COLUMNS})
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
    hashes = np.zeros(len(known_phashes) + len(ordered), dtype=np.uint64)
    hashes[: len(known_phashes)] = [int(h, 16) for h in known_phashes]
    splits = list(known_splits)
    assigned: dict[str, str] = {}
    for candidate in ordered:
        target = int(candidate.phash, 16)
        split = split_from_hash(candidate.sha256, fractions)
        filled = len(splits)
        if filled:
            distances = hamming_distances(target, hashes[:filled])
            nearest = int(np.argmin(distances))
            if int(distances[nearest]) <= max_distance:
                split = splits[nearest]
        assigned[candidate.sha256] = split
        hashes[filled] = target
        splits.append(split)
    return assigned


def write_version(storage: Storage, day: dt.date) -> dict[str, Any]:
    """Write the dataset version for ``day`` (all partitions up to it), then move LATEST if newer."""
    partitions = []
    totals = {"rows": 0, "per_split": {s: 0 for s in SPLITS}, "per_class": {}}
    for part_day in partition_days(storage):
        if part_day > day:
            continue
        data = storage.read_bytes(partition_key(part_day))
        frame = pd.read_parquet(io.BytesIO(data))
        partitions.append(
            {
                "day": part_day.isoformat(),
                "key": partition_key(part_day),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
        totals["rows"] += len(frame)
        for split, count in frame["split"].value_counts().items():
            totals["per_split"][split] = totals["per_split"].get(split, 0) + int(count)
        for label, count in frame["label"].value_counts().items():
            totals["per_class"][label] = totals["per_class"].get(label, 0) + int(count)
    fingerprint = hashlib.sha256(json.dumps(partitions, sort_keys=True).encode()).hexdigest()[:12]
    version = {
        "version": f"{day.isoformat()}.{fingerprint}",
        "day": day.isoformat(),
        "partitions": partitions,
    }
    version.update(totals)
    storage.write_bytes(version_key(day), json.dumps(version, indent=2, sort_keys=True).encode())
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


def dataset_rows(storage: Storage, day: dt.date | None = None) -> tuple[dict[str, Any], pd.DataFrame]:
    """The dataset version (LATEST by default) and its catalog rows, sorted by sha256."""
    version = read_version(storage, day)
    rows = load_catalog(storage, upto=dt.date.fromisoformat(version["day"]))
    return version, rows.sort_values("sha256", ignore_index=True)


def split_rows(rows: pd.DataFrame, split: str) -> pd.DataFrame:
    """The catalog rows of one split (``train``, ``val`` or ``test``)."""
    return rows[rows["split"] == split].reset_index(drop=True)
