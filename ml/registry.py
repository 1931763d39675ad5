"""The MLflow model registry with aliases: ``challenger`` (gated), ``champion`` (production).

Registry stages are deprecated in MLflow; aliases and tags carry the state. Every promotion is
recorded twice: as tags on the model version (who, when, note) and as an append-only audit
record in storage (``registry/audit/``), so the history of champions survives for rollback.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ml.config import REPO_ROOT, Settings
from ml.layout import REGISTRY_AUDIT_PREFIX
from ml.storage import Storage

CHAMPION = "champion"
CHALLENGER = "challenger"


class RegistryError(RuntimeError):
    """The registry could not answer (MLflow down or failing): an error, never "no such model"."""


def tracking_uri(settings: Settings) -> str:
    """The configured tracking URI, else a SQLite store under .data/mlflow (registry included)."""
    if settings.mlflow.tracking_uri:
        return settings.mlflow.tracking_uri
    folder = REPO_ROOT / ".data" / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def artifact_location(settings: Settings) -> str | None:
    """Artifacts beside a SQLite tracking store (never the working directory); None lets a server decide."""
    uri = tracking_uri(settings)
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    return None


def client(settings: Settings) -> Any:
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(settings)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(settings: Settings, name: str | None = None) -> str:
    """The id of experiment ``name`` (default ``mlflow.experiment_name``), created when missing."""
    name = name or settings.mlflow.experiment_name
    mlflow_client = client(settings)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    return str(mlflow_client.create_experiment(name, artifact_location=artifact_location(settings)))


def is_not_found(exc: Exception) -> bool:
    """An MLflow answer that the model or alias does not exist (as opposed to a failure to answer)."""
    code = getattr(exc, "error_code", "")
    missing_alias = code == "INVALID_PARAMETER_VALUE" and "not found" in str(exc)
    return code == "RESOURCE_DOES_NOT_EXIST" or missing_alias


def version_for_alias(settings: Settings, alias: str) -> str | None:
    """The model version behind ``alias``; None only when the registry says there is none.

    Any other MLflow error raises ``RegistryError``: a registry that cannot answer must not look
    like "no champion" (the gate would then register a challenger it never compared).
    """
    from mlflow.exceptions import MlflowException

    try:
        return str(
            client(settings).get_model_version_by_alias(settings.mlflow.registered_model, alias).version
        )
    except MlflowException as exc:
        if is_not_found(exc):
            return None
        raise RegistryError(
            f"the MLflow registry ({tracking_uri(settings)}) could not say which version is {alias!r}: {exc}"
        ) from exc


@dataclass(frozen=True)
class Approval:
    model: str
    version: str
    previous_champion: str | None
    approved_by: str
    approved_at: str
    note: str


def version_classes(settings: Settings, version: str) -> list[str]:
    """The class names a registered version answers in, in its output order (its run's ``classes``
    param; a version logged without one answers in the configured order)."""
    mlflow_client = client(settings)
    run_id = mlflow_client.get_model_version(settings.mlflow.registered_model, str(version)).run_id
    logged = mlflow_client.get_run(run_id).data.params.get("classes")
    return logged.split(",") if logged else list(settings.classes)


def promote(settings: Settings, storage: Storage, version: str, approved_by: str, note: str = "") -> Approval:
    """Make ``version`` the champion; record who approved it, when and why."""
    mlflow_client = client(settings)
    name = settings.mlflow.registered_model
    mlflow_client.get_model_version(name, version)  # raises with a clear message if it does not exist
    now = dt.datetime.now(dt.UTC)
    approval = Approval(
        model=name,
        version=str(version),
        previous_champion=version_for_alias(settings, CHAMPION),
        approved_by=approved_by,
        approved_at=now.isoformat(timespec="seconds"),
        note=note,
    )
    for key, value in {
        "approved_by": approved_by,
        "approved_at": approval.approved_at,
        "approval_note": note,
    }.items():
        mlflow_client.set_model_version_tag(name, str(version), key, value)
    stamp = now.strftime("%Y%m%dT%H%M%S%fZ")  # sortable, unique per promotion
    record = f"{REGISTRY_AUDIT_PREFIX}/{stamp}-v{version}.json"
    storage.write_bytes(record, json.dumps(asdict(approval), indent=2, sort_keys=True).encode())
    # the alias moves last, and a record it did not follow is taken back: a retry after a failure
    # between the two read the moved alias and recorded the version as its own previous champion
    try:
        mlflow_client.set_registered_model_alias(name, CHAMPION, str(version))
    except Exception:
        with contextlib.suppress(Exception):
            storage.delete(record)
        raise
    return approval


def audit_log(storage: Storage) -> list[dict[str, Any]]:
    """Every recorded promotion, oldest first."""
    return [json.loads(storage.read_bytes(key)) for key in storage.list(REGISTRY_AUDIT_PREFIX)]
