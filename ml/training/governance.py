"""Who approves a promotion: a human whenever what the model is, or what it learned from, changed.

The spec's ``human_approval_required`` names model architecture changes and data source
modifications: a challenger whose architecture, backbone weights or preprocessing differ from the
champion's (numeric precision included: an INT8 backbone computes other features), or that was
trained after a change of classes or of the storage root, goes to a human even when
``mlflow.auto_approve`` is on. The lineage is read from each MLflow run's params.
Standard library only: the retrain DAG's route task calls ``approval_decision``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

LINEAGE = {  # MLflow param -> what a reviewer reads
    "architecture": "architecture",
    "backbone_weights": "backbone weights",
    "preprocessing": "preprocessing",
    "precision": "precision",
    "classes": "classes",
    "storage_root": "storage root",
}
LINEAGE_DEFAULTS = {"precision": "fp32"}  # what a run recorded before the param existed was
APPROVE, PROMOTE = "approve", "promote"  # the retrain DAG's tasks: a human's answer, or straight on


def lineage_changes(challenger: Mapping[str, str], champion: Mapping[str, str] | None) -> list[str]:
    """What differs between the two runs' lineage (nothing without a champion)."""
    if champion is None:
        return []
    changes = []
    for key, what in LINEAGE.items():
        new, old = (run.get(key, LINEAGE_DEFAULTS.get(key)) for run in (challenger, champion))
        if old is None:
            changes.append(f"{what}: not recorded for the champion (challenger: {new})")
        elif new != old:
            changes.append(f"{what} changed: {old} -> {new}")
    return changes


@dataclass(frozen=True)
class ApprovalDecision:
    human_required: bool
    route: str  # APPROVE or PROMOTE
    reason: str
    changes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def approval_decision(auto_approve: bool, changes: Sequence[str]) -> ApprovalDecision:
    """A human approves unless the config auto-approves and nothing in the lineage changed."""
    if changes:
        overruled = " (mlflow.auto_approve is on, but this needs a person)" if auto_approve else ""
        return ApprovalDecision(
            True, APPROVE, "a human must approve: " + "; ".join(changes) + overruled, [*changes]
        )
    if auto_approve:
        reason = "auto-approved (mlflow.auto_approve): no lineage change that needs a human"
        return ApprovalDecision(False, PROMOTE, reason, [])
    return ApprovalDecision(
        True, APPROVE, "a human approves every promotion (mlflow.auto_approve is off)", []
    )
