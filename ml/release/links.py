"""Links the promotion approval form shows a reviewer: the MLflow run, its model card, the drift report.

Each is a URL a browser opens (the MLflow UI; a presigned S3 link or the stack's report server),
not the storage or artifact URI that machines use (those stay in the result).
"""

from __future__ import annotations

import logging
from typing import Any

from ml import registry
from ml.alerts import mlflow_run_url
from ml.config import Settings
from ml.storage import Storage, browsable_link
from ml.training.card import MODEL_CARD_MD

log = logging.getLogger(__name__)


def model_card_url(run_url: str) -> str:
    """The run page with the model card open in its artifact view."""
    return f"{run_url}/artifactPath/{MODEL_CARD_MD}"


def approval_links(
    settings: Settings, storage: Storage, result: dict[str, Any], drift_report: str = ""
) -> dict[str, str]:
    """Name -> URL for the approval form; a part that cannot be linked is left out, never raised."""
    links: dict[str, str] = {}
    run_id = str(result.get("run_id") or "")
    if run_id:
        try:
            experiment_id = registry.ensure_experiment(settings)
        except Exception as exc:  # noqa: BLE001 - the form still works without the experiment in the link
            log.warning("no experiment id for the run link: %s", exc)
            experiment_id = ""
        links["MLflow run"] = mlflow_run_url(settings, run_id, experiment_id)
        if (result.get("validation") or {}).get("model_card") and experiment_id:
            links["model card"] = model_card_url(links["MLflow run"])
    if drift_report:
        links["drift report"] = browsable_link(storage, drift_report, settings)
    return links
