"""The deployment state: which model versions every replica serves (written by release).

It lives in storage (``serving/state.json`` under ``storage.root``), so any number of replicas on
any hosts follow it: each polls it and hot-swaps. Every change goes through ``update_state``:
compare-and-swap (a conditional PUT on S3, a file lock locally), so a deploy, a rollback and the
monitor acting at once cannot lose each other's update; ``revision`` counts the changes and
``history`` keeps every stable version in the order it went live.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ml.layout import SERVING_STATE_KEY
from ml.storage import Storage, update_json

HISTORY_KEPT = 50


@dataclass(frozen=True)
class DeploymentState:
    """Which model versions the endpoint serves. Written by deploy/rollback, read by every replica."""

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
    shadow: str | None = None  # a version that sees a copy of live traffic; its answers are only logged

    def tag(self, version: str) -> str:
        return self.models.get(version, version)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DeploymentState:
        return cls(**{key: raw[key] for key in cls.__dataclass_fields__ if key in raw})

    @classmethod
    def from_json(cls, text: str | bytes) -> DeploymentState:
        return cls.from_dict(json.loads(text))


def read_state(storage: Storage) -> DeploymentState | None:
    found = storage.read_tagged(SERVING_STATE_KEY)
    return DeploymentState.from_json(found[0]) if found else None


def read_state_tagged(storage: Storage) -> tuple[DeploymentState, str] | None:
    """The state and its storage tag (a replica polls the tag and re-reads only when it changed)."""
    found = storage.read_tagged(SERVING_STATE_KEY)
    return (DeploymentState.from_json(found[0]), found[1]) if found else None


def _with_history(new: DeploymentState, current: DeploymentState | None) -> DeploymentState:
    history = list(current.history) if current else []
    if not history or history[-1] != new.stable:
        history.append(new.stable)
    return replace(new, revision=(current.revision if current else 0) + 1, history=history[-HISTORY_KEPT:])


def update_state(
    storage: Storage, change: Callable[[DeploymentState | None], DeploymentState]
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

    new = DeploymentState.from_dict(update_json(storage, SERVING_STATE_KEY, apply))
    return seen[-1], new


def write_state(storage: Storage, state: DeploymentState) -> None:
    """Replace the state as given, whatever was there (atomic: a polling replica never reads half)."""
    storage.write_bytes(SERVING_STATE_KEY, state.to_json().encode())
