from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ml.data.images import (
    ImageLimits,
    hamming_distances,
    inspect_image,
    lanczos_resize,
    laplacian,
    measured_copy,
    perceptual_hash,
    pixel_statistics,
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


def float64_grey(values: np.ndarray, mode: str) -> np.ndarray:
    """What to_rgb gave before, computed in float64 copies: the reference its float32 copy must match."""
    array = values.astype(np.float64)
    peak = float(array.max())
    if mode == "F" and peak <= 1.0:
        array = array * 255.0
    elif peak > 255.0:
        array = array / 257.0
    return np.clip(array, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    ("mode", "values"),
    [
        ("I;16", np.arange(65536, dtype=np.uint16).reshape(256, 256)),  # every 16-bit value
        ("I", np.arange(-70000, 70000, 7, dtype=np.int32).reshape(100, 200)),  # negatives, past 16 bits
        ("I", np.arange(256, dtype=np.int32).reshape(16, 16)),  # already 8-bit levels
        ("F", np.linspace(0, 1, 4096, dtype=np.float32).reshape(64, 64)),
        ("F", np.linspace(-10, 300, 4096, dtype=np.float32).reshape(64, 64)),
    ],
)
def test_deep_images_become_the_same_8bit_pixels_as_in_float64(mode: str, values: np.ndarray) -> None:
    image = Image.fromarray(values)
    assert image.mode == mode
    found = np.asarray(to_rgb(image))
    assert (found == float64_grey(values, mode)[..., None]).all()


def test_a_large_sixteen_bit_image_is_normalised_in_one_float32_copy() -> None:
    import tracemalloc

    image = Image.fromarray(np.full((5000, 8000), 40000, dtype=np.uint16))  # 40 MP, I;16
    tracemalloc.start()
    try:
        to_rgb(image)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 250 * 2**20, f"{peak / 2**20:.0f} MB"  # float32 160 MB + 8-bit 40 MB; float64 ~1 GB


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


def pillow_lanczos(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS))


def test_the_matrix_lanczos_resize_is_pillows_to_the_bit() -> None:
    rng = np.random.default_rng(2026)
    shapes = [(1, 1), (1, 900), (900, 1), (32, 32), (31, 33), (394, 500), (500, 394), (8, 8), (2000, 40)]
    shapes += [(800, 700)]  # more pixels than the reusable buffer takes
    shapes += [(int(h), int(w)) for h, w in rng.integers(1, 700, (300, 2))]
    compared = {"vertical first": 0, "horizontal first": 0}
    for index, (height, width) in enumerate(shapes):
        kind = index % 3
        if kind == 0:
            pixels = rng.integers(0, 256, (height, width), dtype=np.uint8)
        elif kind == 1:  # hard edges at 0 and 255: the negative lobes overshoot, so the clipping counts
            pixels = np.where(rng.random((height, width)) < 0.5, 0, 255).astype(np.uint8)
        else:
            rows, columns = np.indices((height, width))
            pixels = ((np.sin(columns / 3.7) * np.cos(rows / 2.3) + 1) * 127.5).astype(np.uint8)
        sizes = [(32, 32), (int(rng.integers(1, 300)), int(rng.integers(1, 300)))]
        for size in sizes:
            ours, pillows = lanczos_resize(pixels, size), pillow_lanczos(pixels, size)
            assert np.array_equal(ours, pillows), (pixels.shape, size)
            # C-ordered, as Pillow's pixels come, whatever the pass order
            assert ours.flags.c_contiguous, (pixels.shape, size)
            shrink = height - size[1]
            if width != size[0] and height != size[1]:
                vertical_first = shrink > 0 and shrink > 2 * (width - size[0])
                compared["vertical first" if vertical_first else "horizontal first"] += 1
    assert min(compared.values()) > 50, compared  # both of Pillow's pass orders were held to it
    first = rng.integers(0, 256, (300, 200), dtype=np.uint8)
    kept = lanczos_resize(first, (32, 32))
    copied = lanczos_resize(first, (200, 300))  # no pass at all: a copy, never the reused buffer
    lanczos_resize(rng.integers(0, 256, (300, 200), dtype=np.uint8), (32, 32))
    assert np.array_equal(kept, pillow_lanczos(first, (32, 32))) and np.array_equal(copied, first)
    with pytest.raises(ValueError, match="8-bit grey"):
        lanczos_resize(np.zeros((4, 4, 3), dtype=np.uint8), (2, 2))


def test_the_bands_hold_every_lanczos_weight_once_and_skip_most_zeros() -> None:
    from ml.data.images import _bands, lanczos_taps

    sizes = [(500, 32), (394, 32), (32, 32), (1, 32), (20, 300), (700, 1), (2000, 40), (33, 31)]
    for in_size, out_size in sizes:
        first, count, fixed = lanczos_taps(in_size, out_size)
        dense = np.zeros((in_size, out_size))
        for output in range(out_size):
            dense[first[output] : first[output] + count[output], output] = fixed[output, : count[output]]
        assert (fixed[np.arange(fixed.shape[1]) >= count[:, None]] == 0).all()
        rebuilt = np.zeros((in_size, out_size))
        covered = np.zeros(out_size, dtype=int)
        for first, last, start, stop, block in _bands(in_size, out_size):
            assert block.shape == (last - first, stop - start) and block.dtype == np.float64
            rebuilt[first:last, start:stop] += block
            covered[start:stop] += 1
        assert np.array_equal(rebuilt, dense), (in_size, out_size)  # every weight, in one band only
        assert (covered == 1).all(), (in_size, out_size)
    read = sum((last - first) * (stop - start) for first, last, start, stop, _ in _bands(500, 32))
    assert read < 0.4 * 500 * 32  # the reason for the bands: a 500 -> 32 px pass skips most zero weights


def test_the_perceptual_hash_is_unchanged_by_the_matrix_resize() -> None:
    from scipy.fft import dctn

    for seed, size in [(1, (500, 394)), (2, (394, 500)), (3, (256, 256)), (4, (640, 48)), (5, (20, 300))]:
        grey = photo(seed, size).convert("L")
        pixels = pillow_lanczos(np.asarray(grey), (32, 32)).astype(np.float64)
        low = dctn(pixels, norm="ortho")[:8, :8].ravel()
        assert perceptual_hash(grey) == int(np.packbits(low > np.median(low[1:])).view(">u8")[0])


def test_pixel_statistics_are_the_plain_numpy_figures_to_the_bit() -> None:
    """Brightness, contrast and blur reuse one mean and one grey array: the same float32 figures as
    ``grey.mean()``, ``grey.std()`` and ``laplacian(...).var()`` computed each on its own, and the same
    hash as the grey image's. Hundreds of noise images, as a float64 mean or a float64 std differs
    from float32's in the fourth decimal for about one image in fifty."""
    rng = np.random.default_rng(7)
    sizes = [(500, 375), (333, 517), (64, 3), (255, 256)]
    images = [photo(seed, size) for seed, size in enumerate(sizes)]
    for _ in range(300):
        height, width = rng.integers(3, 200, 2)
        images.append(Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)))
    for image in images:
        grey_image = measured_copy(image).convert("L")
        grey = np.asarray(grey_image).astype(np.float32)
        lap = laplacian(np.asarray(grey_image))
        assert pixel_statistics(image) == {
            "brightness": round(float(grey.mean()), 4),
            "contrast": round(float(grey.std()), 4),
            "blur": round(float(lap.var()) if lap.size else 0.0, 4),
            "phash": f"{perceptual_hash(grey_image):016x}",
        }


def test_a_reports_properties_are_its_fields_but_the_reason_and_detail() -> None:
    from dataclasses import asdict, fields

    report = inspect_image(encode(photo(3), "PNG"), LIMITS).report
    expected = {k: v for k, v in asdict(report).items() if k not in ("reason", "detail")}
    assert report.properties() == expected
    assert set(expected) == {f.name for f in fields(report)} - {"reason", "detail"} and expected["phash"]
