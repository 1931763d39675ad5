"""The serving check's load test: concurrent clients on keep-alive connections for a few seconds,
held to the spec's inference figures (``inference``: throughput, p99 latency, memory).

Each client thread keeps one connection and sends the same prepared request again as soon as the
answer is in (reconnecting when the service asks it to close, as its connection balancing does).
The service's memory is the resident set of its whole process tree, sampled while the load runs.
"""

from __future__ import annotations

import http.client
import ssl
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import psutil

from ml.config import InferenceConfig

SAMPLE_SECONDS = 0.2  # how often the service's memory is read while the load runs


def percentile_ms(latencies: Sequence[float], q: float) -> float:
    """A latency percentile in ms, to 2 places (0.0 without latencies)."""
    return round(float(np.percentile(latencies, q)), 2) if len(latencies) else 0.0


@dataclass(frozen=True)
class LoadResult:
    concurrency: int
    seconds: float
    requests: int  # answered with 200
    failed: int  # any other status, or a connection error
    throughput_rps: float
    p50_ms: float
    p99_ms: float
    peak_rss_mb: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def misses(load: LoadResult, bounds: InferenceConfig) -> list[str]:
    """What the load result misses of the spec's inference figures (nothing: it meets them)."""
    found = []
    if load.failed:
        found.append(f"{load.failed} of {load.requests + load.failed} requests failed under load")
    if load.throughput_rps < bounds.throughput_rps:
        found.append(
            f"throughput {load.throughput_rps} req/s at {load.concurrency} clients < {bounds.throughput_rps}"
        )
    if load.p99_ms > bounds.latency_p99_ms:
        found.append(f"p99 latency under load {load.p99_ms} ms > {bounds.latency_p99_ms} ms")
    if load.peak_rss_mb > bounds.memory_mb:
        found.append(f"service memory {load.peak_rss_mb} MB > {bounds.memory_mb} MB")
    return found


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its children, in MB (0 when it is gone)."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            continue
    return total / 1e6


def _connection(url: str, ca_file: str | None, timeout: float) -> http.client.HTTPConnection:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        context = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
        return http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout, context=context)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)


def _client(
    url: str,
    request: tuple[str, bytes, dict[str, str]],
    deadline: float,
    ca_file: str | None,
    latencies: list[float],
    failures: list[int],
    ends: list[float],
) -> None:
    path, body, headers = request
    connection = _connection(url, ca_file, timeout=30)
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        try:
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
        except (OSError, http.client.HTTPException):
            failures.append(1)
            connection.close()
            connection = _connection(url, ca_file, timeout=30)
            continue
        if response.status == 200:
            latencies.append((time.perf_counter() - started) * 1000)
        else:
            failures.append(response.status)
        if response.will_close:
            connection.close()
            connection = _connection(url, ca_file, timeout=30)
    connection.close()
    ends.append(time.perf_counter())


def load_test(
    url: str,
    request: tuple[str, bytes, dict[str, str]],
    *,
    concurrency: int,
    seconds: float,
    pid: int | None = None,
    ca_file: str | None = None,
) -> LoadResult:
    """``concurrency`` clients send ``request`` (path, body, headers) to ``url`` for ``seconds``."""
    latencies: list[float] = []
    failures: list[int] = []
    ends: list[float] = []
    started = time.perf_counter()
    deadline = started + seconds
    clients = [
        threading.Thread(
            target=_client, args=(url, request, deadline, ca_file, latencies, failures, ends), daemon=True
        )
        for _ in range(concurrency)
    ]
    for client in clients:
        client.start()
    peak = 0.0
    while any(client.is_alive() for client in clients):
        if pid is not None:
            peak = max(peak, tree_rss_mb(pid))
        time.sleep(SAMPLE_SECONDS)
    elapsed = max(ends, default=deadline) - started  # to the last answer, not to the last memory sample
    return LoadResult(
        concurrency=concurrency,
        seconds=round(elapsed, 2),
        requests=len(latencies),
        failed=len(failures),
        throughput_rps=round(len(latencies) / elapsed, 1),
        p50_ms=percentile_ms(latencies, 50),
        p99_ms=percentile_ms(latencies, 99),
        peak_rss_mb=round(peak, 1),
    )
