"""Preprocessing v2: large JPEGs decoded at reduced scale, the same way in training and in serving."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image
from scipy.stats import wasserstein_distance

from ml.data.images import ImageLimits, draft_scale, inspect_image, open_checked
from ml.demo.drawing import KNOWN_CLASSES, render_image
from ml.serving.bundle import BundleMeta
from ml.serving.uploads import decode_upload
from ml.training.preprocessing import Preprocessing, decode_rgb, to_array

FULL = Preprocessing(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DRAFT = dataclasses.replace(FULL, jpeg_draft=True)
LIMITS = ImageLimits(frozenset({"JPEG", "PNG"}), 50_000_000, 20_000_000)
ORIENTATION = 0x0112


def photo(seed: int, size: tuple[int, int], fmt: str = "JPEG", orientation: int | None = None) -> bytes:
    """A demo product image enlarged to ``size`` with sensor-like noise (detail a draft can lose)."""
    rng = np.random.default_rng(seed)
    image = render_image(KNOWN_CLASSES[seed % len(KNOWN_CLASSES)], KNOWN_CLASSES, rng).resize(size)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 8, (size[1], size[0], 3))
    buffer = io.BytesIO()
    picture = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    if orientation is None:
        picture.save(buffer, fmt, quality=90)
    else:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        picture.save(buffer, fmt, quality=90, exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("size", "scale"),
    [
        ((640, 480), 2),
        ((500, 375), 1),
        ((447, 1000), 1),
        ((1024, 768), 2),
        ((1600, 1200), 4),
        ((4000, 3000), 8),
    ],
)
def test_the_draft_scale_keeps_the_model_side_and_the_property_copy(
    size: tuple[int, int], scale: int
) -> None:
    assert draft_scale(*size, 224) == scale


def test_a_large_jpeg_is_decoded_at_reduced_scale_only_when_the_preprocessing_asks() -> None:
    data = photo(1, (640, 480))
    assert decode_rgb(data, DRAFT).size == (320, 240)
    assert decode_rgb(data, FULL).size == decode_rgb(data).size == (640, 480)
    png = photo(1, (640, 480), "PNG")
    assert decode_rgb(png, DRAFT).size == (640, 480)  # only JPEG decoders scale


def test_the_model_input_of_a_drafted_decode_is_close_to_the_full_one() -> None:
    for seed, size in enumerate([(640, 480), (1280, 960), (900, 1600)]):
        data = photo(seed, size)
        full, drafted = to_array(decode_rgb(data), FULL), to_array(decode_rgb(data, DRAFT), DRAFT)
        assert drafted.shape == full.shape == (3, 224, 224)
        assert 0 < float(np.abs(full - drafted).mean()) < 0.05  # normalised units (~1/4 of a grey level)


@pytest.mark.parametrize("orientation", [None, 6])
def test_serving_and_training_build_the_same_input_from_the_same_bytes(orientation: int | None) -> None:
    data = photo(3, (800, 600), orientation=orientation)
    served = decode_upload(data, LIMITS, DRAFT)
    _, upright, props = open_checked(data, LIMITS, DRAFT.draft_side())
    assert props["draft_scale"] == 2
    np.testing.assert_array_equal(served.array, to_array(upright, DRAFT))
    if orientation is None:  # curated bytes carry no EXIF: training decodes them as they are
        np.testing.assert_array_equal(served.array, to_array(decode_rgb(data, DRAFT), DRAFT))
    expected = (600, 800) if orientation == 6 else (800, 600)  # the full upright size, not the draft's
    assert (served.properties["width"], served.properties["height"]) == expected


def test_served_properties_of_drafted_decodes_match_what_ingestion_measured() -> None:
    """Drift compares served properties with the catalog's (full decodes): the draft must not move them
    past the column drift threshold (normed Wasserstein 0.1)."""
    sizes = [(640, 480), (1280, 960), (1024, 768), (2000, 1500)]
    ingested: dict[str, list[float]] = {"brightness": [], "contrast": [], "blur": []}
    served: dict[str, list[float]] = {"brightness": [], "contrast": [], "blur": []}
    for seed in range(40):
        data = photo(seed, sizes[seed % len(sizes)])
        report = inspect_image(data, LIMITS).report
        properties = decode_upload(data, LIMITS, DRAFT).properties
        assert (properties["width"], properties["height"]) == (report.width, report.height)
        for name in ingested:
            ingested[name].append(getattr(report, name))
            served[name].append(properties[name])
    for name in ingested:
        reference, current = np.array(ingested[name]), np.array(served[name])
        assert wasserstein_distance(reference, current) / reference.std() < 0.05, name
    assert np.abs(np.array(served["brightness"]) - ingested["brightness"]).max() < 1.0


def test_the_version_names_the_draft_and_parses_back() -> None:
    assert FULL.version.startswith("resize-bilinear-imagenet-v1:")  # caches and bundles of v1 keep their key
    assert DRAFT.version.startswith("jpeg-draft-resize-bilinear-imagenet-v2:")
    assert Preprocessing.parse(DRAFT.version) == DRAFT
    assert Preprocessing.parse(FULL.version) == FULL
    for unknown in ("crop-v9:224:(0.5, 0.5, 0.5):(0.2, 0.2, 0.2)", "nonsense", FULL.version + ":extra"):
        with pytest.raises(ValueError):
            Preprocessing.parse(unknown)


def test_a_bundle_made_before_v2_keeps_the_full_decode(tmp_path) -> None:
    (tmp_path / "meta.json").write_text(
        '{"model_version": "1", "dataset_version": "d", "run_id": "r", "classes": ["a", "b"],'
        ' "image_size": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}'
    )
    assert BundleMeta.read(tmp_path).preprocessing == FULL
