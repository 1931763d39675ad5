"""Benchmark: a 50-trial Optuna study on cached features, next to one warm retrain and the naive way.

One process run on generated demo images (landed and ingested as one day), features cached first:

- warm retrain: ``retrain()`` with the default parameters on the fully cached features (train,
  evaluate with CIs, gate, log to MLflow, ONNX export, register), the wall time of one retrain;
- tuning: ``--trials`` trials of one study (``tuning`` config: TPE, MedianPruner, early stopping),
  every trial on the same in-memory cached features, by ``--parallel`` local worker processes
  sharing the study (as ``mlops tune --parallel``; one per core by default); goal: at most 5x the
  warm retrain;
- naive: ``--trials`` full retrains through the plain loop of ``bench/train.py`` (decode, augment
  and the eager-torch backbone every epoch), EXTRAPOLATED from one plain-loop retrain of
  ``--plain-epochs`` epochs: seconds per epoch x the epochs the study's trials ran in all;
- then ``finish``: stratified 5-fold CV of the best parameters and the tuned model (train+val, the
  CV's median best epoch), gated on the same untouched test split as the default-parameter model.

Usage: python bench/tune.py [--images 5000] [--trials 50] [--parallel 2] [--plain-epochs 1]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from train import plain_loop  # bench/train.py (the script's folder is on sys.path)

from ml.config import load_settings
from ml.data.ingest import ingest_day
from ml.demo.landing import land_day
from ml.storage import LocalStorage
from ml.training.model import build_backbone
from ml.training.pipeline import retrain
from ml.training.preprocessing import Preprocessing
from ml.training.train import Hyperparameters
from ml.training.tune import configure_process, finish, open_session, search, start_helpers, summarise

DAY = dt.date(2026, 9, 1)
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_THREADS = torch.get_num_threads()
STUDY_KEYS = ("complete", "pruned", "failed", "ignored", "best_value", "best_params")


def timed(label: str, work, *args, **kwargs):
    started = time.perf_counter()
    value = work(*args, **kwargs)
    seconds = time.perf_counter() - started
    print(f"{label}: {seconds:.1f} s", flush=True)
    return value, seconds


def accuracy(result) -> dict[str, float]:
    m = result.metrics
    return {k: round(m[k], 4) for k in ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "f1_macro")}


def trial_epochs(session) -> int:
    return sum(int(t.user_attrs.get("epochs_run", len(t.intermediate_values))) for t in session.study.trials)


def plain_seconds_per_epoch(storage, settings, epochs: int) -> float:
    prep = Preprocessing.from_settings(settings.preprocessing)
    backbone = build_backbone(settings.model.architecture, settings.model.pretrained)
    hparams = Hyperparameters.from_settings(settings, epochs=epochs)
    seconds = plain_loop(storage, settings, backbone, prep, hparams)
    print(f"plain loop, {epochs} epoch(s): {seconds:.1f} s", flush=True)
    return seconds / epochs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--parallel", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--plain-epochs", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mlops-bench-tune-") as tmp:
        env = {
            "MLOPS__STORAGE__ROOT": f"{tmp}/store",
            "MLOPS__MLFLOW__TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
        }
        settings = load_settings(environ=env)
        storage = LocalStorage(Path(tmp) / "store")
        land_day(storage, DAY, settings.classes, count=args.images, seed=1)
        ingest_day(settings, storage, DAY)
        session, cache_s = timed("features cached (cold) + study opened", open_session, settings, storage)
        torch.set_num_threads(DEFAULT_THREADS)  # a retrain and the plain loop run as they do elsewhere
        default, retrain_s = timed("warm retrain, default parameters", retrain, settings, storage, force=True)
        configure_process(settings)  # tuning.torch_threads, as the tune DAG's workers run
        os.environ.update(env)  # the helper processes read the same storage and MLflow store

        def parallel_search():
            helpers = start_helpers(session, args.parallel - 1, args.trials, None)
            found = search(session, args.trials)
            codes = [helper.wait() for helper in helpers]
            study = session.study  # every worker's trials, counted once all have stopped
            return summarise(
                study, session.url, session.dataset_version, args.trials, found.ran_here, 0.0
            ), codes

        (summary, codes), tune_s = timed(f"{args.trials} trials, {args.parallel} workers", parallel_search)
        assert not any(codes), f"a tuning helper failed: {codes}"
        tuned, finish_s = timed("5-fold CV + tuned model", finish, session, budget=args.trials)
        torch.set_num_threads(DEFAULT_THREADS)
        per_epoch = plain_seconds_per_epoch(storage, settings, args.plain_epochs)
    epochs = trial_epochs(session)
    naive = per_epoch * epochs
    report = {
        "images": args.images,
        "trials": args.trials,
        "torch_threads": {"tuning": settings.tuning.torch_threads, "retrain_and_plain": DEFAULT_THREADS},
        "feature_cache_cold_s": round(cache_s, 1),
        "warm_retrain_s": round(retrain_s, 1),
        "warm_retrain_validation_s": default.validation.get("seconds"),
        "parallel_workers": args.parallel,
        "tuning_s": round(tune_s, 1),
        "tuning_vs_warm_retrain": round(tune_s / retrain_s, 2),
        "trials_epochs_total": epochs,
        "study": {k: v for k, v in summary.to_dict().items() if k in STUDY_KEYS},
        "plain_loop_s_per_epoch": round(per_epoch, 1),
        "naive_extrapolated_s": round(naive, 1),
        "naive_vs_tuning": round(naive / tune_s, 1),
        "cv_and_final_s": round(finish_s, 1),
        "default_params_test": accuracy(default),
        "tuned_test": accuracy(tuned.retrain),
        "tuned_gate_passed": tuned.retrain.gate["passed"],
        "cv": {k: v for k, v in tuned.cv.to_dict().items() if k != "folds"},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"tune-{args.images}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
