"""Benchmark: what a day's ingest does with the catalog (dedupe and splits) as the catalog grows.

Side by side, in one run, for a day of 10,000 new images against catalogs of several sizes (partitions
of 10,000 rows in a local store, as ingestion writes them):

- loading the catalog: every column (what ingestion did before) against the four dedupe and splits
  read (``ml.data.ingest.KNOWN_COLUMNS``), CPU seconds and the frame's memory;
- split assignment, each new image's nearest catalogued perceptual hash: a scan of every known hash
  (``np.argmin`` of the Hamming distances; what ingestion did before, and what a user writes first)
  against ``ml.data.catalog.assign_splits`` (multi-index hashing, ``ml.data.near_duplicates``).

- one image's rows (``mlops lineage``, erasure): every partition loaded whole and masked (what
  ``catalog.image_rows`` did before) against parquet filters on its two hashes, CPU seconds.
- the day's dataset version once its partition is written: every partition read and hashed (what
  ``catalog.write_version`` did before) against ``write_version`` with the partition summaries the
  day before left (only partitions written since are read), CPU seconds and MB read (on S3, the
  bytes fetched); both versions must be equal.

Hashes are drawn in clusters (a root hash and copies of it 0-12 bits away, as pictures of one subject
are) and unrelated; both give the same splits, checked for each size. ``--copies N`` makes N of the
day's images and N of the catalog's the same hash (one picture uploaded again and again, re-encoded:
different bytes, one pHash), the hostile day for an index of hashes.

Usage: python bench/catalog_growth.py [--new 10000] [--known 0,50000,200000,800000] [--copies 0]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ml.config import load_settings
from ml.data import catalog
from ml.data.catalog import SplitCandidate, assign_splits, split_from_hash
from ml.data.images import hamming_distances
from ml.data.ingest import KNOWN_COLUMNS
from ml.storage import LocalStorage

PARTITION_ROWS = 10_000

RESULTS = Path(__file__).resolve().parent / "results"


def clustered_hashes(rng: np.random.Generator, count: int, roots: np.ndarray) -> list[str]:
    """Copies of ``roots`` 0-12 bits away (half of them), and unrelated hashes."""
    values = rng.integers(0, np.iinfo(np.uint64).max, count, dtype=np.uint64, endpoint=True)
    copies = rng.random(count) < 0.5
    values[copies] = roots[rng.integers(0, len(roots), int(copies.sum()))]
    for _ in range(12):
        flip = copies & (rng.random(count) < 0.5)
        values[flip] ^= np.uint64(1) << rng.integers(0, 64, int(flip.sum()), dtype=np.uint64)
    return [f"{int(value):016x}" for value in values]


def scan_splits(
    candidates: list[SplitCandidate], known: list[str], known_splits: list[str], fractions, max_distance: int
) -> dict[str, str]:
    """The scan: every new image against every hash before it."""
    ordered = sorted(candidates, key=lambda c: c.sha256)
    hashes = np.zeros(len(known) + len(ordered), dtype=np.uint64)
    hashes[: len(known)] = [int(h, 16) for h in known]
    splits = list(known_splits)
    assigned = {}
    for candidate in ordered:
        target = int(candidate.phash, 16)
        split = split_from_hash(candidate.sha256, fractions)
        if splits:
            distances = hamming_distances(target, hashes[: len(splits)])
            nearest = int(np.argmin(distances))
            if int(distances[nearest]) <= max_distance:
                split = splits[nearest]
        assigned[candidate.sha256] = split
        hashes[len(splits)] = target
        splits.append(split)
    return assigned


def write_catalog(
    storage: LocalStorage, rng: np.random.Generator, phashes: list[str], splits: list[str]
) -> None:
    """Partitions of ``PARTITION_ROWS`` rows with every catalog column, as ingestion writes them."""
    for start in range(0, len(phashes), PARTITION_ROWS):
        day = dt.date(2025, 1, 1) + dt.timedelta(days=start // PARTITION_ROWS)
        count = len(phashes[start : start + PARTITION_ROWS])
        shas = [f"{start + index:064x}" for index in range(count)]
        frame = pd.DataFrame(
            {
                "sha256": shas,
                "label": rng.choice(list("0123456789"), count),
                "split": splits[start : start + count],
                "day": day.isoformat(),
                "curated_key": [f"curated/images/{sha[:2]}/{sha}.jpg" for sha in shas],
                "source_key": [f"landing/{day}/images/img_{index:05d}.jpg" for index in range(count)],
                "source_sha256": shas,
                "format": "JPEG",
                "width": 500,
                "height": rng.integers(300, 501, count),
                "file_bytes": rng.integers(15_000, 30_000, count),
                "brightness": rng.random(count) * 255,
                "contrast": rng.random(count) * 80,
                "blur": rng.random(count) * 3000,
                "phash": phashes[start : start + count],
                "metadata": "{}",
            }
        )
        data = catalog.to_parquet_bytes(frame[catalog.CATALOG_COLUMNS])
        storage.write_bytes(catalog.partition_key(day), data)


def rows_by_mask(storage: LocalStorage, sha256: str) -> pd.DataFrame:
    """One image's rows as ``catalog.image_rows`` found them before: every column of every row loaded."""
    rows = catalog.load_catalog(storage)
    found = (rows["sha256"] == sha256) | (rows["source_sha256"] == sha256)
    return rows[found].reset_index(drop=True)


def loaded(storage: LocalStorage, columns) -> tuple[float, float]:
    """CPU seconds to load the catalog, and the frame's memory in MB."""
    started = time.process_time()
    frame = catalog.load_catalog(storage, columns=columns)
    return time.process_time() - started, frame.memory_usage(deep=True).sum() / 1e6


class ByteCounter:
    """A storage that counts the bytes read through it."""

    def __init__(self, storage: LocalStorage) -> None:
        self.storage = storage
        self.bytes_read = 0

    def read_bytes(self, key: str) -> bytes:
        data = self.storage.read_bytes(key)
        self.bytes_read += len(data)
        return data

    def __getattr__(self, name: str):
        return getattr(self.storage, name)


def versions(storage: LocalStorage) -> tuple[float, float, float, float]:
    """The next day's version read in full and with yesterday's summaries: CPU s and MB read of each."""
    days = catalog.partition_days(storage)
    if days:
        catalog.write_version(storage, days[-1])  # what the day before's ingest left
        day = days[-1] + dt.timedelta(days=1)
        storage.copy(catalog.partition_key(days[-1]), catalog.partition_key(day))
    else:
        day = dt.date(2025, 1, 1)
        storage.write_bytes(catalog.partition_key(day), catalog.to_parquet_bytes(catalog.empty_catalog()))
    full, cached = ByteCounter(storage), ByteCounter(storage)
    full_s, before = timed(
        lambda: catalog.build_version(
            day, [catalog.summarise_partition(full, d) for d in catalog.partition_days(full)]
        )
    )
    cached_s, after = timed(catalog.write_version, cached, day)
    if after != before:
        raise SystemExit("the version from summaries differs from the one read in full")
    return full_s, full.bytes_read / 1e6, cached_s, cached.bytes_read / 1e6


def timed(fn, *args) -> tuple[float, dict[str, str]]:
    started = time.process_time()
    value = fn(*args)
    return time.process_time() - started, value


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new", type=int, default=10_000)
    parser.add_argument("--known", default="0,50000,200000,800000")
    parser.add_argument("--copies", type=int, default=0, help="images with one hash, each side")
    args = parser.parse_args()
    settings = load_settings()
    fractions = (settings.data.splits.train, settings.data.splits.val, settings.data.splits.test)
    distance = settings.ingest.near_duplicate_max_distance
    rng = np.random.default_rng(2026)
    roots = rng.integers(0, np.iinfo(np.uint64).max, 5_000, dtype=np.uint64, endpoint=True)
    rows = []
    picture = f"{int(roots[0]):016x}"  # the hash of the picture copied --copies times

    def with_copies(hashes: list[str]) -> list[str]:
        for index in rng.choice(len(hashes), min(args.copies, len(hashes)), replace=False):
            hashes[index] = picture
        return hashes

    copies = f", {args.copies} of them and of the catalog one picture's copies" if args.copies else ""
    print(f"{args.new} new images{copies}, near-duplicates within {distance} bits; CPU seconds\n")
    print(
        "| catalogued images | load, all columns s (MB) | load, 4 columns s (MB) | splits, scan s "
        "| splits, mlops s | scan / mlops | same splits | one image, masked s | one image, filtered s "
        "| version, every partition s (MB read) | version, summaries s (MB read) |\n"
        "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"
    )
    for known_count in [int(n) for n in args.known.split(",")]:
        known = with_copies(clustered_hashes(rng, known_count, roots))
        known_splits = [split_from_hash(f"{index:064x}", fractions) for index in range(known_count)]
        with tempfile.TemporaryDirectory(prefix="mlops-bench-catalog-") as folder:
            storage = LocalStorage(Path(folder))
            write_catalog(storage, rng, known, known_splits)
            all_s, all_mb = loaded(storage, None)
            some_s, some_mb = loaded(storage, KNOWN_COLUMNS)
            target = f"{known_count // 2:064x}"  # a catalogued image's curated hash (none when empty)
            masked_s, masked = timed(rows_by_mask, storage, target)
            filtered_s, filtered = timed(catalog.image_rows, storage, target)
            if filtered.to_dict("records") != masked.to_dict("records"):
                raise SystemExit("filtered and masked lookups found different rows")
            full_s, full_mb, cached_s, cached_mb = versions(storage)
        new = [
            SplitCandidate(f"{known_count + index:064x}", phash)
            for index, phash in enumerate(with_copies(clustered_hashes(rng, args.new, roots)))
        ]
        day = (new, known, known_splits, fractions, distance)
        scan_s, scanned = timed(scan_splits, *day)
        mlops_s, indexed = timed(assign_splits, *day)
        same = scanned == indexed
        moved = sum(indexed[c.sha256] != split_from_hash(c.sha256, fractions) for c in new)
        rows.append(
            {
                "known": known_count,
                "load_all_columns_s": round(all_s, 2),
                "load_all_columns_mb": round(all_mb),
                "load_known_columns_s": round(some_s, 2),
                "load_known_columns_mb": round(some_mb),
                "scan_s": round(scan_s, 2),
                "mlops_s": round(mlops_s, 2),
                "same_splits": same,
                "splits_moved_by_a_near_duplicate": moved,  # one of the same split is not counted
                "image_rows_masked_s": round(masked_s, 2),
                "image_rows_filtered_s": round(filtered_s, 2),
                "image_rows_found": len(filtered),
                "version_every_partition_s": round(full_s, 3),
                "version_every_partition_mb_read": round(full_mb, 1),
                "version_summaries_s": round(cached_s, 3),
                "version_summaries_mb_read": round(cached_mb, 2),
            }
        )
        print(
            f"| {known_count:,} | {all_s:.2f} ({all_mb:.0f}) | {some_s:.2f} ({some_mb:.0f}) | {scan_s:.2f} | "
            f"{mlops_s:.2f} | {scan_s / mlops_s:.1f}x | {same} | {masked_s:.2f} | {filtered_s:.2f} | "
            f"{full_s:.3f} ({full_mb:.1f}) | {cached_s:.3f} ({cached_mb:.2f}) |",
            flush=True,
        )
        if not same:
            raise SystemExit("the index and the scan gave different splits")
    RESULTS.mkdir(exist_ok=True)
    report = {
        "new": args.new,
        "copies": args.copies,
        "max_distance": distance,
        "python": platform.python_version(),
        "rows": rows,
    }
    (RESULTS / "catalog_growth.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
