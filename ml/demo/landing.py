"""Demo days landed in the layout that ingestion reads, and labelled live traffic.

One landing day is ``landing/YYYY-MM-DD/images/<file>`` plus ``landing/YYYY-MM-DD/labels.csv``
(``filename,label,source``), written last because ingestion waits on it. Every byte follows
from ``(seed, day)``: landing a day again gives identical objects.

Each image comes from one of ``SOURCES``: most from a studio, a share from phones whose pictures
are darker and blurrier (harder to classify). The ``source`` column carries it into the catalog,
where model validation slices by it.
"""

from __future__ import annotations

import csv
import datetime
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from ml.demo.drawing import Drift, class_weights, render_image
from ml.layout import LABELS_FILE, LANDING_PREFIX
from ml.storage import Storage, join_key

LABELS_HEADER = ("filename", "label", "source")
JPEG_SHARE = 0.7
JPEG_QUALITY = (85, 95)
PNG_COMPRESS_LEVEL = 3  # fast zlib level: demo PNGs are written often and read once


@dataclass(frozen=True)
class Source:
    """Where an image was taken: its share of the images and how it degrades them."""

    name: str
    share: float
    brightness: float  # PIL brightness factor (1 = unchanged)
    blur: float  # Gaussian blur radius per 100 px of the shorter side
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)  # per-channel gain: a white-balance cast
    noise: float = 0.0  # std of Gaussian sensor noise, grey levels


# The phone source is harder (blurred, dimmer, a colour cast, sensor noise) but never flat: the noise
# keeps every image above ingest.min_contrast, which dimming alone pushed rare images below.
SOURCES = (
    Source("studio", 0.75, 1.0, 0.0),
    Source("phone", 0.25, 0.85, 0.5, (1.0, 0.9, 0.75), noise=6.0),
)


def pick_source(rng: np.random.Generator) -> Source:
    """One source, drawn with the sources' shares."""
    draw, cumulative = rng.random(), 0.0
    for source in SOURCES:
        cumulative += source.share
        if draw < cumulative:
            return source
    return SOURCES[-1]


def through_source(image: Image.Image, source: Source, rng: np.random.Generator) -> Image.Image:
    """The image as ``source`` would have taken it (darker, blurrier, noisier)."""
    if source.blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(source.blur * min(image.size) / 100.0))
    if source.brightness != 1.0:
        image = ImageEnhance.Brightness(image).enhance(source.brightness)
    if source.tint == (1.0, 1.0, 1.0) and source.noise == 0:
        return image
    pixels = np.asarray(image, dtype=np.float32) * np.asarray(source.tint, dtype=np.float32)
    if source.noise > 0:
        pixels += rng.normal(0.0, source.noise, size=pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


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
        data, ext, source = _render(label, classes, image_rng, drift)
        filename = f"img_{index:05d}.{ext}"
        storage.write_bytes(join_key(folder, "images", filename), data)
        rows.append((filename, label, source))
    return rows


def _render(
    label: str, classes: Sequence[str], rng: np.random.Generator, drift: Drift | None
) -> tuple[bytes, str, str]:
    """One encoded image of ``label`` from a drawn source: (bytes, extension, source name)."""
    image = render_image(label, classes, rng, drift)
    source = pick_source(rng)
    data, ext = _encode(through_source(image, source, rng), rng)
    return data, ext, source.name


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
        data, _, _ = _render(classes[class_index], classes, np.random.default_rng(image_seed), drift)
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
