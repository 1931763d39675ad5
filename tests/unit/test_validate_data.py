"""What slices are made of: the demo's harder source, and labels.csv metadata carried into the catalog."""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections import Counter
from pathlib import Path

import numpy as np

from ml.data.catalog import metadata_frame, read_partition
from ml.demo.landing import SOURCES, labelled_images, land_day
from ml.storage import LocalStorage
from ml.training.preprocessing import decode_rgb

CLASSES = ["electronics", "clothing", "home", "books", "toys"]
DAY = dt.date(2026, 3, 2)


def grey_mean(data: bytes) -> float:
    return float(np.asarray(decode_rgb(data).convert("L"), dtype=np.float32).mean())


def blue_to_red(data: bytes) -> float:
    """The phone source's warm colour cast shows as less blue than red."""
    pixels = np.asarray(decode_rgb(data), dtype=np.float32)
    return float(pixels[..., 2].mean() / max(pixels[..., 0].mean(), 1.0))


def test_a_share_of_demo_images_comes_from_a_dimmer_warmer_harder_source(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    land_day(storage, DAY, CLASSES, count=80, seed=5)
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(f"landing/{DAY}/labels.csv").decode())))
    sources = Counter(row["source"] for row in rows)
    assert set(sources) == {source.name for source in SOURCES} == {"studio", "phone"}
    assert 8 <= sources["phone"] <= 32  # 25% of 80, give or take 3 standard deviations
    grey: dict[str, list[float]] = {"studio": [], "phone": []}
    cast: dict[str, list[float]] = {"studio": [], "phone": []}
    for row in rows:
        data = storage.read_bytes(f"landing/{DAY}/images/{row['filename']}")
        grey[row["source"]].append(grey_mean(data))
        cast[row["source"]].append(blue_to_red(data))
    assert np.mean(grey["phone"]) < 0.85 * np.mean(grey["studio"])
    assert np.mean(cast["phone"]) < 0.8 * np.mean(cast["studio"])
    again = LocalStorage(tmp_path / "again")
    land_day(again, DAY, CLASSES, count=80, seed=5)
    assert again.read_bytes(f"landing/{DAY}/labels.csv") == storage.read_bytes(f"landing/{DAY}/labels.csv")


def test_live_traffic_mixes_the_same_sources() -> None:
    cast = [blue_to_red(data) for data, _ in labelled_images(CLASSES, 60, seed=9)]
    warm, neutral = sum(value < 0.7 for value in cast), sum(value > 0.9 for value in cast)
    assert warm >= 5 and neutral >= 20, (warm, neutral)  # studio images alone go no lower than ~0.7


def test_ingestion_keeps_every_extra_labels_csv_column_in_the_catalog(tmp_path: Path, make_settings) -> None:
    from ml.data.ingest import ingest_day

    storage = LocalStorage(tmp_path / "store")
    land_day(storage, DAY, CLASSES, count=12, seed=3)
    key = f"landing/{DAY}/labels.csv"
    landed = list(csv.DictReader(io.StringIO(storage.read_bytes(key).decode())))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["filename", "label", "source", "Camera", "region"])
    for index, row in enumerate(landed):  # any column: mixed case, and one left empty
        writer.writerow(
            [row["filename"], row["label"], row["source"], f"cam{index % 3}", "" if index else "eu"]
        )
    storage.write_bytes(key, buffer.getvalue().encode())
    ingest_day(make_settings(storage__root=str(tmp_path / "store")), storage, DAY)
    catalog = read_partition(storage, DAY)
    metadata = metadata_frame(catalog)
    by_file = {row["filename"]: row for row in landed}
    for (_, row), (_, meta) in zip(catalog.iterrows(), metadata.iterrows(), strict=True):
        name = row["source_key"].rsplit("/", 1)[-1]
        index = [r["filename"] for r in landed].index(name)
        assert meta["source"] == by_file[name]["source"] and meta["camera"] == f"cam{index % 3}"
        assert (meta.get("region") == "eu") == (index == 0)  # an empty value is left out, not ""
    assert len(catalog) == 12
