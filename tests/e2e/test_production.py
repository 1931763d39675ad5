"""The production profile, run for real: Airflow on PostgreSQL with the CeleryExecutor over Redis and
two Celery workers, an MLflow server (PostgreSQL store, S3 artifacts), storage on S3 (a moto server
over HTTP) and two service replicas following the deployment state in S3.

The profile is started as ``make up PROFILE=production`` starts it (``python -m ml.ops.production up``,
in a process of its own) with this module's databases, ports and bucket. The first champion is trained
and released in-process against the profile's MLflow server and S3; then the loop runs through
Airflow alone, driven by Airflow's own Python client (``apache-airflow-client``): a drifted day is
ingested (sharded over the workers), ``drift_monitor`` requests a retrain, ``retrain`` trains, checks
and deploys the challenger as the canary to both replicas, a human approves it through the REST API,
it goes to all traffic, and the ``rollback`` DAG brings the first model back; a steady stream of
requests to both replicas fails none.

PostgreSQL and Redis must be running (this machine kind starts them; see the README). Without them
the module is skipped, unless ``MLOPS_REQUIRE_SERVICES=1`` (CI), where that is a failure.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ml.http import free_port
from ml.ops.stack import Api, settle_unpause_runs
from tests.conftest import QUICK_VALIDATION, REPO, setting_overrides

pytestmark = [pytest.mark.slow, pytest.mark.integration]
REQUIRED = os.environ.get("MLOPS_REQUIRE_SERVICES") == "1"
POSTGRES = "postgresql+psycopg2://postgres@127.0.0.1:5432"
REDIS_DB = 11  # the test's own broker database, emptied before and after
START = dt.date(2026, 10, 1)
DRIFT_DAY = START + dt.timedelta(days=3)


@dataclass
class Profile:
    env: dict[str, str]
    settings: Any
    storage: Any
    root: Path
    databases: list[str]
    log: list[str] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.production.api_port}"

    @property
    def home(self) -> Path:
        return Path(self.settings.production.airflow_home)

    def run(self, command: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """``python -m ml.ops.production COMMAND``: what ``make up/down PROFILE=production`` runs."""
        return subprocess.run(
            [sys.executable, "-m", "ml.ops.production", command],
            cwd=REPO,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def backing_services(settings: Any) -> str | None:
    from ml.ops.production import backing_services_problem

    return backing_services_problem(settings)


def drop_databases(names: list[str]) -> None:
    import psycopg2
    from psycopg2 import sql

    connection = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    connection.autocommit = True
    with connection.cursor() as cursor:
        for name in names:
            cursor.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    connection.close()


def flush_broker() -> None:
    import redis

    redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Profile]:
    from ml.config import load_settings
    from ml.storage import storage_from_settings

    root = tmp_path_factory.mktemp("production")
    suffix = uuid.uuid4().hex[:8]
    bucket = f"e2e-{suffix}"
    databases = [f"e2e_{part}_{suffix}" for part in ("airflow", "mlflow", "optuna")]
    replicas = [free_port(), free_port()]
    env = {
        "MLOPS_CONFIG": str(REPO / "profiles" / "production.yaml"),
        **setting_overrides(
            storage__root=f"s3://{bucket}/root",
            storage__endpoint_url=f"http://127.0.0.1:{free_port()}",
            mlflow__tracking_uri=f"http://127.0.0.1:{free_port()}",
            tuning__storage_url=f"{POSTGRES}/{databases[2]}",
            production__airflow_home=str(root / "airflow"),
            production__database_url=f"{POSTGRES}/{databases[0]}",
            production__broker_url=f"redis://127.0.0.1:6379/{REDIS_DB}",
            production__api_port=free_port(),
            production__mlflow_backend_store=f"{POSTGRES}/{databases[1]}",
            production__mlflow_artifacts=f"s3://{bucket}/mlflow",
            production__buckets=f"[{bucket}]",
            production__replica_ports=f"[{replicas[0]}, {replicas[1]}]",
            serving__state_dir=str(root / "serving"),
            serving__state_poll_seconds=0.5,
            serving__heartbeat_seconds=1,
            serving__heartbeat_max_age_seconds=15,
            serving__log_flush_seconds=0.5,
            training__epochs=12,
            training__early_stopping__patience=4,
            **QUICK_VALIDATION,
        ),
    }
    settings = load_settings(environ=env)
    problem = backing_services(settings)
    if problem:
        if REQUIRED:
            pytest.fail(f"{problem} (MLOPS_REQUIRE_SERVICES=1)")
        pytest.skip(f"{problem}: start PostgreSQL and Redis to run the production profile")
    flush_broker()
    found = Profile(env, settings, None, root, databases)
    try:
        started = found.run("up")
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        found.log.append(started.stdout)
        # the unpause's runs finish first: their retrain must not train on the days landed next
        settle_unpause_runs(Api.as_admin(found.api_url, found.home))
        with pytest.MonkeyPatch.context() as patch:  # this process talks to the profile's S3 and MLflow
            for key, value in env.items():
                patch.setenv(key, value)
            patch.setenv("MLFLOW_S3_ENDPOINT_URL", settings.storage.endpoint_url)
            found.storage = storage_from_settings(settings)
            yield found
    finally:
        stopped = found.run("down")
        found.log.append(stopped.stdout)
        print(stopped.stdout)  # what stopping each component took
        flush_broker()
        drop_databases(databases)


def client(profile: Profile) -> Any:
    """Airflow's own Python client, logged in as the simple auth manager's admin."""
    import airflow_client.client as airflow_client

    token = Api.as_admin(profile.api_url, profile.home).token
    configuration = airflow_client.Configuration(host=profile.api_url, access_token=token)
    return airflow_client.ApiClient(configuration)


def wait_state(runs: Any, dag_id: str, run_id: str, seconds: float = 600) -> str:
    deadline, state = time.monotonic() + seconds, ""
    while time.monotonic() < deadline:
        state = str(runs.get_dag_run(dag_id, run_id).state.value)
        if state in ("success", "failed"):
            return state
        time.sleep(1)
    return state


def new_run(runs: Any, dag_id: str, known: set[str], seconds: float = 300) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = [
            r.dag_run_id for r in runs.get_dag_runs(dag_id, limit=50).dag_runs if r.dag_run_id not in known
        ]
        if found:
            return found[0]
        time.sleep(1)
    raise AssertionError(f"no new {dag_id} run in {seconds:.0f} s")


def replica_states(profile: Profile) -> dict[str, tuple[str | None, str | None]]:
    """What every live replica worker reports in its heartbeat: (stable, canary)."""
    from ml.serving.replica import live_heartbeats

    beats = live_heartbeats(profile.storage, profile.settings.serving.heartbeat_max_age_seconds)
    return {f"{beat.replica}-w{beat.worker}": (beat.stable, beat.canary) for beat in beats}


def wait_replicas(profile: Profile, stable: str, canary: str | None, seconds: float = 120) -> dict:
    deadline, states = time.monotonic() + seconds, {}
    while time.monotonic() < deadline:
        states = replica_states(profile)
        replicas = {name.rsplit("-w", 1)[0] for name in states}
        if len(replicas) == 2 and all(state == (stable, canary) for state in states.values()):
            return states
        time.sleep(1)
    raise AssertionError(f"replicas did not all reach stable={stable} canary={canary}: {states}")


class Traffic(threading.Thread):
    """A steady stream of predictions spread over both replicas; counts what failed."""

    def __init__(self, urls: list[str], images: list[bytes], key: str) -> None:
        super().__init__(daemon=True)
        self.urls, self.images, self.key = urls, images, key
        self.sent = self.failed = 0
        self.versions: dict[str, set[str]] = {url: set() for url in urls}
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        from ml.http import http, multipart

        while not self.halt.is_set():
            url = self.urls[self.sent % len(self.urls)]
            body, content_type = multipart("image", [("x.png", self.images[self.sent % len(self.images)])])
            headers = {"Content-Type": content_type, "Authorization": f"Bearer {self.key}"}
            self.sent += 1
            try:
                status, answer = http("POST", f"{url}/predict", body=body, headers=headers, timeout=30)
                if status != 200:
                    self.failed += 1
                    self.errors.append(f"{status}: {answer[:200]!r}")
                else:
                    self.versions[url].add(json.loads(answer)["model_version"])
            except OSError as exc:
                self.failed += 1
                self.errors.append(repr(exc))
            time.sleep(0.2)


@pytest.mark.timeout(1800)
def test_the_loop_runs_on_the_production_profile(profile: Profile) -> None:
    from airflow_client.client.api.dag_run_api import DagRunApi
    from airflow_client.client.api.task_instance_api import TaskInstanceApi
    from airflow_client.client.models.trigger_dag_run_post_body import TriggerDAGRunPostBody
    from airflow_client.client.models.update_hitl_detail_payload import UpdateHITLDetailPayload

    from ml import registry
    from ml.data.ingest import ingest_day
    from ml.demo.drawing import Drift
    from ml.demo.landing import labelled_images, land_day, land_days
    from ml.release.deploy import release
    from ml.serving.auth import admin_key
    from ml.training.pipeline import retrain

    settings, storage = profile.settings, profile.storage
    report: dict[str, Any] = {"started": profile.log[0]}

    # the first champion, in-process against the profile's MLflow server and S3
    land_days(storage, START, 3, settings.classes, count=100, seed=11)
    for offset in range(3):
        ingest_day(settings, storage, START + dt.timedelta(days=offset))
    first = retrain(settings, storage)
    assert first.model_version == "1", first.gate
    registry.promote(settings, storage, "1", "e2e")
    release(settings, storage, "1", stage="full", by="e2e", check=False)  # setup: v2 is checked by retrain
    started = profile.run("up")  # idempotent: now that a champion exists, the replicas start too
    assert started.returncode == 0 and started.stdout.count("replica:") == 2, started.stdout + started.stderr
    wait_replicas(profile, "1", None)
    urls = [f"http://127.0.0.1:{port}" for port in settings.production.replica_ports]
    key = admin_key(environ={}, keys_file=str(profile.home / "api_keys"))  # the replicas' keys file
    traffic = Traffic(urls, [data for data, _ in labelled_images(settings.classes, 8, seed=5)], key)

    with client(profile) as api:
        runs, instances = DagRunApi(api), TaskInstanceApi(api)
        known = {
            dag: {r.dag_run_id for r in runs.get_dag_runs(dag).dag_runs}
            for dag in ("drift_monitor", "retrain")
        }
        land_day(storage, DRIFT_DAY, settings.classes, count=120, seed=7, drift=Drift("brightness", 0.7))
        ingest = runs.trigger_dag_run(
            "ingest_daily", TriggerDAGRunPostBody(logical_date=None, conf={"date": str(DRIFT_DAY)})
        ).dag_run_id
        assert wait_state(runs, "ingest_daily", ingest) == "success"
        monitor = new_run(runs, "drift_monitor", known["drift_monitor"])
        assert wait_state(runs, "drift_monitor", monitor) == "success"
        retrain_run = new_run(runs, "retrain", known["retrain"])
        traffic.start()
        detail = None
        deadline = time.monotonic() + 600
        while detail is None and time.monotonic() < deadline:
            try:
                detail = instances.get_hitl_detail("retrain", retrain_run, "approve", -1)
            except Exception:  # noqa: BLE001 - 404 until the approval task asks
                assert runs.get_dag_run("retrain", retrain_run).state.value != "failed"
                time.sleep(2)
        assert detail is not None, "the retrain never asked for approval"
        report["canary"] = wait_replicas(profile, "1", "2")  # the canary reached every replica first
        instances.update_hitl_detail(
            "retrain", retrain_run, "approve", -1, UpdateHITLDetailPayload(chosen_options=["Approve"])
        )
        assert wait_state(runs, "retrain", retrain_run) == "success"
        report["full"] = wait_replicas(profile, "2", None)
        rollback = runs.trigger_dag_run(
            "rollback",
            TriggerDAGRunPostBody(logical_date=None, conf={"reason": "e2e: roll back the drift model"}),
        ).dag_run_id
        assert wait_state(runs, "rollback", rollback) == "success"
        report["rollback"] = wait_replicas(profile, "1", None)
        time.sleep(3)
        traffic.halt.set()
        traffic.join(timeout=60)

        hosts: dict[str, str] = {}
        report["tasks"], report["runs"] = {}, {}
        for dag_id, run_id in [
            ("ingest_daily", ingest),
            ("drift_monitor", monitor),
            ("retrain", retrain_run),
            ("rollback", rollback),
        ]:
            run = runs.get_dag_run(dag_id, run_id)
            report["runs"][dag_id] = round((run.end_date - run.start_date).total_seconds(), 1)
            for ti in instances.get_task_instances(dag_id, run_id).task_instances:
                if ti.hostname and ti.state and ti.state.value == "success":
                    name = f"{dag_id}.{ti.task_id}" + (f"[{ti.map_index}]" if ti.map_index >= 0 else "")
                    hosts[name] = ti.hostname
                    report["tasks"][name] = f"{ti.hostname} {ti.duration or 0:.1f} s"

    report["traffic"] = {
        "sent": traffic.sent,
        "failed": traffic.failed,
        "versions": {u: sorted(v) for u, v in traffic.versions.items()},
    }
    print(json.dumps(report, indent=2, default=str))
    assert set(hosts.values()) == {w.name for w in settings.production.workers}, (
        hosts
    )  # both workers ran tasks
    assert traffic.failed == 0 and traffic.sent > 20, traffic.errors[:5]
    assert all(versions >= {"1", "2"} for versions in traffic.versions.values())  # both replicas switched
    print(json.dumps(assert_tracked_in_postgres_and_s3(profile), indent=2))
    # the retrain says why it ran: the drift, its report and the Airflow run, in its MLflow run
    mlflow_client = registry.client(settings)
    experiment = mlflow_client.get_experiment_by_name(settings.mlflow.experiment_name)
    (drift_run,) = mlflow_client.search_runs([experiment.experiment_id], "tags.trigger = 'drift'")
    tags = drift_run.data.tags
    assert f"drift on {DRIFT_DAY}" in tags["reason"], tags
    assert tags["report"].endswith(f"reports/drift/{DRIFT_DAY}/report.html"), tags
    assert drift_run.data.params["airflow_run_id"] == retrain_run


def assert_tracked_in_postgres_and_s3(profile: Profile) -> dict[str, Any]:
    """MLflow's runs and model versions are rows in the profile's PostgreSQL; its artifacts (the ONNX
    exports among them) are objects in the bucket."""
    import boto3
    import psycopg2

    connection = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname=profile.databases[1])
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM runs WHERE status = 'FINISHED'")
        (finished,) = cursor.fetchone()
        cursor.execute("SELECT version FROM model_versions ORDER BY version")
        versions = [row[0] for row in cursor.fetchall()]
    connection.close()
    assert finished >= 3, finished  # v1 in-process, the drift check and v2 on the workers
    assert versions == [1, 2], versions
    bucket = profile.settings.production.buckets[0]
    s3 = boto3.client("s3", endpoint_url=profile.settings.storage.endpoint_url, region_name="us-east-1")
    keys = [
        item["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="mlflow/")
        for item in page.get("Contents", [])
    ]
    exports = sorted(f"s3://{bucket}/{key}" for key in keys if key.endswith("onnx/model.onnx"))
    assert len(exports) >= 2, exports  # v1's and v2's exports
    return {
        "mlflow_backend_store": profile.settings.production.mlflow_backend_store,
        "mlflow_runs_finished": finished,
        "model_versions": versions,
        "s3_mlflow_objects": len(keys),
        "onnx_exports": exports,
    }
