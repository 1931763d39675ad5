"""The serving check's latency gate against a local HTTP service that stalls on cue."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from ml.config import load_settings
from ml.release.check import CheckResult, check_load, examine

KEY = "check-key-0123456789abcdef0123456789abcdef"
CLASSES = ["cat", "dog"]
ANSWER = {"predicted_class": "cat", "probabilities": {"cat": 0.9, "dog": 0.1}}
GOLDEN = ([(f"img{i}.png", b"\x89PNG fake bytes") for i in range(20)], np.array([[0.9, 0.1]] * 20), CLASSES)


class Service:
    """/version and /predict over real HTTP; ``stall[n]`` seconds before answering the n-th prediction."""

    def __init__(self) -> None:
        self.stall: dict[int, float] = {}
        self.predictions = 0
        self.posts = 0
        service = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._send(200, {"model_version": "3"})

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                service.posts += 1
                if self.headers.get("Authorization") != f"Bearer {KEY}":
                    self._send(401, {"error": "unauthorized"})
                    return
                time.sleep(service.stall.get(service.predictions, 0.0))
                service.predictions += 1
                self._send(200, ANSWER)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def service() -> Iterator[Service]:
    found = Service()
    thread = threading.Thread(target=found.server.serve_forever, daemon=True)
    thread.start()
    yield found
    found.server.shutdown()
    found.server.server_close()


def checked(service: Service, bound_ms: float = 300.0) -> CheckResult:
    settings = load_settings(environ={"MLOPS__SERVING__CHECK_LATENCY_P99_MS": str(bound_ms)})
    result = CheckResult(False, "3", "bento:test")
    examine(service.url, KEY, result, settings, GOLDEN)
    return result


def test_a_fast_service_is_probed_once(service: Service) -> None:
    result = checked(service)
    assert result.reasons == []
    assert service.predictions == 20 and result.first_pass_p99_ms is None


def test_one_stall_is_probed_again_and_the_second_pass_decides(service: Service) -> None:
    service.stall = {7: 0.6}  # one request of the first pass stalls past the bound
    result = checked(service)
    assert result.reasons == []
    assert service.predictions == 40
    assert result.first_pass_p99_ms is not None and result.first_pass_p99_ms > 300
    assert result.p99_ms < 300


def test_a_service_slow_in_both_passes_fails_and_says_both(service: Service) -> None:
    service.stall = {7: 0.6, 27: 0.6}  # the same stall in the second pass
    result = checked(service)
    assert service.predictions == 40
    assert len(result.reasons) == 1
    assert result.reasons[0].startswith("p99 latency ") and "> 300.0 ms (and " in result.reasons[0]


def test_wrong_answers_fail_without_a_second_pass(service: Service) -> None:
    service.stall = {3: 0.6}
    settings = load_settings(environ={"MLOPS__SERVING__CHECK_LATENCY_P99_MS": "300"})
    result = CheckResult(False, "3", "bento:test")
    wrong = (GOLDEN[0], np.array([[0.1, 0.9]] * 20), CLASSES)  # offline says dog; the service says cat
    examine(service.url, KEY, result, settings, wrong)
    assert service.predictions == 20  # a wrong model is not given a second chance at its latency
    assert any("served cat, offline dog" in reason for reason in result.reasons)
    assert any(reason.startswith("p99 latency") for reason in result.reasons)


def loaded(service: Service, key: str = KEY, **inference: float) -> tuple[dict, list[str]]:
    """The load test's figures and misses against ``service``; memory is this test process's tree,
    whatever the suite grew it to, so its bound is out of reach unless a test sets one."""
    bounds = {"memory_mb": 1_000_000} | inference
    settings = load_settings(
        environ={
            "MLOPS__SERVING__CHECK_LOAD_SECONDS": "0.5",
            "MLOPS__SERVING__CHECK_LOAD_CONCURRENCY": "2",
            **{f"MLOPS__INFERENCE__{name.upper()}": str(value) for name, value in bounds.items()},
        }
    )
    load, missed = check_load(service.url, key, GOLDEN[0][0], settings, os.getpid())
    return load.to_dict(), missed


def test_a_load_test_after_one_stall_is_measured_again_and_the_second_decides(service: Service) -> None:
    service.stall = {0: 0.7, 1: 0.7}  # both clients' first requests outlast the first measurement
    load, missed = loaded(service, throughput_rps=20, latency_p99_ms=300)
    assert missed == [] and load["requests"] > 20 and load["p99_ms"] < 300, load
    assert service.predictions >= load["requests"] + 2  # the first measurement's two are not counted


def test_a_service_slow_under_load_twice_misses_the_figures(service: Service) -> None:
    service.stall = {n: 0.7 for n in range(4)}
    load, missed = loaded(service, throughput_rps=20, latency_p99_ms=300)
    assert load["requests"] == 2 and load["p99_ms"] >= 700 and service.predictions == 4
    assert missed[0].startswith("throughput") and missed[1].startswith("p99 latency under load 7")


def test_refused_requests_under_load_fail_without_a_second_measurement(service: Service) -> None:
    load, missed = loaded(service, key="w" * 40, throughput_rps=1, memory_mb=100_000)
    assert load["requests"] == 0 and load["failed"] == service.posts > 0
    assert missed[0] == f"{service.posts} of {service.posts} requests failed under load"


def test_the_memory_of_a_process_tree_counts_its_children() -> None:
    import subprocess
    import sys

    from ml.release.load import tree_rss_mb

    alone = tree_rss_mb(os.getpid())
    hold = "import time; b = b'x' * 200_000_000; time.sleep(30)"  # 200 MB written, so resident
    child = subprocess.Popen([sys.executable, "-c", hold])
    try:
        deadline = time.monotonic() + 20
        while tree_rss_mb(os.getpid()) < alone + 150 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert tree_rss_mb(os.getpid()) > alone + 150
    finally:
        child.kill()
        child.wait()
    assert tree_rss_mb(child.pid) == 0.0  # gone
