"""Lineage: which model answered a request, what that model was trained on, where an image came from.

Three kinds of id, each walked read-only through what the pipeline already records:

- a request id: its prediction record (``serving/predictions/DAY/*.jsonl``) -> the model version ->
  its MLflow run -> the dataset version (the version's ``dataset_version`` tag, else the run's
  param) -> the days and their landing folders; plus the logged request image's sha256, the catalog
  rows of that image if it was landed later, and the feedback label bound to the request;
- ``vN``: the registered version's run, dataset version, days and images per split;
- an image sha256 (curated, or as landed: ``source_sha256``): its catalog rows (day, label, split,
  curated and landed keys) -> every registered version whose dataset version holds it.

An image erased by ``mlops forget`` is no longer in the catalog: asking for it names the erasure.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

import pandas as pd

from ml import registry
from ml.config import Settings
from ml.data import catalog
from ml.layout import (
    FEEDBACK_PREFIX,
    PREDICTIONS_PREFIX,
    DayLayout,
    feedback_claim_key,
    request_image_key,
)
from ml.storage import Storage, StorageError, read_jsonl

SHA256 = re.compile(r"[0-9a-f]{64}")
MODEL_VERSION = re.compile(r"v(\d+)")
REQUEST_ID = re.compile(r"[0-9a-f]+-[0-9a-f]+-[A-Za-z0-9]+-[0-9a-f]+")  # nonce-version hex-key id-mac


class UnknownId(ValueError):
    """No prediction, registered model version or catalog image has this id."""


class IdKind(StrEnum):
    REQUEST = "request"
    MODEL_VERSION = "model_version"
    IMAGE = "image"


class Evidence(StrEnum):
    VERIFIED = "verified"  # the version lists the image's day with the current partition bytes, which hold it
    PARTITION_REWRITTEN = "partition_rewritten"  # it lists that day in bytes rewritten since: it may hold it


def classify(identifier: str) -> IdKind:
    """Which kind of id this is; ValueError when it is none of them."""
    if SHA256.fullmatch(identifier):
        return IdKind.IMAGE
    if MODEL_VERSION.fullmatch(identifier):
        return IdKind.MODEL_VERSION
    if REQUEST_ID.fullmatch(identifier):
        return IdKind.REQUEST
    raise ValueError(f"{identifier!r} is not a request id, a model version (vN) or an image sha256")


@dataclass(frozen=True)
class DatasetLineage:
    """A dataset version as its document records it, and whether its partitions still match."""

    version: str
    days: tuple[str, ...]
    landing: tuple[str, ...]  # the landing folder of each day (``landing/YYYY-MM-DD``)
    rows: int
    per_split: dict[str, int]
    intact: bool  # every partition still has the sha256 the version recorded (its rows can be read)


@dataclass(frozen=True)
class ModelLineage:
    """A registered model version, the MLflow run that made it, and its dataset version."""

    model_version: str
    run_id: str
    aliases: tuple[str, ...]
    params: dict[str, str]
    dataset_version: str
    dataset: DatasetLineage | None  # None when the catalog has no version with that id


@dataclass(frozen=True)
class ImageLineage:
    """One catalog row: where an image is kept and the landed object it came from."""

    sha256: str
    source_sha256: str
    day: str
    label: str
    split: str
    curated_key: str
    source_key: str
    curated_present: bool
    landed_present: bool


@dataclass(frozen=True)
class ModelUse:
    """A registered version whose dataset version holds an image (in any split)."""

    model_version: str
    dataset_version: str
    evidence: Evidence


@dataclass(frozen=True)
class PredictionLineage:
    """A logged prediction, its request image (when logged) and the label fed back for it."""

    request_id: str
    time: str
    model_version: str
    track: str
    predicted_class: str | None
    confidence: float | None
    status: int
    log_key: str
    image_key: str | None
    image_sha256: str | None
    feedback_label: str | None
    feedback_time: str | None


@dataclass(frozen=True)
class Lineage:
    """What one id leads to; the parts that do not apply to its kind are empty."""

    query: str
    kind: IdKind
    prediction: PredictionLineage | None = None
    model: ModelLineage | None = None
    images: tuple[ImageLineage, ...] = ()
    models: tuple[ModelUse, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def summary(self) -> dict[str, str]:
        """Short lines for a terminal."""
        lines = {"query": f"{self.query} ({self.kind})"}
        if self.prediction is not None:
            lines.update(_prediction_lines(self.prediction))
        if self.model is not None:
            lines.update(_model_lines(self.model))
        for n, image in enumerate(self.images, 1):
            lines[f"image {n}"] = (
                f"{image.sha256} {image.label}/{image.split} on {image.day}; "
                f"curated {image.curated_key}; landed as {image.source_key}"
            )
        if self.kind == IdKind.IMAGE:
            uses = ", ".join(f"v{use.model_version} ({use.evidence})" for use in self.models)
            lines["models"] = uses or "none"
        return lines


def _prediction_lines(prediction: PredictionLineage) -> dict[str, str]:
    answer = f"{prediction.predicted_class} {prediction.confidence}" if prediction.status < 500 else "error"
    return {
        "answered": f"v{prediction.model_version} ({prediction.track}) at {prediction.time}: {answer}",
        "request_image": prediction.image_sha256 or "not logged",
        "feedback": prediction.feedback_label or "none",
    }


def _model_lines(model: ModelLineage) -> dict[str, str]:
    lines = {"model": f"v{model.model_version} {', '.join(model.aliases)}".strip(), "run": model.run_id}
    lines["dataset_version"] = model.dataset_version or "not recorded"
    if model.dataset is not None:
        days = model.dataset.days
        lines["days"] = (
            f"{days[0]} .. {days[-1]} ({len(days)} day{'s' * (len(days) != 1)})" if days else "none"
        )
        counts = model.dataset.per_split
        lines["images_per_split"] = " ".join(f"{split}={counts.get(split, 0)}" for split in catalog.SPLITS)
        lines["intact"] = "yes" if model.dataset.intact else "no: a partition was rewritten since"
    return lines


# -- datasets and models ---------------------------------------------------------------------------
def dataset_lineage(storage: Storage, version_id: str) -> DatasetLineage | None:
    """A dataset version's days, counts and integrity (None when no version has this id)."""
    try:
        version = catalog.read_version_id(storage, version_id)
    except catalog.UnknownDatasetVersion:
        return None
    days = tuple(part["day"] for part in version["partitions"])
    intact = all(
        catalog.partition_sha256(storage, dt.date.fromisoformat(part["day"])) == part["sha256"]
        for part in version["partitions"]
    )
    return DatasetLineage(
        version=version["version"],
        days=days,
        landing=tuple(DayLayout(dt.date.fromisoformat(day)).landing for day in days),
        rows=int(version["rows"]),
        per_split={str(k): int(v) for k, v in version["per_split"].items()},
        intact=intact,
    )


def _registry_call(settings: Settings, what: str, call: Any, *args: Any) -> Any:
    """An MLflow client call: "not found" becomes ``UnknownId``, any other failure ``RegistryError``."""
    from mlflow.exceptions import MlflowException

    try:
        return call(*args)
    except MlflowException as exc:
        if registry.is_not_found(exc):
            raise UnknownId(f"{what} is not in the registry ({registry.tracking_uri(settings)})") from None
        raise registry.RegistryError(f"the MLflow registry could not answer for {what}: {exc}") from exc


def _dataset_of(settings: Settings, model_version: Any) -> str:
    """The dataset version a registered version was trained on: its tag, else its run's param."""
    if model_version.tags.get("dataset_version"):
        return str(model_version.tags["dataset_version"])
    return _run_params(settings, model_version.run_id).get("dataset_version", "")


def _run_params(settings: Settings, run_id: str | None) -> dict[str, str]:
    """A run's params (none when the version names no run, or its run was deleted)."""
    if not run_id:
        return {}
    try:
        run = _registry_call(settings, f"run {run_id}", registry.client(settings).get_run, run_id)
    except UnknownId:
        return {}
    return {str(k): str(v) for k, v in run.data.params.items()}


def model_lineage(settings: Settings, storage: Storage, version: str) -> ModelLineage:
    """A registered version -> its run -> its dataset version and days."""
    client = registry.client(settings)
    name = settings.mlflow.registered_model
    found = _registry_call(
        settings, f"model version v{version} of {name}", client.get_model_version, name, version
    )
    params = _run_params(settings, found.run_id)
    dataset_version = str(found.tags.get("dataset_version") or params.get("dataset_version", ""))
    return ModelLineage(
        model_version=str(found.version),
        run_id=str(found.run_id or ""),
        aliases=tuple(sorted(getattr(found, "aliases", []) or [])),
        params=params,
        dataset_version=dataset_version,
        dataset=dataset_lineage(storage, dataset_version) if dataset_version else None,
    )


def registered_versions(settings: Settings) -> list[Any]:
    """Every version of the registered model, oldest first (none when it was never registered)."""
    name = settings.mlflow.registered_model
    client = registry.client(settings)
    found = _registry_call(settings, f"model {name}", client.search_model_versions, f"name='{name}'")
    return sorted(found, key=lambda version: int(version.version))


def models_holding(
    settings: Settings, storage: Storage, images: Sequence[ImageLineage]
) -> tuple[ModelUse, ...]:
    """Every registered version whose dataset version lists the day partition these images are in."""
    current = {
        image.day: catalog.partition_sha256(storage, dt.date.fromisoformat(image.day)) for image in images
    }
    uses = []
    for version in registered_versions(settings):
        dataset_version = _dataset_of(settings, version)
        try:
            listed = (
                catalog.read_version_id(storage, dataset_version)["partitions"] if dataset_version else []
            )
        except catalog.UnknownDatasetVersion:
            continue
        held = {part["day"]: part["sha256"] for part in listed}
        matches = [held[day] == digest for day, digest in current.items() if day in held]
        if matches:
            evidence = Evidence.VERIFIED if any(matches) else Evidence.PARTITION_REWRITTEN
            uses.append(ModelUse(str(version.version), dataset_version, evidence))
    return tuple(uses)


# -- images ----------------------------------------------------------------------------------------
def image_lineage(storage: Storage, rows: pd.DataFrame) -> tuple[ImageLineage, ...]:
    """Catalog rows as lineage records, with whether their curated and landed objects still exist."""
    return tuple(
        ImageLineage(
            sha256=str(row.sha256),
            source_sha256=str(row.source_sha256),
            day=str(row.day)[:10],
            label=str(row.label),
            split=str(row.split),
            curated_key=str(row.curated_key),
            source_key=str(row.source_key),
            curated_present=storage.exists(str(row.curated_key)),
            landed_present=bool(row.source_key) and storage.exists(str(row.source_key)),
        )
        for row in rows.itertuples(index=False)
    )


def _erased(storage: Storage, sha256: str) -> dict[str, Any] | None:
    for record in reversed(catalog.erasure_records(storage)):
        if sha256 == record.get("sha256") or sha256 in record.get("source_sha256", []):
            return record
    return None


def unknown_image(storage: Storage, sha256: str) -> UnknownId:
    """The error for an image the catalog does not hold, naming its erasure if it was erased."""
    record = _erased(storage, sha256)
    if record is None:
        return UnknownId(f"no catalog image has sha256 or source_sha256 {sha256}")
    models = ", ".join(f"v{use['model_version']}" for use in record.get("models", [])) or "none"
    return UnknownId(
        f"image {sha256} was erased at {record['erased_at']} by {record['erased_by']} "
        f"({record['reason']}); registered versions trained with it: {models}"
    )


# -- requests --------------------------------------------------------------------------------------
def _log_days(storage: Storage, prefix: str) -> list[str]:
    """The day folders of a JSONL log, newest first."""
    return sorted(
        {key.removeprefix(prefix + "/").split("/", 1)[0] for key in storage.list(prefix)}, reverse=True
    )


def find_prediction(
    storage: Storage, request_id: str, day: dt.date | None = None
) -> tuple[dict[str, Any], str] | None:
    """The prediction record of ``request_id`` and the log object it is in (one day, else every day)."""
    days = [day.isoformat()] if day else _log_days(storage, PREDICTIONS_PREFIX)
    for folder in days:
        for key in storage.list(f"{PREDICTIONS_PREFIX}/{folder}"):
            for line in storage.read_bytes(key).decode().splitlines():
                if request_id in line and (record := json.loads(line)).get("request_id") == request_id:
                    return record, key
    return None


def find_feedback(storage: Storage, request_id: str, since: str) -> dict[str, Any] | None:
    """The label bound to a request: its claim object, else the feedback log from ``since`` (a day) on."""
    try:
        claim = json.loads(storage.read_bytes(feedback_claim_key(request_id.split("-", 1)[0])))
        if claim.get("request_id") == request_id:
            return claim
    except StorageError:
        pass
    days = [day for day in _log_days(storage, FEEDBACK_PREFIX) if day >= since]
    found = [
        record
        for record in read_jsonl(storage, FEEDBACK_PREFIX, days)
        if record.get("request_id") == request_id
    ]
    return found[0] if found else None


def _request_image(storage: Storage, record: dict[str, Any]) -> tuple[str | None, str | None]:
    key = record.get("image_key") or request_image_key(record["time"][:10], record["request_id"])
    try:
        return key, hashlib.sha256(storage.read_bytes(key)).hexdigest()
    except StorageError:
        return None, None


def prediction_lineage(storage: Storage, request_id: str, day: dt.date | None = None) -> PredictionLineage:
    """The logged prediction of a request, its request image's sha256 and its bound feedback."""
    found = find_prediction(storage, request_id, day)
    if found is None:
        where = f"{PREDICTIONS_PREFIX}/{day.isoformat()}" if day else PREDICTIONS_PREFIX
        raise UnknownId(f"no prediction with request id {request_id} in {storage.url(where)}")
    record, key = found
    image_key, image_sha256 = _request_image(storage, record)
    feedback = find_feedback(storage, request_id, record["time"][:10]) or {}
    return PredictionLineage(
        request_id=request_id,
        time=str(record["time"]),
        model_version=str(record["model_version"]),
        track=str(record.get("track", "")),
        predicted_class=record.get("predicted_class"),
        confidence=record.get("confidence"),
        status=int(record.get("status", 200)),
        log_key=key,
        image_key=image_key,
        image_sha256=image_sha256,
        feedback_label=feedback.get("label"),
        feedback_time=feedback.get("time"),
    )


# -- the entry point -------------------------------------------------------------------------------
def lineage(settings: Settings, storage: Storage, identifier: str, day: dt.date | None = None) -> Lineage:
    """Trace a request id, a model version (``vN``) or an image sha256; ``UnknownId`` when nothing has it."""
    identifier = identifier.strip()
    kind = classify(identifier)
    if kind == IdKind.MODEL_VERSION:
        version = identifier.removeprefix("v")
        return Lineage(identifier, kind, model=model_lineage(settings, storage, version))
    if kind == IdKind.IMAGE:
        images = image_lineage(storage, catalog.image_rows(storage, identifier))
        if not images:
            raise unknown_image(storage, identifier)
        return Lineage(identifier, kind, images=images, models=models_holding(settings, storage, images))
    prediction = prediction_lineage(storage, identifier, day)
    model: ModelLineage | None = None  # stays None for a version the registry does not hold (a local bundle)
    if prediction.model_version.isdigit():
        with contextlib.suppress(UnknownId):
            model = model_lineage(settings, storage, prediction.model_version)
    logged = prediction.image_sha256
    images = image_lineage(storage, catalog.image_rows(storage, logged)) if logged else ()
    return Lineage(identifier, kind, prediction=prediction, model=model, images=images)
