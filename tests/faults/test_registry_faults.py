"""The registry, deploys and the live check against a real ``mlflow server`` that fails.

One world: an ``mlflow server`` process (SQLite store, served artifacts) behind a proxy that can
answer 500 for chosen paths, three ingested demo days, a champion v1. Each test breaks something
for real (the proxy's 500s, the server stopped mid-retrain or during a check, a deploy racing a
rollback) and asserts what was kept: registered versions, the deployment state, the alerts.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ml.config import load_settings
from ml.data.ingest import ingest_day
from ml.demo.landing import land_days
from ml.serving.state import DeploymentState
from ml.storage import LocalStorage
from tests.conftest import world_env
from tests.faults.conftest import MLFLOW_FAST_FAILURE, FaultyProxy, MlflowServer, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.fault]
START = dt.date(2026, 9, 1)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from ml import registry
    from ml.training.pipeline import retrain

    root = tmp_path_factory.mktemp("registry-faults")
    server = MlflowServer(root / "mlflow").start()
    proxy = FaultyProxy(server.url)
    env = world_env(root, training__epochs=15, training__early_stopping__patience=4)
    env |= {"MLOPS__MLFLOW__TRACKING_URI": proxy.url, **MLFLOW_FAST_FAILURE}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        settings = load_settings()
        storage = LocalStorage(root / "store")
        land_days(storage, START, 3, settings.classes, count=120, seed=11)
        for offset in range(3):
            ingest_day(settings, storage, START + dt.timedelta(days=offset))
        first = retrain(settings, storage)
        assert first.model_version == "1", first
        registry.promote(settings, storage, "1", "test")
        try:
            yield {"settings": settings, "storage": storage, "server": server, "proxy": proxy, "root": root}
        finally:
            proxy.close()
            server.stop()


def versions(settings) -> list[str]:
    from ml import registry

    found = registry.client(settings).search_model_versions(f"name='{settings.mlflow.registered_model}'")
    return sorted(str(v.version) for v in found)


def test_a_registry_that_cannot_answer_is_an_error_not_no_champion(world) -> None:
    """The alias lookup answers 500: the gate, the unchanged-dataset skip and drift all fail loudly."""
    from ml.monitoring.drift import measure_day
    from ml.registry import RegistryError
    from ml.training.pipeline import retrain

    settings, storage, proxy = world["settings"], world["storage"], world["proxy"]
    proxy.failing = {"registered-models/alias"}
    try:
        with pytest.raises(RegistryError, match="could not say which version is 'champion'"):
            retrain(settings, storage, force=True)  # the gate must not run without its champion
        with pytest.raises(RegistryError):
            retrain(settings, storage)  # nor may the unchanged-dataset skip guess
        with pytest.raises(RegistryError):
            measure_day(settings, storage, START)
        assert proxy.failed, "the proxy never saw the alias request"
    finally:
        proxy.failing = set()
    assert versions(settings) == ["1"]  # no unchecked challenger was registered


def test_mlflow_stopped_during_a_retrain_registers_nothing_and_a_rerun_is_gated(world) -> None:
    from ml import registry
    from ml.training.pipeline import retrain

    settings, storage, server = world["settings"], world["storage"], world["server"]
    client = registry.client(settings)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            long = {"epochs": 400, "patience": 400}  # long enough to stop the server while it trains
            outcome["result"] = retrain(settings, storage, force=True, overrides=long)
        except Exception as exc:  # noqa: BLE001 - the test inspects what the retrain raised
            outcome["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    experiment = registry.ensure_experiment(settings)

    def training() -> bool:
        runs = client.search_runs([experiment], filter_string="attributes.status = 'RUNNING'")
        return any(run.data.metrics.get("feature_cache_misses") is not None for run in runs)

    assert wait_until(training, timeout=300, every=0.5), "the retrain never started its MLflow run"
    server.stop()
    worker.join(300)
    assert not worker.is_alive() and "error" in outcome, outcome
    server.start()
    assert versions(settings) == ["1"]  # the run died mid-way: nothing registered
    again = retrain(settings, storage, force=True)
    assert again.model_version == "2" and again.champion_version == "1"  # gated against v1
    assert again.gate["passed"]


def test_a_deploy_racing_a_rollback_loses_no_update(world) -> None:
    from ml.release.audit import audit_log
    from ml.release.deploy import deploy, rollback
    from ml.release.errors import DeployError
    from ml.serving.state import read_state

    settings, storage = world["settings"], world["storage"]
    deploy(settings, storage, "1", stage="full", by="test")
    start = read_state(storage)
    done: list[str] = []
    refused: list[str] = []

    def act(name: str, step, barrier: threading.Barrier) -> None:
        barrier.wait()
        try:
            step()
            done.append(name)
        except DeployError as exc:  # "already the live model": a refusal, not a lost update
            refused.append(f"{name}: {exc}")

    for _ in range(4):
        barrier = threading.Barrier(2)
        moves = [
            ("deploy v2", lambda: deploy(settings, storage, "2", stage="full", by="racer")),
            ("rollback to v1", lambda: rollback(settings, storage, to="1", by="racer", reason="race")),
        ]
        threads = [threading.Thread(target=act, args=(name, step, barrier)) for name, step in moves]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    final = read_state(storage)
    assert final.revision == start.revision + len(done), (done, refused)  # every change counted once
    changes = [e for e in audit_log(storage) if e.get("by") == "racer"]
    assert len(changes) == len(done)
    revisions = [e.get("revision", e.get("state", {}).get("revision")) for e in changes]
    assert sorted(revisions) == list(range(start.revision + 1, final.revision + 1))  # none lost or doubled
    assert final.stable == final.history[-1] and all("already the live model" in r for r in refused)


def _traffic(storage: LocalStorage, version: str, at: dt.datetime, n: int, right: int) -> None:
    """``n`` logged predictions of ``version`` (as the service writes them), ``right`` labelled right."""
    from ml.layout import FEEDBACK_PREFIX, PREDICTIONS_PREFIX

    predictions, feedback = [], []
    for i in range(n):
        stamp = (at + dt.timedelta(seconds=i)).isoformat(timespec="milliseconds")
        rid = f"fault{i:04d}"
        predictions.append(
            {
                "request_id": rid,
                "time": stamp,
                "model_version": version,
                "track": "stable",
                "predicted_class": "toys",
                "confidence": 0.9,
                "latency_ms": 20.0,
                "width": 400.0,
                "height": 300.0,
                "file_bytes": 20000.0,
                "brightness": 120.0,
                "contrast": 50.0,
                "blur": 300.0,
                **{f"embedding_pc{k}": 0.0 for k in range(8)},
            }
        )
        label = "toys" if i < right else "books"
        feedback.append({"request_id": rid, "label": label, "time": stamp, "bound": True})
    for prefix, rows in ((PREDICTIONS_PREFIX, predictions), (FEEDBACK_PREFIX, feedback)):
        body = "".join(json.dumps(row) + "\n" for row in rows).encode()
        storage.write_bytes(f"{prefix}/{at.date()}/fault-000001.jsonl", body)


def test_a_check_that_meets_mlflow_down_still_pages_with_what_failed(world, receiver, monkeypatch) -> None:
    """v2 serves badly and MLflow is down: no drift, no rollback possible, but the critical page goes out."""
    from ml.alerts import env_notify
    from ml.release.deploy import deploy
    from ml.release.guard import check_live
    from tests.receivers import connect_alerts

    settings, storage, server = world["settings"], world["storage"], world["server"]
    deploy(settings, storage, "2", stage="full", by="test")  # v1 -> v2: v1 is the way back
    connect_alerts(monkeypatch, receiver.url)
    now = dt.datetime.now(dt.UTC)
    _traffic(storage, "2", now - dt.timedelta(minutes=10), n=120, right=50)
    server.stop()
    try:
        record = check_live(settings, storage, notify=env_notify(settings), now=now)
    finally:
        server.start()
    assert record["rules"]["model_accuracy_drop"]["outcome"] == "firing"
    assert "drift_error" in record["facts"] and record["metrics"]["drift_score"] is None
    assert record["rollback"] is None
    slack = [m.json()["text"] for m in receiver.on("/slack/") if "model_accuracy_drop" in m.json()["text"]]
    assert len(slack) == 1 and "automatic rollback of v2 FAILED" in slack[0]
    pages = [
        e.json() for e in receiver.on("/v2/enqueue") if e.json()["dedup_key"].endswith("model_accuracy_drop")
    ]
    assert len(pages) == 1 and pages[0]["event_action"] == "trigger"


def test_a_deploy_the_live_endpoint_does_not_follow_fails_loudly(world) -> None:
    """The service cannot load the new model: deploy raises naming the endpoint; nothing pretends."""
    import subprocess
    import sys

    import bentoml

    from ml.http import http, wait_ready
    from ml.release.deploy import deploy, rollback, wait_replicas
    from ml.release.errors import DeployError
    from ml.release.service import stop_service
    from ml.serving.state import read_state

    settings, storage = world["settings"], world["storage"]
    deploy(settings, storage, "2", stage="full", by="test")
    url = settings.serving.live_url
    log = world["root"] / "live.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlops"), "serve"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    state = read_state(storage)
    bundle = Path(bentoml.models.get(state.tag("1")).path) / "model.onnx"
    kept = bundle.read_bytes()
    fast = settings.model_copy(
        update={"serving": settings.serving.model_copy(update={"switch_timeout_seconds": 5})}
    )
    try:
        wait_ready(url, process, 120)
        assert wait_replicas(settings, storage, state, timeout=120) == []  # every worker serves v2 first
        bundle.write_bytes(b"not an onnx model")  # the next model cannot be loaded by the service
        with pytest.raises(DeployError, match="did not switch within"):
            deploy(fast, storage, "1", stage="full", by="test")
        assert json.loads(http("GET", f"{url}/version")[1])["model_version"] == "2"  # still serving
        assert read_state(storage).stable == "1"  # the state says what was asked
        bundle.write_bytes(kept)
        # the model loads again: every worker tries the state again on its own (a backoff) and follows
        assert wait_replicas(settings, storage, read_state(storage), timeout=90) == []
        assert json.loads(http("GET", f"{url}/version")[1])["model_version"] == "1"
        back = rollback(fast, storage, to="2", by="test", reason="v1 could not be loaded")
        assert back.live is True  # a state the endpoint can follow: live again
    finally:
        bundle.write_bytes(kept)
        stop_service(process)


class RacedStorage(LocalStorage):
    """The store, with another writer's change landing just before this caller's first conditional write
    of the deployment state (the moment a real race decides): the caller's write then loses and retries."""

    def __init__(self, root: Path, other: DeploymentState) -> None:
        super().__init__(root)
        self.other: DeploymentState | None = other

    def write_if(self, key: str, data: bytes, tag: str | None) -> bool:
        from ml.layout import SERVING_STATE_KEY
        from ml.serving.state import write_state

        if key == SERVING_STATE_KEY and self.other is not None:
            other, self.other = self.other, None
            write_state(LocalStorage(self.root), other)
        return super().write_if(key, data, tag)


def test_a_rollback_keeps_the_shadows_tag_and_a_retried_one_tags_its_own_target(world) -> None:
    from ml import registry
    from ml.release.build import import_model
    from ml.release.deploy import rollback
    from ml.serving.state import read_state, write_state

    settings, storage = world["settings"], world["storage"]
    client, name = registry.client(settings), settings.mlflow.registered_model
    tags = {version: import_model(settings, version, storage) for version in ("1", "2")}
    shadow_tag = "product-classifier:v9-shadowrun"
    write_state(
        storage,
        DeploymentState(
            stable="2", previous="1", history=["1", "2"], shadow="9", models={**tags, "9": shadow_tag}
        ),
    )
    back = rollback(settings, storage, to="1", by="test", reason="shadow kept").state
    assert (back.stable, back.shadow, back.models) == (
        "1",
        "9",
        {"1": tags["1"], "2": tags["2"], "9": shadow_tag},
    )

    # rolling back from v2 picks v1; another writer makes v1 stable first, so the retried change picks v2
    for version in ("1", "2"):
        client.delete_model_version_tag(name, version, "rolled_back")
    write_state(storage, DeploymentState(stable="2", previous="1", history=["1", "2"], models=tags))
    current = read_state(storage)
    other = DeploymentState(
        **{**current.__dict__, "stable": "1", "previous": "2", "history": ["1", "2", "1"]}
    )
    raced = RacedStorage(storage.root, other)
    new = rollback(settings, raced, by="test", reason="raced").state
    assert new.stable == "2" and new.models["2"] == tags["2"] and new.models["1"] == tags["1"]


def test_a_registration_that_fails_half_way_leaves_no_orphan_version(world) -> None:
    from ml import registry
    from ml.training.pipeline import retrain

    settings, storage, proxy = world["settings"], world["storage"], world["proxy"]
    before = versions(settings)
    proxy.failing = {"POST /api/2.0/mlflow/registered-models/alias"}  # the challenger alias cannot be set
    try:
        with pytest.raises(Exception, match="injected fault|500"):
            retrain(settings, storage, force=True)
        assert proxy.failed, "the proxy never saw the alias request"
    finally:
        proxy.failing = set()
    assert versions(settings) == before  # the half-made version was deleted
    again = retrain(settings, storage, force=True)
    (new,) = set(versions(settings)) - set(before)
    assert again.model_version == new == registry.version_for_alias(settings, registry.CHALLENGER)
    tags = registry.client(settings).get_model_version(settings.mlflow.registered_model, new).tags
    assert tags["gate"] == "passed" and tags["run_id"]


def test_a_promotion_the_registry_fails_half_way_leaves_no_record_and_a_retry_names_the_real_previous(
    world,
) -> None:
    from ml import registry

    settings, storage, proxy = world["settings"], world["storage"], world["proxy"]
    before, records = (
        registry.version_for_alias(settings, registry.CHAMPION),
        len(registry.audit_log(storage)),
    )
    target = next(v for v in versions(settings) if v != before)
    for failing in (
        "POST /api/2.0/mlflow/model-versions/set-tag",
        "POST /api/2.0/mlflow/registered-models/alias",
    ):
        proxy.failing = {failing}  # the approval tags, then the alias itself, cannot be written
        try:
            with pytest.raises(Exception, match="injected fault|500"):
                registry.promote(settings, storage, target, approved_by="test")
        finally:
            proxy.failing = set()
        assert registry.version_for_alias(settings, registry.CHAMPION) == before, failing
        assert len(registry.audit_log(storage)) == records  # no record of a promotion that did not happen
    approval = registry.promote(settings, storage, target, approved_by="test")
    assert approval.previous_champion == before != target
    assert registry.audit_log(storage)[-1]["previous_champion"] == before
