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

from ml.serving.state import DeploymentState, write_state
from tests.hostile import encode, photo, png_bomb
from tests.unit.test_serving import CLASSES, make_bundle

KEY = "unit-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The service's ASGI app with two tiny real models in the BentoML store, v1 stable."""
    import bentoml
    from starlette.testclient import TestClient

    folder = tmp_path_factory.mktemp("service")
    for version, seed in (("1", 0), ("2", 1)):
        bundle = make_bundle(folder, version, seed)
        with bentoml.models.create(f"product-classifier:v{version}") as model:
            for item in bundle.iterdir():
                (Path(model.path) / item.name).write_bytes(item.read_bytes())
    state = folder / "deployment.json"
    write_state(state, DeploymentState(stable="1"))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLOPS_DEPLOYMENT_STATE", str(state))
        env.setenv("MLOPS_API_KEYS", KEY)
        env.setenv("MLOPS_PREDICTION_LOG", "off")
        env.setenv("MLOPS__PREPROCESSING__IMAGE_SIZE", "32")
        env.setenv("MLOPS__SERVING__MAX_REQUEST_BYTES", "8000000")
        service = importlib.import_module("bentos.service")
        with TestClient(service.ImageClassifier.to_asgi()) as test_client:
            test_client.state_file = state
            yield test_client


def post_image(client: Any, data: bytes, field: str = "image", headers: dict | None = None) -> Any:
    return client.post(
        "/predict", files={field: ("upload.bin", data)}, headers=AUTH if headers is None else headers
    )


def test_predict_returns_the_contract(client) -> None:
    response = post_image(client, encode(photo(1), "PNG"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"predicted_class", "confidence", "probabilities", "model_version", "request_id"}
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
        (lambda c: c.post("/feedback", json={"request_id": "abc", "label": "cars"}, headers=AUTH), 400, None),
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
        "unknown-label",
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
    # /metrics needs the server's multiprocess metrics setup: tests/integration/test_serving.py covers it
    assert client.get("/readyz").status_code == 200 and client.get("/livez").status_code == 200
    assert client.get("/version").status_code == 401
    info = client.get("/version", headers=AUTH).json()
    assert info["model_version"] == "1" and info["dataset_version"] == "2026-01-01" and info["ready"]


def test_batch_answers_each_image_and_flags_the_bad_one(client) -> None:
    files = [("images", ("a.png", encode(photo(1), "PNG"))), ("images", ("b.txt", b"nope"))]
    response = client.post("/predict_batch", files=files, headers=AUTH)
    assert response.status_code == 200
    first, second = response.json()["results"]
    assert first["predicted_class"] in CLASSES and second["error"] == "not_an_image"


def test_feedback_is_accepted_for_a_prediction(client) -> None:
    request_id = post_image(client, encode(photo(4), "PNG")).json()["request_id"]
    response = client.post("/feedback", json={"request_id": request_id, "label": "toys"}, headers=AUTH)
    assert response.status_code == 200 and response.json()["status"] == "recorded"


def test_a_new_deployment_state_is_picked_up_without_a_restart(client) -> None:
    write_state(client.state_file, DeploymentState(stable="2", previous="1"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and client.get("/version", headers=AUTH).json()["model_version"] != "2":
        time.sleep(0.2)
    assert post_image(client, encode(photo(5), "PNG")).json()["model_version"] == "2"
    write_state(client.state_file, DeploymentState(stable="1"))
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
