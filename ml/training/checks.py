"""One validation check: what the gate records for it (name, value, threshold, verdict, sentence)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ml.training.evaluate import GateDecision, Metric


@dataclass(frozen=True)
class Check:
    name: str
    value: float | None
    threshold: float | None
    passed: bool
    detail: str

    def add_to(self, decision: GateDecision) -> None:
        decision.add_check(self.name, self.value, self.threshold, self.passed, self.detail)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ci_text(metric: Metric, digits: int = 3) -> str:
    """``0.912 [0.850, 0.960]``."""
    return f"{metric.value:.{digits}f} [{metric.low:.{digits}f}, {metric.high:.{digits}f}]"
