"""A fixed, seeded corruption suite: seven common image corruptions at three severities each.

Every corruption is applied to the image as the model sees it (resized to ``image_size`` with
the same bilinear resize as ``to_array``), so a severity means the same at any landed size. The
random parts (noise, occlusion position) come from a generator seeded by (seed, corruption,
severity, image index): the same call gives the same pixels.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from ml.training.preprocessing import Preprocessing, batch_arrays

CORRUPTIONS = ("gaussian_noise", "blur", "brightness", "contrast", "jpeg", "rotation", "occlusion")
SEVERITIES = (1, 2, 3)
GREY = (128, 128, 128)
PARAMETERS: dict[str, tuple[float, float, float]] = {
    "gaussian_noise": (0.04, 0.08, 0.16),  # noise std, in units of the 0..255 range
    "blur": (1.0, 2.0, 3.0),  # Gaussian radius in pixels at the model's input size
    "brightness": (0.7, 0.5, 0.3),  # brightness factor (darker)
    "contrast": (0.6, 0.4, 0.2),  # contrast factor (flatter)
    "jpeg": (30, 15, 6),  # JPEG quality
    "rotation": (10.0, 20.0, 30.0),  # degrees, grey fill
    "occlusion": (0.1, 0.2, 0.3),  # share of the image covered by one grey square
}


def corruption_rng(seed: int, kind: str, severity: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, CORRUPTIONS.index(kind), severity, index])


def _noise(image: Image.Image, std: float, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32)
    noisy = pixels + rng.normal(0.0, std * 255.0, pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8))


def _jpeg(image: Image.Image, quality: float) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=int(quality))
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def _occlude(image: Image.Image, share: float, rng: np.random.Generator) -> Image.Image:
    side = max(1, round(np.sqrt(share) * min(image.size)))
    left = int(rng.integers(0, image.width - side + 1))
    top = int(rng.integers(0, image.height - side + 1))
    occluded = image.copy()
    occluded.paste(GREY, (left, top, left + side, top + side))
    return occluded


def corrupt(image: Image.Image, kind: str, severity: int, rng: np.random.Generator) -> Image.Image:
    """``image`` (RGB) under corruption ``kind`` at ``severity`` (1..3)."""
    if kind not in PARAMETERS or severity not in SEVERITIES:
        raise ValueError(f"unknown corruption {kind!r} at severity {severity}: use {CORRUPTIONS}, 1..3")
    value = PARAMETERS[kind][severity - 1]
    if kind == "gaussian_noise":
        return _noise(image, value, rng)
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(value))
    if kind == "brightness":
        return ImageEnhance.Brightness(image).enhance(value)
    if kind == "contrast":
        return ImageEnhance.Contrast(image).enhance(value)
    if kind == "jpeg":
        return _jpeg(image, value)
    if kind == "rotation":
        return image.rotate(value, resample=Image.Resampling.BILINEAR, fillcolor=GREY)
    return _occlude(image, value, rng)


def model_sized(images: Sequence[Image.Image], prep: Preprocessing) -> list[Image.Image]:
    """Each image resized to the model's input, as ``to_array`` would (resizing again is a no-op)."""
    size = (prep.image_size, prep.image_size)
    return [image.convert("RGB").resize(size, Image.Resampling.BILINEAR) for image in images]


def corrupted_batch(
    sized: Sequence[Image.Image], kind: str, severity: int, prep: Preprocessing, seed: int
) -> np.ndarray:
    """Model-sized images under one corruption, preprocessed: (N, 3, S, S) float32."""
    corrupted = [
        corrupt(image, kind, severity, corruption_rng(seed, kind, severity, index))
        for index, image in enumerate(sized)
    ]
    return batch_arrays(corrupted, prep)
