"""The production profile's overlay and what its components are started with (no servers here; the
profile runs for real in tests/e2e/test_production.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml.config import load_settings
from tests.conftest import REPO, setting_overrides

PROFILE = str(REPO / "profiles" / "production.yaml")


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    return load_settings(
        environ={"MLOPS_CONFIG": PROFILE, **setting_overrides(production__airflow_home=str(tmp_path))}
    )


def test_the_overlay_names_every_distributed_component(settings) -> None:
    config = settings.production
    assert settings.storage.root.startswith("s3://") and settings.mlflow.tracking_uri.startswith("http://")
    assert config.database_url.startswith("postgresql") and config.mlflow_backend_store.startswith(
        "postgresql"
    )
    assert config.broker_url.startswith("redis://") and config.mlflow_artifacts.startswith("s3://")
    assert [w.name for w in config.workers] == ["worker-1", "worker-2"]
    assert all(set(w.queues) >= {"default", w.name} for w in config.workers)  # shared queue + its own
    assert len(config.replica_ports) == 2 and settings.ingest.shards == 2
    assert settings.mlflow.auto_approve is False


def test_components_start_with_celery_on_postgres_and_their_own_hostnames(settings) -> None:
    from ml.ops import production

    env = production.profile_env(settings)
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == settings.production.database_url
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"] == "db+" + settings.production.database_url
    # each worker's main process runs its task: the supervisor's signals, ingestion's decoder processes
    assert env["AIRFLOW__CELERY__POOL"] == "solo"
    assert env["AIRFLOW__CORE__HOSTNAME_CALLABLE"] == "mlops_airflow.hosts.worker_hostname"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == settings.storage.endpoint_url
    assert production.profile_env(settings)["AIRFLOW__CORE__FERNET_KEY"] == env["AIRFLOW__CORE__FERNET_KEY"]
    workers = [c for c in production.airflow_components(settings) if c.name.startswith("worker-")]
    assert [c.env for c in workers] == [{"MLOPS_WORKER_NAME": "worker-1"}, {"MLOPS_WORKER_NAME": "worker-2"}]
    assert "--queues" in workers[0].argv and "default,worker-1" in workers[0].argv
    names = production.component_names(settings)
    assert names[:2] == ["s3", "mlflow-server"] and names[-2:] == ["replica-3101", "replica-3102"]
    tiers = production.stop_order(settings)  # every component stops, serving and tasks before what they use
    assert sorted(name for tier in tiers for name in tier) == sorted(names)
    assert tiers[0] == ["replica-3101", "replica-3102", "worker-worker-1", "worker-worker-2"]
    assert tiers[-1] == ["mlflow-server", "s3"]


def test_a_task_records_the_worker_that_ran_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import sys

    sys.path.insert(0, str(REPO / "plugins"))
    from mlops_airflow.hosts import worker_hostname

    monkeypatch.setenv("MLOPS_WORKER_NAME", "worker-2")
    assert worker_hostname() == "worker-2"
    monkeypatch.delenv("MLOPS_WORKER_NAME")
    assert worker_hostname() == socket.getfqdn()


def test_a_missing_backing_service_is_named(settings) -> None:
    from ml.http import free_port
    from ml.ops import production

    port = free_port()
    broken = settings.model_copy(
        update={
            "production": settings.production.model_copy(
                update={"database_url": f"postgresql+psycopg2://postgres@127.0.0.1:{port}/x"}
            )
        }
    )
    assert production.backing_services_problem(broken) == f"PostgreSQL does not answer at 127.0.0.1:{port}"


def test_components_start_together_and_one_that_exits_ends_the_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import time

    from ml.ops import stack
    from ml.ops.production import Component, start

    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    marker = tmp_path / "second-started"
    ready = Component("ready", ["sleep", "60"], lambda: marker.exists(), shown="ready: up")
    # never ready: it leaves the marker, then exits
    second = Component("second", ["sh", "-c", f"touch {marker}; sleep 3; exit 1"], lambda: False)
    began = time.monotonic()
    try:
        assert start([ready, second], {}, wait_seconds=60) is False
        took = time.monotonic() - began
        assert took < 15, took  # not the 60 s wait: the exit ended it
        assert marker.exists()  # both were started before either was waited for
        out = capsys.readouterr().out
        assert "ready: up" in out and "second did not become ready" in out
        assert start([ready], {}, wait_seconds=1) is True  # already running: ready, not started again
    finally:
        stack.stop_group("ready", 5)
