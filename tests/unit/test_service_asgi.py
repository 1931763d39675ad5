"""The BentoML service through its ASGI app (no server process): contract, auth, errors, hot swap."""

from __future__ import annotations

import importlib
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ml.layout import FEEDBACK_PREFIX, SERVING_ACCESS_AUDIT_PREFIX
from ml.serving.auth import KeyConfigError, key_id
from ml.serving.state import DeploymentState, write_state
from ml.storage import LocalStorage, read_jsonl
from tests.hostile import encode, photo, png_bomb
from tests.unit.test_serving import CLASSES, make_bundle

KEY = "unit-test-key-with-every-role-0001"  # no roles listed: predict, feedback and admin
PREDICT_KEY = "unit-test-key-that-may-only-predict"
FEEDBACK_KEY = "unit-test-key-that-may-only-label-1"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The service's ASGI app with tiny real models in the BentoML store, v1 stable, the prediction log
    on a local store. v3 is broken: its metadata promises a 48 px input, its ONNX graph takes 32 px."""
    import bentoml
    from starlette.testclient import TestClient

    folder = tmp_path_factory.mktemp("service")
    for version, seed in (("1", 0), ("2", 1), ("3", 2)):
        bundle = make_bundle(folder, version, seed)
        if version == "3":
            meta = json.loads((bundle / "meta.json").read_text())
            (bundle / "meta.json").write_text(json.dumps(meta | {"image_size": 48}))
        with bentoml.models.create(f"product-classifier:v{version}") as model:
            for item in bundle.iterdir():
                (Path(model.path) / item.name).write_bytes(item.read_bytes())
    write_state(
        LocalStorage(folder / "store"), DeploymentState(stable="1")
    )  # in storage, as release writes it
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLOPS__SERVING__STATE_POLL_SECONDS", "0.3")
        env.setenv("MLOPS_API_KEYS", f"{KEY},{PREDICT_KEY}:predict,{FEEDBACK_KEY}:feedback")
        env.delenv("MLOPS_API_KEYS_FILE", raising=False)
        env.delenv("MLOPS_FEEDBACK_SECRET", raising=False)
        env.setenv("MLOPS__STORAGE__ROOT", str(folder / "store"))
        env.setenv("MLOPS__SERVING__STATE_DIR", str(folder / "serving"))
        env.setenv("MLOPS__SERVING__LOG_FLUSH_SECONDS", "0.2")
        env.setenv("MLOPS__PREPROCESSING__IMAGE_SIZE", "32")
        env.setenv("MLOPS__SERVING__MAX_REQUEST_BYTES", "8000000")
        service = importlib.import_module("bentos.service")
        with TestClient(service.ImageClassifier.to_asgi()) as test_client:
            test_client.store = LocalStorage(folder / "store")
            test_client.service = service
            test_client.env = env
            yield test_client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def post_image(client: Any, data: bytes, field: str = "image", headers: dict | None = None) -> Any:
    return client.post(
        "/predict", files={field: ("upload.bin", data)}, headers=AUTH if headers is None else headers
    )


def test_predict_returns_the_contract(client) -> None:
    response = post_image(client, encode(photo(1), "PNG"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {
        "predicted_class",
        "confidence",
        "probabilities",
        "model_version",
        "track",
        "request_id",
    }
    assert body["track"] == "stable"
    assert body["predicted_class"] in CLASSES and set(body["probabilities"]) == set(CLASSES)
    assert body["confidence"] == max(body["probabilities"].values()) and body["model_version"] == "1"


@pytest.mark.parametrize(
    ("fmt", "mode", "size"),
    [
        ("PNG", "RGBA", (8, 8)),
        ("JPEG", "L", (4000, 3000)),
        ("TIFF", "RGB", (100, 10)),
        ("WEBP", "RGB", (64, 64)),
    ],
)
def test_valid_images_of_any_kind_and_size_are_answered(client, fmt: str, mode: str, size) -> None:
    assert post_image(client, encode(photo(2, size, mode), fmt)).status_code == 200


@pytest.mark.parametrize(
    ("make", "status", "code"),
    [
        (lambda c: post_image(c, b"plain text, not an image"), 415, "not_an_image"),
        (lambda c: post_image(c, b""), 400, "empty_file"),
        (lambda c: post_image(c, encode(photo(1), "PNG")[:100]), 400, "corrupt_image"),
        (lambda c: post_image(c, png_bomb()), 413, "too_many_pixels"),
        (lambda c: post_image(c, encode(photo(1), "PNG"), field="file"), 400, "unexpected_field"),
        (lambda c: post_image(c, b"x" * 8_100_000), 413, "request_too_large"),
        (
            lambda c: c.post("/predict", json={"image": "aGVsbG8="}, headers=AUTH),
            415,
            "unsupported_media_type",
        ),
        (
            lambda c: c.post("/predict", data={"image": "text"}, files={"x": ("a", b"b")}, headers=AUTH),
            400,
            None,
        ),
        (lambda c: post_image(c, encode(photo(1), "PNG"), headers={}), 401, "unauthorized"),
        (lambda c: post_image(c, encode(photo(1), "PNG"), headers={"Authorization": "Bearer no"}), 401, None),
        (lambda c: post_image(c, encode(photo(1), "PNG"), headers=bearer(FEEDBACK_KEY)), 403, "forbidden"),
        (lambda c: c.post("/feedback", json={"request_id": "abc", "label": "cars"}, headers=AUTH), 400, None),
        (lambda c: c.post("/feedback", json={"request_id": "ab", "label": "toys"}, headers=AUTH), 404, None),
        (
            lambda c: c.post(
                "/feedback", json={"request_id": "ab", "label": "toys"}, headers=bearer(PREDICT_KEY)
            ),
            403,
            "forbidden",
        ),
        (
            lambda c: c.post(
                "/feedback", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"}
            ),
            400,
            None,
        ),
    ],
    ids=[
        "text",
        "empty",
        "truncated",
        "bomb",
        "wrong-field",
        "too-big",
        "json",
        "text-field",
        "no-key",
        "wrong-key",
        "role-predict",
        "unknown-label",
        "unknown-request",
        "role-feedback",
        "bad-json",
    ],
)
def test_bad_requests_get_a_4xx_with_a_json_error(client, make, status: int, code: str | None) -> None:
    response = make(client)
    assert response.status_code == status, response.text
    assert "error" in response.json()
    if code:
        assert response.json()["error"] == code


def test_probes_need_no_key_and_version_says_what_serves(client) -> None:
    assert client.get("/readyz").status_code == 200 and client.get("/livez").status_code == 200
    assert client.get("/version").status_code == 401
    info = client.get("/version", headers=AUTH).json()
    assert info["model_version"] == "1" and info["dataset_version"] == "2026-01-01" and info["ready"]


def test_version_and_metrics_need_the_admin_role_off_loopback(client) -> None:
    # the test client calls from "testclient", not a loopback address; loopback scrapes are covered
    # against a real server in tests/integration/test_serving.py
    for path in ("/version", "/metrics"):
        assert client.get(path).status_code == 401, path
        for key in (PREDICT_KEY, FEEDBACK_KEY):
            response = client.get(path, headers=bearer(key))
            assert response.status_code == 403 and "'admin' role" in response.json()["detail"], path
    assert client.get("/version", headers=AUTH).status_code == 200


def test_every_admin_request_is_recorded_by_key_id_never_by_key(client) -> None:
    client.get("/version", headers=AUTH)
    client.get("/version", headers=bearer(PREDICT_KEY))  # refused (403), and recorded too
    deadline = time.monotonic() + 10
    records: list[dict] = []
    while time.monotonic() < deadline and not {r["status"] for r in records} >= {200, 403}:
        time.sleep(0.2)
        records = read_jsonl(client.store, SERVING_ACCESS_AUDIT_PREFIX)
    by_status = {r["status"]: r for r in records if r["path"] == "/version"}
    assert (
        by_status[200]["key_id"] == key_id(KEY)
        and by_status[200]["method"] == "GET"
        and by_status[200]["time"]
    )
    assert by_status[403]["key_id"] == key_id(PREDICT_KEY)
    raw = b"".join(client.store.read_bytes(k) for k in client.store.list(SERVING_ACCESS_AUDIT_PREFIX))
    assert KEY.encode() not in raw and PREDICT_KEY.encode() not in raw


def test_a_client_cannot_claim_another_key_id_by_header(client) -> None:
    request_id = post_image(client, encode(photo(8), "PNG"), headers=bearer(PREDICT_KEY)).json()["request_id"]
    spoofed = {**AUTH, "X-MLOps-Key-Id": key_id(PREDICT_KEY)}  # the guard drops the client's own value
    response = client.post("/feedback", json={"request_id": request_id, "label": "toys"}, headers=spoofed)
    assert response.status_code == 403 and response.json()["error"] == "not_your_prediction"


def test_batch_answers_each_image_and_flags_the_bad_one(client) -> None:
    files = [("images", ("a.png", encode(photo(1), "PNG"))), ("images", ("b.txt", b"nope"))]
    response = client.post("/predict_batch", files=files, headers=AUTH)
    assert response.status_code == 200
    first, second = response.json()["results"]
    assert first["predicted_class"] in CLASSES and second["error"] == "not_an_image"


def test_feedback_is_accepted_once_from_the_key_that_made_the_prediction(client) -> None:
    request_id = post_image(client, encode(photo(4), "PNG")).json()["request_id"]
    label = {"request_id": request_id, "label": "toys"}
    other = client.post("/feedback", json=label, headers=bearer(FEEDBACK_KEY))  # may label, not this one
    assert other.status_code == 403 and other.json()["error"] == "not_your_prediction"
    response = client.post("/feedback", json=label, headers=AUTH)
    assert response.status_code == 200 and response.json()["status"] == "recorded"
    assert response.json()["model_version"] == "1" and response.json()["bound"] is True
    again = client.post("/feedback", json={**label, "label": "books"}, headers=AUTH)
    assert again.status_code == 409 and again.json()["error"] == "already_labelled"
    deadline, logged = time.monotonic() + 10, []
    while time.monotonic() < deadline and not logged:
        time.sleep(0.2)
        logged = [r for r in read_jsonl(client.store, FEEDBACK_PREFIX) if r["request_id"] == request_id]
    assert [(r["label"], r["key_id"], r["bound"]) for r in logged] == [("toys", key_id(KEY), True)]


def test_an_internal_failure_is_a_500_with_an_incident_id_and_no_internals(client, caplog) -> None:
    write_state(client.store, DeploymentState(stable="3", previous="1"))  # the broken model
    try:
        deadline = time.monotonic() + 10
        while (
            time.monotonic() < deadline
            and client.get("/version", headers=AUTH).json()["model_version"] != "3"
        ):
            time.sleep(0.2)
        response = post_image(client, encode(photo(9), "PNG"))
        assert response.status_code == 500, response.text
        body = response.json()
        assert body["error"] == "internal_error" and "retry" in body["detail"]
        incident = body["detail"].rsplit("incident ", 1)[1].split()[0]
        for internal in ("onnx", "Invalid", "dimension", "Traceback", "/"):
            assert internal not in body["detail"], internal
        assert any(incident in record.getMessage() for record in caplog.records)
        assert any(record.exc_info for record in caplog.records if incident in record.getMessage())
    finally:
        write_state(client.store, DeploymentState(stable="1"))
        deadline = time.monotonic() + 10
        while (
            time.monotonic() < deadline
            and client.get("/version", headers=AUTH).json()["model_version"] != "1"
        ):
            time.sleep(0.2)


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"MLOPS__SERVING__HOST": "0.0.0.0"}, "no API key configured and the service listens on 0.0.0.0"),
        ({"MLOPS_API_KEYS": "short-key"}, "MLOPS_API_KEYS entry 1: the API key is 9 characters long"),
    ],
    ids=["open-host", "short-key"],
)
def test_the_service_refuses_to_start_open_or_with_a_short_key(client, env: dict, problem: str) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLOPS_API_KEYS")
        for name, value in env.items():
            patch.setenv(name, value)
        with pytest.raises(KeyConfigError) as caught:
            client.service.ImageClassifier.inner()
    assert problem in str(caught.value) and "short-key" not in str(caught.value)


def test_a_new_deployment_state_is_picked_up_without_a_restart(client) -> None:
    write_state(client.store, DeploymentState(stable="2", previous="1"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and client.get("/version", headers=AUTH).json()["model_version"] != "2":
        time.sleep(0.2)
    assert post_image(client, encode(photo(5), "PNG")).json()["model_version"] == "2"
    write_state(client.store, DeploymentState(stable="1"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and client.get("/version", headers=AUTH).json()["model_version"] != "1":
        time.sleep(0.2)
    assert json.loads(client.get("/version", headers=AUTH).text)["model_version"] == "1"


def test_same_image_gets_the_same_answer(client) -> None:
    data = encode(photo(6), "JPEG")
    first, second = (post_image(client, data).json() for _ in range(2))
    assert first["probabilities"] == second["probabilities"]


def test_a_cmyk_jpeg_and_a_16_bit_png_are_answered(client) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(photo(7, (40, 30), "L")).astype("uint16") * 257).save(buffer, "PNG")
    assert post_image(client, buffer.getvalue()).status_code == 200
    assert post_image(client, encode(photo(7, (40, 30), "CMYK"), "JPEG")).status_code == 200


def test_the_page_and_swagger_open_without_a_key_and_their_data_needs_one(client) -> None:
    page = client.get("/ui")
    assert page.status_code == 200 and "<title>Image classifier</title>" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    outside = page.text.replace("http://www.w3.org/2000/svg", "")  # the SVG namespace is a name, not a fetch
    assert "http://" not in outside and "https://" not in outside  # no asset from outside the machine
    assert client.post("/ui", content=b"x").status_code == 401  # only reads of the open pages are open
    assert client.get("/ui/status").status_code == 401
    assert client.get("/ui/status", headers=bearer(FEEDBACK_KEY)).status_code == 403  # needs predict
    status = client.get("/ui/status", headers=bearer(PREDICT_KEY))
    assert status.status_code == 200, status.text
    assert status.json()["deployment"]["stable"] == "1" and status.json()["checks"] == []
    assert client.get("/", headers={}).status_code == 200  # Swagger UI
    assert client.get("/docs", follow_redirects=False).headers["location"] == "/"


def test_the_openapi_spec_declares_the_bearer_scheme(client) -> None:
    spec = client.get("/docs.json").json()
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": spec["components"]["securitySchemes"]["bearerAuth"]["description"],
    }
    assert spec["security"] == [{"bearerAuth": []}]
    assert "/predict" in spec["paths"] and "security" not in spec["paths"]["/predict"]["post"]
    waived = [
        path for path, ops in spec["paths"].items() if any(op.get("security") == [] for op in ops.values())
    ]
    assert set(waived) <= {"/healthz", "/livez", "/readyz", "/ui", "/", "/docs", "/docs.json"}, waived


def multipart(parts: list[tuple[bytes, bytes]], boundary: bytes = b"b0undary") -> bytes:
    """A multipart body from (part headers, data) pairs, written by hand: shapes no client library makes."""
    body = b"".join(b"--" + boundary + b"\r\n" + head + b"\r\n\r\n" + data + b"\r\n" for head, data in parts)
    return body + b"--" + boundary + b"--\r\n"


def file_part(name: str = "images", filename: str = "a.png") -> bytes:
    return f'Content-Disposition: form-data; name="{name}"; filename="{filename}"'.encode()


def test_a_batch_is_parsed_once_whatever_its_parts_headers_say(client) -> None:
    png = encode(photo(1), "PNG")
    form = {**AUTH, "Content-Type": "multipart/form-data; boundary=b0undary"}
    # a second Content-Disposition without a filename: BentoML's parser read a text field, fetched it as
    # a URL and answered 500
    two_dispositions = multipart([(file_part() + b'\r\nContent-Disposition: form-data; name="images"', png)])
    response = client.post("/predict_batch", content=two_dispositions, headers=form)
    assert response.status_code == 200 and response.json()["results"][0]["predicted_class"] in CLASSES
    utf16 = {**form, "Content-Type": "multipart/form-data; boundary=b0undary; charset=utf-16"}
    response = client.post("/predict_batch", content=multipart([(file_part(), png)]), headers=utf16)
    assert response.status_code == 200, response.text
    long_name = multipart([(file_part(filename="é" * 150 + ".png"), png)])  # 300 bytes: no temporary file
    assert client.post("/predict_batch", content=long_name, headers=form).status_code == 200


@pytest.mark.parametrize("count", [33, 1001])
def test_a_batch_over_the_limit_is_a_413(client, count: int) -> None:
    body = multipart([(file_part(filename=f"{i}.png"), b"x") for i in range(count)])
    headers = {**AUTH, "Content-Type": "multipart/form-data; boundary=b0undary"}
    response = client.post("/predict_batch", content=body, headers=headers)
    assert response.status_code == 413 and response.json()["error"] == "too_many_images"


def test_a_batch_of_only_bad_images_answers_with_the_first_ones_status(client) -> None:
    files = [("images", ("a.txt", b"nope")), ("images", ("b.png", b""))]
    response = client.post("/predict_batch", files=files, headers=AUTH)
    assert response.status_code == 415
    assert [result["error"] for result in response.json()["results"]] == ["not_an_image", "empty_file"]


@pytest.mark.parametrize("request_id", ["a-b-c-\u00e9", "\u0661-\u0662-\u0663-\u0664", "abc\u00b2-1-2-3"])
def test_a_request_id_outside_ascii_is_a_400(client, request_id: str) -> None:
    response = client.post("/feedback", json={"request_id": request_id, "label": "toys"}, headers=AUTH)
    assert response.status_code == 400 and response.json()["error"] == "bad_request_id"


@pytest.mark.parametrize("path", ["/predict_batch", "/feedback"])
def test_two_content_types_are_a_400(client, path: str) -> None:
    headers = [
        ("Authorization", AUTH["Authorization"]),
        ("Content-Type", "multipart/form-data"),
        ("Content-Type", "application/json" if path == "/feedback" else "multipart/form-data; boundary=b"),
    ]
    response = client.post(path, content=b'{"request_id": "ab", "label": "toys"}', headers=headers)
    assert response.status_code == 400 and response.json()["error"] == "ambiguous_content_type"


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("GET", "/predict", 405, "POST"),
        ("GET", "/predict_batch", 405, "POST"),
        ("GET", "/feedback", 405, "POST"),
        ("PUT", "/feedback", 405, "POST"),
        ("POST", "/version", 405, "GET, HEAD"),
        ("DELETE", "/metrics", 405, "GET, HEAD"),
        ("GET", "/no/such/path", 404, None),
        ("POST", "/no/such/path", 404, None),
    ],
)
def test_a_wrong_method_or_path_gets_a_json_error(client, method: str, path: str, status: int, allow) -> None:
    response = client.request(method, path, headers=AUTH)
    assert response.status_code == status, response.text
    assert response.json()["error"] == ("method_not_allowed" if status == 405 else "not_found")
    assert response.headers.get("allow") == allow
