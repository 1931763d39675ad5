"""Benchmark: a day's split assignment (nearest catalogued perceptual hash of each new image) as the
catalog grows.

Side by side, in one run, for a day of 10,000 new images against catalogs of several sizes:

- scan: each new image's hash against every known one (``np.argmin`` of the Hamming distances; what
  ingestion did before, and what a user writes first);
- mlops: ``ml.data.catalog.assign_splits`` (multi-index hashing, ``ml.data.near_duplicates``).

Hashes are drawn in clusters (a root hash and copies of it 0-12 bits away, as pictures of one subject
are) and unrelated; both give the same splits, checked for each size.

Usage: python bench/near_duplicates.py [--new 10000] [--known 0,50000,200000,800000]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from ml.config import load_settings
from ml.data.catalog import SplitCandidate, assign_splits, split_from_hash
from ml.data.images import hamming_distances

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
    args = parser.parse_args()
    settings = load_settings()
    fractions = (settings.data.splits.train, settings.data.splits.val, settings.data.splits.test)
    distance = settings.ingest.near_duplicate_max_distance
    rng = np.random.default_rng(2026)
    roots = rng.integers(0, np.iinfo(np.uint64).max, 5_000, dtype=np.uint64, endpoint=True)
    rows = []
    print(f"{args.new} new images, near-duplicates within {distance} bits; CPU seconds\n")
    print("| catalogued images | scan s | mlops s | scan / mlops | same splits |\n|---:|---:|---:|---:|---|")
    for known_count in [int(n) for n in args.known.split(",")]:
        known = clustered_hashes(rng, known_count, roots)
        known_splits = [split_from_hash(f"{index:064x}", fractions) for index in range(known_count)]
        new = [
            SplitCandidate(f"{known_count + index:064x}", phash)
            for index, phash in enumerate(clustered_hashes(rng, args.new, roots))
        ]
        day = (new, known, known_splits, fractions, distance)
        scan_s, scanned = timed(scan_splits, *day)
        mlops_s, indexed = timed(assign_splits, *day)
        same = scanned == indexed
        inherited = sum(indexed[c.sha256] != split_from_hash(c.sha256, fractions) for c in new)
        rows.append(
            {
                "known": known_count,
                "scan_s": round(scan_s, 2),
                "mlops_s": round(mlops_s, 2),
                "same_splits": same,
                "splits_from_a_near_duplicate": inherited,
            }
        )
        ratio = scan_s / mlops_s
        print(f"| {known_count:,} | {scan_s:.2f} | {mlops_s:.2f} | {ratio:.1f}x | {same} |", flush=True)
        if not same:
            raise SystemExit("the index and the scan gave different splits")
    RESULTS.mkdir(exist_ok=True)
    report = {"new": args.new, "max_distance": distance, "python": platform.python_version(), "rows": rows}
    (RESULTS / "near_duplicates.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
