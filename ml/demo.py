"""``make demo``: generated days through the real Airflow scheduler, from ingestion to a drift retrain.

Starts ``airflow standalone`` (as ``make up`` does), lands ``DEMO_DAYS`` generated days (three
broken uploads on day 2, brightness drift from ``DRIFT_FROM``) and, day by day, triggers
``ingest_daily`` through the REST API. Everything after that is scheduled by Airflow itself:
each ingest's ``curated_images`` event runs ``drift_monitor``; a drift event on
``retrain_requested`` runs ``retrain``. The first model is trained by a manual ``retrain`` after
day 3 (auto-approved in the demo: ``mlflow.auto_approve``). Ends with a table per day and stops
the stack; ``make up`` brings the UI back with every run in it.

Storage under ``.data/demo``, MLflow under ``.data/demo/mlflow``, Airflow under ``$AIRFLOW_HOME``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import time
from typing import Any

from ml.config import REPO_ROOT, load_settings
from ml.storage import LocalStorage, Storage

DEMO_ROOT = REPO_ROOT / ".data" / "demo"
DEMO_START = dt.date(2026, 1, 5)
DEMO_DAYS = 7
FIRST_TRAINING_AFTER = 3  # days ingested before the first model is trained
DRIFT_FROM = 5  # 0-based index of the first drifted day
DRIFT = "brightness:0.7"
PER_DAY = 120


def land_broken_objects(storage: Storage, day: dt.date) -> int:
    """Add a few bad objects to a landed day, as real uploads do; returns how many rows were added."""
    base = f"landing/{day.isoformat()}"
    labels = storage.read_bytes(f"{base}/labels.csv").decode()
    storage.write_bytes(f"{base}/images/truncated.jpg", b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    storage.write_bytes(f"{base}/images/notes.jpg", b"meeting notes, not a photo\n")
    first = storage.list(f"{base}/images")[0]
    storage.write_bytes(f"{base}/images/unlabelled_{first.rsplit('/', 1)[-1]}", storage.read_bytes(first))
    extra = "truncated.jpg,toys,upload\nnotes.jpg,books,upload\nmissing.jpg,home,upload\n"
    storage.write_bytes(f"{base}/labels.csv", (labels.rstrip("\n") + "\n" + extra).encode())
    return 3


def day_row(storage: Storage, settings: Any, day: dt.date, retrain: str, seconds: float) -> str:
    from ml import registry

    ingest = json.loads(storage.read_bytes(f"reports/ingest/{day}/result.json"))
    summary_key = f"reports/drift/{day}/summary.json"
    drift = json.loads(storage.read_bytes(summary_key)) if storage.exists(summary_key) else {}
    score = drift.get("drift_score")
    score_text = "-" if score is None else f"{score:.2f}{' DRIFT' if drift.get('drift_detected') else ''}"
    kl = drift.get("prediction_kl")
    champion = registry.version_for_alias(settings, registry.CHAMPION) or "-"
    return (
        f"{day.isoformat():<11} {ingest['curated']['rows'] + ingest['curated']['files']:>8} "
        f"{ingest['quarantined']['rows'] + ingest['quarantined']['files']:>11} {score_text:>11} "
        f"{'-' if kl is None else f'{kl:.3f}':>7}  {retrain:<34} {champion:>8}  ({seconds:.0f} s)"
    )


def run_day(api: Any, storage: Storage, settings: Any, day: dt.date, train_after: bool) -> tuple[str, bool]:
    """Ingest ``day`` through the scheduler and follow what it sets off; returns (retrain note, ok)."""
    from ml.drift import retrain_requests

    known = {dag: {r["dag_run_id"] for r in api.runs(dag)} for dag in ("drift_monitor", "retrain")}
    if api.wait("ingest_daily", api.trigger("ingest_daily", {"date": day.isoformat()})) != "success":
        return "ingest failed", False
    monitor = api.wait_new_run("drift_monitor", known["drift_monitor"])
    if monitor is None or api.wait("drift_monitor", monitor["dag_run_id"]) != "success":
        return "drift_monitor did not run", False
    if any(request["day"] == day.isoformat() for request in retrain_requests(storage)):
        run = api.wait_new_run("retrain", known["retrain"])
        if run is None:
            return "retrain was requested but did not start", False
        state = api.wait("retrain", run["dag_run_id"])
        return f"drift -> retrain {state}", state == "success"
    if train_after:
        state = api.wait("retrain", api.trigger("retrain", {"note": "demo: first model"}))
        return f"first training (manual) {state}", state == "success"
    summary_key = f"reports/drift/{day}/summary.json"
    if storage.exists(summary_key) and json.loads(storage.read_bytes(summary_key))["drift_detected"]:
        return "none: drift within the cooldown", True
    return "-", True


def settle_unpause_run(api: Any, seconds: float = 45) -> None:
    """Unpausing ``retrain`` runs its latest cron tick once; let it finish (no data yet) before day 1."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        active = [run for run in api.runs("retrain") if run["state"] in ("queued", "running")]
        for run in active:
            state = api.wait("retrain", run["dag_run_id"])
            print(f"retrain run {run['dag_run_id']} (started by the unpause, before any data): {state}")
        if active:
            return
        time.sleep(3)


def main() -> int:
    from ml import stack
    from ml.demo_data import Drift, land_days
    from ml.stack import Api

    os.environ["MLOPS__STORAGE__ROOT"] = str(DEMO_ROOT)
    os.environ["MLOPS__MLFLOW__TRACKING_URI"] = f"sqlite:///{DEMO_ROOT / 'mlflow' / 'mlflow.db'}"
    os.environ["MLOPS__MLFLOW__AUTO_APPROVE"] = "true"
    os.environ["MLOPS__SERVING__STATE_DIR"] = str(DEMO_ROOT / "serving")
    settings = load_settings()
    if stack.down() != 0:
        return 1
    shutil.rmtree(DEMO_ROOT, ignore_errors=True)
    (DEMO_ROOT / "mlflow").mkdir(parents=True)
    storage = LocalStorage(DEMO_ROOT)
    print(f"storage: {storage.root_url}\nAIRFLOW_HOME: {stack.airflow_home()}")
    clean = land_days(storage, DEMO_START, DRIFT_FROM, settings.classes, count=PER_DAY, seed=7)
    drifted_start = DEMO_START + dt.timedelta(days=DRIFT_FROM)
    drifted = land_days(
        storage,
        drifted_start,
        DEMO_DAYS - DRIFT_FROM,
        settings.classes,
        count=PER_DAY,
        seed=7,
        drift=Drift.parse(DRIFT),
    )
    land_broken_objects(storage, DEMO_START + dt.timedelta(days=1))
    print(
        f"landed {len(clean) + len(drifted)} days of {PER_DAY} generated images (+3 broken uploads on "
        f"day 2; drift {DRIFT} from {drifted_start})"
    )
    print("starting Airflow (scheduler, API server, LocalExecutor)...")
    if stack.up(wait_seconds=300) != 0:
        return 1
    ok, passwords = True, stack.airflow_home() / stack.PASSWORDS_FILE
    try:
        api = Api.as_admin()
        settle_unpause_run(api)
        header = (
            f"\n{'day':<11} {'accepted':>8} {'quarantined':>11} {'drift score':>11} {'pred KL':>7}  "
            f"{'retrain':<34} {'champion':>8}"
        )
        print(header + "\n" + "-" * (len(header) - 1))
        for offset in range(DEMO_DAYS):
            day = DEMO_START + dt.timedelta(days=offset)
            started = time.perf_counter()
            note, day_ok = run_day(
                api, storage, settings, day, train_after=offset == FIRST_TRAINING_AFTER - 1
            )
            ok = ok and day_ok
            print(day_row(storage, settings, day, note, time.perf_counter() - started), flush=True)
    finally:
        stack.down()
    print(
        "\nwhere to look:"
        f"\n  Airflow UI:  make up, then {stack.api_url()} (user admin; password in {passwords})"
        f"\n  MLflow UI:   .venv/bin/mlflow ui --backend-store-uri {settings.mlflow.tracking_uri}"
        f"\n  drift:       {storage.url('reports/drift')}  (Evidently report.html per day)"
        f"\n  Data Docs:   {storage.url('reports/data_docs')}"
        f"\n  quarantine:  {storage.url('quarantine')}  (each day's _reasons.csv)"
        f"\n  registry:    {storage.url('registry/audit')}  (who promoted what, when)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
