"""Explanations: Grad-CAM (captum) on the backbone's last convolution, a grid of them, a deletion test.

The deletion test checks that an explanation means something: deleting (setting to the dataset
mean, 0 after normalisation) the cells an attribution ranks highest must lower the explained
class's probability faster than deleting random cells of the same area. Per image, the area
under the deletion curve (probability against deleted share) is compared, paired, with a
random ordering's; a one-sided Wilcoxon signed-rank test decides. Its summary is the
``feature_importance`` artifact.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ml.training.checks import Check, ci_text
from ml.training.evaluate import Metric
from ml.training.intervals import mean_ci

Scorer = Callable[[np.ndarray], np.ndarray]  # preprocessed (N, 3, S, S) -> probabilities (N, K)
CAM_BATCH = 8


def gradcam_layer(backbone: nn.Module) -> nn.Module:
    """The backbone's last convolution (EfficientNet-Lite0: ``_conv_head``, 1280 x 7 x 7 at 224 px)."""
    convolutions = [module for module in backbone.modules() if isinstance(module, nn.Conv2d)]
    if not convolutions:
        raise ValueError(f"{type(backbone).__name__} has no convolution to explain")
    return convolutions[-1]


def gradcam(model: nn.Module, layer: nn.Module, arrays: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Grad-CAM maps (N, h, w) of ``targets`` at ``layer``'s resolution, ReLU'd, not normalised."""
    from captum.attr import LayerGradCam

    cam = LayerGradCam(model.eval(), layer)
    maps = []
    for start in range(0, len(arrays), CAM_BATCH):
        batch = torch.from_numpy(np.ascontiguousarray(arrays[start : start + CAM_BATCH]))
        target = torch.from_numpy(np.asarray(targets[start : start + CAM_BATCH], dtype=np.int64))
        attribution = cam.attribute(batch, target=target, relu_attributions=True)
        maps.append(attribution.detach()[:, 0].numpy())
    return np.concatenate(maps) if maps else np.zeros((0, 1, 1), dtype=np.float32)


# ------------------------------------------------------------------------------ deletion test


def cell_edges(size: int, cells: int) -> np.ndarray:
    return np.linspace(0, size, cells + 1).round().astype(int)


def delete_cells(arrays: np.ndarray, order: np.ndarray, count: int, grid: tuple[int, int]) -> np.ndarray:
    """Copies of ``arrays`` with the first ``count`` cells of each image's ``order`` set to 0."""
    rows, cols = cell_edges(arrays.shape[2], grid[0]), cell_edges(arrays.shape[3], grid[1])
    deleted = arrays.copy()
    for image, cells in enumerate(order[:, :count]):
        for cell in cells:
            r, c = divmod(int(cell), grid[1])
            deleted[image, :, rows[r] : rows[r + 1], cols[c] : cols[c + 1]] = 0.0
    return deleted


def attribution_order(maps: np.ndarray) -> np.ndarray:
    """Cells of each map, most attributed first (ties by position)."""
    flat = maps.reshape(len(maps), -1)
    return np.argsort(-flat, axis=1, kind="stable")


def deletion_curves(
    predict: Scorer,
    arrays: np.ndarray,
    targets: np.ndarray,
    order: np.ndarray,
    fractions: Sequence[float],
    grid: tuple[int, int],
) -> np.ndarray:
    """(N, F) probability of each target after deleting each share of cells in ``order``."""
    cells = grid[0] * grid[1]
    curves = []
    for fraction in fractions:
        count = int(round(fraction * cells))
        batch = delete_cells(arrays, order, count, grid) if count else arrays
        curves.append(predict(batch)[np.arange(len(targets)), targets])
    return np.stack(curves, axis=1)


def curve_auc(curves: np.ndarray, fractions: Sequence[float]) -> np.ndarray:
    """Area under each curve, normalised by the deleted range (a mean probability)."""
    x = np.asarray(fractions, dtype=np.float64)
    return np.trapezoid(curves, x, axis=1) / (x[-1] - x[0])


@dataclass(frozen=True)
class DeletionResult:
    n: int
    fractions: list[float]
    attributed_curve: list[Metric]  # mean probability at each deleted share, with CI
    random_curve: list[Metric]
    auc_attributed: Metric
    auc_random: Metric
    auc_gain: Metric  # random - attributed, paired: > 0 when the attribution finds what matters
    statistic: float
    p_value: float
    alpha: float
    passed: bool
    per_image: dict[str, list[float]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "method": "Grad-CAM deletion vs random deletion of the same area, one-sided Wilcoxon",
            "fractions": self.fractions,
            "attributed_curve": [m.to_dict() for m in self.attributed_curve],
            "random_curve": [m.to_dict() for m in self.random_curve],
            "auc_attributed": self.auc_attributed.to_dict(),
            "auc_random": self.auc_random.to_dict(),
            "auc_gain": self.auc_gain.to_dict(),
            "wilcoxon_statistic": round(self.statistic, 4),
            "p_value": float(f"{self.p_value:.4g}"),
            "alpha": self.alpha,
            "passed": self.passed,
        }


def _wilcoxon_less(first: np.ndarray, second: np.ndarray) -> tuple[float, float]:
    """One-sided Wilcoxon signed-rank of first < second; (0, 1) when every pair is equal."""
    from scipy.stats import wilcoxon

    if len(first) == 0 or np.allclose(first, second):
        return 0.0, 1.0
    found = wilcoxon(first, second, alternative="less")
    return float(found.statistic), float(found.pvalue)


def deletion_test(
    predict: Scorer,
    arrays: np.ndarray,
    targets: np.ndarray,
    maps: np.ndarray,
    fractions: Sequence[float],
    *,
    alpha: float = 0.05,
    seed: int = 0,
    n_bootstrap: int = 1000,
) -> DeletionResult:
    """Attributed deletion against random deletion of the same cells count, per image, paired."""
    grid = (maps.shape[1], maps.shape[2])
    steps = [0.0, *[float(f) for f in fractions if f > 0]]
    rng = np.random.default_rng(seed)
    random_order = np.stack([rng.permutation(grid[0] * grid[1]) for _ in range(len(arrays))])
    attributed = deletion_curves(predict, arrays, targets, attribution_order(maps), steps, grid)
    randomised = deletion_curves(predict, arrays, targets, random_order, steps, grid)
    auc_a, auc_r = curve_auc(attributed, steps), curve_auc(randomised, steps)
    statistic, p_value = _wilcoxon_less(auc_a, auc_r)
    return DeletionResult(
        n=len(arrays),
        fractions=steps,
        attributed_curve=[mean_ci(attributed[:, i], n_bootstrap, seed) for i in range(len(steps))],
        random_curve=[mean_ci(randomised[:, i], n_bootstrap, seed) for i in range(len(steps))],
        auc_attributed=mean_ci(auc_a, n_bootstrap, seed),
        auc_random=mean_ci(auc_r, n_bootstrap, seed),
        auc_gain=mean_ci(auc_r - auc_a, n_bootstrap, seed),
        statistic=statistic,
        p_value=p_value,
        alpha=alpha,
        passed=p_value < alpha,
        per_image={"auc_attributed": auc_a.round(4).tolist(), "auc_random": auc_r.round(4).tolist()},
    )


def deletion_check(result: DeletionResult) -> Check:
    verdict = "lowers" if result.passed else "is not shown to lower"
    op = "<" if result.passed else ">="
    return Check(
        "explanation_deletion",
        result.p_value,
        result.alpha,
        result.passed,
        f"deleting the most-attributed regions {verdict} the predicted class's probability more than random "
        f"regions: deletion AUC {ci_text(result.auc_attributed)} vs random {ci_text(result.auc_random)} "
        f"(n={result.n}, Wilcoxon p={result.p_value:.2g} {op} {result.alpha:g})",
    )


# ------------------------------------------------------------------------------ samples and figures


def explanation_sample(
    labels: np.ndarray, proba: np.ndarray, per_class: int, confusions: int
) -> list[tuple[int, str]]:
    """(index, kind) of the first correct predictions per class and the most confident mistakes."""
    predicted = proba.argmax(axis=1)
    chosen: list[tuple[int, str]] = []
    for k in range(proba.shape[1]):
        hits = np.flatnonzero((labels == k) & (predicted == k))[:per_class]
        chosen += [(int(i), "correct") for i in hits]
    wrong = np.flatnonzero(predicted != labels)
    worst = wrong[np.argsort(-proba[wrong, predicted[wrong]], kind="stable")][:confusions]
    return chosen + [(int(i), "confusion") for i in worst]


def _overlay(pixels: np.ndarray, heat: np.ndarray) -> np.ndarray:
    from matplotlib import colormaps
    from PIL import Image

    size = pixels.shape[:2][::-1]
    scaled = heat / heat.max() if heat.max() > 0 else heat
    upsampled = np.asarray(Image.fromarray((scaled * 255).astype(np.uint8)).resize(size, Image.BILINEAR))
    colours = colormaps["jet"](upsampled / 255.0)[..., :3]
    return (0.55 * pixels / 255.0 + 0.45 * colours).clip(0, 1)


def gradcam_grid_png(pixels: np.ndarray, maps: np.ndarray, titles: Sequence[str], columns: int = 4) -> bytes:
    """Each image (uint8 HWC) with its Grad-CAM map overlaid, titled, in a grid."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = max(1, -(-len(pixels) // columns))
    fig = Figure(figsize=(3 * columns, 3.2 * rows), dpi=80)
    FigureCanvasAgg(fig)
    for index, (image, heat, title) in enumerate(zip(pixels, maps, titles, strict=True)):
        axis = fig.add_subplot(rows, columns, index + 1)
        axis.imshow(_overlay(image, heat))
        axis.set_title(title, fontsize=8)
        axis.axis("off")
    fig.suptitle("Grad-CAM (last convolution of the backbone)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def deletion_png(result: DeletionResult) -> bytes:
    """Mean deletion curves with their 95% CIs: Grad-CAM order against random order."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    axis = fig.add_subplot()
    for name, curve in (("Grad-CAM order", result.attributed_curve), ("random order", result.random_curve)):
        axis.plot(result.fractions, [m.value for m in curve], marker="o", label=name)
        axis.fill_between(result.fractions, [m.low for m in curve], [m.high for m in curve], alpha=0.2)
    axis.set_xlabel("share of the image deleted")
    axis.set_ylabel("probability of the predicted class")
    axis.set_title(f"deletion test: n={result.n}, Wilcoxon p={result.p_value:.2g}")
    axis.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
