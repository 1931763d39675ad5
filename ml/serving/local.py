"""``mlops predict``: image files classified by the champion here, or by the live service over HTTP.

Locally, the champion (the registered model's ``champion`` alias) is laid out as the bundle release
builds from its MLflow run (``write_version_bundle``: ONNX export, drift PCA, classes, calibration)
and run by ``ServingModel``, each file checked and decoded by ``decode_upload``: the service's code
path, without the service. Through ``--url``, each file is POSTed to ``/predict`` and the service's
answer (with its ``request_id``) is kept. A file that cannot be read or is not an image gets its own
error; the other files are still classified.

Not imported by the bento (it needs the MLflow client and training's calibration artifact path).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ml import registry
from ml.config import Settings
from ml.data.images import ImageLimits
from ml.http import http, multipart
from ml.layout import CLASS_NAMES_ARTIFACT, ONNX_ARTIFACT, REFERENCE_PCA_ARTIFACT
from ml.serving.bundle import BundleMeta, ServingModel, write_bundle
from ml.serving.uploads import BadRequest, decode_upload
from ml.training.calibration import CALIBRATION_ARTIFACT
from ml.training.preprocessing import Preprocessing

API_KEY_ENV = "MLOPS_API_KEY"


class BundleError(ValueError):
    """A registered version cannot be served as it is (another preprocessing, a model without outputs)."""


def run_calibration(client: Any, run_id: str, folder: Path) -> dict[str, float]:
    """The temperature and conformal threshold model validation logged (empty for runs before it)."""
    logged = {item.path for item in client.list_artifacts(run_id, CALIBRATION_ARTIFACT.rsplit("/", 1)[0])}
    if CALIBRATION_ARTIFACT not in logged:
        return {}
    return json.loads(Path(client.download_artifacts(run_id, CALIBRATION_ARTIFACT, str(folder))).read_text())


def require_serving_outputs(onnx_file: Path, version: str) -> None:
    """``BundleError`` unless the export outputs ``logits`` and ``features`` (what serving runs)."""
    import onnx

    outputs = {out.name for out in onnx.load(str(onnx_file), load_external_data=False).graph.output}
    if not {"logits", "features"} <= outputs:
        raise BundleError(f"v{version}'s ONNX export has outputs {sorted(outputs)}; retrain it to serve it")


def write_version_bundle(client: Any, model_version: Any, prep: Preprocessing, folder: Path) -> BundleMeta:
    """Lay out a registered version's bundle in ``folder`` from its MLflow run, with the preprocessing
    the run recorded (``prep`` for a run that recorded none); ``BundleError`` when that preprocessing
    is unknown here or the export is not servable."""
    run_id, version = model_version.run_id, str(model_version.version)
    trained_with = client.get_run(run_id).data.params.get("preprocessing", prep.version)
    try:
        prep = Preprocessing.parse(trained_with)
    except ValueError:
        raise BundleError(f"v{version} was trained with preprocessing {trained_with}, unknown here") from None
    with tempfile.TemporaryDirectory() as downloads:
        onnx_file = Path(client.download_artifacts(run_id, ONNX_ARTIFACT, downloads))
        pca = Path(client.download_artifacts(run_id, REFERENCE_PCA_ARTIFACT, downloads))
        names = Path(client.download_artifacts(run_id, CLASS_NAMES_ARTIFACT, downloads))
        require_serving_outputs(onnx_file, version)
        calibration = run_calibration(client, run_id, Path(downloads))
        meta = BundleMeta(
            model_version=version,
            dataset_version=model_version.tags.get("dataset_version", ""),
            run_id=run_id,
            classes=list(json.loads(names.read_text())["classes"]),
            image_size=prep.image_size,
            mean=prep.mean,
            std=prep.std,
            temperature=calibration.get("temperature"),
            conformal_threshold=calibration.get("conformal_threshold"),
            coverage=calibration.get("coverage"),
            jpeg_draft=prep.jpeg_draft,
        )
        write_bundle(folder, onnx_file, pca, meta)
    return meta


def champion_version(settings: Settings) -> str:
    """The version the ``champion`` alias names; ``ValueError`` when there is none."""
    version = registry.version_for_alias(settings, registry.CHAMPION)
    if version is None:
        raise ValueError(
            f"no champion of {settings.mlflow.registered_model} registered: train and promote one"
        )
    return str(version)


def load_version(settings: Settings, version: str, folder: Path) -> ServingModel:
    """A registered version as the service runs it, its bundle laid out in ``folder``."""
    client = registry.client(settings)
    model_version = client.get_model_version(settings.mlflow.registered_model, version)
    write_version_bundle(client, model_version, Preprocessing.from_settings(settings.preprocessing), folder)
    return ServingModel(folder)


@dataclass(frozen=True)
class FilePrediction:
    """One file's answer (the service's fields) or why it has none (``error``: a code, ``detail``)."""

    file: str
    answer: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    detail: str = ""
    status: int | None = None  # the HTTP status of a failed request (--url)

    def to_dict(self) -> dict[str, Any]:
        if self.error is None:
            return {"file": self.file, **self.answer}
        failed = {"file": self.file, "error": self.error, "detail": self.detail}
        return failed | ({"status": self.status} if self.status is not None else {})


@dataclass(frozen=True)
class Predictions:
    """Every file's prediction, in the order given, and where they came from."""

    source: str  # "local" or the service's URL
    model_version: str | None
    files: list[FilePrediction]
    calibrated: bool | None = None  # temperature-scaled probabilities (unknown through a URL)

    @property
    def failed(self) -> int:
        return sum(item.error is not None for item in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "model_version": self.model_version,
            "calibrated": self.calibrated,
            "predictions": [item.to_dict() for item in self.files],
            "failed": self.failed,
        }


def read_file(path: Path) -> bytes | FilePrediction:
    """The file's bytes, or its ``unreadable`` error."""
    try:
        return path.read_bytes()
    except OSError as exc:
        return FilePrediction(
            str(path), error="unreadable", detail=f"{type(exc).__name__}: {exc.strerror or exc}"
        )


def classify(model: ServingModel, data: bytes, limits: ImageLimits) -> dict[str, Any]:
    """One upload's answer from ``model``, decoded and checked as the service does; ``BadRequest`` if bad."""
    decoded = decode_upload(data, limits, model.prep)
    proba = model.infer(decoded.array[None]).proba[0]
    return model.answer(proba)


def predict_local(settings: Settings, files: Sequence[Path], version: str | None = None) -> Predictions:
    """Each file classified by ``version`` (default: the champion) run here."""
    version = version or champion_version(settings)
    limits = ImageLimits.from_settings(settings.ingest)
    answers = []
    with tempfile.TemporaryDirectory(prefix="mlops-predict-") as folder:
        model = load_version(settings, version, Path(folder) / "bundle")
        for path in files:
            data = read_file(path)
            if isinstance(data, FilePrediction):
                answers.append(data)
                continue
            try:
                answers.append(FilePrediction(str(path), classify(model, data, limits)))
            except BadRequest as exc:
                answers.append(FilePrediction(str(path), error=exc.code, detail=exc.message))
    return Predictions("local", model.version, answers, calibrated=model.meta.temperature is not None)


def post_file(
    url: str, key: str | None, path: Path, data: bytes, ca_file: str | None = None
) -> FilePrediction:
    """One file through the live service's ``/predict``."""
    body, content_type = multipart("image", [(path.name, data)])
    headers = {"Content-Type": content_type} | ({"Authorization": f"Bearer {key}"} if key else {})
    try:
        status, raw = http("POST", f"{url.rstrip('/')}/predict", body=body, headers=headers, ca_file=ca_file)
    except OSError as exc:
        return FilePrediction(str(path), error="unreachable", detail=f"{url}: {exc}")
    try:
        reply = json.loads(raw)
    except ValueError:
        reply = {"detail": raw[:200].decode("utf-8", "replace")}
    if status == 200 and isinstance(reply, dict):
        return FilePrediction(str(path), reply)
    reply = reply if isinstance(reply, dict) else {"detail": str(reply)}
    code = str(reply.get("error") or "http_error")
    return FilePrediction(str(path), error=code, detail=str(reply.get("detail", "")), status=status)


def predict_remote(
    url: str, files: Sequence[Path], key: str | None = None, ca_file: str | None = None
) -> Predictions:
    """Each file classified by the live service at ``url`` (``Authorization: Bearer key``)."""
    answers = []
    for path in files:
        data = read_file(path)
        answers.append(data if isinstance(data, FilePrediction) else post_file(url, key, path, data, ca_file))
    versions = {item.answer.get("model_version") for item in answers if item.error is None}
    version = versions.pop() if len(versions) == 1 else None  # a canary may answer some of them
    return Predictions(url, version, answers)
