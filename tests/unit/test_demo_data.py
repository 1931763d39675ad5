"""Demo data: deterministic landing days, valid labels, real variation, drift knobs, separable classes."""

from __future__ import annotations

import csv
import datetime
import io
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml.demo import landing
from ml.demo.drawing import DRIFT_KINDS, Drift, class_weights, render_image
from ml.demo.landing import land_day, land_days
from ml.storage import LocalStorage

CLASSES = ["electronics", "clothing", "home", "books", "toys"]
DAY = datetime.date(2024, 3, 1)
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EDGE_THRESHOLD = 16.0  # grey-level step that counts as an edge in the separability features


class RecordingStorage(LocalStorage):
    """LocalStorage that remembers the order of its writes."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.writes: list[str] = []

    def write_bytes(self, key: str, data: bytes) -> None:
        self.writes.append(key)
        super().write_bytes(key, data)


def _tiny_image(
    label: str, classes: Sequence[str], rng: np.random.Generator, drift: Drift | None = None
) -> Image.Image:
    return Image.new("RGB", (8, 8), (classes.index(label) * 40, 0, 0))


def _read_labels(storage: LocalStorage, day: datetime.date) -> list[dict[str, str]]:
    text = storage.read_bytes(f"landing/{day.isoformat()}/labels.csv").decode("utf-8")
    return list(csv.DictReader(io.StringIO(text)))


def _grey(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float32)


def _laplacian_variance(image: Image.Image) -> float:
    grey = _grey(image)
    lap = grey[1:-1, :-2] + grey[1:-1, 2:] + grey[:-2, 1:-1] + grey[2:, 1:-1] - 4.0 * grey[1:-1, 1:-1]
    return float(lap.var())


def _render_pairs(drift: Drift, count: int = 40) -> list[tuple[Image.Image, Image.Image]]:
    """The same images (same RNG seed) without and with ``drift``."""
    pairs = []
    for seed in range(count):
        label = CLASSES[seed % len(CLASSES)]
        plain = render_image(label, CLASSES, np.random.default_rng(seed))
        drifted = render_image(label, CLASSES, np.random.default_rng(seed), drift)
        pairs.append((plain, drifted))
    return pairs


@pytest.fixture(scope="module")
def landed(tmp_path_factory: pytest.TempPathFactory) -> tuple[RecordingStorage, dict]:
    storage = RecordingStorage(tmp_path_factory.mktemp("landed"))
    summary = land_day(storage, DAY, CLASSES, count=100, seed=7)
    return storage, summary


# ---------------------------------------------------------------- determinism


def test_same_seed_and_day_give_identical_bytes(tmp_path: Path) -> None:
    first, second = LocalStorage(tmp_path / "a"), LocalStorage(tmp_path / "b")
    land_day(first, DAY, CLASSES, count=12, seed=3)
    land_day(second, DAY, CLASSES, count=12, seed=3)
    keys = first.list()
    assert keys == second.list()
    assert len(keys) == 13
    assert all(first.read_bytes(key) == second.read_bytes(key) for key in keys)


def test_other_seed_or_day_gives_other_bytes(tmp_path: Path) -> None:
    base, reseeded, next_day = (LocalStorage(tmp_path / name) for name in ("base", "seed", "day"))
    land_day(base, DAY, CLASSES, count=6, seed=3)
    land_day(reseeded, DAY, CLASSES, count=6, seed=4)
    land_day(next_day, DAY + datetime.timedelta(days=1), CLASSES, count=6, seed=3)
    base_images = [base.read_bytes(key) for key in base.list() if "/images/" in key]
    for other in (reseeded, next_day):
        other_images = [other.read_bytes(key) for key in other.list() if "/images/" in key]
        assert not set(base_images) & set(other_images)


def test_render_image_is_a_function_of_the_rng_state() -> None:
    first = render_image("books", CLASSES, np.random.default_rng(11))
    again = render_image("books", CLASSES, np.random.default_rng(11))
    assert first.mode == "RGB"
    assert first.tobytes() == again.tobytes()


# ---------------------------------------------------------------- layout and labels


def test_labels_csv_is_valid_and_matches_the_images(landed: tuple[RecordingStorage, dict]) -> None:
    storage, summary = landed
    text = storage.read_bytes(summary["labels_key"]).decode("utf-8")
    assert text.splitlines()[0] == "filename,label,source"
    rows = _read_labels(storage, DAY)
    images = {key.rsplit("/", 1)[1] for key in storage.list(f"landing/{DAY.isoformat()}/images")}
    assert len(rows) == summary["images"] == 100
    assert {row["filename"] for row in rows} == images
    assert all(row["label"] in CLASSES and row["source"] for row in rows)
    assert Counter(row["label"] for row in rows) == {k: v for k, v in summary["per_class"].items() if v}
    assert summary["day"] == "2024-03-01"
    assert summary["labels_key"] == "landing/2024-03-01/labels.csv"


def test_labels_csv_is_written_last(landed: tuple[RecordingStorage, dict]) -> None:
    storage, summary = landed
    assert storage.writes[-1] == summary["labels_key"]
    assert all("/images/img_" in key for key in storage.writes[:-1])


# ---------------------------------------------------------------- variation


def test_sizes_span_a_wide_range(landed: tuple[RecordingStorage, dict]) -> None:
    storage, _ = landed
    sizes = []
    for key in storage.list(f"landing/{DAY.isoformat()}/images"):
        with Image.open(io.BytesIO(storage.read_bytes(key))) as image:
            sizes.append(image.size)
            assert image.mode == "RGB"
    assert min(min(size) for size in sizes) < 150
    assert max(max(size) for size in sizes) > 500
    assert any(width != height for width, height in sizes)
    assert all(64 <= side <= 800 for size in sizes for side in size)


def test_jpeg_and_png_are_mixed_and_named_by_content(landed: tuple[RecordingStorage, dict]) -> None:
    storage, _ = landed
    formats = Counter()
    for key in storage.list(f"landing/{DAY.isoformat()}/images"):
        head = storage.read_bytes(key)[:8]
        kind = "jpg" if head.startswith(JPEG_MAGIC) else "png" if head.startswith(PNG_MAGIC) else "other"
        assert key.endswith(f".{kind}")
        formats[kind] += 1
    assert formats["jpg"] > formats["png"] > 0
    assert formats["other"] == 0


# ---------------------------------------------------------------- drift


def test_brightness_drift_darkens() -> None:
    pairs = _render_pairs(Drift.parse("brightness:0.6"))
    plain = np.mean([_grey(image).mean() for image, _ in pairs])
    drifted = np.mean([_grey(image).mean() for _, image in pairs])
    assert drifted < 0.65 * plain  # 1 - 0.7 * 0.6 = 0.58


def test_blur_drift_lowers_sharpness() -> None:
    pairs = _render_pairs(Drift("blur", 0.8))
    ratios = [_laplacian_variance(drifted) / _laplacian_variance(plain) for plain, drifted in pairs]
    assert float(np.median(ratios)) < 0.2
    assert max(ratios) < 0.6


def test_class_mix_does_not_change_pixels() -> None:
    plain = render_image("toys", CLASSES, np.random.default_rng(5))
    mixed = render_image("toys", CLASSES, np.random.default_rng(5), Drift("class_mix", 1.0))
    assert plain.tobytes() == mixed.tobytes()


def test_class_mix_makes_the_first_class_dominant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(landing, "render_image", _tiny_image)
    storage = LocalStorage(tmp_path)
    summary = land_day(storage, DAY, CLASSES, count=300, seed=1, drift=Drift("class_mix", 1.0))
    labels = Counter(row["label"] for row in _read_labels(storage, DAY))
    assert labels["electronics"] > 0.4 * 300
    assert labels == Counter(summary["per_class"])
    uniform = land_day(LocalStorage(tmp_path / "uniform"), DAY, CLASSES, count=300, seed=1)
    assert uniform["per_class"]["electronics"] < 0.3 * 300


def test_class_weights() -> None:
    assert class_weights(CLASSES, None) == pytest.approx([0.2] * 5)
    assert class_weights(CLASSES, Drift("brightness", 1.0)) == pytest.approx([0.2] * 5)
    assert class_weights(CLASSES, Drift("class_mix", 0.5)) == pytest.approx([5 / 9] + [1 / 9] * 4)
    assert sum(class_weights(CLASSES, Drift("class_mix", 1.0))) == pytest.approx(1.0)


def test_land_days_applies_drift_from_the_given_day(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Drift | None] = []

    def recording(
        label: str, classes: Sequence[str], rng: np.random.Generator, drift: Drift | None = None
    ) -> Image.Image:
        seen.append(drift)
        return _tiny_image(label, classes, rng)

    monkeypatch.setattr(landing, "render_image", recording)
    drift = Drift("brightness", 0.5)
    summaries = land_days(LocalStorage(tmp_path), DAY, 3, CLASSES, count=2, seed=1, drift=drift, drift_from=1)
    assert [s["day"] for s in summaries] == ["2024-03-01", "2024-03-02", "2024-03-03"]
    assert [s["drift"] for s in summaries] == [None, "brightness:0.5", "brightness:0.5"]
    assert seen == [None, None, drift, drift, drift, drift]
    everywhere = land_days(LocalStorage(tmp_path / "all"), DAY, 2, CLASSES, count=1, seed=1, drift=drift)
    assert [s["drift"] for s in everywhere] == ["brightness:0.5"] * 2


def test_drift_parse() -> None:
    assert Drift.parse("brightness:0.6") == Drift("brightness", 0.6)
    assert Drift.parse(" class_mix : 1 ") == Drift("class_mix", 1.0)
    assert str(Drift.parse("blur:0.25")) == "blur:0.25"
    assert set(DRIFT_KINDS) == {"brightness", "blur", "class_mix"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("contrast:0.5", "unknown drift kind"),
        ("brightness:1.5", r"within \[0, 1\]"),
        ("blur:-0.1", r"within \[0, 1\]"),
        ("blur:nan", r"within \[0, 1\]"),
        ("blur:strong", "not a number"),
        ("blur", "KIND:STRENGTH"),
    ],
)
def test_drift_parse_rejects_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Drift.parse(spec)


# ---------------------------------------------------------------- classes


def test_unknown_classes_render_deterministically_and_unknown_labels_fail() -> None:
    classes = [*CLASSES, "garden", "sports"]
    for label in ("garden", "sports"):
        first = render_image(label, classes, np.random.default_rng(2))
        assert first.tobytes() == render_image(label, classes, np.random.default_rng(2)).tobytes()
    garden = render_image("garden", classes, np.random.default_rng(2))
    electronics = render_image("electronics", classes, np.random.default_rng(2))
    assert garden.size == electronics.size
    assert garden.tobytes() != electronics.tobytes()
    with pytest.raises(ValueError, match="not one of the classes"):
        render_image("garden", CLASSES, np.random.default_rng(2))


def test_bad_land_day_inputs_fail(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    with pytest.raises(ValueError, match="unique"):
        land_day(storage, DAY, ["books", "books"], count=1, seed=1)
    with pytest.raises(ValueError, match="count"):
        land_day(storage, DAY, CLASSES, count=-1, seed=1)
    with pytest.raises(ValueError, match="seed"):
        land_day(storage, DAY, CLASSES, count=1, seed=-1)
    assert storage.list() == []


def _features(image: Image.Image) -> np.ndarray:
    """Simple statistics of a 128 px thumbnail, taken where the image has edges (backgrounds are smooth).

    16-bin hue, saturation and value histograms of edge pixels, the hue histogram sorted (colour
    variety, whichever colours), a 16-bin edge-strength histogram and horizontal/vertical edge density.
    """
    small = image.copy()
    small.thumbnail((128, 128))
    hsv = np.asarray(small.convert("HSV"), dtype=np.float32)[:-1, :-1]
    grey = _grey(small)
    step_y, step_x = np.abs(np.diff(grey, axis=0))[:, :-1], np.abs(np.diff(grey, axis=1))[:-1, :]
    strength = np.hypot(step_x, step_y)
    on_edges = (strength > EDGE_THRESHOLD).astype(np.float32) + 1e-6
    hists = [np.histogram(hsv[..., band], bins=16, range=(0, 256), weights=on_edges)[0] for band in range(3)]
    hists.append(np.histogram(np.minimum(strength, 127), bins=16, range=(0, 128))[0])
    hists = [hist / hist.sum() for hist in hists]
    density = np.array([(step_x > EDGE_THRESHOLD).mean(), (step_y > EDGE_THRESHOLD).mean()])
    return np.concatenate([*hists, np.sort(hists[0])[::-1], density])


def test_classes_are_separable_by_simple_statistics() -> None:
    train, test = [], []
    for index, label in enumerate(CLASSES):
        for k in range(40):
            features = _features(render_image(label, CLASSES, np.random.default_rng(1000 * index + k)))
            (train if k < 30 else test).append((features, index))
    train_x = np.stack([x for x, _ in train])
    scale = train_x.std(axis=0) + 1e-6
    centroids = np.stack([train_x[[y == c for _, y in train]].mean(axis=0) for c in range(len(CLASSES))])
    hits = [int(np.argmin(np.linalg.norm((centroids - x) / scale, axis=1)) == y) for x, y in test]
    accuracy = sum(hits) / len(hits)
    assert accuracy > 0.6, f"nearest-centroid accuracy {accuracy:.2f}"
