"""The deployment state: which model versions the live endpoint serves (written by release)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class DeploymentState:
    """Which model versions the live endpoint serves. Written by deploy/rollback, read by the service."""

    stable: str
    canary: str | None = None
    canary_share: float = 0.0
    previous: str | None = None
    updated_at: str = ""
    updated_by: str = ""
    reason: str = ""
    models: dict[str, str] = field(default_factory=dict)  # version -> model-store tag of its bundle

    def tag(self, version: str) -> str:
        return self.models.get(version, version)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DeploymentState:
        raw = json.loads(text)
        return cls(**{key: raw[key] for key in cls.__dataclass_fields__ if key in raw})


def read_state(path: Path) -> DeploymentState | None:
    try:
        return DeploymentState.from_json(path.read_text())
    except FileNotFoundError:
        return None


def write_state(path: Path, state: DeploymentState) -> None:
    """Atomic replace: a service polling the file never reads half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(state.to_json())
    os.replace(tmp, path)
