"""Benchmark: drift detection quality (kind x strength -> score -> detected, false alarms) and speed.

Quality (default): a champion trained on three generated demo days; then, one day each, no-drift
days with new seeds and every drift knob at several strengths, each landed, ingested and
monitored exactly as the ``drift_monitor`` DAG does (``ml.monitoring.drift.measure_day``).

Speed (``--images N``): N vs N images of one distribution, features already cached by ingestion
and training (the normal case). Side by side, in one run:

- mlops: cached embeddings -> PCA -> model outputs -> Evidently (effect size + test per column),
  report written;
- what users write first: re-embed the current images with the eager torch backbone, then
  Evidently's ``DataDriftPreset()`` with its defaults (its p-value tests at this size), on the
  same columns; the number of columns that preset flags on this no-drift pair is reported too.

Usage: python bench/drift.py [--quality] [--images 10000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from ml.config import load_settings
from ml.data.ingest import ingest_day
from ml.demo.drawing import Drift
from ml.demo.landing import land_day, land_days
from ml.storage import LocalStorage

RESULTS = Path(__file__).resolve().parent / "results"
START = dt.date(2026, 9, 1)
STRENGTHS = (0.1, 0.2, 0.4, 0.6, 1.0)
NO_DRIFT_DAYS = 12


def quality(per_day: int) -> dict:
    from ml import registry
    from ml.monitoring.drift import measure_day
    from ml.training.pipeline import retrain

    with tempfile.TemporaryDirectory(prefix="mlops-bench-drift-") as tmp:
        env = {"MLOPS__STORAGE__ROOT": f"{tmp}/store", "MLOPS__MLFLOW__TRACKING_URI": f"sqlite:///{tmp}/m.db"}
        settings = load_settings(environ=env)
        storage = LocalStorage(Path(tmp) / "store")
        land_days(storage, START, 3, settings.classes, count=per_day, seed=11)
        for offset in range(3):
            ingest_day(settings, storage, START + dt.timedelta(days=offset))
        trained = retrain(settings, storage, overrides={"epochs": 25}).to_dict()
        registry.promote(settings, storage, trained["model_version"], "bench")
        rows, day = [], START + dt.timedelta(days=10)
        cases = [(None, 0.0)] * NO_DRIFT_DAYS + [
            (kind, strength) for kind in ("brightness", "blur", "class_mix") for strength in STRENGTHS
        ]
        for seed, (kind, strength) in enumerate(cases, start=100):
            day += dt.timedelta(days=1)
            drift = Drift(kind, strength) if kind else None
            land_day(storage, day, settings.classes, count=per_day, seed=seed, drift=drift)
            ingest_day(settings, storage, day)
            started = time.perf_counter()
            summary = measure_day(settings, storage, day).summary()
            rows.append(
                {
                    "drift": str(drift) if drift else "none",
                    "drift_score": summary["drift_score"],
                    "prediction_kl": summary["prediction_kl"],
                    "detected": summary["drift_detected"],
                    "drifted_columns": [c["column"] for c in summary["columns"] if c["drifted"]],
                    "seconds": round(time.perf_counter() - started, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    false_alarms = sum(r["detected"] for r in rows if r["drift"] == "none")
    return {"per_day": per_day, "no_drift_days": NO_DRIFT_DAYS, "false_alarms": false_alarms, "rows": rows}


def speed(images: int) -> dict:
    import torch
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    from ml.data.catalog import read_partition
    from ml.monitoring import drift
    from ml.training.features import extract, feature_cache
    from ml.training.model import Head, build_backbone, predict_proba
    from ml.training.preprocessing import Preprocessing, decode_rgb
    from ml.training.reference import batch_frame, build_reference

    with tempfile.TemporaryDirectory(prefix="mlops-bench-drift-") as tmp:
        # Drift compares clean views only, so the bench caches one view per image.
        settings = load_settings(
            environ={"MLOPS__STORAGE__ROOT": tmp, "MLOPS__TRAINING__AUGMENTED_VIEWS": "0"}
        )
        storage = LocalStorage(Path(tmp))
        days = [START, START + dt.timedelta(days=1)]
        for seed, day in enumerate(days, start=1):
            land_day(storage, day, settings.classes, count=images, seed=seed)
            ingest_day(settings, storage, day)
        prep = Preprocessing.from_settings(settings.preprocessing)
        backbone = build_backbone(settings.model.architecture, settings.model.pretrained)
        cache = feature_cache(settings, storage, backbone, prep)
        reference_rows, current_rows = (read_partition(storage, day) for day in days)
        started = time.perf_counter()
        reference_features, _ = cache.features_for(reference_rows)  # what ingestion/training cached
        warm_cache_s = time.perf_counter() - started
        torch.manual_seed(0)
        head = Head(backbone.dim, len(settings.classes), 0.0).eval()
        embeddings = reference_features[:, 0]
        reference = build_reference(
            reference_rows,
            embeddings,
            predict_proba(head, embeddings),
            list(settings.classes),
            cache_id=cache.id,
            dataset_version="bench",
            components=8,
            max_rows=images,
        )
        cache.features_for(current_rows)

        started = time.perf_counter()
        current = drift.current_frame(settings, storage, current_rows, reference, head)
        snapshot, columns = drift.compare(current, reference, settings.monitoring)
        kl = drift.prediction_kl(
            current["predicted_class"], reference.frame["predicted_class"], reference.classes
        )
        score, detected, _, _, _ = drift.drift_verdict(columns, kl, settings.monitoring)
        drift.write_report(storage, "bench", snapshot)
        mlops_s = time.perf_counter() - started

        started = time.perf_counter()
        pictures = [decode_rgb(storage.read_bytes(key), prep) for key in current_rows["curated_key"]]
        fresh = extract(backbone, pictures, prep, batch_size=32)
        projected = reference.project(fresh)
        plain = batch_frame(current_rows, projected, predict_proba(head, fresh), reference.classes)
        categorical = ["label", "predicted_class"]
        definition = DataDefinition(
            numerical_columns=[c for c in plain.columns if c not in categorical],
            categorical_columns=categorical,
        )
        preset = Report([DataDriftPreset()]).run(
            Dataset.from_pandas(plain, data_definition=definition),
            Dataset.from_pandas(reference.frame[plain.columns], data_definition=definition),
        )
        plain_s = time.perf_counter() - started
        counted = next(m for m in preset.dict()["metrics"] if "DriftedColumnsCount" in m["metric_name"])
        cached, _ = cache.features_for(current_rows)
        gap = float(np.abs(fresh - cached[:, 0]).max())  # eager torch vs the cached ONNX Runtime features
    return {
        "images": images,
        "mlops_s": round(mlops_s, 2),
        "mlops_drift_score": round(score, 3),
        "mlops_detected": detected,
        "plain_s": round(plain_s, 1),
        "plain_preset_drifted_columns": int(counted["value"]["count"]),
        "columns": len(columns),
        "speedup": round(plain_s / mlops_s, 1),
        "reference_embedding_s_once": round(warm_cache_s, 1),
        "max_abs_embedding_gap": gap,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quality", action="store_true", help="run the kind x strength table")
    parser.add_argument("--per-day", type=int, default=120)
    parser.add_argument("--images", type=int, default=0, help="run the N vs N speed comparison")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    if args.quality:
        table = quality(args.per_day)
        (RESULTS / "drift-quality.json").write_text(json.dumps(table, indent=2))
        print("| drift | drift score | prediction KL | detected |\n|---|---|---|---|")
        for row in table["rows"]:
            print(f"| {row['drift']} | {row['drift_score']} | {row['prediction_kl']} | {row['detected']} |")
        print(f"false alarms: {table['false_alarms']} of {table['no_drift_days']} no-drift days")
    if args.images:
        result = speed(args.images)
        (RESULTS / f"drift-speed-{args.images}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result))


if __name__ == "__main__":
    main()
