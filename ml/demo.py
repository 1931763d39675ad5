"""``make demo``: land generated days and ingest each one through Airflow (``airflow dags test``).

Runs on the embedded default: storage under ``.data/demo``, Airflow's SQLite database under
``$AIRFLOW_HOME``. Prints landed / accepted / quarantined per day and where to look.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sys
import time

from ml.config import REPO_ROOT, load_settings
from ml.stack import airflow_cli
from ml.storage import LocalStorage, Storage

DEMO_ROOT = REPO_ROOT / ".data" / "demo"
DEMO_START = dt.date(2026, 1, 5)
DEMO_DAYS = 3
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


def ingest_through_airflow(day: dt.date) -> tuple[str, float]:
    logical = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC).isoformat()
    started = time.perf_counter()
    run = airflow_cli(
        "dags", "test", "ingest_daily", logical, "--conf", json.dumps({"date": day.isoformat()})
    )
    state = "success" if run.returncode == 0 and "state=success" in (run.stdout + run.stderr) else "failed"
    if state != "success":
        print((run.stdout + run.stderr)[-3000:], file=sys.stderr)
    return state, time.perf_counter() - started


def main() -> int:
    from ml.demo_data import land_days

    os.environ["MLOPS__STORAGE__ROOT"] = str(DEMO_ROOT)
    settings = load_settings()
    shutil.rmtree(DEMO_ROOT, ignore_errors=True)
    storage = LocalStorage(DEMO_ROOT)
    print(f"storage: {storage.root_url}\nAIRFLOW_HOME: {os.environ.get('AIRFLOW_HOME')}")
    migrate = airflow_cli("db", "migrate")
    if migrate.returncode != 0:
        print(migrate.stderr[-3000:], file=sys.stderr)
        return 1
    landed = land_days(storage, DEMO_START, DEMO_DAYS, settings.classes, count=PER_DAY, seed=7)
    land_broken_objects(storage, DEMO_START + dt.timedelta(days=1))
    print(f"landed {len(landed)} days of {PER_DAY} generated images (+3 broken uploads on day 2)\n")
    columns = f"{'day':<11} {'airflow':<8} {'landed':>7} {'accepted':>9} {'quarantined':>12} {'new':>5}"
    header = f"{columns}  dataset version"
    print(header)
    print("-" * len(header))
    failures = 0
    for offset in range(DEMO_DAYS):
        day = DEMO_START + dt.timedelta(days=offset)
        state, seconds = ingest_through_airflow(day)
        result = json.loads(storage.read_bytes(f"reports/ingest/{day.isoformat()}/result.json"))
        failures += state != "success"
        print(
            f"{day.isoformat():<11} {state:<8} {result['landed']['objects']:>7} "
            f"{result['curated']['rows'] + result['curated']['files']:>9} "
            f"{result['quarantined']['rows'] + result['quarantined']['files']:>12} "
            f"{result['curated']['new_images']:>5}  {result.get('dataset_version', '-')}  ({seconds:.0f} s)"
        )
    last = DEMO_START + dt.timedelta(days=DEMO_DAYS - 1)
    print(
        "\nwhere to look:"
        f"\n  Data Docs:   {storage.url(f'reports/data_docs/{last.isoformat()}/index.html')}"
        f"\n  quarantine:  {storage.url('quarantine')}  (each day's _reasons.csv)"
        f"\n  catalog:     {storage.url('catalog/versions')}"
        "\n  Airflow UI:  make up, then http://127.0.0.1:8080 (see README for the password)"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
