"""Preprocessing v2 (drafted JPEG decodes) against v1 on held-out images: accuracy moves < 0.5 point.

The pretrained EfficientNet-Lite0 backbone (ONNX Runtime, as feature caching runs it) embeds large
JPEGs of the demo classes (enlarged, with sensor-like noise), decoded both ways. A linear head is
trained on each preprocessing's training features and scored on the same held-out images under the
same preprocessing, as a model trained and served with it would be.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
from sklearn.linear_model import LogisticRegression

from ml.demo.drawing import large_jpegs
from ml.training.features import extract
from ml.training.model import build_backbone, onnx_runner
from ml.training.preprocessing import Preprocessing, decode_rgb

FULL = Preprocessing(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DRAFT = dataclasses.replace(FULL, jpeg_draft=True)
TRAIN, HELD_OUT = 300, 800


def test_held_out_accuracy_moves_less_than_half_a_point_with_drafted_decodes() -> None:
    backbone = build_backbone("efficientnet_lite0", pretrained=True)
    run = onnx_runner(backbone, FULL.image_size, threads=2)
    train, train_labels = large_jpegs(TRAIN, seed=1)
    held_out, held_out_labels = large_jpegs(HELD_OUT, seed=2)

    def features(blobs: list[bytes], prep: Preprocessing) -> np.ndarray:
        return extract(backbone, [decode_rgb(data, prep) for data in blobs], prep, 32, run)

    accuracy, predictions = {}, {}
    for prep in (FULL, DRAFT):
        head = LogisticRegression(max_iter=3000, C=1.0).fit(features(train, prep), train_labels)
        predictions[prep.jpeg_draft] = head.predict(features(held_out, prep))
        accuracy[prep.jpeg_draft] = float(np.mean(predictions[prep.jpeg_draft] == held_out_labels))
    agreement = float(np.mean(predictions[True] == predictions[False]))
    moved = 100 * (accuracy[True] - accuracy[False])
    print(
        f"held-out accuracy on {HELD_OUT} large JPEGs: v1 {accuracy[False]:.4f}, v2 {accuracy[True]:.4f}, "
        f"difference {moved:+.2f} points; predictions agree on {agreement:.4f}",
        file=sys.stderr,
    )
    assert 0.5 < accuracy[False] < 1.0  # neither trivial nor hopeless: the comparison can show a difference
    assert abs(accuracy[True] - accuracy[False]) < 0.005
