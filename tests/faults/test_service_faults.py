"""The live service under real faults: its storage stalls and goes away mid-stream, its buffer
fills, its workers are restarted under a steady stream, one is paused while clients connect. Each
test counts what was kept.

The service is a real `mlops serve` (`bentoml serve`, two workers) of tiny real ONNX models in
the session's BentoML store; storage is a moto S3 server this module starts and stops itself
(its objects live in this process, so they survive a stop and a start on the same port).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ml.config import load_settings
from ml.http import free_port, http, wait_ready
from ml.serving.state import DeploymentState, write_state
from ml.storage import storage_from_settings
from tests.hostile import encode, photo
from tests.unit.test_serving import make_bundle

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.fault]
KEY = "fault-suite-key-with-all-the-roles-01"
AUTH = {"Authorization": f"Bearer {KEY}"}
MLOPS = str(Path(sys.executable).parent / "mlops")


@pytest.fixture(scope="module")
def model_tag(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny real model (32 px ONNX, logits + features) in the BentoML store the services use."""
    import bentoml

    folder = tmp_path_factory.mktemp("fault-models")
    bundle = make_bundle(folder, "1", seed=3)
    tag = "product-classifier:v1-faults"
    with bentoml.models.create(tag) as model:
        for item in bundle.iterdir():
            (Path(model.path) / item.name).write_bytes(item.read_bytes())
    return tag


@dataclass
class Service:
    url: str
    root: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes]

    def log_text(self) -> str:
        return (self.root / "serve.log").read_text(errors="replace")


@pytest.fixture
def start_service(tmp_path: Path, model_tag: str) -> Iterator[Callable[..., Service]]:
    """``start_service(**settings)``: `mlops serve` of the tiny model under ``tmp_path``; stopped after."""
    from ml.release.service import stop_service

    started: list[Service] = []

    def start(**settings: Any) -> Service:
        root = tmp_path / f"service-{len(started)}"
        root.mkdir(parents=True)
        port = free_port()
        env = dict(os.environ) | {
            "MLOPS_API_KEYS": KEY,
            "MLOPS__STORAGE__ROOT": str(root / "store"),
            "MLOPS__SERVING__STATE_DIR": str(root / "serving"),
            "MLOPS__SERVING__PORT": str(port),
            "MLOPS__PREPROCESSING__IMAGE_SIZE": "32",
            "MLOPS__SERVING__LOG_FLUSH_SECONDS": "0.5",
        }
        env |= {f"MLOPS__{name.upper()}": str(value) for name, value in settings.items()}
        # the deployment state lives in the service's own storage root (S3 in the outage tests)
        deployed = DeploymentState(stable="1", models={"1": model_tag})
        write_state(storage_from_settings(load_settings(environ=env)), deployed)
        with (root / "serve.log").open("ab") as out:
            process = subprocess.Popen(
                [MLOPS, "serve"], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        service = Service(f"http://127.0.0.1:{port}", root, env, process)
        started.append(service)
        wait_ready(service.url, process, 120)
        return service

    yield start
    for service in started:
        stop_service(service.process)


@dataclass
class Answer:
    at: float
    status: int | str
    body: dict[str, Any] = field(default_factory=dict)


class Stream:
    """Valid images posted to /predict by ``clients`` threads, one after another (``pause`` seconds
    apart, per client); every answer kept."""

    def __init__(self, url: str, clients: int = 3, pause: float = 0.0) -> None:
        self.url, self.answers, self.stop, self.pause = url, [], threading.Event(), pause
        self.images = [encode(photo(seed), "JPEG") for seed in range(5)]
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(clients)]

    def run(self, client: int) -> None:
        import requests

        n = 0
        while not self.stop.is_set():
            n += 1
            files = {"image": ("a.jpg", self.images[n % len(self.images)])}
            try:
                response = requests.post(f"{self.url}/predict", files=files, headers=AUTH, timeout=30)
                body = response.json() if response.status_code == 200 else {"text": response.text[:200]}
                self.answers.append(Answer(time.monotonic(), response.status_code, body))
            except Exception as exc:  # noqa: BLE001 - a dropped connection is a failed request
                self.answers.append(Answer(time.monotonic(), repr(exc)))
            self.stop.wait(self.pause)

    def __enter__(self) -> Stream:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def between(self, start: float, end: float) -> list[Answer]:
        return [answer for answer in self.answers if start < answer.at <= end]

    def failures(self) -> list[Answer]:
        return [answer for answer in self.answers if answer.status != 200]


class MotoS3:
    """A moto S3 server on a fixed port that a test can stall, take away and bring back."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server = self._start()
        self.answering = self.listening = True

    def _start(self) -> Any:
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        server.start()
        return server

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stall(self) -> None:
        """Stop answering: the port still accepts connections, nothing replies (reads time out)."""
        self.server.stop()
        self.answering = False

    def take_away(self) -> None:
        """Close the port as well: connections are refused."""
        self.server._server.server_close()  # ThreadedMotoServer.stop leaves its socket open
        self.listening = False

    def bring_back(self) -> None:
        self.server = self._start()
        self.answering = self.listening = True

    def close(self) -> None:
        if self.answering:
            self.stall()
        if self.listening:
            self.take_away()

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1")


@pytest.fixture
def moto_s3() -> Iterator[MotoS3]:
    s3 = MotoS3()
    s3.client().create_bucket(Bucket="fault-log")
    yield s3
    s3.close()


def s3_storage(s3: MotoS3) -> Any:
    from ml.storage import open_storage

    return open_storage("s3://fault-log/live", endpoint_url=s3.url, timeout_seconds=5)


def test_a_storage_outage_answers_every_prediction_and_loses_no_logged_row(start_service, moto_s3) -> None:
    """Storage stalls, then refuses connections, then comes back: every valid prediction was answered
    200 meanwhile, and every answered prediction's row and image reach storage afterwards."""
    from ml.layout import PREDICTIONS_PREFIX, REQUEST_IMAGES_PREFIX
    from ml.storage import read_jsonl

    service = start_service(
        storage__root="s3://fault-log/live",
        storage__endpoint_url=moto_s3.url,
        storage__timeout_seconds=2,
        serving__log_flush_rows=20,
        serving__log_images="true",
    )
    every_worker_serving(service)  # before storage goes: a worker reads its deployment state there
    # paced: every answered request leaves a row and an image to write once storage is back
    with Stream(service.url, pause=0.05) as stream:
        time.sleep(3)
        stalled_at = time.monotonic()
        moto_s3.stall()
        time.sleep(6)
        refused_at = time.monotonic()
        moto_s3.take_away()
        time.sleep(5)
        back_at = time.monotonic()
        moto_s3.bring_back()
        time.sleep(2)
    assert not stream.failures(), stream.failures()[:5]
    stalled, refused = stream.between(stalled_at, refused_at), stream.between(refused_at, back_at)
    assert len(stalled) > 20 and len(refused) > 20, (len(stalled), len(refused))  # served through both
    answered = {answer.body["request_id"] for answer in stream.answers}
    storage = s3_storage(moto_s3)

    def kept() -> tuple[dict[str, dict], set[str]]:
        rows = {row["request_id"]: row for row in read_jsonl(storage, PREDICTIONS_PREFIX)}
        return rows, set(storage.list(REQUEST_IMAGES_PREFIX))

    deadline, (logged, images) = time.monotonic() + 90, kept()
    while time.monotonic() < deadline and not (answered <= set(logged) and len(images) >= len(answered)):
        time.sleep(1)
        logged, images = kept()
    missing = answered - set(logged)
    assert not missing, f"{len(missing)} of {len(answered)} answered predictions never reached storage"
    assert {logged[request_id]["image_key"] for request_id in answered} <= images
    assert "could not write" in service.log_text()  # the outage was real, and seen by the service


def every_worker_serving(service: Service, version: str = "1", timeout: float = 120) -> None:
    """Until every worker of ``service`` has published a heartbeat serving ``version``: each worker
    reads the deployment state and loads the model as it starts, and a worker still starting accepts no
    connection, so readiness checks on the socket can all reach the one that is up."""
    from ml.serving.replica import live_heartbeats

    settings = load_settings(environ=service.env)
    storage, deadline = storage_from_settings(settings), time.monotonic() + timeout
    serving: set[int] = set()
    while len(serving) < settings.serving.workers:
        assert time.monotonic() < deadline, f"only workers {sorted(serving)} serve v{version}"
        beats = live_heartbeats(storage, settings.serving.heartbeat_max_age_seconds)
        serving = {beat.worker for beat in beats if beat.url == service.url and beat.stable == version}
        time.sleep(0.2)


def test_a_full_buffer_drops_rows_answers_anyway_and_counts_the_drops(start_service, moto_s3) -> None:
    """Storage goes away once the service has read its deployment state, and the buffer holds 10 rows
    per worker: 40 predictions are all answered, at least 20 rows are dropped, /metrics says how many."""
    from prometheus_client.parser import text_string_to_metric_families

    service = start_service(
        storage__root="s3://fault-log/full",
        storage__endpoint_url=moto_s3.url,
        storage__timeout_seconds=1,
        serving__log_max_buffer_rows=10,
        serving__log_images="true",
        serving__log_max_buffer_bytes=1000,  # smaller than one image: every image is dropped
    )
    every_worker_serving(service)  # before storage goes: a worker reads its deployment state there
    moto_s3.take_away()  # every write from here on fails: the buffer fills
    with Stream(service.url, clients=2) as stream:
        while len(stream.answers) < 40:
            time.sleep(0.1)
    answered = [answer for answer in stream.answers if answer.status == 200]
    assert len(answered) == len(stream.answers) >= 40, stream.failures()[:5]
    status, body = http("GET", f"{service.url}/metrics")  # from loopback: no key needed
    assert status == 200
    dropped = {
        sample.labels["kind"]: sample.value
        for family in text_string_to_metric_families(body.decode())
        if family.name == "mlops_prediction_log_dropped"
        for sample in family.samples
        if sample.name.endswith("_total")
    }
    assert dropped["rows"] >= len(answered) - 20, dropped  # two workers keep at most 10 rows each
    assert dropped["images"] == len(answered), dropped


def test_restarting_the_service_under_a_steady_stream_fails_no_request(start_service) -> None:
    """`mlops serve --reload` replaces every worker while three clients keep posting: no request fails,
    the same model answers after, and the listening socket never closed."""
    service = start_service()
    mlops_reload = [MLOPS, "serve", "--reload", "--json"]
    with Stream(service.url) as stream:
        time.sleep(3)
        reloaded_at = time.monotonic()
        out = subprocess.run(mlops_reload, env=service.env, capture_output=True, text=True, timeout=180)
        done_at = time.monotonic()
        time.sleep(3)
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert result["reloaded"] and not set(result["workers"]) & set(result["old_workers"])
    assert len(result["workers"]) == 2 and service.process.poll() is None  # same arbiter, new workers
    failures = stream.failures()
    assert not failures and len(stream.answers) > 60, (failures[:5], len(stream.answers))
    during, after = stream.between(reloaded_at, done_at), stream.between(done_at, time.monotonic())
    assert during and after, (len(during), len(after))
    assert {answer.body["model_version"] for answer in stream.answers} == {"1"}
    assert "stopping: no new connections here" in service.log_text()  # the old workers drained


def _second_worker_share(service: Service, seconds: float = 3.0) -> float:
    """Pause worker 2 while 8 keep-alive clients connect (worker 1 accepts them all), resume it, let
    the clients post for a while; then worker 2's share of both workers' CPU over ``seconds``."""
    import psutil
    import requests

    tree = psutil.Process(service.process.pid).children(recursive=True)
    workers = sorted((p for p in tree if "--worker-id" in p.cmdline()), key=lambda p: p.pid)
    assert len(workers) == 2, [p.cmdline() for p in tree]
    image = {"image": ("a.jpg", encode(photo(1), "JPEG"))}
    sessions = [requests.Session() for _ in range(8)]
    failures: list[object] = []
    stop = threading.Event()

    def post(session: requests.Session) -> None:
        response = session.post(f"{service.url}/predict", files=image, headers=AUTH, timeout=30)
        if response.status_code != 200:
            failures.append(response.text[:200])

    def keep_posting(session: requests.Session) -> None:
        while not stop.is_set():
            try:
                post(session)
            except requests.RequestException as exc:
                failures.append(repr(exc))

    workers[1].suspend()
    try:
        for session in sessions:
            post(session)  # each client's connection is accepted by worker 1: worker 2 is paused
    finally:
        workers[1].resume()
    threads = [threading.Thread(target=keep_posting, args=(s,), daemon=True) for s in sessions]
    for thread in threads:
        thread.start()
    time.sleep(2)  # a balancing worker has shed its excess by now
    before = [sum(p.cpu_times()[:2]) for p in workers]
    time.sleep(seconds)
    used = [sum(p.cpu_times()[:2]) - b for p, b in zip(workers, before, strict=True)]
    stop.set()
    for thread in threads:
        thread.join(60)
    assert not failures, failures[:5]  # a closed keep-alive connection is reopened, never a failed request
    return used[1] / sum(used)


def test_connections_a_paused_worker_missed_are_spread_back_to_it(start_service) -> None:
    """Eight keep-alive clients all land on one worker (the other was paused when they connected):
    without balancing the second worker stays idle; with it, the first closes its excess after an
    answer and the reconnecting clients give the second its share of the work."""
    idle = _second_worker_share(start_service(serving__balance_connections="false"))
    assert idle < 0.1, idle
    shared = _second_worker_share(start_service())
    assert shared > 0.3, shared
