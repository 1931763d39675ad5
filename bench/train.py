"""Benchmark: cold and warm retrain wall time, cached features vs the plain loop, same epochs.

One process run on generated demo data, landed and ingested as two days: (1 - new share) of the
images on day 1, the new share on day 2. Then, on all N images:

- mlops cold as at issue 18: an empty feature cache; features for every image (clean + augmented
  views, the frozen backbone through ONNX Runtime), one chunk at a time, its views in one call,
  each augmented view made one Pillow step at a time (crop, flip, rotate the crop, resize:
  ``pil_augmented_view``, a copy of the code the issue measured), then the head trained for
  ``--epochs`` epochs;
- mlops cold, 1 worker: the same with today's views (``augmented_array``: the flip and rotation one
  OpenCV warp), still one chunk at a time;
- mlops cold, a chunk's views a call: the same from an empty cache again, ``model.feature_workers``
  chunks at a time (one thread per core by default), each chunk's views (16 images x 3) in one
  backbone call, as before ``model.feature_batch``;
- mlops cold: the same with ``model.feature_batch`` views a call (1 by default);
- mlops cold, int8: the same with ``model.precision: int8`` (the quantised backbone, its own cache
  key; the one-off quantisation is timed apart);
- mlops warm: the cache holds day 1 only (day 2's shard is removed), so only the new images
  are embedded, then the same training;
- plain loop: what users write first: every epoch decodes, augments and runs the frozen backbone
  (eager torch) on every training image, then updates the head, for the same epochs.

First it times one clean view and one augmented view made each way (ms per image, one thread).

Usage: python bench/train.py [--images 5000] [--new-share 0.1] [--epochs 5] [--no-plain]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from pillow_views import issue_views, pil_augmented_view
from torch import nn

from ml.config import load_settings
from ml.data.catalog import dataset_rows
from ml.data.ingest import ingest_day
from ml.demo.landing import land_day
from ml.storage import LocalStorage
from ml.training.features import feature_cache
from ml.training.model import Head, build_backbone
from ml.training.preprocessing import Preprocessing, augmented_array, decode_rgb, to_array
from ml.training.quantize import published_backbone
from ml.training.train import Hyperparameters, fit_head, split_data

DAY = dt.date(2026, 8, 1)
RESULTS = Path(__file__).resolve().parent / "results"


def mlops_retrain(
    storage, settings, backbone, prep, hparams, workers=None, call_size=None
) -> tuple[float, dict[str, float]]:
    started = time.perf_counter()
    cache = feature_cache(settings, storage, backbone, prep)
    cache.workers = workers or cache.workers
    cache.call_size = call_size or cache.call_size
    _, rows = dataset_rows(storage)
    features, stats = cache.features_for(rows)
    feature_seconds = time.perf_counter() - started
    data = split_data(rows, features, settings.classes)
    fitted = fit_head(Head(backbone.dim, len(settings.classes), hparams.dropout), data, hparams)
    total = time.perf_counter() - started
    with torch.no_grad():
        test_logits = fitted.head.eval()(torch.from_numpy(data["test"].features[:, 0]))
    return total, {
        "features_s": round(feature_seconds, 1),
        "val_accuracy": round(fitted.best_val_accuracy, 4),
        "test_accuracy": round(float((test_logits.argmax(1).numpy() == data["test"].labels).mean()), 4),
        "misses": stats.misses,
        "hits": stats.hits,
        "workers": cache.workers,
        "views_per_call": cache.call_size,
        "views_per_s": round(stats.misses * cache.views / max(feature_seconds, 1e-9), 1),
    }


def view_costs(storage: LocalStorage, settings, prep: Preprocessing, count: int = 300) -> dict[str, float]:
    """Milliseconds per image (best of 3, one thread) of the clean view and of one augmented view made
    each way, on the first ``count`` curated images."""
    _, rows = dataset_rows(storage)
    images = [decode_rgb(storage.read_bytes(key), prep) for key in rows["curated_key"].head(count)]
    kinds = list(settings.preprocessing.augmentation)
    ways = {
        "clean_view_ms": lambda image, rng: to_array(image, prep),
        "augmented_view_pillow_steps_ms": lambda image, rng: to_array(
            pil_augmented_view(image, rng, kinds), prep
        ),
        "augmented_view_ms": lambda image, rng: augmented_array(image, rng, kinds, prep),
    }
    costs = {}
    for name, make in ways.items():
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            for index, image in enumerate(images):
                make(image, np.random.default_rng(index))
            best = min(best, time.perf_counter() - started)
        costs[name] = round(best / len(images) * 1000, 3)
    return costs


def empty(storage: LocalStorage, cache_id: str) -> None:
    for key in storage.list(f"features/{cache_id}"):
        storage.delete(key)


def plain_loop(storage, settings, backbone, prep, hparams) -> float:
    """Decode + augment + backbone forward every epoch (frozen backbone, head trained)."""
    started = time.perf_counter()
    _, rows = dataset_rows(storage)
    train = rows[rows["split"] == "train"]
    index = {name: i for i, name in enumerate(settings.classes)}
    labels = torch.tensor(train["label"].map(index).to_numpy())
    head = Head(backbone.dim, len(settings.classes), hparams.dropout)
    optimizer = torch.optim.Adam(head.parameters(), lr=hparams.learning_rate)
    loss_fn = nn.CrossEntropyLoss()
    keys = list(train["curated_key"])
    rng = np.random.default_rng(0)
    for _ in range(hparams.epochs):
        order = rng.permutation(len(keys))
        for start in range(0, len(order), hparams.batch_size):
            batch = order[start : start + hparams.batch_size]
            images = [
                pil_augmented_view(decode_rgb(storage.read_bytes(keys[i])), rng, ["rotation", "flip", "crop"])
                for i in batch
            ]
            with torch.inference_mode():
                features = backbone.module(torch.from_numpy(np.stack([to_array(im, prep) for im in images])))
            optimizer.zero_grad()
            loss = loss_fn(head(features.clone()), labels[batch])
            loss.backward()
            optimizer.step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--new-share", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--no-plain", action="store_true", help="skip the plain loop (the slowest contender)")
    args = parser.parse_args()
    new = int(round(args.images * args.new_share))
    with tempfile.TemporaryDirectory(prefix="mlops-bench-train-") as tmp:
        # preprocessing v2 as the cold-feature figures in the README were measured
        environ = {"MLOPS__STORAGE__ROOT": tmp, "MLOPS__PREPROCESSING__JPEG_DRAFT": "true"}
        settings = load_settings(environ=environ)
        int8_settings = load_settings(environ=environ | {"MLOPS__MODEL__PRECISION": "int8"})
        storage = LocalStorage(Path(tmp))
        hparams = Hyperparameters.from_settings(settings, epochs=args.epochs, patience=args.epochs + 1)
        prep = Preprocessing.from_settings(settings.preprocessing)
        backbone = build_backbone(settings.model.architecture, settings.model.pretrained)
        for offset, (count, seed) in enumerate([(args.images - new, 1), (new, 2)]):
            land_day(storage, DAY + dt.timedelta(days=offset), settings.classes, count=count, seed=seed)
            ingest_day(settings, storage, DAY + dt.timedelta(days=offset))
        cache = feature_cache(settings, storage, backbone, prep)
        costs = view_costs(storage, settings, prep)
        print(f"views, ms per image: {costs}", flush=True)
        with issue_views():  # and, as at the issue, a chunk's views in one backbone call
            issue, issue_info = mlops_retrain(
                storage, settings, backbone, prep, hparams, workers=1, call_size=cache.batch_size
            )
        print(f"mlops cold as at the issue, {args.images} images: {issue:.1f} s {issue_info}", flush=True)
        empty(storage, cache.id)
        serial, serial_info = mlops_retrain(storage, settings, backbone, prep, hparams, workers=1)
        print(f"mlops cold, 1 worker, {args.images} images: {serial:.1f} s {serial_info}", flush=True)
        empty(storage, cache.id)
        chunked, chunked_info = mlops_retrain(
            storage, settings, backbone, prep, hparams, call_size=cache.batch_size
        )
        print(f"mlops cold, a chunk's views a call, {args.images} images: {chunked:.1f} s {chunked_info}")
        empty(storage, cache.id)
        cold, cold_info = mlops_retrain(storage, settings, backbone, prep, hparams)
        print(f"mlops cold {args.images} images: {cold:.1f} s {cold_info}", flush=True)
        started = time.perf_counter()
        published_backbone(storage, backbone, prep)
        quantize_s = time.perf_counter() - started
        int8, int8_info = mlops_retrain(storage, int8_settings, backbone, prep, hparams)
        print(f"mlops cold int8 {args.images} images: {int8:.1f} s {int8_info} (quantise {quantize_s:.1f} s)")
        storage.delete(cache.shard_key(str(DAY + dt.timedelta(days=1))))
        warm, warm_info = mlops_retrain(storage, settings, backbone, prep, hparams)
        print(f"mlops warm {args.images} images ({new} new): {warm:.1f} s {warm_info}", flush=True)
        plain = float("nan") if args.no_plain else plain_loop(storage, settings, backbone, prep, hparams)
        print(f"plain loop {args.images} images: {plain:.1f} s", flush=True)
    report = {
        "images": args.images,
        "new_images": new,
        "epochs": args.epochs,
        "views": cache.views,
        "view_costs": costs,
        "feature_runtime": settings.model.feature_runtime,
        "mlops_cold_as_at_issue_s": round(issue, 1),
        "mlops_cold_1_worker_s": round(serial, 1),
        "mlops_cold_chunk_calls_s": round(chunked, 1),
        "mlops_cold_s": round(cold, 1),
        "cold_features_speedup_vs_issue": round(issue_info["features_s"] / cold_info["features_s"], 2),
        "cold_features_speedup_vs_1_worker": round(serial_info["features_s"] / cold_info["features_s"], 2),
        "cold_features_speedup_vs_chunk_calls": round(
            chunked_info["features_s"] / cold_info["features_s"], 2
        ),
        "mlops_cold_int8_s": round(int8, 1),
        "int8_features_speedup_vs_issue": round(issue_info["features_s"] / int8_info["features_s"], 2),
        "int8_quantise_s": round(quantize_s, 1),
        "mlops_warm_s": round(warm, 1),
        "plain_loop_s": round(plain, 1),
        "cold_speedup": round(plain / cold, 2),
        "warm_speedup": round(plain / warm, 2),
        "cold_as_at_issue": issue_info,
        "cold_1_worker": serial_info,
        "cold_chunk_calls": chunked_info,
        "cold": cold_info,
        "cold_int8": int8_info,
        "warm": warm_info,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"train-{args.images}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
