"""Robustness: accuracy under the corruption suite, and under FGSM and PGD attacks.

Corruptions are scored through the whole model (``Scorer``: preprocessed images -> class
probabilities), the challenger's and, when there is one, the champion's on the same corrupted
images, so the two compare paired: each image's accuracy over all conditions, challenger minus
champion, is one paired difference (the conditions of one image are not independent draws).
Attacks run on the torch ``Classifier`` (backbone + head) in pixel space: the model is wrapped
to normalise its input, so ``eps`` bounds the change of each pixel in [0, 1] (``eps`` is given in
1/255 steps), and every adversarial image stays a valid image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image
from torch import nn

from ml.training.checks import Check, ci_text
from ml.training.corruptions import SEVERITIES, corrupted_batch, model_sized
from ml.training.evaluate import Metric, NonInferiority, paired_non_inferiority
from ml.training.intervals import share_ci, statistic_ci
from ml.training.preprocessing import Preprocessing, batch_arrays

Scorer = Callable[[np.ndarray], np.ndarray]  # preprocessed (N, 3, S, S) -> probabilities (N, K)
MultiScorer = Callable[[np.ndarray], Sequence[np.ndarray]]  # the same, for several models at once
ATTACK_BATCH = 8


@dataclass(frozen=True)
class CorruptionResult:
    corruption: str
    severity: int
    accuracy: Metric
    champion_accuracy: Metric | None

    def to_dict(self) -> dict:
        champion = None if self.champion_accuracy is None else self.champion_accuracy.to_dict()
        return {
            "corruption": self.corruption,
            "severity": self.severity,
            "accuracy": self.accuracy.to_dict(),
            "champion_accuracy": champion,
        }


@dataclass(frozen=True)
class CorruptionSuite:
    """Accuracy per corruption and severity, their mean (CI over images) and its share of clean."""

    n: int
    clean_accuracy: Metric
    results: list[CorruptionResult]
    mean_accuracy: Metric
    ratio: Metric
    champion_mean_accuracy: Metric | None = None
    comparison: NonInferiority | None = None

    def to_dict(self) -> dict:
        comparison = self.comparison
        return {
            "n": self.n,
            "clean_accuracy": self.clean_accuracy.to_dict(),
            "mean_accuracy": self.mean_accuracy.to_dict(),
            "ratio_to_clean": self.ratio.to_dict(),
            "champion_mean_accuracy": None
            if self.champion_mean_accuracy is None
            else self.champion_mean_accuracy.to_dict(),
            "vs_champion": None
            if comparison is None
            else {
                "difference": round(comparison.difference, 4),
                "lower_bound": round(comparison.lower_bound, 4),
                "margin": comparison.margin,
                "p_value": float(f"{comparison.p_value:.4g}"),
                "non_inferior": comparison.non_inferior,
            },
            "results": [result.to_dict() for result in self.results],
        }


def summarise_corruptions(
    conditions: Sequence[tuple[str, int]],
    clean: np.ndarray,
    correct: np.ndarray,
    champion: np.ndarray | None,
    *,
    margin: float,
    alpha: float,
    n_bootstrap: int,
    seed: int,
) -> CorruptionSuite:
    """The suite from correctness: ``clean`` (n,), ``correct`` and ``champion`` (conditions, n)."""
    n = clean.size
    per_image = correct.mean(axis=0)
    clean_share = float(clean.mean())

    def ratio(idx: np.ndarray) -> np.ndarray:
        base = clean[idx].mean(axis=1)
        return np.divide(per_image[idx].mean(axis=1), base, out=np.zeros(len(idx)), where=base > 0)

    results = [
        CorruptionResult(
            kind,
            severity,
            share_ci(correct[i], n_bootstrap, seed),
            None if champion is None else share_ci(champion[i], n_bootstrap, seed),
        )
        for i, (kind, severity) in enumerate(conditions)
    ]
    mean = float(per_image.mean())
    return CorruptionSuite(
        n=n,
        clean_accuracy=share_ci(clean, n_bootstrap, seed),
        results=results,
        mean_accuracy=statistic_ci(mean, lambda idx: per_image[idx].mean(axis=1), n, n_bootstrap, seed),
        ratio=statistic_ci(mean / clean_share if clean_share else 0.0, ratio, n, n_bootstrap, seed),
        champion_mean_accuracy=None
        if champion is None
        else statistic_ci(
            float(champion.mean()), lambda idx: champion.mean(axis=0)[idx].mean(axis=1), n, n_bootstrap, seed
        ),
        # paired per image (its accuracy over every condition): conditions of one image are not independent
        comparison=None
        if champion is None
        else paired_non_inferiority(per_image - champion.mean(axis=0), margin=margin, alpha=alpha),
    )


def corruption_correctness(
    images: Sequence[Image.Image],
    labels: np.ndarray,
    prep: Preprocessing,
    score: MultiScorer,
    kinds: Sequence[str],
    seed: int,
) -> tuple[list[tuple[str, int]], np.ndarray, np.ndarray]:
    """(conditions, clean (models, n), corrupted (models, conditions, n)): each model's correctness.

    ``score`` answers for every model at once, so models sharing a backbone share its features."""
    sized = model_sized(images, prep)
    clean = np.stack([proba.argmax(axis=1) == labels for proba in score(batch_arrays(sized, prep))])
    conditions = [(kind, severity) for kind in kinds for severity in SEVERITIES]
    correct = np.zeros((len(clean), len(conditions), len(labels)), dtype=bool)
    for index, (kind, severity) in enumerate(conditions):
        for model, proba in enumerate(score(corrupted_batch(sized, kind, severity, prep, seed))):
            correct[model, index] = proba.argmax(axis=1) == labels
    return conditions, clean, correct


# ---------------------------------------------------------------------------------- attacks


class PixelSpace(nn.Module):
    """A classifier on pixels in [0, 1]: it normalises first, so attacks perturb real pixels."""

    def __init__(self, model: nn.Module, prep: Preprocessing) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(prep.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(prep.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model((pixels - self.mean) / self.std)


def to_pixels(arrays: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Preprocessed arrays back to pixels in [0, 1] (the inverse of the normalisation)."""
    mean = np.asarray(prep.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(prep.std, dtype=np.float32).reshape(1, 3, 1, 1)
    return np.clip(arrays * std + mean, 0.0, 1.0).astype(np.float32)


def input_gradient(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """d cross-entropy / d pixels."""
    pixels = pixels.detach().clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(model(pixels), labels)
    (gradient,) = torch.autograd.grad(loss, pixels)
    return gradient


def fgsm(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """One signed-gradient step of size ``eps`` (pixels in [0, 1])."""
    return (pixels + eps * input_gradient(model, pixels, labels).sign()).clamp(0.0, 1.0).detach()


def pgd(
    model: nn.Module,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    steps: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Projected gradient descent in the L-infinity ball of radius ``eps``, from a random start."""
    step = 2.5 * eps / steps
    start = torch.empty_like(pixels).uniform_(-eps, eps, generator=generator)
    adversarial = (pixels + start).clamp(0.0, 1.0)
    for _ in range(steps):
        adversarial = adversarial + step * input_gradient(model, adversarial, labels).sign()
        adversarial = torch.clamp(adversarial, pixels - eps, pixels + eps).clamp(0.0, 1.0).detach()
    return adversarial


@dataclass(frozen=True)
class AttackResult:
    attack: str  # "none" (clean), "fgsm" or "pgd"
    eps: float  # in 1/255 pixel steps
    n: int
    accuracy: Metric
    max_perturbation: float  # the largest change of any pixel, in 1/255 steps
    correct: np.ndarray = field(repr=False, compare=False, default_factory=lambda: np.zeros(0, bool))

    def to_dict(self) -> dict:
        return {
            "attack": self.attack,
            "eps": self.eps,
            "n": self.n,
            "accuracy": self.accuracy.to_dict(),
            "max_perturbation": round(self.max_perturbation, 4),
        }


def _batches(pixels: torch.Tensor, labels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (pixels[start : start + ATTACK_BATCH], labels[start : start + ATTACK_BATCH])
        for start in range(0, len(labels), ATTACK_BATCH)
    ]


def _correct(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        predicted = torch.cat([model(batch).argmax(dim=1) for batch, _ in _batches(pixels, labels)])
    return (predicted == labels).numpy()


def _result(
    name: str,
    eps: float,
    model: nn.Module,
    clean: torch.Tensor,
    adversarial: torch.Tensor,
    labels: torch.Tensor,
) -> AttackResult:
    """Accuracy on ``adversarial`` (CI added by the caller) and how far it moved from ``clean``."""
    change = float((adversarial - clean).abs().max()) * 255 if len(labels) else 0.0
    correct = _correct(model, adversarial, labels)
    return AttackResult(name, eps, len(labels), Metric(float(correct.mean()), 0.0, 0.0), change, correct)


def adversarial_accuracy(
    model: nn.Module,
    arrays: np.ndarray,
    labels: np.ndarray,
    prep: Preprocessing,
    eps_steps: Sequence[float],
    pgd_steps: int,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> list[AttackResult]:
    """Clean accuracy, then FGSM and PGD accuracy at each ``eps`` (in 1/255 steps) on the images."""
    wrapped = PixelSpace(model.eval(), prep).eval()
    pixels = torch.from_numpy(to_pixels(arrays, prep))
    targets = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    results = [_result("none", 0.0, wrapped, pixels, pixels, targets)]
    # FGSM at every eps steps along the sign of the same clean-image gradient: computed once
    gradient = torch.cat([input_gradient(wrapped, x, y) for x, y in _batches(pixels, targets)])
    generator = torch.Generator().manual_seed(seed)
    for eps in eps_steps:
        radius = eps / 255.0
        single = (pixels + radius * gradient.sign()).clamp(0.0, 1.0)
        results.append(_result("fgsm", eps, wrapped, pixels, single, targets))
        iterated = torch.cat(
            [pgd(wrapped, x, y, radius, pgd_steps, generator) for x, y in _batches(pixels, targets)]
        )
        results.append(_result("pgd", eps, wrapped, pixels, iterated, targets))
    return [replace(r, accuracy=share_ci(r.correct, n_bootstrap, seed)) for r in results]


# ---------------------------------------------------------------------------------- the gate


def robustness_checks(suite: CorruptionSuite, ratio_min: float) -> list[Check]:
    """Mean corruption accuracy >= ``ratio_min`` of clean; not worse than the champion's beyond the margin."""
    ratio = suite.ratio
    op = ">=" if ratio.value >= ratio_min else "<"
    checks = [
        Check(
            "corruption_robustness",
            ratio.value,
            ratio_min,
            ratio.value >= ratio_min,
            f"mean accuracy under corruptions {ci_text(suite.mean_accuracy)} is {ratio.value:.2f} "
            f"[{ratio.low:.2f}, {ratio.high:.2f}] of clean {suite.clean_accuracy.value:.3f} "
            f"({op} {ratio_min:.2f} required)",
        )
    ]
    comparison = suite.comparison
    if comparison is not None:
        shown = "" if comparison.non_inferior else "not shown "
        checks.append(
            Check(
                "corruption_non_inferiority",
                comparison.lower_bound,
                -comparison.margin,
                comparison.non_inferior,
                f"under corruptions the challenger is {shown}non-inferior to the champion: accuracy diff "
                f"{comparison.difference:+.3f} ({100 * (1 - comparison.alpha):g}% lower bound "
                f"{comparison.lower_bound:.3f} vs -{comparison.margin:g} margin)",
            )
        )
    return checks
