from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ml.data.images import (
    ImageLimits,
    hamming_distances,
    inspect_image,
    laplacian,
    perceptual_hash,
    to_rgb,
)
from tests.hostile import encode, photo, png_bomb, with_exif_gps

LIMITS = ImageLimits(frozenset({"JPEG", "PNG", "WEBP", "BMP", "TIFF"}), 40_000_000, 25_000_000)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty_file"),
        (b"just some text\n" * 10, "not_an_image"),
        (encode(photo(1, (300, 200)), "JPEG")[:900], "corrupt_image"),
        (encode(photo(2), "PNG")[:-40], "corrupt_image"),
        (png_bomb(), "too_many_pixels"),
        (encode(photo(3), "GIF"), "format_not_allowed"),
    ],
)
def test_unsafe_input_is_rejected_with_a_reason(data: bytes, reason: str) -> None:
    result = inspect_image(data, LIMITS)
    assert result.report.reason == reason
    assert result.curated is None


def test_file_size_limit() -> None:
    data = encode(photo(4), "PNG")
    small = ImageLimits(LIMITS.allowed_formats, LIMITS.max_pixels, len(data) - 1)
    assert inspect_image(data, small).report.reason == "file_too_large"


def test_bomb_is_refused_from_the_header_without_decoding() -> None:
    data = png_bomb(20000, 20000)  # 400 Mpx: over Pillow's own limit too
    assert inspect_image(data, LIMITS).report.reason == "too_many_pixels"


@pytest.mark.parametrize(
    "image_bytes",
    [
        encode(photo(5).convert("CMYK"), "JPEG"),
        encode(Image.fromarray(np.asarray(photo(6).convert("L"), np.uint16) * 257), "PNG"),
        encode(photo(7).convert("RGBA"), "PNG"),
        encode(photo(8).convert("L"), "PNG"),
        encode(photo(9).convert("P"), "PNG"),
        encode(photo(10), "TIFF"),
        encode(photo(11), "WEBP"),
        encode(photo(12), "BMP"),
    ],
    ids=["cmyk", "gray16", "rgba", "gray", "palette", "tiff", "webp", "bmp"],
)
def test_every_mode_is_normalised_to_8bit_rgb(image_bytes: bytes) -> None:
    result = inspect_image(image_bytes, LIMITS)
    assert result.report.reason is None, result.report.detail
    curated = Image.open(io.BytesIO(result.curated or b""))
    assert curated.mode == "RGB"
    assert curated.size == (160, 120)
    assert result.report.contrast > 5


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    grey = np.asarray(photo(6).convert("L"), np.uint16)
    rgb = to_rgb(Image.fromarray(grey * 257))
    assert abs(np.asarray(rgb)[..., 0].astype(int) - grey).max() <= 1


def test_exif_and_gps_are_stripped_from_what_is_kept() -> None:
    data = with_exif_gps(photo(13))
    assert Image.open(io.BytesIO(data)).getexif()  # the landed file carries EXIF/GPS
    result = inspect_image(data, LIMITS)
    curated = Image.open(io.BytesIO(result.curated or b""))
    assert not curated.getexif() and "exif" not in curated.info
    assert b"SpyCam" not in (result.curated or b"")


def test_a_clean_jpeg_is_kept_byte_for_byte_and_a_commented_one_is_not() -> None:
    clean = encode(photo(20), "JPEG", quality=90)
    assert inspect_image(clean, LIMITS).curated == clean
    commented = encode(photo(20), "JPEG", quality=90, comment=b"owner: alice@example.com")
    kept = inspect_image(commented, LIMITS).curated or b""
    assert kept != commented and b"alice" not in kept


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    data = encode(photo(14, (160, 120)), "JPEG", exif=exif)
    assert Image.open(io.BytesIO(inspect_image(data, LIMITS).curated or b"")).size == (120, 160)


def test_content_decides_not_the_extension_and_results_are_deterministic() -> None:
    png = encode(photo(15), "PNG")
    first, second = inspect_image(png, LIMITS), inspect_image(png, LIMITS)
    assert first.report.format == "PNG" and first.report == second.report
    assert first.curated == second.curated


def test_properties_measure_brightness_contrast_and_blur() -> None:
    sharp = inspect_image(encode(photo(16, (256, 256)), "PNG"), LIMITS).report
    from PIL import ImageFilter

    blurred_image = photo(16, (256, 256)).filter(ImageFilter.GaussianBlur(4))
    blurred = inspect_image(encode(blurred_image, "PNG"), LIMITS).report
    dark = inspect_image(encode(Image.eval(photo(16, (256, 256)), lambda v: v // 4), "PNG"), LIMITS).report
    assert blurred.blur < sharp.blur / 5
    assert dark.brightness < sharp.brightness / 2
    black = inspect_image(encode(Image.new("RGB", (64, 64)), "PNG"), LIMITS).report
    assert black.brightness == 0 and black.contrast == 0


def test_perceptual_hash_survives_reencoding_but_not_a_different_image() -> None:
    image = photo(17, (320, 240))
    recompressed = Image.open(io.BytesIO(encode(image.resize((200, 150)), "JPEG", quality=60)))
    h1, h2 = perceptual_hash(image.convert("L")), perceptual_hash(recompressed.convert("L"))
    other = perceptual_hash(photo(99, (320, 240)).transpose(Image.Transpose.ROTATE_90).convert("L"))
    distances = hamming_distances(h1, np.array([h2, other], dtype=np.uint64))
    assert distances[0] <= 8 < 16 < distances[1]


def float32_laplacian(pixels: np.ndarray) -> np.ndarray:
    """The Laplacian as first written: summed in float32 over the grey image."""
    grey = pixels.astype(np.float32)
    return grey[1:-1, :-2] + grey[1:-1, 2:] + grey[:-2, 1:-1] + grey[2:, 1:-1] - 4.0 * grey[1:-1, 1:-1]


@pytest.mark.parametrize("shape", [(3, 3), (3, 500), (343, 500), (512, 384), (257, 3)])
def test_the_integer_laplacian_gives_the_float32_blur_to_the_bit(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    noise = rng.integers(0, 256, shape, dtype=np.uint8)
    extremes = np.where(rng.random(shape) < 0.5, 0, 255).astype(np.uint8)
    for pixels in (noise, extremes, np.full(shape, 255, dtype=np.uint8)):
        lap, reference = laplacian(pixels), float32_laplacian(pixels)
        assert lap.dtype == np.float32 and np.array_equal(lap, reference)
        assert float(lap.var()) == float(reference.var())  # the blur, to the bit
    checkerboard = (np.indices((6, 7)).sum(axis=0) % 2 * 255).astype(np.uint8)  # the extremes, +-1020
    assert laplacian(checkerboard).min() == -1020 and laplacian(checkerboard).max() == 1020
    assert np.array_equal(laplacian(checkerboard), float32_laplacian(checkerboard))
    assert laplacian(np.zeros((2, 9), dtype=np.uint8)).size == 0  # no interior: no blur measure
