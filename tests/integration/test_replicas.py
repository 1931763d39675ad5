"""Every replica follows the deploy: two `mlops serve` replicas on two ports, one S3 root (moto).

The deployment state (``serving/state.json``) and the model bundles live in S3; each replica
polls the state, hot-swaps, and publishes a heartbeat per worker. Deploy and rollback wait until
every live replica reports the new state, and fail naming the ones that did not.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest

from ml.config import load_settings
from ml.data.ingest import ingest_day
from ml.demo.landing import labelled_images, land_days
from ml.http import free_port, http, multipart, wait_ready
from tests.conftest import world_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]
START = dt.date(2026, 11, 1)
KEY = "replica-test-key-with-every-role-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@dataclass
class Replica:
    port: int
    process: subprocess.Popen[bytes]
    url: str = ""

    def __post_init__(self) -> None:
        self.url = f"http://127.0.0.1:{self.port}"

    def version(self) -> dict[str, Any]:
        return json.loads(http("GET", f"{self.url}/version", headers=AUTH, timeout=10)[1])


@dataclass
class Stream:
    """Clients posting valid images to every replica in turn until stopped; every answer recorded."""

    replicas: list[Replica]
    images: list[bytes]
    answers: list[tuple[float, str, int, str]] = field(
        default_factory=list
    )  # (time, replica, status, version)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _client(self, index: int) -> None:
        turns = itertools.cycle(self.replicas)
        for n in itertools.count():
            if self._stop.is_set():
                return
            replica = next(turns)
            body, kind = multipart("image", [("x.jpg", self.images[(index + n) % len(self.images)])])
            headers = {**AUTH, "Content-Type": kind, "X-Client-Id": f"client-{index}-{n % 7}"}
            try:
                status, answer = http(
                    "POST", f"{replica.url}/predict", body=body, headers=headers, timeout=30
                )
                version = (
                    json.loads(answer).get("model_version", "") if status == 200 else answer[:120].decode()
                )
            except OSError as exc:
                status, version = 0, f"{type(exc).__name__}: {exc}"
            self.answers.append((time.monotonic(), replica.url, status, version))

    def __enter__(self) -> Stream:
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(3)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def failed(self) -> list[tuple[float, str, int, str]]:
        return [answer for answer in self.answers if answer[2] != 200]

    def versions_between(self, start: float, end: float = float("inf")) -> set[str]:
        return {version for at, _, status, version in self.answers if start < at < end and status == 200}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """v1 champion and v2 challenger trained on days ingested from S3 (a moto server of our own)."""
    from moto.server import ThreadedMotoServer

    from ml import registry
    from ml.storage import storage_from_settings
    from ml.training.pipeline import retrain

    root = tmp_path_factory.mktemp("replicas")
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="replicas")
    env = world_env(
        root,
        training__epochs=15,
        training__early_stopping__patience=4,
        storage__endpoint_url=endpoint,
        serving__state_poll_seconds=0.5,
        serving__heartbeat_seconds=1,
        serving__heartbeat_max_age_seconds=10,
        serving__log_flush_seconds=0.5,
    )
    env |= {"MLOPS__STORAGE__ROOT": "s3://replicas/root", "MLOPS_API_KEYS": KEY}
    started: list[Replica] = []
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        settings = load_settings()
        storage = storage_from_settings(settings)
        land_days(storage, START, 3, settings.classes, count=120, seed=11)
        for offset in range(3):
            ingest_day(settings, storage, START + dt.timedelta(days=offset))
        first = retrain(settings, storage)
        registry.promote(settings, storage, first.model_version, "test")
        second = retrain(settings, storage, force=True, overrides={"learning_rate": 0.002})
        assert (first.model_version, second.model_version) == ("1", "2"), second

        def start_replica() -> Replica:
            replica = Replica(free_port(), None)  # type: ignore[arg-type]
            log = (root / f"replica-{replica.port}.log").open("ab")
            replica.process = subprocess.Popen(
                [str(Path(sys.executable).parent / "mlops"), "serve", "--port", str(replica.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            wait_ready(replica.url, replica.process, 180)
            started.append(replica)
            return replica

        try:
            yield {"settings": settings, "storage": storage, "start": start_replica, "root": root}
        finally:
            for replica in started:
                if replica.process.poll() is None:
                    os.killpg(replica.process.pid, signal.SIGTERM)
                    replica.process.wait(30)
            moto.stop()


def test_canary_full_and_rollback_reach_both_replicas_with_no_failed_request(world) -> None:
    from ml.release.audit import audit_log
    from ml.release.deploy import deploy, rollback, status

    settings, storage = world["settings"], world["storage"]
    a, b = world["start"](), world["start"]()  # the first `mlops serve` deploys the champion (v1)
    images = [data for data, _ in labelled_images(settings.classes, 12, seed=5)]
    steps = []
    with Stream([a, b], images) as stream:
        time.sleep(3)
        for name, step in (
            ("canary v2", lambda: deploy(settings, storage, "2", stage="canary", by="tester")),
            ("full v2", lambda: deploy(settings, storage, "2", stage="full", by="tester")),
            ("rollback", lambda: rollback(settings, storage, by="tester", reason="replica test")),
        ):
            began = time.monotonic()
            result = step()
            assert result.live is True, name  # deploy returned only once both replicas reported it
            seen = status(settings, storage)
            workers = [w for replica in seen["replicas"] for w in replica["workers"] if w["live"]]
            assert {r["replica"] for r in seen["replicas"]} >= {
                f"{os.uname().nodename}-{p}" for p in (a.port, b.port)
            }
            assert workers and all(w["follows_state"] for w in workers), seen
            assert all(w["revision"] == result.state.revision for w in workers)
            steps.append((name, began, time.monotonic(), result.state))
            time.sleep(3)
        time.sleep(2)
    assert stream.failed() == [] and len(stream.answers) > 60, stream.failed()[:5]
    (_, _, canary_live, _), (_, _, full_live, _), (_, rollback_began, rollback_live, _) = steps
    assert stream.versions_between(canary_live, steps[1][1]) == {"1", "2"}  # the canary share, sticky
    assert stream.versions_between(full_live, rollback_began) == {"2"}  # both replicas, all traffic
    assert stream.versions_between(rollback_live) == {"1"}
    for replica in (a, b):
        assert replica.version()["model_version"] == "1"
    trail = [e for e in audit_log(storage) if e.get("by") == "tester"]
    assert [(e["action"], e["to"]) for e in trail] == [
        ("deploy-canary", "2"),
        ("deploy-full", "2"),
        ("rollback", "1"),
    ]


def test_a_replica_started_after_a_deploy_serves_what_is_deployed(world) -> None:
    from ml.serving.state import read_state

    storage = world["storage"]
    state = read_state(storage)
    late = world["start"]()
    info = late.version()
    assert (info["model_version"], info["revision"]) == (state.stable, state.revision)


def test_a_replica_that_is_down_makes_the_deploy_fail_naming_it(world) -> None:
    from ml.release.deploy import deploy
    from ml.release.errors import DeployError
    from ml.release.service import _children
    from ml.serving.replica import live_heartbeats

    settings, storage = world["settings"], world["storage"]
    doomed = world["start"]()
    name = f"{os.uname().nodename}-{doomed.port}"
    workers = settings.serving.workers

    def beating() -> list:
        return [b for b in live_heartbeats(storage, 10) if b.replica == name]

    deadline = time.monotonic() + 60
    while len(beating()) < workers and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(beating()) == workers, "the replica never published its heartbeats"
    processes = [doomed.process.pid, *_children(doomed.process.pid)]
    for pid in processes:  # the host dies: arbiter and workers at once, no clean stop
        os.kill(pid, signal.SIGKILL)
    doomed.process.wait(30)
    fast = settings.model_copy(
        update={"serving": settings.serving.model_copy(update={"switch_timeout_seconds": 4})}
    )
    with pytest.raises(DeployError) as caught:
        deploy(fast, storage, "2", stage="canary", by="tester")
    assert f"{os.uname().nodename}-{doomed.port}" in str(caught.value)
    assert "did not switch" in str(caught.value)
    time.sleep(settings.serving.heartbeat_max_age_seconds + 2)  # its heartbeat is stale now: not waited for
    assert deploy(settings, storage, "1", stage="full", by="tester").live is True
