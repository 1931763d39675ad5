"""Decode and check one landed image by its content, normalise it, and measure its properties.

Safety checks (can it be decoded safely at all?) live here; quality rules on the measured
properties (sizes, brightness, contrast) live in the Great Expectations suite
``expectations/image_properties.json``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

PROPERTY_SIDE = 256  # properties are measured on a copy no larger than this
DRAFT_SCALES = (8, 4, 2)  # the reduced scales libjpeg decodes at (DCT scaling)
LOSSY_FORMATS = frozenset({"JPEG"})
ORIENTATION = 0x0112  # EXIF tag


@dataclass(frozen=True)
class ImageLimits:
    allowed_formats: frozenset[str]
    max_pixels: int
    max_file_bytes: int

    @classmethod
    def from_settings(cls, ingest: Any) -> ImageLimits:
        return cls(frozenset(ingest.allowed_formats), ingest.max_pixels, ingest.max_file_bytes)


@dataclass(frozen=True)
class ImageReport:
    """What one landed file turned out to be. ``reason`` is None when it decoded safely."""

    source_sha256: str
    file_bytes: int
    reason: str | None = None
    detail: str = ""
    format: str | None = None
    mode: str | None = None
    width: int = 0
    height: int = 0
    brightness: float = 0.0
    contrast: float = 0.0
    blur: float = 0.0
    phash: str = ""
    sha256: str = ""  # of the curated (normalised, metadata-free) bytes
    curated_ext: str = ""

    def properties(self) -> dict[str, Any]:
        """Every field but ``reason`` and ``detail``: plain values, so no deep copy (``asdict``'s: 9.7
        against 0.7 us a report, ~0.1 s of a 10,000-image day's serial work)."""
        return {k: v for k, v in vars(self).items() if k not in ("reason", "detail")}


@dataclass(frozen=True)
class Inspected:
    report: ImageReport
    curated: bytes | None  # normalised image bytes, None when rejected
    same_as_source: bool = False  # curated bytes are the landed bytes (not shipped back twice)

    def curated_bytes(self, source: bytes) -> bytes | None:
        return source if self.same_as_source else self.curated


def _reject(data: bytes, digest: str, reason: str, detail: str, **props: Any) -> Inspected:
    return Inspected(ImageReport(digest, len(data), reason, detail, **props), None)


def to_rgb(image: Image.Image) -> Image.Image:
    """Normalise any Pillow mode to 8-bit RGB (16-bit and float scaled, alpha on white)."""
    mode = image.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # one copy, scaled in place: a 40-megapixel 16-bit image (a ~100 KB PNG) peaked at ~1 GB as
        # float64 copies. An integer image's copy is float32: it holds every value up to 2**24 exactly,
        # and v / 257 within far less than the 1/257 that separates it from the next whole level, so
        # the truncation to 8 bits gives the same pixels; a float image keeps float64's rounding
        array = np.array(image, dtype=np.float64 if mode == "F" else np.float32)
        peak = float(array.max()) if array.size else 0.0
        if mode == "F" and peak <= 1.0:
            array *= 255.0
        elif peak > 255.0:
            array /= 257.0
        np.clip(array, 0, 255, out=array)
        grey = Image.fromarray(array.astype(np.uint8), mode="L")
        del array
        return grey.convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return image.convert("RGB")
    return image


def draft_scale(width: int, height: int, image_size: int) -> int:
    """The DCT scale (1, 2, 4 or 8) a drafted JPEG decode uses: the largest that keeps the short side
    at least ``image_size`` and the image no smaller than the copy its properties are measured on."""
    reduce_by = max(1, max(width, height) // PROPERTY_SIDE)
    for scale in DRAFT_SCALES:
        if scale <= reduce_by and min(width, height) // scale >= image_size:
            return scale
    return 1


def set_draft(image: Image.Image, side: int | None) -> int:
    """Ask the JPEG decoder of a not yet loaded ``image`` for its ``draft_scale``; the scale used."""
    if side is None or image.format != "JPEG":
        return 1
    width, height = image.size
    scale = draft_scale(width, height, side)
    if scale > 1:
        image.draft(image.mode, (width // scale, height // scale))
        if image.size == (width, height):  # a file the decoder cannot scale: decoded at full size
            return 1
        if image.size != (-(-width // scale), -(-height // scale)):  # libjpeg rounds up
            raise RuntimeError(f"draft of {width}x{height} at 1/{scale} gave {image.size}")
    return scale


def perceptual_hash(grey: Image.Image | np.ndarray) -> int:
    """64-bit DCT perceptual hash (the pHash construction) of a grey image or its 8-bit pixels: robust
    to re-encoding and resizing."""
    from scipy.fft import dctn

    small = lanczos_resize(np.asarray(grey), (32, 32)).astype(np.float64)
    low = dctn(small, norm="ortho")[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int(np.packbits(bits).view(">u8")[0])


LANCZOS_BITS = 22  # Pillow's fixed-point precision for 8-bit resampling (32 - 8 - 2)
SCRATCH_PIXELS = 1 << 19  # inputs up to this many pixels (4 MB as float64) reuse a per-thread buffer
_scratch = threading.local()


def lanczos_resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pillow's LANCZOS ``resize`` of 8-bit grey ``pixels`` to ``size`` (width, height), to the bit.

    Pillow's integer arithmetic (22-bit weights, 8-bit intermediate) as float64 matrix products over
    each output's band of inputs (``_bands``): every partial sum is an integer far below 2**53, so the
    products are exact in any order, and ~3.5x faster than Pillow's scalar loop on one BLAS thread.
    Pillow 13's pass order too: vertical first when the height shrinks by more than twice the width
    does. ``tests/unit/test_images.py`` holds it to Pillow.
    """
    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        raise ValueError(f"lanczos_resize takes 8-bit grey pixels, not {pixels.dtype} {pixels.shape}")
    width, height = size
    in_height, in_width = pixels.shape
    out = _as_float64(pixels)
    horizontal, vertical = in_width != width, in_height != height
    shrink = in_height - height
    vertical_first = horizontal and vertical and shrink > 0 and shrink > 2 * (in_width - width)
    if vertical_first:
        out = _resample_columns(out, in_height, height)
    if horizontal:
        out = _resample_rows(out, in_width, width)
    if vertical and not vertical_first:
        out = _resample_columns(out, in_height, height)
    return out.astype(np.uint8, order="C")


def _as_float64(pixels: np.ndarray) -> np.ndarray:
    """``pixels`` as float64 in this thread's reusable buffer: a fresh 1.6 MB array for each 500 px
    image cost ~400 page faults (~0.45 ms), more than the matrix products save."""
    if pixels.size > SCRATCH_PIXELS:
        return pixels.astype(np.float64)
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.size < pixels.size:
        buffer = _scratch.buffer = np.empty(pixels.size, dtype=np.float64)
    out = buffer[: pixels.size].reshape(pixels.shape)
    np.copyto(out, pixels)
    return out


def _resample_rows(pixels: np.ndarray, in_size: int, out_size: int) -> np.ndarray:
    """The horizontal pass: each row resampled from ``in_size`` to ``out_size`` columns, in 8 bits."""
    out = np.empty((pixels.shape[0], out_size))
    for first, last, start, stop, block in _bands(in_size, out_size):
        np.matmul(pixels[:, first:last], block, out=out[:, start:stop])
    return _fixed_point(out)


def _resample_columns(pixels: np.ndarray, in_size: int, out_size: int) -> np.ndarray:
    """The vertical pass: the horizontal pass of the transpose (matmul takes the strided views)."""
    return _resample_rows(pixels.T, in_size, out_size).T


Band = tuple[int, int, int, int, np.ndarray]  # inputs first:last, outputs start:stop, their weights


@functools.lru_cache(maxsize=256)
def _bands(in_size: int, out_size: int) -> tuple[Band, ...]:
    """Pillow's LANCZOS weights along one axis (``lanczos_taps``) as float64 blocks of adjacent outputs,
    each with the span of inputs it reads. An output reads ~6 x scale inputs, so shrinking 500 px to 32
    a dense (in x out) product would multiply ~80% zeros; blocks of ~6 outputs skip most of them."""
    first, count, fixed = lanczos_taps(in_size, out_size)
    taps = int(count.max())
    per_block = max(1, round(taps * out_size / in_size))  # outputs whose inputs span ~2 x taps
    bands = []
    for start in range(0, out_size, per_block):
        stop = min(start + per_block, out_size)
        low, high = int(first[start:stop].min()), int((first + count)[start:stop].max())
        block = np.zeros((high - low, stop - start))
        for output in range(start, stop):
            offset = first[output] - low
            block[offset : offset + count[output], output - start] = fixed[output, : count[output]]
        block.flags.writeable = False
        bands.append((low, high, start, stop, block))
    return tuple(bands)


def _fixed_point(sums: np.ndarray) -> np.ndarray:
    """Pillow's rounding of weighted sums back to 8 bits: add half, shift, clip."""
    sums += 1 << (LANCZOS_BITS - 1)
    return np.clip(np.floor(sums * (1.0 / (1 << LANCZOS_BITS))), 0, 255)


def lanczos_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pillow's LANCZOS resampling along one axis: each output's first input, its number of inputs,
    and their integer (22-bit fixed point) weights, one row per output (zero past its count)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 3.0 * filterscale
    centers = (np.arange(out_size) + 0.5) * scale
    first = np.maximum((centers - support + 0.5).astype(np.int64), 0)  # C's (int) truncates, as astype
    count = np.minimum((centers + support + 0.5).astype(np.int64), in_size) - first
    taps = np.arange(int(count.max()))
    used = taps[None, :] < count[:, None]
    x = ((taps[None, :] + first[:, None]) - centers[:, None] + 0.5) * (1.0 / filterscale)
    kernel = np.where(used & (x >= -3.0) & (x < 3.0), _sinc(x) * _sinc(x / 3), 0.0)
    total = np.cumsum(kernel, axis=1)[:, -1:]  # summed left to right, as Pillow sums them
    np.divide(kernel, total, out=kernel, where=total != 0.0)  # a row summing to 0 stays as it is
    fixed = kernel * (1 << LANCZOS_BITS)
    return first, count, np.trunc(np.where(fixed < 0, fixed - 0.5, fixed + 0.5))


def _sinc(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(x == 0.0, 1.0, np.sin(x * np.pi) / (x * np.pi))


def measured_copy(rgb: Image.Image, scale: int = 1, full_size: tuple[int, int] | None = None) -> Image.Image:
    """The copy properties are measured on: the full image box-reduced by an integer factor so that its
    longest side is about ``PROPERTY_SIDE``. A drafted decode (``scale`` > 1 of ``full_size``) is
    reduced to the same size (by ``Image.reduce`` when the factors divide, else a box resize)."""
    width, height = full_size or rgb.size
    factor = max(1, max(width, height) // PROPERTY_SIDE)
    if scale == 1:
        return rgb.reduce(factor) if factor > 1 else rgb
    if factor % scale == 0:
        return rgb.reduce(factor // scale) if factor > scale else rgb
    return rgb.resize((-(-width // factor), -(-height // factor)), Image.Resampling.BOX)


def laplacian(pixels: np.ndarray) -> np.ndarray:
    """The 4-neighbour Laplacian of 8-bit grey pixels (interior only), as float32.

    Computed in int16: every value is an integer within +-1020, so it equals a float32 computation
    of the same sums to the bit (and so does its variance, the blur), at about a third of the cost.
    """
    if pixels.shape[0] <= 2 or pixels.shape[1] <= 2:
        return np.zeros((0,), dtype=np.float32)
    wide = pixels.astype(np.int16)
    lap = wide[1:-1, :-2] + wide[1:-1, 2:]
    lap += wide[:-2, 1:-1]
    lap += wide[2:, 1:-1]
    lap -= 4 * wide[1:-1, 1:-1]
    return lap.astype(np.float32)


def pixel_statistics(
    rgb: Image.Image, phash: bool = True, scale: int = 1, full_size: tuple[int, int] | None = None
) -> dict[str, float | str]:
    """Brightness (mean grey), contrast (grey std), blur (Laplacian variance), perceptual hash; of a
    drafted decode at 1/``scale`` of ``full_size`` as of the full image, but for the decoder's filter."""
    pixels = np.asarray(measured_copy(rgb, scale, full_size).convert("L"))  # box average: fast
    grey = pixels.astype(np.float32)
    mean = grey.mean(keepdims=True)  # the very sum ``std`` would compute again
    lap = laplacian(pixels)
    measured: dict[str, float | str] = {
        "brightness": round(float(mean.item()), 4),
        "contrast": round(float(grey.std(mean=mean)), 4),
        "blur": round(float(lap.var()) if lap.size else 0.0, 4),
    }
    if phash:
        measured["phash"] = f"{perceptual_hash(pixels):016x}"
    return measured


def is_clean_rgb_jpeg(image: Image.Image) -> bool:
    """A baseline RGB JPEG with no metadata segments besides JFIF: safe to keep byte for byte."""
    applist = getattr(image, "applist", None)
    return (
        image.format == "JPEG"
        and image.mode == "RGB"
        and applist is not None
        and all(marker == "APP0" and payload.startswith(b"JFIF") for marker, payload in applist)
        and "comment" not in image.info
    )


def encode_curated(rgb: Image.Image, source_format: str) -> tuple[bytes, str]:
    """Metadata-free bytes: JPEG sources stay JPEG (quality 95), everything else PNG (lossless)."""
    rgb.info = {}  # Pillow's encoders carry comments, ICC profiles and the like over from .info
    buffer = io.BytesIO()
    if source_format in LOSSY_FORMATS:
        rgb.save(buffer, format="JPEG", quality=95, optimize=False)
        return buffer.getvalue(), "jpg"
    rgb.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue(), "png"


class Rejected(ValueError):
    """A file that cannot be decoded safely; ``reason`` is a stable code, ``detail`` says why."""

    def __init__(self, reason: str, detail: str, props: dict[str, Any] | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.props = reason, detail, props or {}


def open_checked(
    data: bytes, limits: ImageLimits, draft_side: int | None = None
) -> tuple[Image.Image, Image.Image, dict[str, Any]]:
    """(decoded image, upright 8-bit RGB, format/mode/size) of ``data``, checked by content.

    With ``draft_side`` a large JPEG is decoded at ``draft_scale`` (props: ``draft_scale``, and the
    full upright size as ``upright_width``/``upright_height``). Raises ``Rejected`` for empty,
    oversized, unrecognised, disallowed, bomb or corrupt input.
    """
    if not data:
        raise Rejected("empty_file", "the file has zero bytes")
    if len(data) > limits.max_file_bytes:
        raise Rejected("file_too_large", f"{len(data)} bytes > {limits.max_file_bytes}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise Rejected("not_an_image", "content is not a recognised image format") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise Rejected("too_many_pixels", str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a rejection, not a crash
            raise Rejected("corrupt_image", f"{type(exc).__name__}: {exc}") from None
        fmt = image.format or "unknown"
        width, height = image.size
        props: dict[str, Any] = {"format": fmt, "mode": image.mode, "width": width, "height": height}
        if fmt not in limits.allowed_formats:
            raise Rejected("format_not_allowed", f"{fmt} is not in the allowed formats", props)
        if width * height > limits.max_pixels:
            raise Rejected(
                "too_many_pixels", f"{width}x{height} = {width * height} pixels > {limits.max_pixels}", props
            )
        try:
            orientation = image.getexif().get(ORIENTATION, 1)
            scale = set_draft(image, draft_side)
            image.load()
            rgb = to_rgb(image if orientation in (1, None) else ImageOps.exif_transpose(image))
        except Exception as exc:  # noqa: BLE001 - truncated/corrupt streams raise many types
            raise Rejected("corrupt_image", f"{type(exc).__name__}: {exc}", props) from None
    turned = orientation in (5, 6, 7, 8)  # a quarter turn: width and height swap
    upright = (height, width) if turned else (width, height)
    return (
        image,
        rgb,
        {**props, "upright_width": upright[0], "upright_height": upright[1], "draft_scale": scale},
    )


def inspect_image(data: bytes, limits: ImageLimits) -> Inspected:
    """Decode ``data`` safely, verify it by content, normalise it and measure it."""
    digest = hashlib.sha256(data).hexdigest()
    try:
        image, rgb, props = open_checked(data, limits)
    except Rejected as exc:
        return _reject(data, digest, exc.reason, exc.detail, **exc.props)
    # A clean RGB JPEG is kept as landed (lossless, and no re-encoding cost); the rest is re-encoded.
    same_as_source = is_clean_rgb_jpeg(image)
    curated, ext = (data, "jpg") if same_as_source else encode_curated(rgb, props["format"])
    report = ImageReport(
        source_sha256=digest,
        file_bytes=len(data),
        format=props["format"],
        mode=props["mode"],
        width=rgb.width,
        height=rgb.height,
        sha256=digest if same_as_source else hashlib.sha256(curated).hexdigest(),
        curated_ext=ext,
        **pixel_statistics(rgb),  # type: ignore[arg-type]
    )
    return Inspected(report, curated, same_as_source)


def inspect_for_pool(data: bytes, limits: ImageLimits) -> Inspected:
    """``inspect_image`` for a worker process: landed bytes kept as curated are not sent back."""
    result = inspect_image(data, limits)
    return Inspected(result.report, None, True) if result.same_as_source else result


def hamming_distances(target: int, others: np.ndarray) -> np.ndarray:
    """Hamming distance between one 64-bit hash and an array of them (uint64)."""
    xor = np.bitwise_xor(others, np.uint64(target))
    return np.bitwise_count(xor)
