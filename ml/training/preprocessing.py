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

Training views (``augmented_array``, training only): the crop is a slice, the flip and rotation one
bilinear warp (OpenCV) at the crop's resolution, the resize ``to_array``'s. The Pillow steps one at
a time made the same views (the same pixels without a rotation; with one, within half a level of 8
bits on average, as sharp) at twice the cost. ``AUGMENTATION_VERSION`` names it in feature-cache keys.
"""

from __future__ import annotations

import ast
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from ml.data.images import set_draft, to_rgb

PREPROCESSING_VERSION = "resize-bilinear-imagenet-v1"  # part of every feature-cache key
DRAFT_PREPROCESSING_VERSION = "jpeg-draft-resize-bilinear-imagenet-v2"
AUGMENTATION_VERSION = "crop-slice-warp-v2"  # part of the key of a feature cache with augmented views
FILL = (128, 128, 128)  # what a rotation uncovers


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
    return normalise(np.asarray(resized), prep)


def normalise(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """8-bit RGB pixels (size, size, 3) -> float32 (3, size, size), (x / 255 - mean) / std."""
    scale, offset = prep.affine()
    out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
    for channel in range(3):  # one multiply-add per channel, written as CHW
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


def augmented_array(
    image: Image.Image, rng: np.random.Generator, kinds: Sequence[str], prep: Preprocessing
) -> np.ndarray:
    """The model input of a random training view (crop, flip, rotation, colour jitter), like ``to_array``.

    The crop (75-100% of each side) is a slice of the decoded pixels; the left-right flip and the
    rotation (+-15 degrees about the crop's centre, uncovered corners grey) are one affine map, sampled
    by one bilinear warp at the crop's own resolution; then ``to_array`` resizes it as it resizes a
    clean image (Pillow's antialiased bilinear), so a view is as sharp as the clean view."""
    import cv2  # training only: the serving image never augments

    pixels = np.asarray(to_rgb(image))
    height, width = pixels.shape[:2]
    left, top, crop_w, crop_h = 0, 0, width, height
    if "crop" in kinds:
        scale = rng.uniform(0.75, 1.0)
        crop_w, crop_h = max(1, int(width * scale)), max(1, int(height * scale))
        left = int(rng.integers(0, width - crop_w + 1))
        top = int(rng.integers(0, height - crop_h + 1))
    flip = "flip" in kinds and bool(rng.random() < 0.5)
    angle = math.radians(float(rng.uniform(-15, 15))) if "rotation" in kinds else 0.0
    view = pixels[top : top + crop_h, left : left + crop_w]
    if flip or angle:
        warp = flip_and_turn(crop_w, crop_h, angle, flip)
        inverse = cv2.WARP_INVERSE_MAP
        # as Pillow's rotate: a pixel whose source is off the crop is grey; one inside interpolates
        # with the crop's edge pixels repeated (blending in the grey would frame every view)
        inside = cv2.warpAffine(
            np.ones_like(view[..., 0]), warp, (crop_w, crop_h), flags=cv2.INTER_NEAREST | inverse
        )
        view = cv2.warpAffine(
            view, warp, (crop_w, crop_h), flags=cv2.INTER_LINEAR | inverse, borderMode=cv2.BORDER_REPLICATE
        )
        view[inside == 0] = FILL
    if "color_jitter" in kinds:
        view = cv2.LUT(
            view, np.asarray(jitter_table(rng.uniform(0.8, 1.2), rng.uniform(-20, 20)), dtype=np.uint8)
        )
    return to_array(Image.fromarray(np.ascontiguousarray(view)), prep)


def flip_and_turn(width: int, height: int, angle: float, flip: bool) -> np.ndarray:
    """2x3 affine map from a pixel of the view to where it is sampled in the source (OpenCV's pixel
    coordinates, centres at integers): turned back by ``angle`` (radians, counter-clockwise as
    Pillow's ``rotate``) about the centre, then mirrored left-right when ``flip``: the view is the
    source flipped, then rotated."""
    turn = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    centre = np.array([width / 2, height / 2])
    shift = centre - turn @ centre + (turn @ [0.5, 0.5])  # pixel centres sit at i + 0.5
    if flip:
        turn, shift = np.diag([-1.0, 1.0]) @ turn, np.array([width - shift[0], shift[1]])
    return np.hstack([turn, (shift - 0.5)[:, None]])


def jitter_table(gain: float, shift: float) -> list[int]:
    """clip(x * gain + shift) for each 8-bit value x, in float32: the colour jitter as a lookup table
    (the same arithmetic per value as on a float32 copy of the image, done 256 times instead)."""
    values = np.arange(256, dtype=np.float32) * gain + shift
    return np.clip(values, 0, 255).astype(np.uint8).tolist()
