"""`mlops predict` on a tiny trained champion, and the run's ONNX export as an MLflow `onnx` model.

One small world: 60 generated images, a random-init resnet18 on 32 px images, 3 epochs, no
validation, an acceptance bar of 0 (the model only has to exist: ~25 s on two cores).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.parser
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ml.config import Settings, load_settings
from ml.storage import LocalStorage
from tests.conftest import NO_ACCEPTANCE_BAR, world_env
from tests.hostile import encode, photo

pytestmark = [pytest.mark.integration]
DAY = dt.date(2026, 6, 1)
KEY = "predict-test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], Settings, Path]]:
    """v1 trained, registered and promoted champion; image files to classify under ``root/files``."""
    from ml import registry
    from ml.data.ingest import ingest_day
    from ml.demo.landing import land_days
    from ml.training.pipeline import retrain

    root = tmp_path_factory.mktemp("predict")
    env = world_env(
        root,
        model__architecture="resnet18",
        model__pretrained=False,
        preprocessing__image_size=32,
        training__epochs=3,
        training__augmented_views=0,
        validation__enabled=False,
        **NO_ACCEPTANCE_BAR,
    )
    settings = load_settings(environ=env)
    storage = LocalStorage(root / "store")
    land_days(storage, DAY, 1, settings.classes, count=60, seed=3)
    ingest_day(settings, storage, DAY)
    result = retrain(settings, storage).to_dict()
    assert result["model_version"] == "1", result
    registry.promote(settings, storage, "1", "test")
    files = root / "files"
    files.mkdir()
    (files / "a.png").write_bytes(encode(photo(1), "PNG"))
    (files / "b.jpg").write_bytes(encode(photo(2, (40, 90)), "JPEG"))
    (files / "notes.jpg").write_bytes(b"a text file named .jpg")
    yield env, settings, root


def service_answers(settings: Settings, data: list[bytes]) -> list[dict[str, Any]]:
    """What the live service's predictor answers for each upload, on the bundle release builds."""
    import bentoml

    from ml.data.images import ImageLimits
    from ml.release.build import import_model
    from ml.serving.predictor import Predictor

    tag = import_model(settings, "1")
    predictor = Predictor(
        lambda _: Path(bentoml.models.get(tag).path),
        ImageLimits.from_settings(settings.ingest),
        default_version="1",
        default_tag=tag,
    )
    assert predictor.refresh()

    async def ask() -> list[dict[str, Any]]:
        return [await predictor.predict(item) for item in data]

    try:
        return asyncio.run(ask())
    finally:
        predictor.close()


SERVICE_ONLY = {"request_id", "track"}  # what only a live request has: its id, the lane that answered


def same_answer(local: dict[str, Any], served: dict[str, Any]) -> None:
    """The local answer is the service's answer, without what only a live request has."""
    mine = {key: value for key, value in local.items() if key != "file"}
    assert set(served) - set(mine) <= SERVICE_ONLY and set(mine) <= set(served)
    for key, value in mine.items():
        numeric = isinstance(value, float | dict)  # confidence, probabilities
        assert value == (pytest.approx(served[key], abs=1e-6) if numeric else served[key]), key


def test_the_local_champion_answers_as_the_service_and_bad_files_fail_alone(world) -> None:
    from ml.serving.local import predict_local

    _, settings, root = world
    files = [root / "files" / name for name in ("a.png", "notes.jpg", "missing.png", "b.jpg")]
    result = predict_local(settings, files).to_dict()
    assert (result["source"], result["model_version"], result["failed"]) == ("local", "1", 2)
    assert result["calibrated"] is False  # validation (which fits the temperature) is off in this world
    good, text, missing, other = result["predictions"]
    assert (text["error"], missing["error"]) == ("not_an_image", "unreadable"), result
    assert text["file"].endswith("notes.jpg") and "No such file" in missing["detail"]
    assert set(good["probabilities"]) == set(settings.classes)
    assert sum(good["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    served = service_answers(settings, [files[0].read_bytes(), files[3].read_bytes()])
    same_answer(good, served[0])
    same_answer(other, served[1])


class FakeService(BaseHTTPRequestHandler):
    """/predict with the service's contract (bearer key, multipart field ``image``), answered by
    ``ServingModel.answer`` plus a request id; errors as the service words them."""

    model: Any = None
    limits: Any = None

    def do_POST(self) -> None:
        from ml.serving.local import classify
        from ml.serving.uploads import BadRequest, upload_problem

        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            return self.reply(401, {"error": "unauthorized", "detail": "send Authorization: Bearer KEY"})
        problem = upload_problem(self.path, body, self.headers["Content-Type"])
        if problem is not None:
            return self.reply(problem[0], {"error": problem[1], "detail": problem[2]})
        head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
        (part,) = email.parser.BytesParser().parsebytes(head + body).get_payload()
        try:
            answer = classify(self.model, part.get_payload(decode=True), self.limits)
        except BadRequest as exc:
            return self.reply(exc.status, exc.body())
        return self.reply(200, answer | {"request_id": "r-1"})

    def reply(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def service(world, tmp_path: Path) -> Iterator[str]:
    from ml.data.images import ImageLimits
    from ml.serving.local import load_version

    _, settings, _ = world
    FakeService.model = load_version(settings, "1", tmp_path / "bundle")
    FakeService.limits = ImageLimits.from_settings(settings.ingest)
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeService)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_cli_predicts_locally_and_through_a_url_with_one_json_shape(
    world, service: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ml.cli import EXIT_OK, EXIT_REJECTED, main

    env, _, root = world
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    good = [str(root / "files" / "a.png"), str(root / "files" / "b.jpg")]
    bad = str(root / "files" / "notes.jpg")

    assert main(["predict", *good, "--json"]) == EXIT_OK
    local = json.loads(capsys.readouterr().out)
    monkeypatch.setenv("MLOPS_API_KEY", KEY)
    assert main(["predict", good[0], bad, good[1], "--url", service, "--json"]) == EXIT_REJECTED
    remote = json.loads(capsys.readouterr().out)
    assert main(["predict", good[0], "--url", service, "--key", "wrong-key", "--json"]) == EXIT_REJECTED
    refused = json.loads(capsys.readouterr().out)["predictions"][0]

    assert (remote["source"], remote["model_version"], remote["failed"]) == (service, "1", 1)
    first, text, second = remote["predictions"]
    assert (text["error"], text["status"]) == ("not_an_image", 415)
    assert first["request_id"] == "r-1"
    for mine, theirs in zip(local["predictions"], (first, second), strict=True):
        assert mine == {k: v for k, v in theirs.items() if k != "request_id"}
    assert (refused["error"], refused["status"]) == ("unauthorized", 401)


def test_the_run_logs_its_onnx_export_as_an_onnx_model_with_its_signature(world, tmp_path: Path) -> None:
    import mlflow
    import mlflow.onnx
    import onnxruntime as ort

    from ml import registry
    from ml.layout import ONNX_ARTIFACT
    from ml.training.pipeline import ONNX_MODEL

    _, settings, _ = world
    mlflow.set_tracking_uri(registry.tracking_uri(settings))
    client = registry.client(settings)
    run_id = client.get_model_version(settings.mlflow.registered_model, "1").run_id
    uri = f"runs:/{run_id}/{ONNX_MODEL}"
    info = mlflow.models.get_model_info(uri)
    assert "onnx" in info.flavors
    inputs, outputs = info.signature.inputs.inputs, info.signature.outputs.inputs
    assert [(spec.name, spec.shape) for spec in inputs] == [("image", (-1, 3, 32, 32))]
    assert [(spec.name, spec.shape[:2]) for spec in outputs] == [
        ("logits", (-1, len(settings.classes))),
        ("features", (-1, 512)),  # resnet18's pooled features
    ]

    batch = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    plain = Path(client.download_artifacts(run_id, ONNX_ARTIFACT, str(tmp_path)))  # what release reads
    expected = ort.InferenceSession(str(plain)).run(["logits", "features"], {"image": batch})
    flavour = ort.InferenceSession(mlflow.onnx.load_model(uri).SerializeToString())
    pyfunc = mlflow.pyfunc.load_model(uri).predict({"image": batch})
    for name, value in zip(("logits", "features"), expected, strict=True):
        assert np.allclose(flavour.run([name], {"image": batch})[0], value, atol=1e-6)
        assert np.allclose(pyfunc[name], value, atol=1e-6)
    from importlib.metadata import version

    requirements = mlflow.artifacts.download_artifacts(f"{uri}/requirements.txt", dst_path=str(tmp_path))
    pinned = set(Path(requirements).read_text().split())  # what a pyfunc server of this model installs
    assert {f"onnx=={version('onnx')}", f"onnxruntime=={version('onnxruntime')}"} <= pinned
    registered = mlflow.models.get_model_info(
        client.get_model_version(settings.mlflow.registered_model, "1").source
    )
    assert "pytorch" in registered.flavors  # the version registers the PyTorch model, not the export
    installed = [f"{name}=={version(name).split('+')[0]}" for name in ("torch", "torchvision")]
    torch_pins = set(Path(mlflow.pyfunc.get_model_dependencies(registered.model_uri)).read_text().split())
    assert {*installed, f"efficientnet-lite-pytorch=={version('efficientnet-lite-pytorch')}"} <= torch_pins
