"""``ml.data.near_duplicates``: the banded search answers as a scan of every hash does."""

from __future__ import annotations

import numpy as np
import pytest

from ml.data.near_duplicates import NearestHash


def scan(hashes: list[int], target: int, max_distance: int) -> int | None:
    """The plain answer: the first of the nearest hashes, if within ``max_distance`` bits."""
    if not hashes:
        return None
    distances = [(value ^ target).bit_count() for value in hashes]
    nearest = min(range(len(hashes)), key=lambda number: (distances[number], number))
    return nearest if distances[nearest] <= max_distance else None


def near(rng: np.random.Generator, value: int, bits: int) -> int:
    """``value`` with ``bits`` of its 64 bits flipped."""
    for bit in rng.choice(64, size=bits, replace=False):
        value ^= 1 << int(bit)
    return value


@pytest.mark.parametrize("max_distance", [0, 1, 2, 3, 4, 5, 6, 7, 8, 12])  # bands up to 7, a scan beyond
def test_the_banded_search_answers_as_a_scan_of_every_hash(max_distance: int) -> None:
    rng = np.random.default_rng(max_distance)
    roots = [int(v) for v in rng.integers(0, 1 << 63, 40, dtype=np.uint64) * 2 + 1]
    # clusters of near-duplicates at every distance around a few roots (many hashes share bands, and
    # ties at the smallest distance), plus unrelated hashes
    known = [near(rng, roots[i % 40], int(rng.integers(0, 14))) for i in range(1500)]
    known += [int(v) for v in rng.integers(0, 1 << 63, 500, dtype=np.uint64)]
    queries = [near(rng, roots[i % 40], int(rng.integers(0, 16))) for i in range(600)]
    queries += known[:50] + [int(v) for v in rng.integers(0, 1 << 63, 50, dtype=np.uint64)]
    banded = NearestHash(np.array(known, dtype=np.uint64), max_distance, adds=len(queries), scan_up_to=0)
    scanned = NearestHash(np.array(known, dtype=np.uint64), max_distance, adds=len(queries))
    everything = list(known)
    found = 0
    for query in queries:
        expected = scan(everything, query, max_distance)
        assert banded.nearest(query) == expected == scanned.nearest(query)
        found += expected is not None
        assert banded.add(query) == scanned.add(query) == len(everything)  # added ones are searched too
        everything.append(query)
    assert found > 50  # near-duplicates were there to find (besides the 50 copies of known hashes)
    assert bool(banded._bands) == (64 // (max_distance + 1) >= 8)  # bands where they are wide enough


def test_an_empty_index_finds_nothing_and_grows_past_what_it_was_sized_for() -> None:
    hashes = NearestHash(np.zeros(0, dtype=np.uint64), 2, adds=1, scan_up_to=0)
    assert hashes._bands  # searched through its bands: none known, added ones only
    assert hashes.nearest(12345) is None
    numbers = [hashes.add(value) for value in (5, 6, 1 << 63, (1 << 64) - 1, 0)]
    assert numbers == [0, 1, 2, 3, 4]
    assert hashes.nearest(4) == 0 and hashes.nearest(7) == 0  # 1 bit from 5 (and 7 is 1 from 6): the first
    assert hashes.nearest((1 << 64) - 2) == 3 and hashes.nearest(1 << 62) == 4  # 1 bit from 0
    assert hashes.nearest(0xFFFF_0000_0000) is None


def test_copies_of_one_hash_are_compared_once_and_answered_as_a_scan_answers() -> None:
    """A day of re-encoded copies of one picture (one pHash, different bytes) must not turn every query
    into a comparison with every copy: the bands hold a hash once, by its first number."""
    rng = np.random.default_rng(3)
    picture = int(rng.integers(0, 1 << 63, dtype=np.uint64))
    variants = [near(rng, picture, 1 + i % 3) for i in range(20)]  # distinct near-copies
    others = [int(v) for v in rng.integers(0, 1 << 63, 300, dtype=np.uint64)]
    known = [picture] * 2000 + others + variants[:10] + [picture] * 500 + variants[:10]
    queries = [picture] * 800 + variants + [picture] * 200 + others[:20]
    hashes = NearestHash(np.array(known, dtype=np.uint64), 3, adds=len(queries), scan_up_to=0)
    everything = list(known)
    for query in queries:
        assert hashes.nearest(query) == scan(everything, query, 3)
        hashes.add(query)
        everything.append(query)
    compared = np.unique(np.concatenate(hashes._sharing_a_band(near(rng, picture, 2))))
    assert everything.count(picture) == 3500
    assert len(compared) <= 1 + len(variants) + 2  # the picture, its variants, a rare unrelated band match
    assert hashes.nearest(picture) == 0  # the first copy, as a scan answers
