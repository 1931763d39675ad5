"""Demo days landed in the layout that ingestion reads, and labelled live traffic.

One landing day is ``landing/YYYY-MM-DD/images/<file>`` plus ``landing/YYYY-MM-DD/labels.csv``
(``filename,label,source``), written last because ingestion waits on it. Every byte follows
from ``(seed, day)``: landing a day again gives identical objects.
"""

from __future__ import annotations

import csv
import datetime
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from ml.demo.drawing import Drift, class_weights, render_image
from ml.layout import LABELS_FILE, LANDING_PREFIX
from ml.storage import Storage, join_key

LABELS_HEADER = ("filename", "label", "source")
SOURCE = "demo"
JPEG_SHARE = 0.7
JPEG_QUALITY = (85, 95)
PNG_COMPRESS_LEVEL = 3  # fast zlib level: demo PNGs are written often and read once


def _check_inputs(classes: Sequence[str], count: int, seed: int) -> None:
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be a non-empty list of unique names, got {list(classes)}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


def _encode(image: Image.Image, rng: np.random.Generator) -> tuple[bytes, str]:
    """JPEG (quality 85-95) about 70% of the time, else PNG; no metadata, no optimisation passes."""
    buffer = io.BytesIO()
    if rng.random() < JPEG_SHARE:
        quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
        image.save(buffer, "JPEG", quality=quality, optimize=False)
        return buffer.getvalue(), "jpg"
    image.save(buffer, "PNG", optimize=False, compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue(), "png"


def _labels_csv(rows: Sequence[tuple[str, str, str]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(LABELS_HEADER)
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def _land_images(
    storage: Storage,
    folder: str,
    classes: Sequence[str],
    labels: Sequence[int],
    day_seed: np.random.SeedSequence,
    *,
    drift: Drift | None,
) -> list[tuple[str, str, str]]:
    """Render, encode and write each image (its own RNG spawned from the day's); return CSV rows."""
    rows = []
    for index, (class_index, image_seed) in enumerate(zip(labels, day_seed.spawn(len(labels)), strict=True)):
        image_rng = np.random.default_rng(image_seed)
        label = classes[class_index]
        data, ext = _encode(render_image(label, classes, image_rng, drift), image_rng)
        filename = f"img_{index:05d}.{ext}"
        storage.write_bytes(join_key(folder, "images", filename), data)
        rows.append((filename, label, SOURCE))
    return rows


def labelled_images(
    classes: Sequence[str], count: int, seed: int, drift: Drift | None = None
) -> list[tuple[bytes, str]]:
    """``count`` encoded images (JPEG or PNG, as landed) with their labels, in memory: live traffic."""
    _check_inputs(classes, count, seed)
    day_seed = np.random.SeedSequence(seed)
    weights = class_weights(classes, drift)
    labels = np.random.default_rng(day_seed).choice(len(classes), size=count, p=weights).tolist()
    images = []
    for class_index, image_seed in zip(labels, day_seed.spawn(count), strict=True):
        rng = np.random.default_rng(image_seed)
        data, _ = _encode(render_image(classes[class_index], classes, rng, drift), rng)
        images.append((data, classes[class_index]))
    return images


def land_day(
    storage: Storage,
    day: datetime.date,
    classes: Sequence[str],
    *,
    count: int,
    seed: int,
    drift: Drift | None = None,
) -> dict[str, Any]:
    """Write one landing day (images first, ``labels.csv`` last) and return its summary.

    Everything follows from ``(seed, day.toordinal())``, so landing a day again rewrites the same bytes.
    """
    _check_inputs(classes, count, seed)
    day_seed = np.random.SeedSequence(seed, spawn_key=(day.toordinal(),))
    weights = class_weights(classes, drift)
    labels = np.random.default_rng(day_seed).choice(len(classes), size=count, p=weights).tolist()
    folder = join_key(LANDING_PREFIX, day.isoformat())
    rows = _land_images(storage, folder, classes, labels, day_seed, drift=drift)
    labels_key = join_key(folder, LABELS_FILE)
    storage.write_bytes(labels_key, _labels_csv(rows))
    per_class = dict.fromkeys(classes, 0)
    for _, label, _ in rows:
        per_class[label] += 1
    return {
        "day": day.isoformat(),
        "images": count,
        "labels_key": labels_key,
        "per_class": per_class,
        "drift": str(drift) if drift is not None else None,
    }


def land_days(
    storage: Storage,
    start: datetime.date,
    days: int,
    classes: Sequence[str],
    *,
    count: int,
    seed: int,
    drift: Drift | None = None,
    drift_from: int | None = None,
) -> list[dict[str, Any]]:
    """Land ``days`` consecutive days; ``drift`` applies from day index ``drift_from`` (default: all)."""
    if days < 0:
        raise ValueError(f"days must be >= 0, got {days}")
    if drift_from is not None and drift_from < 0:
        raise ValueError(f"drift_from must be >= 0, got {drift_from}")
    summaries = []
    for index in range(days):
        drifted = drift if drift_from is None or index >= drift_from else None
        day = start + datetime.timedelta(days=index)
        summaries.append(land_day(storage, day, classes, count=count, seed=seed, drift=drifted))
    return summaries
