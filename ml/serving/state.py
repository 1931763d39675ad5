"""The deployment state: which model versions the live endpoint serves (written by release).

Every change goes through ``update_state``: compare-and-swap on the file (a lock, a tag check,
an atomic rename), so a deploy, a rollback and the monitor acting at once cannot lose each
other's update; ``revision`` counts the changes and ``history`` keeps every stable version in
the order it went live.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ml.storage import LocalStorage, update_json

HISTORY_KEPT = 50


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
    revision: int = 0  # one more on every change
    history: list[str] = field(default_factory=list)  # stable versions in the order they went live

    def tag(self, version: str) -> str:
        return self.models.get(version, version)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DeploymentState:
        return cls(**{key: raw[key] for key in cls.__dataclass_fields__ if key in raw})

    @classmethod
    def from_json(cls, text: str) -> DeploymentState:
        return cls.from_dict(json.loads(text))


def read_state(path: Path) -> DeploymentState | None:
    try:
        return DeploymentState.from_json(path.read_text())
    except FileNotFoundError:
        return None


def _with_history(new: DeploymentState, current: DeploymentState | None) -> DeploymentState:
    history = list(current.history) if current else []
    if not history or history[-1] != new.stable:
        history.append(new.stable)
    return replace(new, revision=(current.revision if current else 0) + 1, history=history[-HISTORY_KEPT:])


def update_state(
    path: Path, change: Callable[[DeploymentState | None], DeploymentState]
) -> tuple[DeploymentState | None, DeploymentState]:
    """Apply ``change`` to the current state compare-and-swap; (the state it replaced, the new state).

    ``change`` may run more than once (each time on the state another writer just left) and may
    raise to refuse the change.
    """
    seen: list[DeploymentState | None] = []

    def apply(raw: dict[str, Any] | None) -> dict[str, Any]:
        current = DeploymentState.from_dict(raw) if raw else None
        seen.append(current)
        return asdict(_with_history(change(current), current))

    folder = LocalStorage(path.parent)
    new = DeploymentState.from_dict(update_json(folder, path.name, apply))
    return seen[-1], new


def write_state(path: Path, state: DeploymentState) -> None:
    """Replace the state as given, whatever was there (atomic: a polling service never reads half)."""
    LocalStorage(path.parent).write_bytes(path.name, state.to_json().encode())
