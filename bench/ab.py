"""A/B verdicts by simulation: how often ``ab_report`` says what, on arms whose truth is known.

Generated live traffic at the spec's 80/20 split (stable/canary), a share of the answers labelled,
for three truths: equal arms, a worse challenger and a better one (accuracy; same latency and error
rate). For each traffic size and N seeds, the table counts the overall verdicts and the accuracy
verdicts, with the default ``ab:`` config (params.yaml).

Usage: python bench/ab.py [--seeds 200] [--sizes 2500 10000 40000] [--labelled 0.5]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from typing import Any

import numpy as np

from ml.config import load_settings
from ml.monitoring.ab import ACCURACY, Verdict, ab_report

CONTROL, CHALLENGER, SHARE = "1", "2", 0.2
SCENARIOS = {  # name: (control accuracy, challenger accuracy)
    "equal (0.92 vs 0.92)": (0.92, 0.92),
    "worse (0.92 vs 0.88)": (0.92, 0.88),
    "better (0.92 vs 0.96)": (0.92, 0.96),
}
MEDIAN_MS, ERROR_RATE = 50.0, 0.002


def simulate(
    rng: np.random.Generator, requests: int, accuracy: tuple[float, float], labelled: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Prediction and feedback records: independent requests, the challenger on ``SHARE`` of them."""
    canary = rng.random(requests) < SHARE
    correct = rng.random(requests) < np.where(canary, accuracy[1], accuracy[0])
    failed = rng.random(requests) < ERROR_RATE
    latency = MEDIAN_MS * np.exp(0.3 * rng.standard_normal(requests))
    label = rng.random(requests) < labelled
    predictions, feedback = [], []
    for i, (is_canary, hit, fail, ms, has_label) in enumerate(
        zip(canary.tolist(), correct.tolist(), failed.tolist(), latency.tolist(), label.tolist(), strict=True)
    ):
        record: dict[str, Any] = {
            "request_id": f"r{i}",
            "model_version": CHALLENGER if is_canary else CONTROL,
            "latency_ms": ms,
        }
        if fail:
            predictions.append(record | {"status": 500})
            continue
        predictions.append(record | {"predicted_class": "a" if hit else "b"})
        if has_label:
            feedback.append({"request_id": f"r{i}", "label": "a", "bound": True})
    return predictions, feedback


def run(seeds: int, sizes: list[int], labelled: float) -> list[tuple[str, int, Counter[str], Counter[str]]]:
    config = load_settings().ab
    rows = []
    for name, accuracy in SCENARIOS.items():
        for requests in sizes:
            overall, by_accuracy = Counter(), Counter()
            for seed in range(seeds):
                predictions, feedback = simulate(np.random.default_rng(seed), requests, accuracy, labelled)
                report = ab_report(predictions, feedback, CONTROL, CHALLENGER, config)
                overall[str(report.verdict)] += 1
                by_accuracy[str(report.metric(ACCURACY).verdict)] += 1
            rows.append((name, requests, overall, by_accuracy))
    return rows


def table(rows: list[tuple[str, int, Counter[str], Counter[str]]], labelled: float) -> str:
    verdicts = [str(v) for v in (Verdict.BETTER, Verdict.NOT_WORSE, Verdict.WORSE, Verdict.NOT_ENOUGH_DATA)]
    head = (
        "| truth | requests (canary, labelled) | "
        + " | ".join(verdicts)
        + " | accuracy: "
        + " / ".join(verdicts)
    )
    lines = [head + " |", "|" + "---|" * (3 + len(verdicts))]
    for name, requests, overall, accuracy in rows:
        canary = int(requests * SHARE)
        counts = " | ".join(str(overall[v]) for v in verdicts)
        acc = " / ".join(str(accuracy[v]) for v in verdicts)
        lines.append(f"| {name} | {requests} ({canary}, ~{int(canary * labelled)}) | {counts} | {acc} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2500, 10000, 40000])
    parser.add_argument("--labelled", type=float, default=0.5, help="share of answers that get a label")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = run(args.seeds, args.sizes, args.labelled)
    print(table(rows, args.labelled))
    print(
        f"\n{args.seeds} seeds per row, 80/20 split, {args.labelled:.0%} of answers labelled, "
        f"median latency {MEDIAN_MS:g} ms and {ERROR_RATE:.1%} errors in both arms; "
        f"{time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
