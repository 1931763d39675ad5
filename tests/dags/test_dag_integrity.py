"""Every DAG imports cleanly and fast, and follows the house rules."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

EXPECTED = {"ingest_daily", "drift_monitor", "retrain", "rollback", "monitor_serving", "tune"}


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


def test_no_import_errors_and_expected_dags(dagbag) -> None:
    assert dagbag.import_errors == {}
    assert EXPECTED <= set(dagbag.dag_ids)


def test_house_rules(dagbag) -> None:
    from mlops_airflow.alerts import failure_callback, landing_timeout_callback

    for dag in dagbag.dags.values():
        assert dag.tags and "mlops" in dag.tags, dag.dag_id
        assert dag.catchup is False, dag.dag_id
        assert dag.doc_md, dag.dag_id
        for task in dag.tasks:
            assert task.owner == "mlops", (dag.dag_id, task.task_id)
            callbacks = task.on_failure_callback
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            assert callbacks and set(callbacks) <= {failure_callback, landing_timeout_callback}, task.task_id
        if dag.dag_id != "rollback":  # a retried rollback would flip back: a human re-runs it instead
            assert any(task.retries >= 1 for task in dag.tasks), dag.dag_id


def test_ingest_daily_shape(dagbag) -> None:
    dag = dagbag.dags["ingest_daily"]
    assert [t.task_id for t in dag.topological_sort()] == ["wait_for_labels", "land_feedback", "ingest"]
    ingest = dag.get_task("ingest")
    assert [a.name for a in ingest.outlets] == ["curated_images"]
    assert ingest.retries >= 1 and ingest.retry_exponential_backoff
    assert ingest.max_active_tis_per_dag == 1  # one catalog writer at a time
    sensor = dag.get_task("wait_for_labels")
    assert sensor.mode == "reschedule" and sensor.timeout > 0
    assert "date" in dag.params


def test_ingest_daily_fans_out_over_shards_when_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("MLOPS__INGEST__SHARDS", "3")
    dag = DagBag(dag_folder=str(REPO / "dags" / "ingest_daily.py")).dags["ingest_daily"]
    order = [t.task_id for t in dag.topological_sort()]
    assert order == ["wait_for_labels", "land_feedback", "plan", "inspect_shard", "ingest"]
    assert type(dag.get_task("inspect_shard")).__name__.endswith("MappedOperator")  # one task per shard
    assert dag.get_task("inspect_shard").retries >= 1  # a shard whose worker died runs again
    assert dag.get_task("ingest").upstream_task_ids == {"land_feedback", "inspect_shard"}
    assert dag.params["shards"] == 3  # the form can split a day differently


def test_retrain_shape(dagbag) -> None:
    dag = dagbag.dags["retrain"]
    order = [t.task_id for t in dag.topological_sort()]
    assert order == [
        "train",
        "registered",
        "build_and_check",
        "deploy_canary",
        "route",
        "approve",
        "promote",
        "deploy_champion",
        "withdraw_unapproved",
    ]
    # nothing reaches the live endpoint before the serving check, nor all traffic before approval
    assert "build_and_check" in dag.get_task("deploy_canary").upstream_task_ids
    assert dag.get_task("deploy_champion").upstream_task_ids == {"promote", "train"}
    assert dag.get_task("withdraw_unapproved").trigger_rule == "all_done"
    assert "retrain_requested" in str(dag.timetable)  # the drift Asset triggers it, besides the cron
    assert {"epochs", "learning_rate", "batch_size", "force", "note"} <= set(dag.params)
    assert type(dag.get_task("approve")).__name__ == "ApprovalOperator"


def test_tune_maps_workers_over_one_study_then_finishes_once(dagbag) -> None:
    dag = dagbag.dags["tune"]
    assert type(dag.timetable).__name__ == "NullTimetable"  # manual trigger only
    assert {"trials", "parallel", "timeout", "dataset_version", "note"} <= set(dag.params)
    assert [t.task_id for t in dag.topological_sort()] == ["prepare", "worker_slots", "search", "finish"]
    search = dag.get_task("search")
    assert type(search).__name__.endswith("MappedOperator")  # one task instance per worker slot
    assert dag.get_task("finish").upstream_task_ids == {"prepare", "search"}
    assert "tuned parameters" in dagbag.dags["retrain"].get_task("approve").body


def test_rollback_is_manual_with_a_version_and_a_reason_in_its_form(dagbag) -> None:
    dag = dagbag.dags["rollback"]
    assert type(dag.timetable).__name__ == "NullTimetable"  # manual trigger only
    assert {"version", "reason"} <= set(dag.params)
    assert dag.params.get_param("reason").schema["minLength"] >= 1
    assert [t.task_id for t in dag.tasks] == ["roll_back"]


def test_drift_monitor_shape(dagbag) -> None:
    dag = dagbag.dags["drift_monitor"]
    order = [t.task_id for t in dag.topological_sort()]
    assert set(order) == {"measure", "route", "request_retrain", "every_day_measured"}
    assert order.index("measure") < order.index("route") < order.index("request_retrain")
    assert dag.get_task("every_day_measured").upstream_task_ids == {"measure"}  # beside route, not after
    assert "curated_images" in str(dag.timetable)  # runs after every ingest
    assert [a.name for a in dag.get_task("request_retrain").outlets] == ["retrain_requested"]
    assert "date" in dag.params


@pytest.mark.parametrize("path", sorted((REPO / "dags").glob("*.py")), ids=lambda p: p.name)
def test_parse_is_fast_and_imports_nothing_heavy(path) -> None:
    heavy = ["torch", "great_expectations", "evidently", "mlflow", "bentoml", "pandas", "lightning"]
    code = (
        "import sys, time, runpy, airflow.sdk; t = time.perf_counter(); "
        f"runpy.run_path({str(path)!r}); "
        "print(time.perf_counter() - t); "
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds, loaded = [line for line in run.stdout.splitlines() if line.strip()][-2:]
    assert loaded == "[]", f"{path.name} imports heavy modules at parse time: {loaded}"
    assert float(seconds) < 2.0, f"{path.name} took {seconds} s to parse (airflow.sdk already imported)"
    assert time.perf_counter() - started < 60
