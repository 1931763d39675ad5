"""The training views as issue 18 found them, for benchmarks' baselines: each augmented view made one
Pillow step at a time on the whole decoded image (crop, flip, rotate the crop, jitter), then resized
by ``to_array``. Today's views are one warp (``ml.training.preprocessing.augmented_array``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

import ml.training.features
from ml.data.images import to_rgb
from ml.training.features import view_rng
from ml.training.preprocessing import FILL, Preprocessing, jitter_table, to_array


def pil_augmented_view(image: Image.Image, rng: np.random.Generator, kinds: Sequence[str]) -> Image.Image:
    """A training view as the code at issue 18 made it (and as users write it): Pillow, one step at a
    time on the whole image, before ``to_array``'s resize."""
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
        view = view.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BILINEAR, fillcolor=FILL)
    if "color_jitter" in kinds:
        view = view.point(jitter_table(rng.uniform(0.8, 1.2), rng.uniform(-20, 20)) * 3)
    return view


def pil_image_views(
    image: Image.Image, sha256: str, views: int, kinds: Sequence[str], prep: Preprocessing
) -> list[np.ndarray]:
    augmented = [pil_augmented_view(image, view_rng(sha256, view), kinds) for view in range(1, views)]
    return [to_array(view, prep) for view in [image, *augmented]]


@contextlib.contextmanager
def issue_views() -> Iterator[None]:
    """The feature cache makes its views as at the issue (the baseline contender only)."""
    today = ml.training.features.image_views
    ml.training.features.image_views = pil_image_views
    try:
        yield
    finally:
        ml.training.features.image_views = today
