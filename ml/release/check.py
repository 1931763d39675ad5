"""The serving check (like TFX's InfraValidator): the bento runs on a scratch port and must
become ready, report its version, answer golden test-split images with the offline
predictions within the latency bound, and refuse a request without the key. Then a load test
measures it against the spec's inference figures (``serving.check_load``: reported, or a gate).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ml.alerts import Alert, Notify
from ml.config import Settings
from ml.data.catalog import dataset_rows
from ml.http import NotReady, free_port, http, multipart, wait_ready
from ml.release.build import build_bento, import_model, use_bentoml_home
from ml.release.errors import DeployError
from ml.release.load import LoadResult, load_test, misses, percentile_ms
from ml.release.service import (
    FOLLOW_ENV,
    REPLICA_ENV,
    instance_home,
    serving_dir,
    start_service,
    stop_service,
    tls_args,
    tls_ca_file,
)
from ml.serving.bundle import BUNDLE_ONNX, BundleMeta
from ml.storage import Storage


@dataclass
class CheckResult:
    passed: bool
    version: str
    bento_tag: str
    images: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    first_pass_p99_ms: float | None = None  # set when a first pass over the bound was probed again
    max_probability_gap: float = 0.0
    reasons: list[str] = field(default_factory=list)
    load: dict[str, Any] | None = None  # the load test's figures, and what they miss of `inference`

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def golden_images(settings: Settings, storage: Storage) -> list[tuple[str, bytes]]:
    """A class-balanced handful of test-split images of the current dataset (curated bytes)."""
    _, rows = dataset_rows(storage)
    test = rows[rows["split"] == "test"].sort_values("sha256")
    per_class = max(1, settings.serving.check_images // max(1, test["label"].nunique()))
    picked = test.groupby("label", sort=True).head(per_class).head(settings.serving.check_images)
    return [(key, storage.read_bytes(key)) for key in picked["curated_key"]]


def offline_probabilities(bundle: Path, images: list[bytes]) -> np.ndarray:
    """What the model says offline: the training-side preprocessing, the bundle's ONNX and its
    calibration temperature (the served probabilities are calibrated too)."""
    from ml.training.preprocessing import batch_arrays, decode_rgb
    from ml.training.scoring import onnx_predict_proba

    meta = BundleMeta.read(bundle)
    prep = meta.preprocessing
    arrays = batch_arrays([decode_rgb(data, prep) for data in images], prep)
    return onnx_predict_proba(bundle / BUNDLE_ONNX, arrays, temperature=meta.temperature)


def _probe(
    url: str,
    key: str,
    images: list[tuple[str, bytes]],
    expected: np.ndarray,
    classes: list[str],
    ca_file: str | None = None,
) -> tuple[list[float], list[float], list[str]]:
    """Send the golden images; (latencies ms, probability gaps, reasons for every mismatch)."""
    latencies, gaps, reasons = [], [], []
    for (name, data), want in zip(images, expected, strict=True):
        payload, content_type = multipart("image", [(Path(name).name, data)])
        started = time.perf_counter()
        status, body = http(
            "POST",
            f"{url}/predict",
            body=payload,
            headers={"Content-Type": content_type, "Authorization": f"Bearer {key}"},
            ca_file=ca_file,
        )
        latencies.append((time.perf_counter() - started) * 1000)
        if status != 200:
            reasons.append(f"{name}: HTTP {status} {body[:200]!r}")
            continue
        answer = json.loads(body)
        gaps.append(float(np.max(np.abs(np.array([answer["probabilities"][c] for c in classes]) - want))))
        offline = classes[int(np.argmax(want))]
        if answer["predicted_class"] != offline:
            reasons.append(f"{name}: served {answer['predicted_class']}, offline {offline}")
    return latencies, gaps, reasons


def p99(latencies: list[float]) -> float:
    return percentile_ms(latencies, 99)


def _hold_to_bounds(
    result: CheckResult, settings: Settings, latencies: list[float], gaps: list[float]
) -> None:
    result.p50_ms = percentile_ms(latencies, 50)
    result.p99_ms = p99(latencies)
    result.max_probability_gap = round(max(gaps, default=1.0), 6)
    if result.max_probability_gap > settings.acceptance.onnx_max_abs_diff:
        result.reasons.append(
            f"served probabilities differ from offline by {result.max_probability_gap:.2e} "
            f"> {settings.acceptance.onnx_max_abs_diff}"
        )
    if result.p99_ms > settings.serving.check_latency_p99_ms:
        first = result.first_pass_p99_ms
        again = "" if first is None else f" (and {first} ms the pass before)"
        result.reasons.append(
            f"p99 latency {result.p99_ms} ms > {settings.serving.check_latency_p99_ms} ms{again}"
        )


def examine(
    url: str, key: str, result: CheckResult, settings: Settings, golden: tuple, ca_file: str | None = None
) -> None:
    """Everything the check asks of a running service; failures go to ``result.reasons``."""
    images, expected, classes = golden
    status, body = http("GET", f"{url}/version", headers={"Authorization": f"Bearer {key}"}, ca_file=ca_file)
    served = json.loads(body).get("model_version") if status == 200 else None
    if served != result.version:
        result.reasons.append(f"/version says model {served!r} (HTTP {status}), expected {result.version}")
    latencies, gaps, reasons = _probe(url, key, images, expected, classes, ca_file)
    if not reasons and p99(latencies) > settings.serving.check_latency_p99_ms:
        # Right answers, but over the bound: probe once more. The p99 of a score of requests is about
        # their slowest, and one stall of a loaded machine is not the service's latency; a slow
        # service is slow twice. The check keeps the second pass's figures and says both.
        result.first_pass_p99_ms = p99(latencies)
        latencies, gaps, reasons = _probe(url, key, images, expected, classes, ca_file)
    result.reasons.extend(reasons)
    payload, content_type = multipart("image", [("x.png", images[0][1])])
    headers = {"Content-Type": content_type}
    status, _ = http("POST", f"{url}/predict", body=payload, headers=headers, ca_file=ca_file)
    if status != 401:
        result.reasons.append(f"a request without the API key got HTTP {status}, not 401")
    result.images = len(images)
    _hold_to_bounds(result, settings, latencies, gaps)


def check_load(
    url: str, key: str, image: tuple[str, bytes], settings: Settings, pid: int, ca_file: str | None = None
) -> tuple[LoadResult, list[str]]:
    """The load test and what it misses of ``inference``; a miss of throughput or latency alone is
    measured once more (one stall of a shared machine is not the service's speed), and the second
    figures are kept."""
    payload, content_type = multipart("image", [(Path(image[0]).name, image[1])])
    request = ("/predict", payload, {"Content-Type": content_type, "Authorization": f"Bearer {key}"})
    serving = settings.serving

    def measure() -> tuple[LoadResult, list[str]]:
        load = load_test(
            url,
            request,
            concurrency=serving.check_load_concurrency,
            seconds=serving.check_load_seconds,
            pid=pid,
            ca_file=ca_file,
        )
        return load, misses(load, settings.inference)

    load, missed = measure()
    if missed and not load.failed and load.peak_rss_mb <= settings.inference.memory_mb:
        load, missed = measure()
    return load, missed


def serving_check(settings: Settings, storage: Storage, version: str, bento_tag: str) -> CheckResult:
    """Run the bento on a scratch port and hold it to the offline predictions and the latency bound."""
    use_bentoml_home(settings)
    import bentoml

    result = CheckResult(False, str(version), bento_tag)
    images = golden_images(settings, storage)
    if not images:
        result.reasons.append("no test-split images to check with")
        return result
    bundle = Path(bentoml.models.get(import_model(settings, version)).path)
    expected = offline_probabilities(bundle, [data for _, data in images])
    classes = BundleMeta.read(bundle).classes
    port, key = free_port(), secrets.token_urlsafe(32)  # one key with every role
    env = {k: v for k, v in os.environ.items() if k != REPLICA_ENV}  # a scratch service is no replica
    env[FOLLOW_ENV] = "off"  # it serves the model packed in its bento, whatever is deployed
    env |= {"MLOPS_API_KEYS": key, "MLOPS_PREDICTION_LOG": "off", "MLOPS_API_KEYS_FILE": ""}
    env |= {"MLOPS_FEEDBACK_SECRET": secrets.token_hex(32)}  # the scratch service's own request-id secret
    env["BENTOML_HOME"] = str(instance_home(use_bentoml_home(settings), f"check-{port}"))  # live metrics stay
    log_file = serving_dir(settings) / "logs" / f"check-v{version}.log"
    try:
        tls = tls_args(settings)
    except DeployError as exc:
        result.reasons.append(str(exc))
        return result
    ca_file = tls_ca_file(settings)
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    process = start_service(bento_tag, port, env, log_file, tls=tls)
    try:
        wait_ready(url, process, settings.serving.check_timeout_seconds, ca_file=ca_file)
        examine(url, key, result, settings, (images, expected, classes), ca_file)
        if settings.serving.check_load != "off" and not result.reasons:
            load, missed = check_load(url, key, images[0], settings, process.pid, ca_file)
            result.load = load.to_dict() | {"mode": settings.serving.check_load, "misses": missed}
            if settings.serving.check_load == "enforce":
                result.reasons.extend(f"load test: {miss}" for miss in missed)
    except (NotReady, DeployError, OSError, ValueError, KeyError) as exc:
        result.reasons.append(f"{type(exc).__name__}: {exc}")
    finally:
        stop_service(process)
    result.passed = not result.reasons
    return result


def build_and_check(settings: Settings, storage: Storage, version: str, notify: Notify) -> CheckResult:
    """Build the bento and run the serving check; a failure pages (critical) and raises ``DeployError``."""
    bento_tag = build_bento(settings, version)
    check = serving_check(settings, storage, version, bento_tag)
    if not check.passed:
        reason = f"v{version} ({bento_tag}) failed its serving check: {'; '.join(check.reasons)}"
        notify(Alert("serving_check_failed", "critical", reason, "retrain", "build_and_check"))
        raise DeployError(f"{reason}. Nothing was deployed.")
    return check
