"""``mlops validate [VERSION]``: a registered version's model validation on the current dataset.

The version's head (``model_meta/head.pt``, loaded with ``weights_only``) on the configured
backbone (its weights must be the ones the version was trained with), the current dataset
version's features from the cache, the same report and checks a retrain gates on, paired with
the champion when the version is not the champion. Nothing is logged: the report is the answer.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ml import registry
from ml.config import Settings
from ml.data.catalog import dataset_rows
from ml.storage import Storage
from ml.training.governance import LINEAGE, approval_decision, lineage_changes
from ml.training.pipeline import snapshot
from ml.training.quantize import precision_name
from ml.training.train import split_data
from ml.training.validate import (
    candidate_from_training,
    champion_of,
    validate_model,
    version_head,
    version_params,
)


def resolve_version(settings: Settings, version: str | None) -> str:
    """The given version, else the challenger, else the champion."""
    found = (
        version
        or registry.version_for_alias(settings, registry.CHALLENGER)
        or registry.version_for_alias(settings, registry.CHAMPION)
    )
    if not found:
        raise ValueError(f"no registered version of {settings.mlflow.registered_model} to validate")
    return str(found)


def validate_version(settings: Settings, storage: Storage, version: str | None = None) -> dict[str, Any]:
    """The validation report of a registered version on the current dataset's splits."""
    version = resolve_version(settings, version)
    params = version_params(settings, version) or {}
    dataset, rows = dataset_rows(storage)
    snap = snapshot(settings, storage, dataset, rows)
    if params.get("backbone_weights", snap.backbone.weights_id) != snap.backbone.weights_id:
        raise ValueError(
            f"v{version} was trained on backbone weights {params['backbone_weights']}; the config builds "
            f"{snap.backbone.weights_id}"
        )
    trained_in, configured = params.get("precision", "fp32"), precision_name(settings.model.precision)
    if trained_in != configured:
        raise ValueError(f"v{version} was trained in precision {trained_in}; the config uses {configured}")
    data = split_data(rows, snap.features, list(settings.classes))
    champion = registry.version_for_alias(settings, registry.CHAMPION)
    against = champion if champion and champion != version else None
    with tempfile.TemporaryDirectory() as folder:
        head = version_head(settings, version, Path(folder))
        candidate = candidate_from_training(settings, storage, rows, snap.backbone, data, head)
        report, _ = validate_model(
            settings, candidate, champion_of(settings, against, Path(folder), snap.backbone)
        )
    lineage = {key: params[key] for key in LINEAGE if key in params}
    approval = approval_decision(
        settings.mlflow.auto_approve, lineage_changes(lineage, version_params(settings, against))
    )
    return {
        "model_version": version,
        "dataset_version": dataset["version"],
        "compared_with": against,
        "passed": report.passed,
        "failed_checks": [check.name for check in report.checks if not check.passed],
        "headline": report.headline(),
        "approval": approval.to_dict(),
        "report": report.to_dict(),
    }
