from __future__ import annotations

import dataclasses
import hashlib
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ml.demo.drawing import KNOWN_CLASSES, render_image
from ml.storage import LocalStorage
from ml.training.features import FEATURES_FORMAT, FeatureCache, cache_id, extract
from ml.training.model import Backbone, build_backbone, torch_runner
from ml.training.preprocessing import (
    AUGMENTATION_VERSION,
    FILL,
    Preprocessing,
    augmented_array,
    decode_rgb,
    jitter_table,
    to_array,
)

PREP = Preprocessing(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SMALL = dataclasses.replace(PREP, image_size=96)  # fast, for the cache mechanics
KINDS = ("rotation", "flip", "crop", "color_jitter")
DAYS = ("2024-05-01", "2024-05-02")


@pytest.fixture(scope="module", autouse=True)
def _two_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small() -> Backbone:
    """A random-init backbone for the cache mechanics: resnet18's features are O(1), where
    random-init mobilenet_v3_small's are ~1e-8 and would all round to 0 in float16."""
    return build_backbone("resnet18", pretrained=False)


@pytest.fixture(scope="module")
def lite0() -> Backbone:
    return build_backbone("efficientnet_lite0", pretrained=True)


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    rng = np.random.default_rng(5)
    out = []
    for i in range(25):
        buffer = io.BytesIO()
        render_image(KNOWN_CLASSES[i % 5], KNOWN_CLASSES, rng).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def store(storage: LocalStorage, images: list[bytes]) -> pd.DataFrame:
    """Write images at curated keys; rows alternate between two days."""
    rows = []
    for i, data in enumerate(images):
        sha = hashlib.sha256(data).hexdigest()
        key = f"curated/images/{sha[:2]}/{sha}.png"
        storage.write_bytes(key, data)
        rows.append({"sha256": sha, "day": DAYS[i % 2], "curated_key": key, "label": "x"})
    return pd.DataFrame(rows)


def test_first_call_computes_and_writes_shards_then_all_hits(
    small: Backbone, images: list[bytes], tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path)
    rows = store(storage, images[:20])
    cache = FeatureCache(storage, small, SMALL, views=3, augmentations=KINDS, batch_size=16)
    first, stats = cache.features_for(rows)
    assert (stats.hits, stats.misses) == (0, 20)
    assert stats.seconds_computing > 0
    assert first.shape == (20, 3, small.dim) and first.dtype == np.float32
    assert np.abs(first).mean() > 0.1 and np.abs(first[0] - first[1]).max() > 0.1  # not degenerate
    assert storage.list(f"features/{cache.id}") == [f"features/{cache.id}/{day}.npz" for day in DAYS]
    with np.load(io.BytesIO(storage.read_bytes(cache.shard_key(DAYS[0]))), allow_pickle=False) as shard:
        assert list(shard["sha256"]) == sorted(rows.loc[rows["day"] == DAYS[0], "sha256"])
        assert shard["features"].dtype == np.float16 and shard["features"].shape == (10, 3, small.dim)

    again = FeatureCache(storage, small, SMALL, views=3, augmentations=KINDS, batch_size=16)
    second, stats = again.features_for(rows)
    assert (stats.hits, stats.misses, stats.seconds_computing) == (20, 0, 0.0)
    np.testing.assert_array_equal(first, second)

    order = np.random.default_rng(0).permutation(20)
    shuffled, _ = again.features_for(rows.iloc[order].reset_index(drop=True))
    np.testing.assert_array_equal(shuffled, first[order])  # returned in the order of the rows


def test_chunks_computed_by_several_workers_give_the_same_features(
    small: Backbone, images: list[bytes], tmp_path: Path
) -> None:
    """Threads embed chunks at once; the features (augmented views included) are those of one thread."""
    rows = store(LocalStorage(tmp_path / "one"), images)
    store(LocalStorage(tmp_path / "three"), images)
    threads_seen: set[str] = set()
    runner = torch_runner(small)

    def recording(batch: np.ndarray) -> np.ndarray:
        threads_seen.add(threading.current_thread().name)
        return runner(batch)

    one, _ = FeatureCache(
        LocalStorage(tmp_path / "one"), small, SMALL, views=3, augmentations=KINDS, batch_size=4, workers=1
    ).features_for(rows)
    three_cache = FeatureCache(
        LocalStorage(tmp_path / "three"),
        small,
        SMALL,
        views=3,
        augmentations=KINDS,
        batch_size=4,
        runner=recording,
        workers=3,
    )
    three, stats = three_cache.features_for(rows)
    assert stats.misses == 25
    assert len(threads_seen) > 1  # 7 chunks, 3 threads: the work was spread
    np.testing.assert_array_equal(three, one)


def test_the_backbone_run_one_view_a_call_gives_the_features_of_batched_calls(
    lite0: Backbone, images: list[bytes], tmp_path: Path
) -> None:
    """ONNX Runtime's FP32 features of one view are those it computes for it inside a batch, to the
    bit, so calling the backbone a view at a time (faster on CPU) leaves the cache as it was."""
    from ml.training.model import onnx_runner

    runner = onnx_runner(lite0, PREP.image_size, threads=1)
    rows = store(LocalStorage(tmp_path / "chunks"), images[:10])
    store(LocalStorage(tmp_path / "single"), images[:10])
    sizes: list[int] = []

    def recording(batch: np.ndarray) -> np.ndarray:
        sizes.append(len(batch))
        return runner(batch)

    def cache(folder: str, call_size: int | None) -> FeatureCache:
        return FeatureCache(
            LocalStorage(tmp_path / folder),
            lite0,
            PREP,
            views=3,
            augmentations=KINDS,
            batch_size=8,
            runner=recording,
            call_size=call_size,
        )

    whole, _ = cache("chunks", None).features_for(rows)
    assert sizes == [8, 8, 8, 6]  # 30 views in calls of the chunk's size
    sizes.clear()
    single, stats = cache("single", 1).features_for(rows)
    assert stats.misses == 10 and sizes == [1] * 30
    np.testing.assert_array_equal(single, whole)


def test_only_new_images_are_computed(small: Backbone, images: list[bytes], tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    rows = store(storage, images)
    cache = FeatureCache(storage, small, SMALL, views=2, augmentations=KINDS)
    before, stats = cache.features_for(rows.iloc[:20])
    assert stats.misses == 20
    after, stats = cache.features_for(rows)
    assert (stats.hits, stats.misses) == (20, 5)
    np.testing.assert_array_equal(after[:20], before)
    _, stats = cache.features_for(rows)
    assert (stats.hits, stats.misses) == (25, 0)


def test_duplicate_rows_are_computed_once(small: Backbone, images: list[bytes], tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    rows = store(storage, images[:3])
    doubled = pd.concat([rows, rows.iloc[[0]]], ignore_index=True)
    features, stats = FeatureCache(storage, small, SMALL, views=1, augmentations=()).features_for(doubled)
    assert (stats.hits, stats.misses) == (0, 3)
    np.testing.assert_array_equal(features[3], features[0])


def test_views_of_the_real_backbone(lite0: Backbone, images: list[bytes], tmp_path: Path) -> None:
    rows = store(LocalStorage(tmp_path / "a"), images[:4])
    store(LocalStorage(tmp_path / "b"), images[:4])
    cache = FeatureCache(LocalStorage(tmp_path / "a"), lite0, PREP, views=3, augmentations=KINDS)
    features, _ = cache.features_for(rows)
    assert features.shape == (4, 3, 1280)

    clean = np.stack([to_array(decode_rgb(data), PREP) for data in images[:4]])
    with torch.no_grad():
        expected = lite0.module(torch.from_numpy(clean)).numpy()
    np.testing.assert_allclose(features[:, 0], expected, atol=1e-2, rtol=0)
    for view in (1, 2):
        assert np.abs(features[:, view] - features[:, 0]).max(axis=1).min() > 0.05

    # a second cache on other storage computes everything again, and gets the same views
    other = FeatureCache(LocalStorage(tmp_path / "b"), lite0, PREP, views=3, augmentations=KINDS)
    recomputed, stats = other.features_for(rows)
    assert stats.misses == 4
    np.testing.assert_array_equal(recomputed, features)


def test_cache_id_names_everything_that_changes_a_feature(
    small: Backbone, images: list[bytes], tmp_path: Path
) -> None:
    base = cache_id(small, SMALL, 3, KINDS)
    assert base == cache_id(small, SMALL, 3, tuple(reversed(KINDS)))
    assert (
        len(
            {
                base,
                cache_id(small, dataclasses.replace(PREP, image_size=160), 3, KINDS),
                cache_id(small, SMALL, 2, KINDS),
                cache_id(small, SMALL, 3, ("flip",)),
                cache_id(dataclasses.replace(small, weights_id="0123456789abcdef"), SMALL, 3, KINDS),
                cache_id(dataclasses.replace(small, name="resnet50"), SMALL, 3, KINDS),
                cache_id(small, SMALL, 3, KINDS, "int8"),
            }
        )
        == 7
    )
    # one-view FP32 keys are what they were before precisions and augmentation versions existed: no
    # clean-view cache built before is orphaned; augmented views made another way are other features
    one_view = "|".join([FEATURES_FORMAT, small.name, small.weights_id, SMALL.version, "1", ""])
    assert cache_id(small, SMALL, 1, KINDS) == cache_id(small, SMALL, 1, ()) == short_sha(one_view)
    kinds = ",".join(sorted(KINDS))
    before = "|".join([FEATURES_FORMAT, small.name, small.weights_id, SMALL.version, "3", kinds])
    assert base == cache_id(small, SMALL, 3, KINDS, "fp32") == short_sha(f"{before}|{AUGMENTATION_VERSION}")

    storage = LocalStorage(tmp_path)
    rows = store(storage, images[:6])
    FeatureCache(storage, small, SMALL, views=2, augmentations=KINDS).features_for(rows)
    resized = FeatureCache(storage, small, dataclasses.replace(PREP, image_size=160), 2, KINDS)
    assert resized.id != base
    _, stats = resized.features_for(rows)
    assert (stats.hits, stats.misses) == (0, 6)


def short_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def test_extract_shapes(small: Backbone, images: list[bytes]) -> None:
    pictures = [decode_rgb(data) for data in images[:5]]
    features = extract(small, pictures, SMALL, batch_size=2)
    assert features.shape == (5, small.dim) and features.dtype == np.float32
    np.testing.assert_allclose(extract(small, pictures[3:4], SMALL, batch_size=1)[0], features[3], atol=1e-4)
    assert extract(small, [], SMALL, batch_size=2).shape == (0, small.dim)


def test_bad_arguments_are_rejected(small: Backbone, tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    with pytest.raises(ValueError, match="augmentation"):
        FeatureCache(storage, small, SMALL, views=3, augmentations=())
    cache = FeatureCache(storage, small, SMALL, views=1, augmentations=())
    with pytest.raises(ValueError, match="curated_key"):
        cache.features_for(pd.DataFrame({"sha256": [], "day": []}))
    empty, stats = cache.features_for(pd.DataFrame({"sha256": [], "day": [], "curated_key": []}))
    assert empty.shape == (0, 1, small.dim) and (stats.hits, stats.misses) == (0, 0)


def test_onnx_runner_matches_torch_and_reuses_its_export(
    lite0: Backbone, images: list[bytes], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from ml.training import model

    monkeypatch.setattr(model, "ONNX_BACKBONE_DIR", tmp_path / "onnx")
    pictures = [decode_rgb(data) for data in images[:6]]
    runner = model.onnx_runner(lite0, PREP.image_size, threads=1)
    exported = list((tmp_path / "onnx").glob("*.onnx"))
    assert len(exported) == 1 and lite0.weights_id in exported[0].name
    via_onnx = extract(lite0, pictures, PREP, batch_size=4, runner=runner)
    via_torch = extract(lite0, pictures, PREP, batch_size=4)
    assert np.abs(via_onnx - via_torch).max() < 1e-3
    stamp = exported[0].stat().st_mtime_ns
    model.onnx_runner(lite0, PREP.image_size, threads=1)
    assert exported[0].stat().st_mtime_ns == stamp


def test_onnx_runner_falls_back_to_torch_when_the_export_disagrees(
    small: Backbone, images: list[bytes], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from ml.training import model

    monkeypatch.setattr(model, "ONNX_BACKBONE_DIR", tmp_path / "onnx")
    other = build_backbone("resnet18", pretrained=False)
    with torch.no_grad():
        next(other.module.parameters()).add_(1.0)
    # An export of different weights stored under this backbone's name stands in for a bad export.
    planted = tmp_path / "onnx" / f"resnet18-{small.weights_id}-96.onnx"
    model.export_onnx(other.module, planted, 96, "features")
    runner = model.onnx_runner(small, 96, threads=1)
    pictures = [decode_rgb(data) for data in images[:2]]
    np.testing.assert_allclose(
        extract(small, pictures, SMALL, 2, runner=runner), extract(small, pictures, SMALL, 2), atol=1e-5
    )


@pytest.mark.parametrize(("gain", "shift"), [(0.8, -20.0), (1.2, 20.0), (1.0371, -7.25), (0.93, 13.9)])
def test_colour_jitter_table_is_the_float32_arithmetic_on_every_pixel(gain: float, shift: float) -> None:
    pixels = np.random.default_rng(3).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    pixels.reshape(-1)[:256] = np.arange(256)  # every 8-bit value, in every channel
    by_array = np.clip(pixels.astype(np.float32) * gain + shift, 0, 255).astype(np.uint8)
    by_table = np.asarray(Image.fromarray(pixels).point(jitter_table(gain, shift) * 3))
    assert np.array_equal(by_table, by_array)
    assert not np.array_equal(by_table, pixels)
    assert np.array_equal(cv2.LUT(pixels, np.asarray(jitter_table(gain, shift), dtype=np.uint8)), by_array)


def pillow_steps(image: Image.Image, rng: np.random.Generator, kinds: tuple[str, ...]) -> Image.Image:
    """The reference: crop, flip, rotate and jitter one Pillow step at a time (the same draws)."""
    view = image
    if "crop" in kinds:
        scale = rng.uniform(0.75, 1.0)
        crop_w, crop_h = max(1, int(image.width * scale)), max(1, int(image.height * scale))
        left = int(rng.integers(0, image.width - crop_w + 1))
        top = int(rng.integers(0, image.height - crop_h + 1))
        view = view.crop((left, top, left + crop_w, top + crop_h))
    if "flip" in kinds and rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if "rotation" in kinds:
        view = view.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BILINEAR, fillcolor=FILL)
    if "color_jitter" in kinds:
        view = view.point(jitter_table(rng.uniform(0.8, 1.2), rng.uniform(-20, 20)) * 3)
    return view


@pytest.mark.parametrize("kinds", [("crop",), ("flip",), ("rotation",), ("rotation", "flip", "crop"), KINDS])
def test_a_view_is_the_pillow_steps_view_made_faster(kinds: tuple[str, ...]) -> None:
    """The view is what cropping, flipping, rotating and jittering one Pillow step at a time give:
    the same array without a rotation; with one, within half a level of 8 bits on average
    (OpenCV's bilinear weights are rounded to 1/32 pixel), as sharp, and with the same edges (grey
    only where the source is off the crop). A mirrored angle, a lost flip, a view half a pixel off,
    grey blended into the edges or sampling straight at the input size (no antialiasing) fails."""
    rng = np.random.default_rng(11)
    pictures = [render_image(KNOWN_CLASSES[i % 5], KNOWN_CLASSES, rng) for i in range(6)]
    pictures.append(pictures[0].resize((61, 90), Image.Resampling.BILINEAR))  # smaller than the input
    yy, xx = np.mgrid[:56, :56]
    ring = np.abs(np.hypot(yy - 30, xx - 26) - 14) < 4  # a bright stroke on black, digit-like, 56 px
    pictures.append(Image.fromarray(np.where(ring, 255, 0).astype(np.uint8)).convert("RGB"))
    scale = PREP.affine()[0][:, None, None]
    levels, sharpness = [], []
    for index, picture in enumerate(pictures):
        for seed in range(3):
            warped = augmented_array(picture, np.random.default_rng([index, seed]), kinds, PREP)
            stepped = to_array(pillow_steps(picture, np.random.default_rng([index, seed]), kinds), PREP)
            assert warped.shape == (3, 224, 224) and warped.dtype == np.float32
            levels.append(float((np.abs(warped - stepped) / scale).mean()))
            sharpness.append(
                float(
                    np.abs(np.diff(warped / scale, axis=2)).mean()
                    / np.abs(np.diff(stepped / scale, axis=2)).mean()
                )
            )
            again = augmented_array(picture, np.random.default_rng([index, seed]), kinds, PREP)
            np.testing.assert_array_equal(again, warped)  # seeded: the same view every time
    if "rotation" not in kinds:
        assert max(levels) == 0.0, levels  # a slice and an exact flip: Pillow's pixels
    assert np.mean(levels) < 0.35 and max(levels) < 0.6, levels
    assert 0.99 < np.mean(sharpness) < 1.01, sharpness
