"""Explanations: the deletion test tells a real attribution from random or wrong ones; Grad-CAM finds cues."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ml.training.explain import (
    deletion_check,
    deletion_test,
    explanation_sample,
    gradcam,
    gradcam_grid_png,
    gradcam_layer,
)

GRID = 4  # 4 x 4 cells of 4 px on 16 px images
CUE = (slice(0, 8), slice(0, 8))  # the top-left quadrant: cells 0, 1, 4, 5


def cue_images(n: int, seed: int) -> np.ndarray:
    """Noise, and a strong positive signal in the top-left quadrant (the only thing that counts)."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n, 3, 16, 16)).astype(np.float32)
    images[:, :, CUE[0], CUE[1]] += 1.5
    return images


def cue_model(arrays: np.ndarray) -> np.ndarray:
    """Class 1's probability rises with the mean of the top-left quadrant: the answer is known."""
    cue = arrays[:, :, CUE[0], CUE[1]].mean(axis=(1, 2, 3))
    p = 1 / (1 + np.exp(-4 * cue))
    return np.stack([1 - p, p], axis=1)


def cue_map(rng: np.random.Generator) -> np.ndarray:
    heat = 0.1 * rng.random((GRID, GRID))
    heat[:2, :2] += 1.0
    return heat


def test_deleting_a_true_attribution_beats_random_deletion() -> None:
    rng = np.random.default_rng(0)
    arrays, targets = cue_images(24, seed=1), np.ones(24, dtype=np.int64)
    maps = np.stack([cue_map(rng) for _ in range(24)])
    result = deletion_test(cue_model, arrays, targets, maps, [0.125, 0.25, 0.5], alpha=0.05, n_bootstrap=500)
    assert result.passed and result.p_value < 1e-3
    assert result.auc_attributed.value < result.auc_random.value and result.auc_gain.low > 0
    assert result.attributed_curve[2].value < 0.6  # the whole cue (4 of 16 cells) deleted at 25%
    assert deletion_check(result).passed


@pytest.mark.parametrize("kind", ["inverted", "random"])
def test_a_wrong_or_random_attribution_fails_the_deletion_test(kind: str) -> None:
    rng = np.random.default_rng(2)
    arrays, targets = cue_images(24, seed=3), np.ones(24, dtype=np.int64)
    if kind == "inverted":  # the cue ranked last: deleting "the most attributed" never touches it early
        maps = np.stack([-cue_map(rng) for _ in range(24)])
    else:
        maps = rng.random((24, GRID, GRID))
    result = deletion_test(cue_model, arrays, targets, maps, [0.125, 0.25, 0.5], alpha=0.05, n_bootstrap=500)
    assert not result.passed and result.p_value > 0.05
    check = deletion_check(result)
    assert not check.passed and "is not shown to lower" in check.detail


class CueNet(nn.Module):
    """conv -> ReLU -> mean: responds to bright pixels wherever they are, so Grad-CAM must find them."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        with torch.no_grad():
            self.backbone[0].weight.fill_(0.1)
            self.backbone[0].bias.fill_(-0.2)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.head.weight[:] = torch.tensor([[-1.0] * 4, [1.0] * 4])
            self.head.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images).mean(dim=(2, 3)))


def test_gradcam_through_captum_points_at_the_cue() -> None:
    model = CueNet().eval()
    images = np.zeros((3, 3, 16, 16), dtype=np.float32)
    for index, (row, col) in enumerate([(2, 2), (12, 3), (5, 12)]):
        images[index, :, row - 2 : row + 2, col - 2 : col + 2] = 2.0
    layer = gradcam_layer(model.backbone)
    assert layer is model.backbone[0]
    maps = gradcam(model, layer, images, np.ones(3, dtype=np.int64))
    assert maps.shape == (3, 16, 16) and (maps >= 0).all()
    for index, (row, col) in enumerate([(2, 2), (12, 3), (5, 12)]):
        peak = np.unravel_index(np.argmax(maps[index]), maps[index].shape)
        assert abs(peak[0] - row) <= 3 and abs(peak[1] - col) <= 3, (index, peak)
    pixels = np.zeros((3, 16, 16, 3), dtype=np.uint8)
    assert gradcam_grid_png(pixels, maps, ["a", "b", "c"]).startswith(b"\x89PNG")


def test_the_sample_takes_correct_predictions_per_class_and_the_most_confident_mistakes() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1])
    proba = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9], [0.6, 0.4], [0.95, 0.05]])
    assert explanation_sample(labels, proba, per_class=1, confusions=2) == [
        (0, "correct"),
        (3, "correct"),
        (5, "confusion"),
        (2, "confusion"),
    ]
