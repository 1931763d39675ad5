"""A real Airflow (standalone: scheduler, API server, LocalExecutor): a triggered ingest, and a
retrain whose promotion waits for a human answer given through the REST API."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import time
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ml.data.ingest import ingest_day
from ml.demo.landing import land_days
from ml.storage import LocalStorage
from tests.e2e.standalone import standalone

pytestmark = [pytest.mark.slow, pytest.mark.integration]
DAY = dt.date(2026, 4, 1)
CLASSES = ["electronics", "clothing", "home", "books", "toys"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, airflow_db: Path):
    """One ``airflow standalone`` (scheduler, API server, LocalExecutor) for this module's tests."""
    from ml.ops import stack

    root = tmp_path_factory.mktemp("e2e")
    with standalone(root) as home:
        yield Stack(stack.Api.as_admin(), home, root)


@dataclass(frozen=True)
class Stack:
    api: Any  # ml.stack.Api, logged in as admin
    home: Path
    root: Path

    def get(self, path: str) -> dict:
        return self.api.call(f"/api/v2/{path}")

    def send(self, path: str, payload: dict, method: str = "POST") -> dict:
        return self.api.call(f"/api/v2/{path}", payload, method)

    def wait_run(self, dag_id: str, run_id: str, seconds: float) -> str:
        return self.api.wait(dag_id, run_id, seconds)


def test_scheduler_runs_a_triggered_ingest(stack: Stack) -> None:
    storage = LocalStorage(stack.root / "store")
    land_days(storage, DAY, 1, CLASSES, count=40, seed=3)
    run = stack.send("dags/ingest_daily/dagRuns", {"logical_date": None, "conf": {"date": str(DAY)}})
    state = stack.wait_run("ingest_daily", run["dag_run_id"], 180)
    assert state == "success", f"run ended {state}; see {stack.home / 'standalone.log'}"
    result = json.loads(storage.read_bytes(f"reports/ingest/{DAY}/result.json"))
    assert result["status"] == "published" and result["curated"]["new_images"] == 40
    assert os.environ["AIRFLOW_HOME"] == str(stack.home)


def test_a_human_approves_the_promotion_through_the_rest_api(stack: Stack) -> None:
    """retrain waits at ``approve`` until someone answers; the answer (and who gave it) promotes."""
    from ml import registry
    from ml.config import load_settings

    settings = load_settings()  # the module's environment: this stack's storage and MLflow
    storage = LocalStorage(stack.root / "store")
    start = DAY + dt.timedelta(days=1)
    land_days(storage, start, 3, CLASSES, count=120, seed=11)
    for offset in range(3):
        ingest_day(settings, storage, start + dt.timedelta(days=offset))
    run = stack.send(
        "dags/retrain/dagRuns", {"logical_date": None, "conf": {"epochs": 20, "note": "e2e approval"}}
    )
    run_id = run["dag_run_id"]
    path = f"dags/retrain/dagRuns/{run_id}/taskInstances/approve/-1/hitlDetails"
    deadline = time.monotonic() + 420
    detail = None
    while time.monotonic() < deadline and detail is None:
        time.sleep(2)
        try:
            detail = stack.get(path)
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise
        state = stack.get(f"dags/retrain/dagRuns/{run_id}")["state"]
        assert state != "failed", f"retrain failed before approval; see {stack.home / 'standalone.log'}"
    assert detail is not None, "no approval was requested"
    assert detail["options"] == ["Approve", "Reject"]
    version = re.search(r"Promote model version (\d+) to champion", detail["subject"]).group(1)
    time.sleep(5)  # an approval that did not wait would have promoted by now
    assert registry.version_for_alias(settings, registry.CHAMPION) is None  # nothing before the answer
    assert stack.get(f"dags/retrain/dagRuns/{run_id}")["state"] == "running"

    answer = stack.send(path, {"chosen_options": ["Approve"], "params_input": {}}, method="PATCH")
    assert answer["chosen_options"] == ["Approve"]
    state = stack.wait_run("retrain", run_id, 180)
    assert state == "success", f"run ended {state}; see {stack.home / 'standalone.log'}"
    assert registry.version_for_alias(settings, registry.CHAMPION) == version
    tags = registry.client(settings).get_model_version(settings.mlflow.registered_model, version).tags
    assert tags["approved_by"] == "admin"
    assert [record["approved_by"] for record in registry.audit_log(storage)] == ["admin"]
    from ml.serving.state import read_state

    assert read_state(storage).stable == version and tags["bento_tag"]  # checked, deployed


def test_up_adds_the_mlflow_ui_and_the_service_and_down_stops_everything(stack: Stack) -> None:
    """`make up` beside a running Airflow: the MLflow UI and the champion's service; `make down` ends all."""
    from ml import registry
    from ml.config import load_settings
    from ml.http import http
    from ml.ops import stack as stacks

    settings = load_settings()
    champion = registry.version_for_alias(settings, registry.CHAMPION)
    assert champion, "the tests above leave a champion"
    assert stacks.up() == 0
    service = f"http://127.0.0.1:{settings.serving.port}"
    assert http("GET", f"{stacks.mlflow_ui_url()}/health")[0] == 200
    assert json.loads(http("GET", f"{service}/version")[1])["model_version"] == champion
    pids = {name: stacks.running_pid(name) for name in ("standalone", "mlflow", "service")}
    assert all(pids.values()), pids
    assert stacks.down() == 0
    for name, pid in pids.items():
        assert stacks.running_pid(name) is None and not stacks.group_members(pid), name
    with pytest.raises(OSError):
        http("GET", f"{service}/readyz", timeout=2)
