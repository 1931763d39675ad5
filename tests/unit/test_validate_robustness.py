"""Robustness: a seeded corruption suite graded by severity; FGSM and PGD respect eps and hurt accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ml.training.corruptions import CORRUPTIONS, SEVERITIES, corrupted_batch, model_sized
from ml.training.preprocessing import Preprocessing, batch_arrays
from ml.training.robustness import (
    adversarial_accuracy,
    corruption_correctness,
    robustness_checks,
    summarise_corruptions,
    to_pixels,
)
from tests.hostile import photo

PREP = Preprocessing(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
IMAGES = model_sized([photo(seed, (60, 45)) for seed in range(6)], PREP)


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_each_corruption_is_deterministic_and_worse_with_severity(kind: str) -> None:
    clean = batch_arrays(IMAGES, PREP)
    distances = []
    for severity in SEVERITIES:
        first = corrupted_batch(IMAGES, kind, severity, PREP, seed=3)
        assert np.array_equal(first, corrupted_batch(IMAGES, kind, severity, PREP, seed=3)), "not seeded"
        assert first.shape == clean.shape and first.dtype == np.float32
        distances.append(float(np.abs(first - clean).mean()))
    assert 0 < distances[0] < distances[1] < distances[2], distances


def test_random_corruptions_follow_their_seed() -> None:
    for kind in ("gaussian_noise", "occlusion"):
        assert not np.array_equal(
            corrupted_batch(IMAGES, kind, 2, PREP, seed=1), corrupted_batch(IMAGES, kind, 2, PREP, seed=2)
        )


def linear_pixel_model(w: np.ndarray, prep: Preprocessing) -> nn.Module:
    """Logit(1) - logit(0) = w . (pixels - 0.5) in pixel space, written on normalised inputs."""
    std = np.repeat(np.asarray(prep.std, np.float32), prep.image_size**2)
    mean = np.repeat(np.asarray(prep.mean, np.float32), prep.image_size**2)
    flat = w.ravel()
    layer = nn.Linear(flat.size, 2)
    with torch.no_grad():
        layer.weight[:] = torch.from_numpy(np.stack([-flat * std / 2, flat * std / 2]))
        bias = float(flat @ (mean - 0.5)) / 2
        layer.bias[:] = torch.tensor([-bias, bias])
    return nn.Sequential(nn.Flatten(), layer).eval()


@pytest.fixture(scope="module")
def linear_world() -> tuple[nn.Module, np.ndarray, np.ndarray, Preprocessing]:
    prep = Preprocessing(8, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 8, 8)).astype(np.float32)
    pixels = np.clip(0.5 + 0.1 * rng.standard_normal((200, 3, 8, 8)), 0, 1).astype(np.float32)
    labels = ((pixels - 0.5).reshape(200, -1) @ w.ravel() > 0).astype(np.int64)
    mean = np.asarray(prep.mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(prep.std, np.float32).reshape(1, 3, 1, 1)
    return linear_pixel_model(w, prep), (pixels - mean) / std, labels, prep


def test_fgsm_and_pgd_lower_accuracy_more_with_eps_and_stay_within_it(linear_world) -> None:
    model, arrays, labels, prep = linear_world
    results = adversarial_accuracy(model, arrays, labels, prep, [1, 2, 4], pgd_steps=5, n_bootstrap=200)
    clean = results[0]
    assert (clean.attack, clean.accuracy.value, clean.max_perturbation) == ("none", 1.0, 0.0)
    for attack in ("fgsm", "pgd"):
        found = [r for r in results if r.attack == attack]
        accuracies = [r.accuracy.value for r in found]
        assert accuracies[0] < 0.9 and accuracies[2] < 0.2, (attack, accuracies)
        assert accuracies[0] > accuracies[1] > accuracies[2], (attack, accuracies)
        for result in found:
            assert 0 < result.max_perturbation <= result.eps + 1e-3, result
            assert result.accuracy.low <= result.accuracy.value <= result.accuracy.high
    fgsm = {r.eps: r.accuracy.value for r in results if r.attack == "fgsm"}
    pgd = {r.eps: r.accuracy.value for r in results if r.attack == "pgd"}
    assert all(pgd[eps] <= fgsm[eps] + 0.02 for eps in fgsm), (fgsm, pgd)


def test_attacked_pixels_stay_valid_images(linear_world) -> None:
    _, arrays, _, prep = linear_world
    pixels = to_pixels(arrays, prep)
    assert pixels.min() >= 0 and pixels.max() <= 1
    mean = np.asarray(prep.mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(prep.std, np.float32).reshape(1, 3, 1, 1)
    assert np.allclose((pixels - mean) / std, arrays, atol=1e-5)


def test_the_suite_pairs_challenger_and_champion_and_gates_on_the_ratio() -> None:
    labels = np.zeros(len(IMAGES), dtype=np.int64)

    def always_right(arrays: np.ndarray) -> np.ndarray:
        return np.tile([0.9, 0.1], (len(arrays), 1))

    def right_only_on_bright(arrays: np.ndarray) -> np.ndarray:  # fails whatever got darker or flatter
        bright = arrays.mean(axis=(1, 2, 3)) > batch_arrays(IMAGES, PREP).mean() - 0.2
        return np.where(bright[:, None], [0.9, 0.1], [0.1, 0.9])

    conditions, clean, correct = corruption_correctness(
        IMAGES,
        labels,
        PREP,
        lambda a: [right_only_on_bright(a), always_right(a)],
        ["brightness", "blur"],
        seed=0,
    )
    assert conditions == [
        ("brightness", 1),
        ("brightness", 2),
        ("brightness", 3),
        ("blur", 1),
        ("blur", 2),
        ("blur", 3),
    ]
    assert clean.all() and correct[1].all() and not correct[0, :3].any() and correct[0, 3:].all()
    suite = summarise_corruptions(
        conditions, clean[0], correct[0], correct[1], margin=0.05, alpha=0.05, n_bootstrap=200, seed=0
    )
    assert suite.mean_accuracy.value == pytest.approx(0.5) and suite.ratio.value == pytest.approx(0.5)
    assert suite.comparison is not None and not suite.comparison.non_inferior
    checks = {check.name: check for check in robustness_checks(suite, ratio_min=0.75)}
    assert not checks["corruption_robustness"].passed and "0.50" in checks["corruption_robustness"].detail
    assert not checks["corruption_non_inferiority"].passed
    assert all(check.passed for check in robustness_checks(suite, ratio_min=0.4)[:1])


def test_a_champion_on_the_same_backbone_reuses_the_challengers_features() -> None:
    from ml.training.validate import Candidate, Champion, both_models

    calls: list[int] = []

    def embed(arrays: np.ndarray) -> np.ndarray:
        calls.append(len(arrays))
        return arrays.reshape(len(arrays), -1)[:, :4].astype(np.float32)

    torch.manual_seed(0)
    head, other = nn.Linear(4, 2), nn.Linear(4, 2)
    model = nn.Module()
    model.head = head
    empty = (np.zeros((1, 2)), np.zeros(1))
    candidate = Candidate(model, embed, empty, empty, None, lambda positions: [], PREP, ["a", "b"])
    arrays = batch_arrays(IMAGES, PREP)
    challenger, champion = both_models(candidate, Champion("1", head=other))(arrays)
    assert calls == [len(arrays)]  # one backbone pass for both models
    features = torch.from_numpy(embed(arrays))
    with torch.no_grad():
        assert np.allclose(champion, torch.softmax(other(features), dim=1).numpy(), atol=1e-6)
        assert np.allclose(challenger, torch.softmax(head(features), dim=1).numpy(), atol=1e-6)
    exported = both_models(candidate, Champion("1", export=lambda a: np.full((len(a), 2), 0.5)))(arrays)
    assert np.array_equal(exported[1], np.full((len(arrays), 2), 0.5))
    assert len(both_models(candidate, None)(arrays)) == 1


def test_the_champion_comparison_pairs_images_not_image_condition_pairs() -> None:
    """An image's 21 corrupted copies are not 21 independent trials: the interval is the images'."""
    from ml.training.evaluate import non_inferiority

    conditions = [(kind, severity) for kind in ("blur", "jpeg", "noise") for severity in (1, 2, 3)]
    champion = np.ones((len(conditions), 40), dtype=bool)
    challenger = champion.copy()
    challenger[:, :2] = False  # wrong on every corrupted copy of two images
    suite = summarise_corruptions(
        conditions, np.ones(40, bool), challenger, champion, margin=0.1, alpha=0.05, n_bootstrap=200, seed=0
    )
    pooled = non_inferiority(challenger.ravel(), champion.ravel(), margin=0.1, alpha=0.05)
    assert suite.comparison.difference == pytest.approx(pooled.difference) == pytest.approx(-0.05)
    assert pooled.non_inferior and not suite.comparison.non_inferior  # 360 pairs vs 40 images
    assert suite.comparison.lower_bound < pooled.lower_bound - 0.03
    assert suite.champion_mean_accuracy.value == 1.0
