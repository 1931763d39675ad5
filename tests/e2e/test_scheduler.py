"""A real Airflow (standalone: scheduler, API server, LocalExecutor) runs ingest_daily end to end."""

from __future__ import annotations

import datetime as dt
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ml.demo_data import land_days
from ml.storage import LocalStorage
from tests.conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.integration]
DAY = dt.date(2026, 4, 1)


def call(url: str, payload: dict | None = None, token: str | None = None, method: str | None = None) -> dict:
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode() if payload is not None else None,
        method=method or ("POST" if payload is not None else "GET"),
    )
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    for attempt in range(5):  # the API server on SQLite can answer 500 while the scheduler writes
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or attempt == 4:
                raise
            time.sleep(2)
    raise AssertionError("unreachable")


@pytest.fixture
def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, airflow_db: Path):
    from ml import stack

    home = tmp_path / "airflow"
    home.mkdir()
    monkeypatch.setenv("AIRFLOW_HOME", str(home))
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"sqlite:///{home}/airflow.db")
    monkeypatch.setenv("AIRFLOW__API__PORT", str(free_port()))
    monkeypatch.setenv("MLOPS__STORAGE__ROOT", str(tmp_path / "store"))
    assert stack.up(wait_seconds=240) == 0, (home / "standalone.log").read_text()[-3000:]
    yield stack, home
    stack.down()


def test_scheduler_runs_a_triggered_ingest(stack, tmp_path: Path) -> None:
    module, home = stack
    storage = LocalStorage(tmp_path / "store")
    land_days(storage, DAY, 1, ["electronics", "clothing", "home", "books", "toys"], count=40, seed=3)
    password = json.loads((home / "simple_auth_manager_passwords.json.generated").read_text())["admin"]
    api = module.api_url()
    token = call(f"{api}/auth/token", {"username": "admin", "password": password})["access_token"]
    run = call(
        f"{api}/api/v2/dags/ingest_daily/dagRuns", {"logical_date": None, "conf": {"date": str(DAY)}}, token
    )
    deadline = time.monotonic() + 180
    state = run["state"]
    while time.monotonic() < deadline and state not in ("success", "failed"):
        time.sleep(3)
        state = call(f"{api}/api/v2/dags/ingest_daily/dagRuns/{run['dag_run_id']}", token=token)["state"]
    assert state == "success", f"run ended {state}; see {home / 'standalone.log'}"
    result = json.loads(storage.read_bytes(f"reports/ingest/{DAY}/result.json"))
    assert result["status"] == "published" and result["curated"]["new_images"] == 40
    assert os.environ["AIRFLOW_HOME"] == str(home)
