"""The service for real: bentoml build, the serving check, `bentoml serve` over HTTP, deploy and rollback.

Two models trained on generated demo days; v1 is the champion, v2 the challenger.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ml.config import load_settings
from ml.data.ingest import ingest_day
from ml.demo.landing import land_days
from ml.http import multipart
from ml.storage import LocalStorage
from tests.browser import STEP_SECONDS, chromium, needs_browser
from tests.conftest import REPO, world_env
from tests.hostile import encode, photo, png_bomb, with_exif_gps

pytestmark = [pytest.mark.integration, pytest.mark.slow]
START = dt.date(2026, 6, 1)
KEY = "0-integration-key-with-every-role"  # sorts first: the key deploy's /version check uses is admin
PREDICT_KEY = "p-integration-key-that-only-predicts"
FEEDBACK_KEY = "f-integration-key-that-only-labels-1"
PAGE_KEY = "page-integration-key-predict-and-feedback"  # what a team hands out for the page
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict, Any, LocalStorage]]:
    """Champion v1 and challenger v2; the settings environment applies to everything started here."""
    from ml import registry
    from ml.training.pipeline import retrain

    root = tmp_path_factory.mktemp("serving")
    env = world_env(
        root,
        training__epochs=15,
        training__early_stopping__patience=4,
        # v2 only has to be a second servable model here; the gate's own tests are in test_retrain/validate
        acceptance__non_inferiority_margin=0.1,
        acceptance__robustness_margin=0.15,
        serving__log_flush_seconds=0.5,
        serving__log_images=True,  # labelled request images become training data (the feedback test)
        serving__max_request_bytes=6000000,
    ) | {"MLOPS_API_KEYS": f"{KEY},{PREDICT_KEY}:predict,{FEEDBACK_KEY}:feedback,{PAGE_KEY}:predict+feedback"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        settings = load_settings()
        storage = LocalStorage(root / "store")
        land_days(storage, START, 3, settings.classes, count=120, seed=11)
        for offset in range(3):
            ingest_day(settings, storage, START + dt.timedelta(days=offset))
        first = retrain(settings, storage).to_dict()
        registry.promote(settings, storage, first["model_version"], "test")
        second = retrain(settings, storage, force=True, overrides={"learning_rate": 0.002}).to_dict()
        assert (first["model_version"], second["model_version"]) == ("1", "2"), second
        yield env, settings, storage


def test_release_builds_checks_and_deploys_the_champion(world) -> None:
    from ml import registry
    from ml.release.audit import audit_log
    from ml.release.deploy import release
    from ml.serving.state import read_state

    _, settings, storage = world
    result = release(settings, storage, "1", stage="full", by="test")
    check = result["check"]
    assert check["passed"] and check["images"] == settings.serving.check_images, check
    assert check["max_probability_gap"] <= settings.acceptance.onnx_max_abs_diff
    assert check["p99_ms"] <= settings.serving.check_latency_p99_ms
    tags = registry.client(settings).get_model_version(settings.mlflow.registered_model, "1").tags
    assert tags["bento_tag"] == result["bento_tag"] and result["bento_tag"].startswith(
        "product-classifier-service:v1-"
    )
    assert read_state(storage).stable == "1"
    assert result["live"] is None  # no live endpoint yet: the state waits for `mlops serve`
    assert audit_log(storage)[-1]["action"] == "deploy-full"


def test_a_broken_bento_fails_the_serving_check_and_nothing_deploys(world) -> None:
    import bentoml

    from ml.release.build import build_bento, import_model
    from ml.release.check import serving_check
    from ml.release.deploy import release
    from ml.release.errors import DeployError
    from ml.serving.state import read_state

    _, settings, storage = world
    tag = build_bento(settings, "2")
    src = Path(bentoml.get(tag).path) / "src" / "bentos"
    packed, service = src / "packed.json", src / "service.py"
    originals = {path: path.read_bytes() for path in (packed, service)}
    try:
        wrong = {"model_version": "1", "model_tag": import_model(settings, "1"), "bento_tag": tag}
        packed.write_text(json.dumps(wrong))  # the bento packs another model than the one checked
        wrong_model = serving_check(settings, storage, "2", tag)
        assert not wrong_model.passed and any("/version says model '1'" in r for r in wrong_model.reasons)
        assert any("served" in r or "differ" in r for r in wrong_model.reasons), wrong_model.reasons
        packed.write_bytes(originals[packed])
        service.write_text(originals[service].decode() + "\nraise RuntimeError('broken build')\n")
        with pytest.raises(DeployError, match="serving check of v2.*exited"):
            release(settings, storage, "2", stage="canary", by="test")
        assert read_state(storage).canary is None  # nothing was deployed
    finally:
        for path, data in originals.items():
            path.write_bytes(data)
    assert serving_check(settings, storage, "2", tag).passed


@pytest.fixture(scope="module")
def live(world) -> Iterator[str]:
    """`mlops serve`: the live service for the deployed model (the champion on its first run)."""
    from ml.http import wait_ready
    from ml.release.service import stop_service

    _, settings, _ = world
    port = settings.serving.port
    log = Path(settings.serving.state_dir) / "live.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlops"), "serve", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, 120)
        yield url
    finally:
        stop_service(process)


def post(
    url: str, path: str, files: list[tuple[str, str, bytes]], headers: dict | None = None
) -> tuple[int, Any]:
    import requests

    response = requests.post(
        url + path,
        files=[(field, (name, data)) for field, name, data in files],
        headers=AUTH if headers is None else headers,
        timeout=60,
    )
    return response.status_code, response.json()


def image(fmt: str, mode: str = "RGB", size: tuple[int, int] = (160, 120)) -> bytes:
    if mode == "I;16":
        return encode(Image.fromarray(np.asarray(photo(1, size, "L")).astype("uint16") * 257), fmt)
    return encode(photo(1, size, mode), fmt)


VALID = {
    "png": image("PNG"),
    "jpeg": image("JPEG"),
    "tiff": image("TIFF"),
    "webp": image("WEBP"),
    "bmp": image("BMP"),
    "rgba-png": image("PNG", "RGBA"),
    "grey-jpeg": image("JPEG", "L"),
    "16-bit-png": image("PNG", "I;16"),
    "cmyk-jpeg": image("JPEG", "CMYK"),
    "8x8": image("PNG", size=(8, 8)),
    "4000x3000": encode(Image.new("RGB", (4000, 3000), (90, 120, 150)), "JPEG"),
    "exif-jpeg": with_exif_gps(photo(2)),
}


@pytest.mark.parametrize("name", sorted(VALID))
def test_every_valid_image_is_answered_over_http(live, name: str) -> None:
    status, body = post(live, "/predict", [("image", f"upload.{name}", VALID[name])])
    assert status == 200, body
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-4 and body["model_version"] == "1"


def raw(url: str, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, Any]:
    from ml.http import http

    status, data = http(method, url + path, body=body or None, headers={**AUTH, **(headers or {})})
    return status, data


HOSTILE = {
    "text-file": lambda u: post(u, "/predict", [("image", "a.png", b"GIF89a but not really")]),
    "empty-file": lambda u: post(u, "/predict", [("image", "a.png", b"")]),
    "truncated-png": lambda u: post(u, "/predict", [("image", "a.png", image("PNG")[:200])]),
    "pixel-bomb": lambda u: post(u, "/predict", [("image", "a.png", png_bomb())]),
    "wrong-field": lambda u: post(u, "/predict", [("file", "a.png", image("PNG"))]),
    "two-images": lambda u: post(u, "/predict", [("image", "a.png", image("PNG"))] * 2),
    "too-large": lambda u: post(u, "/predict", [("image", "a.png", b"0" * 6_100_000)]),
    "no-key": lambda u: post(u, "/predict", [("image", "a.png", image("PNG"))], headers={}),
    "wrong-key": lambda u: post(
        u, "/predict", [("image", "a.png", image("PNG"))], {"Authorization": "Bearer x"}
    ),
    "json-body": lambda u: raw(
        u, "POST", "/predict", b'{"image": "x"}', {"Content-Type": "application/json"}
    ),
    "raw-bytes": lambda u: raw(u, "POST", "/predict", image("PNG"), {"Content-Type": "image/png"}),
    "no-boundary": lambda u: raw(u, "POST", "/predict", b"xx", {"Content-Type": "multipart/form-data"}),
    "bad-multipart": lambda u: raw(
        u, "POST", "/predict", b"--b\r\nnonsense", {"Content-Type": "multipart/form-data; boundary=b"}
    ),
    "get-predict": lambda u: raw(u, "GET", "/predict"),
    "feedback-label": lambda u: raw(
        u,
        "POST",
        "/feedback",
        b'{"request_id": "ab12", "label": "cars"}',
        {"Content-Type": "application/json"},
    ),
    "feedback-broken-json": lambda u: raw(
        u, "POST", "/feedback", b'{"request_id": ', {"Content-Type": "application/json"}
    ),
    "feedback-form": lambda u: post(u, "/feedback", [("request_id", "x", b"ab12")]),
    "feedback-non-ascii-id": lambda u: raw(
        u,
        "POST",
        "/feedback",
        '{"request_id": "a-b-c-\u00e9", "label": "toys"}'.encode(),
        {"Content-Type": "application/json"},
    ),
    "batch-too-many": lambda u: post(u, "/predict_batch", [("images", f"{i}.png", b"x") for i in range(33)]),
    "batch-second-disposition": lambda u: raw(  # BentoML's parser fetched the part's text as a URL: 500
        u,
        "POST",
        "/predict_batch",
        b"--b0\r\nContent-Disposition: form-data; name=images; filename=a.png\r\n"
        b"Content-Disposition: form-data; name=images\r\n\r\nhttp://example.com/\r\n--b0--\r\n",
        {"Content-Type": "multipart/form-data; boundary=b0"},
    ),
    "get-feedback": lambda u: raw(u, "GET", "/feedback"),
    "unknown-path": lambda u: raw(u, "POST", "/no/such/path", b"x", {"Content-Type": "text/plain"}),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_requests_get_a_4xx_and_the_service_stays_up(live, name: str) -> None:
    status, _ = HOSTILE[name](live)
    assert 400 <= status < 500, (name, status)
    assert raw(live, "GET", "/readyz")[0] == 200


def test_metrics_version_and_the_prediction_log(world, live) -> None:
    from ml.layout import FEEDBACK_PREFIX, PREDICTIONS_PREFIX
    from ml.storage import read_jsonl

    _, settings, storage = world
    request_ids = []
    for seed in range(3):
        _, body = post(live, "/predict", [("image", "x.png", encode(photo(seed), "PNG"))])
        request_ids.append(body["request_id"])
        time.sleep(0.3)
    status, body = raw(
        live,
        "POST",
        "/feedback",
        json.dumps({"request_id": request_ids[0], "label": "toys"}).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 200
    time.sleep(0.6)
    # nothing more is sent: each worker's watcher writes its rows after log_flush_seconds
    deadline = time.monotonic() + 10
    logged: list[dict] = []
    feedback: list[dict] = []
    while time.monotonic() < deadline and not (
        {*request_ids} <= {r["request_id"] for r in logged} and feedback
    ):
        time.sleep(0.5)
        logged = read_jsonl(storage, PREDICTIONS_PREFIX)
        feedback = read_jsonl(storage, FEEDBACK_PREFIX)
    row = next(r for r in logged if r["request_id"] == request_ids[0])
    assert row["model_version"] == "1" and {"embedding_pc0", "brightness", "blur", "latency_ms"} <= set(row)
    assert storage.read_bytes(row["image_key"])  # serving.log_images: the request's image is kept
    assert [(r["request_id"], r["label"]) for r in feedback] == [(request_ids[0], "toys")]
    assert feedback[0]["bound"] is True and feedback[0]["model_version"] == "1" and feedback[0]["key_id"]
    status, metrics = raw(live, "GET", "/metrics")
    text = metrics.decode()
    assert (
        'mlops_predictions_total{model_version="1"' in text
        and "mlops_prediction_latency_seconds_bucket" in text
    )
    assert 'mlops_request_errors_total{code="unauthorized",status="401"}' in text
    calls = re.search(r'mlops_model_batch_images_count\{model_version="1"\} (\S+)', text)
    images = re.search(r'mlops_model_batch_images_sum\{model_version="1"\} (\S+)', text)
    assert calls and images and float(images[1]) >= float(calls[1]) >= 1  # images per model call
    info = json.loads(raw(live, "GET", "/version")[1])
    assert info["model_version"] == "1" and info["dataset_version"].startswith("2026-06-03")


def upload_in_chunks(port: int, size: int, *, chunked: bool) -> tuple[int, dict]:
    """POST a ``size``-byte multipart body with http.client, 64 KiB at a time, then read the answer.

    ``Connection: close`` (what urllib and many clients send) makes the server close the connection
    after its answer: a server that answers early without reading the body resets it under the client.
    """
    import http.client

    boundary = "b0undary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'.encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    chunk = b"0" * 65536

    def body() -> Iterator[bytes]:
        yield head
        for _ in range(size // len(chunk)):
            yield chunk
        yield tail

    headers = {**AUTH, "Connection": "close", "Content-Type": f"multipart/form-data; boundary={boundary}"}
    if not chunked:
        headers["Content-Length"] = str(len(head) + size // len(chunk) * len(chunk) + len(tail))
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", "/predict", body=body(), headers=headers, encode_chunked=chunked)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_30_mb_upload_gets_a_413_the_client_can_read(world, live, chunked: bool) -> None:
    _, settings, _ = world
    status, body = upload_in_chunks(settings.serving.port, 30_000_000, chunked=chunked)
    assert status == 413 and body["error"] == "request_too_large", body
    assert raw(live, "GET", "/readyz")[0] == 200


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_each_route_needs_its_role_and_admin_requests_are_audited(world, live) -> None:
    from ml.layout import SERVING_ACCESS_AUDIT_PREFIX
    from ml.serving.auth import key_id
    from ml.storage import read_jsonl

    _, _, storage = world
    png = [("image", "a.png", image("PNG"))]
    assert post(live, "/predict", png, bearer(PREDICT_KEY))[0] == 200
    assert post(live, "/predict", png, bearer(FEEDBACK_KEY)) == (
        403,
        {"error": "forbidden", "detail": "this API key does not have the 'predict' role"},
    )
    label = json.dumps({"request_id": "ab12", "label": "toys"}).encode()
    json_type = {"Content-Type": "application/json"}
    assert raw(live, "POST", "/feedback", label, {**json_type, **bearer(PREDICT_KEY)})[0] == 403
    assert raw(live, "GET", "/version", headers=bearer(PREDICT_KEY))[0] == 403
    assert raw(live, "GET", "/version")[0] == 200
    from ml.http import http

    assert http("GET", f"{live}/metrics")[0] == 200  # from loopback: no key needed
    deadline, audited = time.monotonic() + 15, []
    while time.monotonic() < deadline and not {200, 403} <= {r["status"] for r in audited}:
        time.sleep(0.5)
        audited = [r for r in read_jsonl(storage, SERVING_ACCESS_AUDIT_PREFIX) if r["path"] == "/version"]
    assert {(r["key_id"], r["status"]) for r in audited} >= {(key_id(KEY), 200), (key_id(PREDICT_KEY), 403)}
    raw_records = b"".join(storage.read_bytes(k) for k in storage.list(SERVING_ACCESS_AUDIT_PREFIX))
    assert KEY.encode() not in raw_records and PREDICT_KEY.encode() not in raw_records


def test_feedback_is_bound_to_its_prediction_across_workers(world, live) -> None:
    """The label comes from the key that asked, once; another key, a forged id or a second label is
    refused, whichever worker process answers (connections land on either of the two)."""
    _, body = post(live, "/predict", [("image", "a.jpg", image("JPEG"))])
    request_id = body["request_id"]
    json_type = {"Content-Type": "application/json"}

    def label(rid: str, headers: dict[str, str], value: str = "toys") -> tuple[int, dict]:
        data = json.dumps({"request_id": rid, "label": value}).encode()
        status, answer = raw(live, "POST", "/feedback", data, {**json_type, **headers})
        return status, json.loads(answer)

    forged = request_id[:-4] + ("0000" if not request_id.endswith("0000") else "1111")
    assert label(forged, AUTH)[0] == 404
    assert label(request_id, bearer(FEEDBACK_KEY)) == (
        403,
        {"error": "not_your_prediction", "detail": "only the API key that made a prediction may label it"},
    )
    status, answer = label(request_id, AUTH)
    assert status == 200 and answer["bound"] is True and answer["model_version"] == body["model_version"]
    for _ in range(4):  # new connections: both workers get a chance to answer
        assert label(request_id, AUTH, "books")[0] == 409


def test_without_a_key_the_service_refuses_to_listen_beyond_loopback(world) -> None:
    from ml.http import free_port, http
    from ml.release.service import serve_env, start_service, stop_service

    env, settings, _ = world
    mlops = str(Path(sys.executable).parent / "mlops")
    open_env = {**os.environ, "MLOPS_API_KEYS": "", "MLOPS__SERVING__HOST": "0.0.0.0"}
    out = subprocess.run([mlops, "serve", "--json"], env=open_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "refusing to serve beyond loopback" in json.loads(out.stdout)["error"]
    out = subprocess.run(
        [mlops, "serve", "--json"],
        env={**os.environ, "MLOPS_API_KEYS": "not-32-chars"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "12 characters long" in out.stdout and "not-32-chars" not in out.stdout
    # bentoml serve itself on 0.0.0.0 (as in a container): every worker refuses to start
    port, log_file = free_port(), Path(settings.serving.state_dir) / "open.log"
    process = start_service(
        "bentos.service:ImageClassifier",
        port,
        serve_env(settings, port) | {"MLOPS_API_KEYS": ""},
        log_file,
        "0.0.0.0",
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and "refusing to start" not in log_file.read_text(errors="replace"):
            time.sleep(0.5)
        assert "no API key configured and the service listens on 0.0.0.0" in log_file.read_text(
            errors="replace"
        )
        with pytest.raises(OSError):
            http("GET", f"http://127.0.0.1:{port}/readyz", timeout=3)  # nothing answers
    finally:
        stop_service(process)


def self_signed(folder: Path, addresses: list[str]) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and ``addresses``, and its key (PEM files)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    names = [x509.DNSName("localhost"), *(x509.IPAddress(ipaddress.ip_address(a)) for a in addresses)]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key_file.write_bytes(pem)
    return cert_file, key_file


def outward_address() -> str:
    """This machine's address on its default route (not loopback), or skip."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the route
        except OSError:
            pytest.skip("no non-loopback route on this machine")
        return str(probe.getsockname()[0])


def test_tls_service_answers_https_only_and_metrics_beyond_loopback_need_admin(world, tmp_path) -> None:
    """`mlops serve` with a self-signed certificate on 0.0.0.0: https with the certificate as CA works,
    plain http gets no answer, and /metrics from a non-loopback address needs a key with admin."""
    from ml.http import free_port, http, wait_ready
    from ml.release.service import stop_service

    _, settings, _ = world
    address = outward_address()
    cert, key = self_signed(tmp_path, ["127.0.0.1", address])
    port = free_port()
    env = {**os.environ, "MLOPS__SERVING__HOST": "0.0.0.0", "MLOPS__SERVING__PORT": str(port)}
    env |= {"MLOPS__SERVING__TLS_CERT": str(cert), "MLOPS__SERVING__TLS_KEY": str(key)}
    mlops = str(Path(sys.executable).parent / "mlops")
    with (tmp_path / "tls.log").open("ab") as out:
        process = subprocess.Popen(
            [mlops, "serve"], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url, ca = f"https://127.0.0.1:{port}", str(cert)
    try:
        wait_ready(url, process, 120, ca_file=ca)
        payload, content_type = multipart("image", [("a.png", image("PNG"))])
        status, body = http(
            "POST", f"{url}/predict", body=payload, headers={**AUTH, "Content-Type": content_type}, ca_file=ca
        )
        assert status == 200 and json.loads(body)["model_version"], body
        with pytest.raises(OSError):  # the certificate is not trusted without its CA
            http("GET", f"{url}/readyz")
        try:
            plain = http("GET", f"http://127.0.0.1:{port}/readyz", timeout=5)[0]
        except OSError:
            plain = None
        assert plain != 200
        outside = f"https://{address}:{port}"
        assert http("GET", f"{outside}/metrics", ca_file=ca)[0] == 401
        assert http("GET", f"{outside}/metrics", headers=bearer(PREDICT_KEY), ca_file=ca)[0] == 403
        status, metrics = http("GET", f"{outside}/metrics", headers=AUTH, ca_file=ca)
        assert status == 200 and b"mlops_predictions_total" in metrics
        assert http("GET", f"{url}/metrics", ca_file=ca)[0] == 200  # loopback needs no key
    finally:
        stop_service(process)


def test_the_serving_check_runs_its_scratch_service_with_tls_when_tls_is_on(world, tmp_path) -> None:
    from ml.release.build import build_bento
    from ml.release.check import serving_check

    _, settings, storage = world
    cert, key = self_signed(tmp_path, ["127.0.0.1"])
    tls = settings.serving.model_copy(update={"tls_cert": str(cert), "tls_key": str(key)})
    with_tls = settings.model_copy(update={"serving": tls})
    # every probe goes to https://127.0.0.1:<port> checked against the certificate: a scratch service
    # serving plain http would fail each of them
    check = serving_check(with_tls, storage, "2", build_bento(settings, "2"))
    assert check.passed and check.images == settings.serving.check_images, check.reasons


def test_the_serving_check_load_tests_the_service_against_the_specs_inference_figures(world) -> None:
    from ml.release.build import build_bento
    from ml.release.check import serving_check

    _, settings, storage = world
    tag = build_bento(settings, "2")

    def check(mode: str, **inference: float):
        serving = settings.serving.model_copy(update={"check_load": mode, "check_load_seconds": 2.0})
        bounds = settings.inference.model_copy(update=inference)
        return serving_check(
            settings.model_copy(update={"serving": serving, "inference": bounds}), storage, "2", tag
        )

    met = check("enforce", throughput_rps=1, latency_p99_ms=60_000, memory_mb=100_000)
    assert met.passed, met.reasons
    load = met.load
    assert load["requests"] > 20 and load["failed"] == 0 and load["misses"] == [], load
    assert load["throughput_rps"] == pytest.approx(load["requests"] / load["seconds"], rel=0.02)
    assert 0 < load["p50_ms"] <= load["p99_ms"] and 150 < load["peak_rss_mb"] < 100_000  # its processes

    beyond = {"throughput_rps": 1e6, "latency_p99_ms": 0.001, "memory_mb": 1}  # no service meets these
    reported = check("report", **beyond)
    assert reported.passed and len(reported.load["misses"]) == 3, reported.load
    enforced = check("enforce", **beyond)
    assert not enforced.passed
    for what in ("load test: throughput", "load test: p99 latency under load", "load test: service memory"):
        assert any(reason.startswith(what) for reason in enforced.reasons), (what, enforced.reasons)
    assert check("off").load is None


def test_requests_the_service_refuses_under_load_are_counted_as_failed(live) -> None:
    from ml.config import InferenceConfig
    from ml.release.load import load_test, misses

    body, content_type = multipart("image", [("a.png", image("PNG"))])
    wrong_key = {"Content-Type": content_type, "Authorization": "Bearer " + "w" * 40}
    load = load_test(live, ("/predict", body, wrong_key), concurrency=2, seconds=1.0)
    assert load.requests == 0 and load.failed > 10 and load.throughput_rps == 0
    bounds = InferenceConfig(latency_p99_ms=500, throughput_rps=1, memory_mb=2048)
    assert misses(load, bounds)[0] == f"{load.failed} of {load.failed} requests failed under load"


class Traffic:
    """Steady requests from three client threads; every answer is kept."""

    def __init__(self, url: str) -> None:
        self.url, self.answers, self.stop = url, [], threading.Event()
        self.data = encode(photo(4), "JPEG")
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(3)]

    def run(self, worker: int) -> None:
        import requests

        n = 0
        while not self.stop.is_set():
            n += 1
            headers = {**AUTH, "X-Client-Id": f"client-{worker}-{n % 50}"}
            sent = time.monotonic()  # routing happens on arrival: a request sent after a switch sees it
            try:
                response = requests.post(
                    self.url + "/predict", files={"image": ("a.jpg", self.data)}, headers=headers, timeout=30
                )
                version = response.json().get("model_version") if response.status_code == 200 else None
                self.answers.append((sent, response.status_code, version))
            except Exception as exc:  # noqa: BLE001 - a dropped connection is a failed request
                self.answers.append((sent, repr(exc), None))

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def since(self, moment: float) -> list[str | None]:
        return [version for at, _, version in self.answers if at > moment]


def test_canary_full_deploy_and_rollback_under_steady_traffic_fail_no_request(world, live) -> None:
    from ml import registry
    from ml.release.audit import audit_log
    from ml.release.deploy import deploy, rollback

    _, settings, storage = world
    with Traffic(live) as traffic:
        time.sleep(2)
        staged = deploy(settings, storage, "2", stage="canary", by="test").to_dict()
        assert staged["live"] is True and staged["state"]["canary"] == "2"
        moment = time.monotonic()
        time.sleep(6)
        during_canary = traffic.since(moment)
        full = deploy(settings, storage, "2", stage="full", by="test").to_dict()
        assert full["live"] is True
        moment = time.monotonic()
        time.sleep(3)
        after_full = traffic.since(moment)
        back = rollback(settings, storage, by="tester", reason="live accuracy dropped").to_dict()
        assert back["live"] is True
        moment = time.monotonic()
        time.sleep(3)
        after_rollback = traffic.since(moment)
    failures = [answer for answer in traffic.answers if answer[1] != 200]
    assert not failures and len(traffic.answers) > 60, (failures[:5], len(traffic.answers))
    share = during_canary.count("2") / len(during_canary)
    assert 0 < share < 0.35, share  # sticky per client id, about 10% of 150 ids
    assert set(after_full) == {"2"} and set(after_rollback) == {"1"}
    entry = audit_log(storage)[-1]
    assert (entry["action"], entry["by"], entry["from"], entry["to"]) == ("rollback", "tester", "2", "1")
    assert entry["why"] == "live accuracy dropped" and entry["at"]
    assert registry.version_for_alias(settings, registry.CHAMPION) == "1"
    tags = registry.client(settings).get_model_version(settings.mlflow.registered_model, "2").tags
    assert "live accuracy dropped" in tags["rolled_back"]


def test_the_rollback_dag_rolls_back_from_its_form(world, live, airflow_db) -> None:
    from airflow.dag_processing.dagbag import DagBag

    from ml import registry
    from ml.release.audit import audit_log

    _, settings, storage = world
    dag = DagBag(dag_folder=str(REPO / "dags" / "rollback.py")).dags["rollback"]
    run = dag.test(run_conf={"version": "2", "reason": "from the Airflow form"})
    assert run.state == "success"
    entry = audit_log(storage)[-1]
    assert (entry["action"], entry["to"], entry["why"]) == ("rollback", "2", "from the Airflow form")
    assert json.loads(raw(live, "GET", "/version")[1])["model_version"] == "2"
    assert registry.version_for_alias(settings, registry.CHAMPION) == "2"


def test_cli_deploy_and_rollback_explain_what_is_wrong(world) -> None:
    mlops = str(Path(sys.executable).parent / "mlops")
    out = subprocess.run([mlops, "deploy", "99", "--json"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 3 and "no version 99" in json.loads(out.stdout)["error"]
    out = subprocess.run(
        [mlops, "rollback", "--to", "2", "--reason", "x", "--json"], capture_output=True, text=True
    )
    assert out.returncode == 3 and "already the live model" in json.loads(out.stdout)["error"]


def predict_with_feedback(url: str, storage: LocalStorage, uploads: list[tuple[bytes, str]]) -> list[str]:
    """Classify each upload, send its true label as feedback, and wait until both logs hold them."""
    from ml.layout import FEEDBACK_PREFIX, PREDICTIONS_PREFIX
    from ml.storage import read_jsonl

    ids = []
    for data, label in uploads:
        status, body = post(url, "/predict", [("image", "x.jpg", data)])
        assert status == 200, body
        ids.append(body["request_id"])
        feedback = json.dumps({"request_id": body["request_id"], "label": label}).encode()
        assert raw(url, "POST", "/feedback", feedback, {"Content-Type": "application/json"})[0] == 200
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        logged = {r["request_id"] for r in read_jsonl(storage, PREDICTIONS_PREFIX)}
        labelled = {r["request_id"] for r in read_jsonl(storage, FEEDBACK_PREFIX)}
        if set(ids) <= logged & labelled:
            return ids
        time.sleep(0.5)
    raise AssertionError("the prediction and feedback logs did not receive every request")


def test_monitor_rolls_back_a_bad_new_model_and_alerts_once(
    world, live, receiver, airflow_db, monkeypatch
) -> None:
    """v2 serves well; a deliberately bad v3 goes live; feedback shows it; the monitor rolls back to v2."""
    from airflow.dag_processing.dagbag import DagBag
    from mlops_airflow.alerts import notifier

    from ml import registry
    from ml.demo.landing import labelled_images
    from ml.monitoring.live import read_monitor_state
    from ml.release.audit import audit_log
    from ml.release.deploy import deploy
    from ml.release.guard import check_live
    from ml.serving.state import read_state
    from ml.training.pipeline import retrain
    from tests.receivers import connect_alerts

    _, settings, storage = world
    connect_alerts(monkeypatch, receiver.url)
    notify = notifier(settings)

    assert read_state(storage).stable == "2"  # left by the rollback DAG's test
    check_live(settings, storage, allow_rollback=False)  # the next check's window starts here
    predict_with_feedback(live, storage, labelled_images(settings.classes, 110, seed=21))
    good = check_live(settings, storage, notify=notify)
    assert good["rules"]["model_accuracy_drop"]["outcome"] == "ok", good["facts"]["accuracy_by_version"]
    assert good["metrics"]["error_rate"] == 0.0 and good["facts"]["requests"]["requests"] >= 220
    assert 0 < good["metrics"]["p50_latency_ms"] <= good["metrics"]["p99_latency_ms"] < 1000
    assert good["metrics"]["drift_score"] is not None and good["facts"]["drift"]["report"].endswith(
        "report.html"
    )
    assert good["rollback"] is None and read_monitor_state(storage)["last_good"]["version"] == "2"

    # a negative control forced through a gate loosened to nothing: it cannot have learned anything
    loose = settings.acceptance.model_copy(
        update={
            "accuracy_min": 0,
            "precision_min": 0,
            "recall_min": 0,
            "f1_macro_min": 0,
            "non_inferiority_margin": 1,
        }
    )
    unchecked = settings.validation.model_copy(update={"enabled": False})  # no slice/robustness checks either
    bad = retrain(
        settings.model_copy(update={"acceptance": loose, "validation": unchecked}),
        storage,
        force=True,
        shuffle_labels=True,
        overrides={"epochs": 5},
    ).to_dict()
    assert bad["status"] == "registered", bad
    version = bad["model_version"]
    registry.promote(settings, storage, version, "careless approver")
    assert deploy(settings, storage, version, stage="full", by="careless approver").live is True
    receiver.requests.clear()
    predict_with_feedback(live, storage, labelled_images(settings.classes, 60, seed=22))
    fired = check_live(settings, storage, notify=notify)

    assert fired["rules"]["model_accuracy_drop"]["outcome"] == "firing", fired["metrics"]
    assert (
        fired["rollback"]["from"] == version and fired["rollback"]["to"] == "2" and fired["rollback"]["live"]
    )
    assert read_state(storage).stable == "2"
    assert json.loads(raw(live, "GET", "/version")[1])["model_version"] == "2"
    assert registry.version_for_alias(settings, registry.CHAMPION) == "2"
    entry = audit_log(storage)[-1]
    assert (entry["action"], entry["by"], entry["from"], entry["to"]) == (
        "rollback",
        "monitor_serving (automatic)",
        version,
        "2",
    )
    assert "model_accuracy_drop" in entry["why"]
    slack = [m.body.decode() for m in receiver.on("/slack/") if b"model_accuracy_drop" in m.body]
    assert len(slack) == 1 and "ROLLED BACK automatically" in slack[0] and f"was v{version}" in slack[0]
    (page,) = [e.json() for e in receiver.on("/v2/enqueue") if b"model_accuracy_drop" in e.body]
    assert page["event_action"] == "trigger" and page["dedup_key"] == "monitor_serving/model_accuracy_drop"
    assert "ROLLED BACK" in page["payload"]["custom_details"]["reason"]

    # v2 serves well again: the hourly DAG's check resolves the incident, on both channels
    receiver.requests.clear()
    predict_with_feedback(live, storage, labelled_images(settings.classes, 60, seed=23))
    dag = DagBag(dag_folder=str(REPO / "dags" / "monitor_serving.py")).dags["monitor_serving"]
    assert dag.test().state == "success"
    state = read_monitor_state(storage)
    assert state["alerts"]["model_accuracy_drop"]["firing"] is False and state["last_good"]["version"] == "2"
    resolved = [m.body.decode() for m in receiver.on("/slack/") if b"model_accuracy_drop" in m.body]
    assert len(resolved) == 1 and "[RESOLVED]" in resolved[0]
    (page,) = [e.json() for e in receiver.on("/v2/enqueue") if b"model_accuracy_drop" in e.body]
    assert page["event_action"] == "resolve" and page["dedup_key"] == "monitor_serving/model_accuracy_drop"
    assert read_state(storage).stable == "2"  # a good check changes nothing


@needs_browser
def test_the_page_classifies_an_upload_and_binds_the_correction_to_it(world, live, tmp_path) -> None:
    """The page at /ui in headless Chromium: a key, an upload, the answer, a correction; then the
    status panel with the replicas, the monitor's checks and drift per day. The correction is found
    in the feedback log bound to the request the page showed."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from ml.demo.landing import labelled_images
    from ml.layout import FEEDBACK_PREFIX
    from ml.monitoring.drift import measure_day
    from ml.storage import read_jsonl

    _, settings, storage = world
    for offset in range(3):  # drift per day, as the drift monitor records it
        measure_day(settings, storage, START + dt.timedelta(days=offset))
    data, truth = labelled_images(settings.classes, 1, seed=31)[0]
    upload = tmp_path / "photo.jpg"
    upload.write_bytes(data)
    shots = REPO / ".data" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    with chromium(tmp_path) as browser:
        wait = WebDriverWait(browser, STEP_SECONDS, poll_frequency=0.5)
        browser.get(f"{live}/ui")  # the page itself needs no key; everything it calls does
        browser.find_element(By.ID, "key").send_keys(PAGE_KEY)
        browser.find_element(By.ID, "save-key").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "deployment"), "Champion v"))
        browser.find_element(By.ID, "file").send_keys(str(upload))
        wait.until(ec.element_to_be_clickable((By.ID, "predict"))).click()
        wait.until(ec.visibility_of_element_located((By.ID, "result")))
        request_id = browser.find_element(By.ID, "request-id").text
        shown_version = browser.find_element(By.ID, "result-version").text
        bars = browser.find_elements(By.CSS_SELECTOR, "#probabilities .bar")
        assert len(bars) == len(settings.classes) and request_id
        assert browser.find_element(By.ID, "result-track").text in ("stable", "canary")
        wrong = next(name for name in settings.classes if name != truth)  # a correction, not a confirmation
        Select(browser.find_element(By.ID, "label")).select_by_value(wrong)
        browser.find_element(By.ID, "correct").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "feedback-status"), "recorded"))
        assert browser.find_element(By.ID, "feedback-status").get_attribute("class") == "ok"
        browser.find_element(By.ID, "try").screenshot(str(shots / "ui_try.png"))

        browser.find_element(By.ID, "refresh").click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#replicas tr")) >= 1)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#chart-drift circle")) == 3)
        assert browser.find_elements(By.CSS_SELECTOR, "#chart-p99 circle")  # the monitor's checks
        assert browser.find_elements(By.CSS_SELECTOR, "#alerts tr")  # its rollback and resolve notices
        assert len(browser.find_elements(By.CSS_SELECTOR, "#links a")) == 3
        browser.set_window_size(1400, 1800)  # the whole panel in one picture
        browser.find_element(By.ID, "status").screenshot(str(shots / "ui_status.png"))

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        bound = [r for r in read_jsonl(storage, FEEDBACK_PREFIX) if r["request_id"] == request_id]
        if bound:
            break
        time.sleep(0.5)
    assert [(r["label"], r["model_version"], r["bound"]) for r in bound] == [(wrong, shown_version, True)]


def test_the_page_and_swagger_open_without_a_key_and_the_spec_declares_the_bearer_scheme(live) -> None:
    from ml.http import http

    status, page = http("GET", f"{live}/ui")
    assert status == 200 and b"<title>Image classifier</title>" in page
    assert http("GET", f"{live}/ui/status")[0] == 401  # the page's data needs a key
    assert http("POST", f"{live}/ui", body=b"x")[0] == 401  # only reads are open
    status, spec = http("GET", f"{live}/docs.json")
    spec = json.loads(spec)
    assert status == 200 and spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert spec["security"] == [{"bearerAuth": []}] and "security" not in spec["paths"]["/predict"]["post"]
    assert http("GET", f"{live}/docs")[0] == 200  # redirected to Swagger UI
    status, body = raw(live, "GET", "/ui/status", headers={"Authorization": f"Bearer {PAGE_KEY}"})
    assert status == 200 and json.loads(body)["deployment"]["stable"] == "2"


def test_labelled_served_images_are_ingested_and_counted_by_the_next_retrain(world, live) -> None:
    """Every labelled request of today (the monitor's traffic, the page's correction, a dark upload the
    checks refuse) lands as feedback beside an upstream day, passes the same ingest, and trains."""
    from ml import registry
    from ml.data import catalog
    from ml.data.feedback import from_feedback, land_feedback
    from ml.layout import DayLayout
    from ml.training.pipeline import retrain

    _, settings, storage = world
    dark = Image.new("RGB", (96, 96), (2, 2, 2))
    (dark_id,) = predict_with_feedback(live, storage, [(encode(dark, "JPEG"), settings.classes[0])])
    today = dt.datetime.now(dt.UTC).date()
    land_days(storage, today, 1, settings.classes, count=40, seed=12)  # upstream's rows of the day
    landed = land_feedback(storage, today, settings.ingest.feedback_lookback_days)
    assert landed.landed >= 230 and landed.without_image == 0, landed  # the monitor test labelled 230

    result = ingest_day(settings, storage, today)

    rows = catalog.read_partition(storage, today)
    fed = int(from_feedback(rows).sum())
    layout = DayLayout(today)
    manifest = pd.read_csv(io.BytesIO(storage.read_bytes(layout.feedback_labels)), dtype=str)
    ledger = pd.read_csv(io.BytesIO(storage.read_bytes(layout.ledger)), dtype=str, keep_default_na=False)
    feedback_rows = ledger[ledger["ref"].str.startswith("feedback.csv:")]
    assert len(feedback_rows) == len(manifest) == landed.landed  # every landed label is accounted for
    dark_line = int(manifest.index[manifest["request_id"] == dark_id][0]) + 2  # CSV line (header is 1)
    (dark_row,) = feedback_rows[feedback_rows["ref"] == f"feedback.csv:{dark_line}"].itertuples()
    assert dark_row.outcome == "quarantined" and dark_row.reason, dark_row
    refused = int((feedback_rows["outcome"] == "quarantined").sum())
    assert 0 < fed <= landed.landed - refused and result.reconciled
    run = retrain(settings, storage, force=True).to_dict()
    params = registry.client(settings).get_run(run["run_id"]).data.params
    assert int(params["feedback_images"]) == fed and params["dataset_version"] == result.dataset_version
    print(f"feedback: landed {landed.landed}, quarantined rows {refused}, curated {fed}; run {run['run_id']}")
