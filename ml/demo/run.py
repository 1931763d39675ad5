"""``make demo``: ten generated days through the real Airflow scheduler and the live service.

Starts ``airflow standalone`` (as ``make up``), lands ``DEMO_DAYS`` generated days (three broken
uploads on day 2, brightness drift from day ``DRIFT_FROM + 1``) and, day by day, triggers
``ingest_daily`` through the REST API. Everything after an ingest is scheduled by Airflow: its
``curated_images`` event runs ``drift_monitor``; a drift event on ``retrain_requested`` runs
``retrain`` (train, gate, build, serving check, canary, approval, deploy). The first model is
trained by a manual ``retrain`` after day 3 (auto-approved in the demo: ``mlflow.auto_approve``);
then the live service starts (``mlops serve``). From day 4 each day's live traffic, images like
that day's landing, is classified by the service and labelled through ``/feedback``, and
``monitor_serving`` checks it (live accuracy, p99, errors, drift of served traffic) before the
day's batch is ingested. Ends with a table per day and stops everything.

Config overlay: ``.data/demo/params.yaml`` (storage, MLflow and deployment state under
``.data/demo``); ``MLOPS_CONFIG=.data/demo/params.yaml make up`` brings it all back.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import yaml

from ml.config import REPO_ROOT, Settings, load_settings
from ml.demo.drawing import Drift
from ml.layout import DayLayout, drift_summary_key
from ml.storage import LocalStorage, Storage

DEMO_ROOT = REPO_ROOT / ".data" / "demo"
DEMO_CONFIG = DEMO_ROOT / "params.yaml"
DEMO_START = dt.date(2026, 1, 5)
DEMO_DAYS = 10
FIRST_TRAINING_AFTER = 3  # days ingested before the first model is trained
DRIFT_FROM = 6  # 0-based index of the first drifted day
DRIFT = "brightness:0.7"
PER_DAY = 200  # the first model trains on 3 days: ~18 test images per class for the per-class gate
LIVE_PER_DAY = 100  # live requests per day once the service runs, each labelled through /feedback
SEED = 7
ROW = (
    "{day:<10} {accepted:>8} {quarantined:>5} {drift:>10}  {retrain:<22} {model:>5}  "
    "{traffic:>7} {acc:>5} {served:>6} {p99:>6} {live_drift:>5} {seconds:>6}  {alerts}"
)
HEADER = {
    "day": "day", "accepted": "accepted", "quarantined": "quar.", "drift": "drift", "retrain": "retrain",
    "model": "model", "traffic": "live", "acc": "acc.", "served": "served", "p99": "p99 ms",
    "live_drift": "drift", "seconds": "time", "alerts": "alerts (live)",
}  # fmt: skip
NO_TRAFFIC = {"traffic": "-", "acc": "-", "served": "-", "p99": "-", "drift": "-", "alerts": "-"}


def land_broken_objects(storage: Storage, day: dt.date) -> int:
    """Add a few bad objects to a landed day, as real uploads do; returns how many rows were added."""
    layout = DayLayout(day)
    labels = storage.read_bytes(layout.labels).decode()
    storage.write_bytes(f"{layout.images}/truncated.jpg", b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    storage.write_bytes(f"{layout.images}/notes.jpg", b"meeting notes, not a photo\n")
    first = storage.list(layout.images)[0]
    storage.write_bytes(f"{layout.images}/unlabelled_{first.rsplit('/', 1)[-1]}", storage.read_bytes(first))
    extra = "truncated.jpg,toys,upload\nnotes.jpg,books,upload\nmissing.jpg,home,upload\n"
    storage.write_bytes(layout.labels, (labels.rstrip("\n") + "\n" + extra).encode())
    return 3


def write_overlay() -> None:
    """The demo's config overlay: everything under .data/demo, promotions auto-approved."""
    overlay = {
        "storage": {"root": str(DEMO_ROOT)},
        "mlflow": {"tracking_uri": f"sqlite:///{DEMO_ROOT / 'mlflow' / 'mlflow.db'}", "auto_approve": True},
        "serving": {"state_dir": str(DEMO_ROOT / "serving")},
    }
    DEMO_CONFIG.write_text(yaml.safe_dump(overlay, sort_keys=False))
    os.environ["MLOPS_CONFIG"] = str(DEMO_CONFIG)  # for this process and everything it starts


def drift_on(offset: int) -> Drift | None:
    return Drift.parse(DRIFT) if offset >= DRIFT_FROM else None


def live_traffic(settings: Settings, day: dt.date, offset: int) -> tuple[int, set[str]]:
    """The day's live requests, images like the day's landing, each classified and then labelled.

    Returns (requests sent, ids of those answered and labelled)."""
    from ml.demo.landing import labelled_images
    from ml.http import http, multipart

    url = settings.serving.live_url
    seed = SEED * 1000 + day.toordinal()
    images = labelled_images(settings.classes, LIVE_PER_DAY, seed=seed, drift=drift_on(offset))

    def one(upload: tuple[bytes, str]) -> str | None:
        body, content_type = multipart("image", [("upload.jpg", upload[0])])
        status, answer = http("POST", f"{url}/predict", body=body, headers={"Content-Type": content_type})
        if status != 200:
            return None
        request_id = json.loads(answer)["request_id"]
        feedback = json.dumps({"request_id": request_id, "label": upload[1]}).encode()
        headers = {"Content-Type": "application/json"}
        status, _ = http("POST", f"{url}/feedback", body=feedback, headers=headers)
        return request_id if status == 200 else None

    with ThreadPoolExecutor(max_workers=4) as pool:
        answered = {request_id for request_id in pool.map(one, images) if request_id}
    return len(images), answered


def check_of_run(storage: Storage, run_id: str) -> dict[str, Any]:
    """The record the ``monitor_serving`` run ``run_id`` wrote (newest first)."""
    from ml.layout import LIVE_CHECKS_PREFIX

    for key in reversed(storage.list(LIVE_CHECKS_PREFIX)):
        record = json.loads(storage.read_bytes(key))
        if record.get("run_id") == run_id:
            return record
    return {}


def wait_logged(storage: Storage, request_ids: set[str], seconds: float = 30) -> None:
    """The service writes its feedback log in batches every few seconds: wait for this traffic's."""
    from ml.layout import FEEDBACK_PREFIX
    from ml.storage import read_jsonl

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if request_ids <= {record["request_id"] for record in read_jsonl(storage, FEEDBACK_PREFIX)}:
            return
        time.sleep(1)


def start_live_day(
    api: Any, storage: Storage, settings: Settings, day: dt.date, offset: int
) -> dict[str, Any]:
    """Send the day's traffic, wait for its logs, trigger ``monitor_serving`` (it runs beside the ingest)."""
    sent, answered = live_traffic(settings, day, offset)
    wait_logged(storage, answered)
    return {"sent": sent, "answered": len(answered), "run_id": api.trigger("monitor_serving", {})}


def finish_live_day(api: Any, storage: Storage, started: dict[str, Any]) -> tuple[dict[str, str], bool]:
    """Wait for the day's ``monitor_serving`` run; its verdict as table cells."""
    state = api.wait("monitor_serving", started["run_id"])
    check = check_of_run(storage, started["run_id"])
    metrics = check.get("metrics", {})

    def shown(name: str, spec: str) -> str:
        value = metrics.get(name)
        return "-" if value is None else format(value, spec)

    fired = [n["notice"] for n in check.get("notices", []) if n["notice"]["action"] == "trigger"]
    alerts = ", ".join(f"{n['rule']} ({n['severity']})" for n in fired) or "-"
    if check.get("rollback"):
        alerts += f"; ROLLED BACK to v{check['rollback']['to']}"
    cells = {
        "traffic": f"{started['answered']}/{started['sent']}",
        "acc": shown("accuracy", ".2f"),
        "served": f"v{check.get('deployment', {}).get('stable')}",
        "p99": shown("p99_latency_ms", ".0f"),
        "drift": shown("drift_score", ".2f"),
        "alerts": alerts,
    }
    return cells, state == "success" and started["answered"] == started["sent"]


def ingest_cells(storage: Storage, day: dt.date) -> dict[str, str]:
    ingest = json.loads(storage.read_bytes(DayLayout(day).result))
    summary_key = drift_summary_key(day)
    drift = json.loads(storage.read_bytes(summary_key)) if storage.exists(summary_key) else {}
    score = drift.get("drift_score")
    return {
        "accepted": str(ingest["curated"]["rows"] + ingest["curated"]["files"]),
        "quarantined": str(ingest["quarantined"]["rows"] + ingest["quarantined"]["files"]),
        "drift": "-" if score is None else f"{score:.2f}{' DRIFT' if drift.get('drift_detected') else ''}",
    }


def champion_version() -> str | None:
    from ml import registry
    from ml.config import get_settings

    return registry.version_for_alias(get_settings(), registry.CHAMPION)


def run_day(api: Any, storage: Storage, day: dt.date, train_after: bool) -> tuple[str, bool]:
    """Ingest ``day`` through the scheduler and follow what it sets off; returns (retrain note, ok)."""
    from ml.monitoring.drift import retrain_requests

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
        if state == "success" and not champion_version():
            return "first model not promoted", False  # the run ended well, but the gate refused the model
        return f"first training {state}", state == "success"
    summary_key = drift_summary_key(day)
    if storage.exists(summary_key) and json.loads(storage.read_bytes(summary_key))["drift_detected"]:
        return "cooldown", True
    return "-", True


def land(storage: Storage, settings: Settings) -> None:
    from ml.demo.landing import land_day

    for offset in range(DEMO_DAYS):
        day = DEMO_START + dt.timedelta(days=offset)
        land_day(storage, day, settings.classes, count=PER_DAY, seed=SEED, drift=drift_on(offset))
    land_broken_objects(storage, DEMO_START + dt.timedelta(days=1))
    print(
        f"landed {DEMO_DAYS} days of {PER_DAY} generated images (+3 broken uploads on day 2; drift {DRIFT} "
        f"from {DEMO_START + dt.timedelta(days=DRIFT_FROM)})"
    )


def prepare() -> tuple[Settings, Storage] | None:
    """A clean demo root and overlay, the days landed while Airflow starts; None if Airflow did not."""
    from ml.ops import stack

    if stack.down() != 0:
        return None
    shutil.rmtree(DEMO_ROOT, ignore_errors=True)
    (DEMO_ROOT / "mlflow").mkdir(parents=True)
    write_overlay()
    settings = load_settings()
    storage = LocalStorage(DEMO_ROOT)
    print(f"config: {DEMO_CONFIG}\nstorage: {storage.root_url}\nAIRFLOW_HOME: {stack.airflow_home()}")
    print("starting Airflow (scheduler, API server, LocalExecutor) while the days land...")
    with ThreadPoolExecutor(max_workers=1) as pool:
        booting = pool.submit(stack.start_airflow, 300)
        land(storage, settings)
        if booting.result() != 0:
            return None
    return settings, storage


def run_demo_day(api: Any, storage: Storage, settings: Settings, offset: int) -> bool:
    """One day: its live traffic and check (once the service runs), its ingest and what follows; one row."""
    from ml import registry
    from ml.ops import stack

    day = DEMO_START + dt.timedelta(days=offset)
    began = time.perf_counter()
    live, live_ok = dict(NO_TRAFFIC), True
    traffic = stack.service_running() and start_live_day(api, storage, settings, day, offset)
    note, day_ok = run_day(api, storage, day, train_after=offset == FIRST_TRAINING_AFTER - 1)
    if traffic:
        live, live_ok = finish_live_day(api, storage, traffic)
    if offset == FIRST_TRAINING_AFTER - 1 and day_ok:
        day_ok = stack.start_service() == 0
    print(
        ROW.format(
            day=day.isoformat(),
            retrain=note,
            model=registry.version_for_alias(settings, registry.CHAMPION) or "-",
            seconds=f"{time.perf_counter() - began:.0f} s",
            live_drift=live.pop("drift"),
            **ingest_cells(storage, day),
            **live,
        ),
        flush=True,
    )
    return day_ok and live_ok


def where_to_look(settings: Settings, storage: Storage) -> str:
    from ml import registry
    from ml.ops import stack

    passwords = stack.airflow_home() / stack.PASSWORDS_FILE
    return (
        "\nwhere to look (bring everything back with: MLOPS_CONFIG=.data/demo/params.yaml make up):"
        f"\n  Airflow UI:  {stack.api_url()} (user admin; password in {passwords})"
        f"\n  MLflow UI:   {stack.mlflow_ui_url()}  ({registry.tracking_uri(settings)})"
        f"\n  service:     http://127.0.0.1:{settings.serving.port}  (/predict /feedback /metrics /version)"
        f"\n  live checks: {storage.url('monitoring/serving/checks')}  (one JSON per monitor_serving run)"
        f"\n  drift:       {storage.url('reports/drift')} and {storage.url('reports/serving_drift')}"
        f"\n  Data Docs:   {storage.url('reports/data_docs')}"
        f"\n  quarantine:  {storage.url('quarantine')}  (each day's _reasons.csv)"
        f"\n  audit:       {storage.url('registry/audit')} and {storage.url('serving/audit')}"
    )


def main() -> int:
    from ml.ops import stack
    from ml.ops.stack import Api

    prepared = prepare()
    if prepared is None:
        return 1
    settings, storage = prepared
    ok, started = True, time.perf_counter()
    try:
        api = Api.as_admin()
        stack.settle_unpause_runs(api)
        header = ROW.format(**HEADER)
        print(f"\n{header}\n{'-' * len(header)}")
        for offset in range(DEMO_DAYS):
            ok = run_demo_day(api, storage, settings, offset) and ok
    finally:
        stack.down()
    print(f"\n{DEMO_DAYS} days in {time.perf_counter() - started:.0f} s after Airflow started")
    print(where_to_look(settings, storage))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
