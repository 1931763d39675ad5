"""The nearest perceptual hash within a few bits, without comparing a new image with every catalogued one.

A day's split assignment asks, for each new image in turn, which known hash is nearest to its own. A scan
of every known hash costs (new images) x (catalogued images): 0.07 s for a 10,000-image day on an empty
catalog, 2 s against 200,000 catalogued images, ~40 s a day after a year of such days. Multi-index
hashing answers the same question from the few hashes that share a band with the query.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import pairwise

import numpy as np

from ml.data.images import hamming_distances

HASH_BITS = 64
MIN_BAND_BITS = 8  # narrower bands are shared by chance with too many hashes: a scan is as fast
SCAN_UP_TO = 50_000  # hashes (known and added) up to which a scan of all is faster than the bands


class NearestHash:
    """64-bit hashes numbered in the order they are given (the known ones, then each ``add``-ed), and for a
    query the number of the nearest one within ``max_distance`` bits: the smallest distance, and of those
    the first given, as a scan of all of them in order answers.

    Each hash is cut into ``max_distance + 1`` bands; two hashes that differ in at most ``max_distance``
    bits agree on at least one band (pigeonhole), so only the hashes sharing a band with the query are
    compared: the known ones found by binary search in each band's sorted values, the added ones in a dict.
    The bands hold each distinct hash once, by its first number (the one a scan answers among equal
    hashes), so many copies of one hash cost a query one comparison, not one per copy.
    Up to ``scan_up_to`` hashes in all, or with bands under ``MIN_BAND_BITS`` wide, it scans all of them.
    """

    def __init__(
        self, known: np.ndarray, max_distance: int, adds: int = 0, scan_up_to: int = SCAN_UP_TO
    ) -> None:
        self.max_distance = max_distance
        self._hashes = np.zeros(len(known) + adds, dtype=np.uint64)
        self._hashes[: len(known)] = known
        self._count = len(known)
        bands = max_distance + 1
        width = HASH_BITS // bands
        self._bands: list[tuple[int, int]] = []  # (shift, mask) of each band; none: scan
        if len(known) + adds > scan_up_to and width >= MIN_BAND_BITS:
            edges = [band * width for band in range(bands)] + [HASH_BITS]
            self._bands = [(low, (1 << (high - low)) - 1) for low, high in pairwise(edges)]
        self._distinct_known = np.zeros(0, dtype=np.uint64)  # sorted, to tell an added hash already banded
        self._sorted = []  # per band: the distinct known hashes' band values, sorted, and their first numbers
        if self._bands:
            self._distinct_known, first = np.unique(self._hashes[: self._count], return_index=True)
            first = first.astype(np.int32)  # 4 bytes a hash and band
            for shift, mask in self._bands:
                values = (self._distinct_known >> np.uint64(shift)) & np.uint64(mask)
                order = np.argsort(values, kind="stable")
                self._sorted.append((values[order], first[order]))
        self._added: list[dict[int, list[int]]] = [defaultdict(list) for _ in self._bands]
        self._distinct_added: set[int] = set()

    def nearest(self, target: int) -> int | None:
        """The number of the nearest hash within ``max_distance`` bits of ``target``; None if none is."""
        if not self._bands:
            numbers, hashes = None, self._hashes[: self._count]
        else:
            numbers = np.unique(np.concatenate(self._sharing_a_band(target)))
            hashes = self._hashes[numbers]
        if not hashes.size:
            return None
        distances = hamming_distances(target, hashes)
        first = int(np.argmin(distances))  # in ascending numbers: the first of the nearest
        if int(distances[first]) > self.max_distance:
            return None
        return first if numbers is None else int(numbers[first])

    def _sharing_a_band(self, target: int) -> list[np.ndarray]:
        """The numbers of the hashes that agree with ``target`` on a band, per band (known, then added)."""
        parts = []
        for (shift, mask), (values, order), added in zip(self._bands, self._sorted, self._added, strict=True):
            key = (target >> shift) & mask
            at = np.uint64(key)
            low, high = np.searchsorted(values, at), np.searchsorted(values, at, "right")
            parts += [order[low:high], np.asarray(added.get(key, ()), dtype=np.int64)]
        return parts

    def add(self, value: int) -> int:
        """Add a hash; its number."""
        number = self._count
        if number == len(self._hashes):
            self._hashes = np.concatenate([self._hashes, np.zeros(max(16, number), dtype=np.uint64)])
        self._hashes[number] = value
        self._count += 1
        if self._bands and not self._banded(value):
            self._distinct_added.add(value)
            for (shift, mask), added in zip(self._bands, self._added, strict=True):
                added[(value >> shift) & mask].append(number)
        return number

    def _banded(self, value: int) -> bool:
        """Whether an equal hash is in the bands already (by a smaller number, which a query answers)."""
        if value in self._distinct_added:
            return True
        at = int(np.searchsorted(self._distinct_known, np.uint64(value)))
        return at < len(self._distinct_known) and int(self._distinct_known[at]) == value
