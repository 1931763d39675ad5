"""The one preprocessing module: training, feature caching and serving all call these functions.

Eval preprocessing is PIL + numpy only (no torch), so the serving image can run it next to ONNX
Runtime and produce exactly the tensor training saw: resize to ``image_size`` square (bilinear,
Pillow's antialiasing), scale to [0, 1], normalise with the ImageNet statistics.

With ``jpeg_draft`` (version ``jpeg-draft-...-v2``) a JPEG at least twice ``image_size`` on its
short side is decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling (Pillow's ``draft``)
before that resize: the decode and the resize then touch a quarter of the pixels or fewer. The
scale is a function of the image's size only (``draft_scale``), so training, the feature cache,
the serving check and the service decode the same bytes to the same pixels. A bundle records the
preprocessing its version was trained with; older versions keep theirs.
"""

from __future__ import annotations

import ast
import io
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from ml.data.images import set_draft, to_rgb

PREPROCESSING_VERSION = "resize-bilinear-imagenet-v1"  # part of every feature-cache key
DRAFT_PREPROCESSING_VERSION = "jpeg-draft-resize-bilinear-imagenet-v2"


@dataclass(frozen=True)
class Preprocessing:
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    jpeg_draft: bool = False  # decode large JPEGs at reduced scale (DCT scaling) before the resize

    @classmethod
    def from_settings(cls, preprocessing: object) -> Preprocessing:
        return cls(
            int(preprocessing.image_size),  # type: ignore[attr-defined]
            tuple(preprocessing.mean),  # type: ignore[attr-defined]
            tuple(preprocessing.std),  # type: ignore[attr-defined]
            bool(getattr(preprocessing, "jpeg_draft", False)),
        )

    @classmethod
    def parse(cls, version: str) -> Preprocessing:
        """The preprocessing a ``version`` string names (as a training run records it); ``ValueError``
        for one this code does not know."""
        try:
            name, size, mean, std = version.split(":")
            parsed = cls(int(size), tuple(ast.literal_eval(mean)), tuple(ast.literal_eval(std)))
        except (ValueError, SyntaxError) as exc:
            raise ValueError(f"unreadable preprocessing {version!r}: {exc}") from None
        if (
            name not in (PREPROCESSING_VERSION, DRAFT_PREPROCESSING_VERSION)
            or parsed.version.split(":", 1)[1] != (version.split(":", 1)[1])
        ):
            raise ValueError(f"unknown preprocessing {version!r}")
        return replace(parsed, jpeg_draft=name == DRAFT_PREPROCESSING_VERSION)

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(scale, offset) per channel with x * scale + offset == (x / 255 - mean) / std."""
        std = np.asarray(self.std, dtype=np.float64)
        scale = 1.0 / (255.0 * std)
        offset = -np.asarray(self.mean, dtype=np.float64) / std
        return scale.astype(np.float32), offset.astype(np.float32)

    @property
    def version(self) -> str:
        name = DRAFT_PREPROCESSING_VERSION if self.jpeg_draft else PREPROCESSING_VERSION
        return f"{name}:{self.image_size}:{self.mean}:{self.std}"

    def draft_side(self) -> int | None:
        """The model input side a drafted decode must still cover (None: decode at full size)."""
        return self.image_size if self.jpeg_draft else None


def decode_rgb(data: bytes, prep: Preprocessing | None = None) -> Image.Image:
    """Decode image bytes to 8-bit RGB with the same normalisation ingestion applies (drafted as
    ``prep`` asks when the image is the model's input)."""
    image = Image.open(io.BytesIO(data))
    set_draft(image, prep.draft_side() if prep is not None else None)
    image.load()
    return to_rgb(image)


def to_array(image: Image.Image, prep: Preprocessing) -> np.ndarray:
    """One RGB image -> float32 array (3, size, size), normalised. The model's input."""
    resized = to_rgb(image).resize((prep.image_size, prep.image_size), Image.Resampling.BILINEAR)
    pixels = np.asarray(resized)
    scale, offset = prep.affine()
    out = np.empty((3, prep.image_size, prep.image_size), dtype=np.float32)
    for channel in range(3):  # (x / 255 - mean) / std as one multiply-add per channel, written as CHW
        np.multiply(pixels[..., channel], scale[channel], out=out[channel], dtype=np.float32)
        out[channel] += offset[channel]
    return out


def batch_arrays(images: Sequence[Image.Image], prep: Preprocessing) -> np.ndarray:
    """Images -> float32 array (N, 3, size, size)."""
    return (
        np.stack([to_array(image, prep) for image in images])
        if images
        else np.zeros((0, 3, prep.image_size, prep.image_size), dtype=np.float32)
    )


def augmented_view(image: Image.Image, rng: np.random.Generator, kinds: Sequence[str]) -> Image.Image:
    """A random training view (rotation, flip, crop, colour jitter), applied before ``to_array``."""
    view = to_rgb(image)
    if "crop" in kinds:
        scale = rng.uniform(0.75, 1.0)
        width, height = view.size
        crop_w, crop_h = max(1, int(width * scale)), max(1, int(height * scale))
        left = int(rng.integers(0, width - crop_w + 1))
        top = int(rng.integers(0, height - crop_h + 1))
        view = view.crop((left, top, left + crop_w, top + crop_h))
    if "flip" in kinds and rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if "rotation" in kinds:
        view = view.rotate(
            float(rng.uniform(-15, 15)), resample=Image.Resampling.BILINEAR, fillcolor=(128, 128, 128)
        )
    if "color_jitter" in kinds:
        view = view.point(jitter_table(rng.uniform(0.8, 1.2), rng.uniform(-20, 20)) * 3)
    return view


def jitter_table(gain: float, shift: float) -> list[int]:
    """clip(x * gain + shift) for each 8-bit value x, in float32: the colour jitter as a lookup table
    (the same arithmetic per value as on a float32 copy of the image, done 256 times instead)."""
    values = np.arange(256, dtype=np.float32) * gain + shift
    return np.clip(values, 0, 255).astype(np.uint8).tolist()
