"""Drift on generated demo days against a real champion: no false alarms, every knob detected,
and drift_monitor (through Airflow) warns on Slack, requests a retrain and honours the cooldown."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from ml.config import load_settings
from ml.data.ingest import ingest_day
from ml.demo.drawing import Drift
from ml.demo.landing import land_day, land_days
from ml.storage import LocalStorage
from tests.conftest import REPO, world_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]
START = dt.date(2026, 6, 1)
TRAIN_DAYS = 3
CLEAR = {"brightness": 0.6, "blur": 0.6, "class_mix": 0.6}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    """Three ingested demo days and a champion trained on them."""
    from ml import registry
    from ml.training.pipeline import retrain

    root = tmp_path_factory.mktemp("drift")
    env = world_env(root, training__epochs=25, training__early_stopping__patience=6)
    settings = load_settings(environ=env)
    storage = LocalStorage(root / "store")
    land_days(storage, START, TRAIN_DAYS, settings.classes, count=120, seed=11)
    for offset in range(TRAIN_DAYS):
        ingest_day(settings, storage, START + dt.timedelta(days=offset))
    result = retrain(settings, storage).to_dict()
    assert result["status"] == "registered", result
    registry.promote(settings, storage, result["model_version"], "test")
    return env, settings, storage


def land_and_ingest(settings, storage, day: dt.date, seed: int, drift: Drift | None = None) -> None:
    land_day(storage, day, settings.classes, count=120, seed=seed, drift=drift)
    ingest_day(settings, storage, day)


def test_five_new_no_drift_days_raise_no_alarm(world) -> None:
    from ml.monitoring.drift import measure_day

    _, settings, storage = world
    scores = []
    for offset in range(5):  # the false-alarm rate itself is measured in tests/unit/test_drift.py
        day = START + dt.timedelta(days=10 + offset)
        land_and_ingest(settings, storage, day, seed=100 + offset)
        summary = measure_day(settings, storage, day).summary()
        assert summary["status"] == "measured" and summary["model_version"] == "1"
        scores.append(
            (summary["drift_detected"], summary["drift_score"], summary["prediction_kl"], summary["reasons"])
        )
    assert not any(detected or score > 0.1 for detected, score, _, _ in scores), scores
    report = storage.read_bytes(f"reports/drift/{day}/report.html")
    assert b"<html" in report[:2000].lower() and storage.exists(f"reports/drift/{day}/evidently.json")


@pytest.mark.parametrize("kind", sorted(CLEAR))
def test_each_drift_knob_at_a_clear_strength_is_detected(world, kind: str) -> None:
    from ml import registry
    from ml.monitoring.drift import measure_day

    _, settings, storage = world
    day = START + dt.timedelta(days=30 + sorted(CLEAR).index(kind))
    land_and_ingest(settings, storage, day, seed=7, drift=Drift(kind, CLEAR[kind]))
    summary = measure_day(settings, storage, day).summary()
    assert summary["drift_detected"], summary["reasons"]
    if kind == "class_mix":
        assert summary["prediction_drift"] and summary["prediction_kl"] > 0.05
        assert any(c["column"] == "label" and c["drifted"] for c in summary["columns"])
    else:
        assert summary["data_drift"] and summary["drift_score"] > 0.1
    run = registry.client(settings).get_run(summary["mlflow_run_id"])
    assert run.data.metrics["drift_score"] == summary["drift_score"]
    assert json.loads(storage.read_bytes(f"reports/drift/{day}/summary.json"))["day"] == str(day)


def test_drift_monitor_dag_warns_requests_a_retrain_then_cools_down(
    world, monkeypatch: pytest.MonkeyPatch, receiver, airflow_db: Path
) -> None:
    from airflow.dag_processing.dagbag import DagBag

    env, settings, storage = world
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(
        "AIRFLOW_CONN_SLACK_ALERTS",
        json.dumps({"conn_type": "slackwebhook", "password": f"{receiver.url}/slack/T0/B0"}),
    )
    dag = DagBag(dag_folder=str(REPO / "dags" / "drift_monitor.py")).dags["drift_monitor"]
    first, second = START + dt.timedelta(days=40), START + dt.timedelta(days=41)
    for day in (first, second):
        land_and_ingest(settings, storage, day, seed=8, drift=Drift("brightness", 0.6))

    run = dag.test(logical_date=dt.datetime(2026, 8, 1, tzinfo=dt.UTC), run_conf={"date": str(first)})
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert run.state == "success" and states["request_retrain"] == "success", states
    (slack,) = receiver.wait_for("/slack/")
    text = slack.json()["text"]
    assert "data_drift_detected" in text and f"reports/drift/{first}/report.html" in text

    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        events = (
            session.query(AssetEvent)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .filter(AssetModel.name == "retrain_requested")
            .all()
        )
        extras = [event.extra for event in events]
    assert extras and extras[-1]["day"] == str(first) and "drift on" in extras[-1]["reason"]
    assert extras[-1]["report"].endswith(f"reports/drift/{first}/report.html")

    again = dag.test(logical_date=dt.datetime(2026, 8, 2, tzinfo=dt.UTC), run_conf={"date": str(second)})
    states = {ti.task_id: ti.state for ti in again.get_task_instances()}
    assert states["measure"] == "success" and states["request_retrain"] == "skipped", states
    from ml.monitoring.drift import retrain_requests

    assert [r["day"] for r in retrain_requests(storage)] == [str(first)]
    assert "cooldown" in receiver.wait_for("/slack/", count=2)[-1].json()["text"]


def test_a_day_that_cannot_be_measured_does_not_hold_back_the_others(world, tmp_path: Path) -> None:
    import shutil

    from ml.data import catalog
    from ml.monitoring.drift import monitor_days

    env, settings, _ = world
    storage = LocalStorage(
        tmp_path / "store"
    )  # a copy: this test's requests stay out of the others' cooldown
    shutil.copytree(world[2].root, storage.root)
    drifted, broken = START + dt.timedelta(days=60), START + dt.timedelta(days=61)
    land_and_ingest(settings, storage, drifted, seed=12, drift=Drift("brightness", 0.6))
    storage.write_bytes(catalog.partition_key(broken), b"not a parquet file")  # a corrupt partition
    sent = []
    summary = monitor_days(settings, storage, [drifted, broken], lambda alert: sent.append(alert) or {})
    assert summary["day"] == str(drifted) and summary["retrain"]["request"] is True
    assert list(summary["failed_days"]) == [str(broken)] and "parquet" in summary["failed_days"][str(broken)]
    assert [alert.date for alert in sent] == [str(drifted)]  # warned once, after every day was measured
    with pytest.raises(catalog.CatalogPartitionError):
        monitor_days(settings, storage, [broken], lambda alert: sent.append(alert) or {})
    assert len(sent) == 1


def test_cli_prints_score_decision_and_report(world, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from ml.cli import main

    env, settings, storage = world
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    day = START + dt.timedelta(days=50)
    land_and_ingest(settings, storage, day, seed=9, drift=Drift("blur", 0.8))
    assert main(["drift", "--date", str(day), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["drift_detected"] is True and result["drift_score"] > 0.1
    assert result["report"] == storage.url(f"reports/drift/{day}/report.html")


def test_drift_loads_the_champion_head_without_unpickling_a_planted_artifact(world, tmp_path: Path) -> None:
    """A poisoned head.pt in the champion's run must not run: drift fails instead of executing it."""
    import pickle

    import torch

    from ml import registry
    from ml.layout import HEAD_WEIGHTS_ARTIFACT
    from ml.monitoring.drift import champion_reference
    from tests.unit.test_model import _Planted

    _, settings, _ = world
    client = registry.client(settings)
    version = registry.version_for_alias(settings, registry.CHAMPION)
    run_id = client.get_model_version(settings.mlflow.registered_model, version).run_id
    original = Path(client.download_artifacts(run_id, HEAD_WEIGHTS_ARTIFACT, str(tmp_path)))
    kept = original.read_bytes()
    assert champion_reference(settings)[2] is not None  # the real head loads
    marker = tmp_path / "marker.txt"
    poisoned = tmp_path / "poisoned" / "head.pt"
    poisoned.parent.mkdir()
    torch.save({"layers.1.weight": _Planted(str(marker))}, poisoned)
    client.log_artifact(run_id, str(poisoned), "model_meta")
    try:
        with pytest.raises(pickle.UnpicklingError):
            champion_reference(settings)
        assert not marker.exists()
    finally:
        poisoned.write_bytes(kept)
        client.log_artifact(run_id, str(poisoned), "model_meta")
    assert champion_reference(settings)[2] is not None
