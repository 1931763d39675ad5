"""Deploy and roll back the live endpoint by rewriting its deployment state.

The live endpoint is one long-running service that follows a deployment state file (stable
version, canary version and share, previous version). Writing the file is the switch: every
worker loads the new model completely before it routes a request to it (an in-service swap,
so no request fails during a deploy). ``canary`` stages a version on a share of traffic;
``full`` makes it the stable model and keeps the old one as ``previous`` for rollback.
``rollback`` goes back to the previous (or a named) version, champion alias included.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from ml import registry
from ml.alerts import Alert
from ml.config import Settings
from ml.http import http
from ml.release.audit import audit
from ml.release.build import build_bento, import_model
from ml.release.check import serving_check
from ml.release.errors import DeployError
from ml.release.service import state_path
from ml.serving.auth import api_keys
from ml.serving.state import DeploymentState, read_state, write_state
from ml.storage import Storage

LIVE_STREAK = 8  # consecutive /version answers that must agree before a deploy counts as live


@dataclass(frozen=True)
class DeployResult:
    """A deploy, withdrawal or rollback: the new state, its audit record, whether the endpoint follows."""

    state: DeploymentState
    audit: dict[str, Any]
    live: bool | None  # None: no endpoint runs; False: it did not switch in time

    def to_dict(self) -> dict[str, Any]:
        return {"state": asdict(self.state), "audit": self.audit, "live": self.live}

    def alert(self, who: str) -> Alert:
        """The warning a rollback sends: from, to, who and why."""
        entry = self.audit
        reason = f"v{entry['from']} -> v{entry['to']} by {who}: {entry['why']}"
        return Alert("model_rolled_back", "warning", reason, "rollback", "roll_back")


def _next_state(current: DeploymentState | None, version: str, stage: str, share: float) -> DeploymentState:
    if current is None or (stage == "full" and current.stable == version):
        return DeploymentState(stable=version, previous=current.previous if current else None)
    if stage == "canary":
        return replace(current, canary=version, canary_share=share)
    return DeploymentState(stable=version, previous=current.stable)


def deploy(
    settings: Settings, storage: Storage, version: str, *, stage: str, by: str, reason: str = ""
) -> DeployResult:
    """Stage ``version`` as the canary or make it the stable model; wait for a running endpoint to follow."""
    if stage not in ("canary", "full"):
        raise DeployError(f"stage must be canary or full, not {stage!r}")
    version = str(version)
    tag = import_model(settings, version)
    path = state_path(settings)
    current = read_state(path)
    new = _next_state(current, version, stage, settings.serving.canary_share)
    kept = {
        v: t
        for v, t in (current.models if current else {}).items()
        if v in (new.stable, new.canary, new.previous)
    }
    new = replace(
        new,
        updated_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        updated_by=by,
        reason=reason or f"{stage} deploy of v{version}",
        models=kept | {version: tag},
    )
    write_state(path, new)
    record = {
        "by": by,
        "from": current.stable if current else None,
        "to": version,
        "why": new.reason,
        "state": asdict(new),
    }
    entry = audit(storage, f"deploy-{stage}", record)
    return DeployResult(new, entry, wait_live(settings, new))


def withdraw_canary(settings: Settings, storage: Storage, version: str, *, by: str) -> str:
    """Take ``version`` off the canary (a challenger that was not approved); idempotent."""
    path = state_path(settings)
    current = read_state(path)
    if current is None or current.canary != str(version):
        return f"v{version} is not the canary"
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    new = replace(
        current, canary=None, canary_share=0.0, updated_at=now, updated_by=by, reason="canary withdrawn"
    )
    write_state(path, new)
    audit(
        storage,
        "withdraw-canary",
        {"by": by, "from": str(version), "to": current.stable, "why": "not approved"},
    )
    wait_live(settings, new)
    return f"v{version} withdrawn from the canary; v{current.stable} serves all traffic"


def withdraw_unapproved(settings: Settings, storage: Storage, version: str | None, *, by: str) -> str:
    """A staged challenger that did not become champion (rejected, failed) leaves the canary."""
    if not version or registry.version_for_alias(settings, registry.CHAMPION) == str(version):
        return "nothing to withdraw"
    return withdraw_canary(settings, storage, str(version), by=by)


def wait_live(settings: Settings, state: DeploymentState, timeout: float = 60) -> bool | None:
    """True once a running endpoint serves ``state``; None when none is running; False on timeout.

    Every worker process swaps on its own, so the answer must hold for ``LIVE_STREAK`` /version
    calls in a row (new connections land on any worker), spanning more than one poll interval.
    """
    url = settings.serving.live_url
    try:
        status, _ = http("GET", f"{url}/livez", timeout=2)
    except OSError:
        return None
    if status != 200:
        return None
    key = first_key()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    wanted = (state.stable, state.canary if state.canary_share > 0 else None)
    deadline, streak = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        try:
            status, body = http("GET", f"{url}/version", headers=headers, timeout=5)
            info = json.loads(body) if status == 200 else {}
        except (OSError, ValueError):
            info = {}
        streak = streak + 1 if (info.get("model_version"), info.get("canary_version")) == wanted else 0
        if streak >= LIVE_STREAK:
            return True
        time.sleep(0.2)
    return False


def first_key() -> str:
    keys = sorted(api_keys())
    return keys[0] if keys else ""


def rollback(
    settings: Settings, storage: Storage, *, to: str | None = None, by: str, reason: str
) -> DeployResult:
    """Serve the previous (or named) version again, make it the champion, and record who, when and why."""
    path = state_path(settings)
    current = read_state(path)
    if current is None:
        raise DeployError(f"nothing is deployed (no {path}); nothing to roll back")
    target = str(to) if to else current.previous
    if not target:
        raise DeployError(f"v{current.stable} has no previous version recorded; name one with --to")
    if target == current.stable and not current.canary:
        raise DeployError(f"v{target} is already the live model")
    tag = import_model(settings, target)
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    models = {current.stable: current.tag(current.stable), target: tag}
    new = DeploymentState(
        models=models,
        stable=target,
        previous=current.stable,
        updated_at=now,
        updated_by=by,
        reason=f"rollback: {reason}",
    )
    write_state(path, new)
    mlflow_client = registry.client(settings)
    name = settings.mlflow.registered_model
    if registry.version_for_alias(settings, registry.CHAMPION) != target:
        registry.promote(settings, storage, target, by, note=f"rollback from v{current.stable}: {reason}")
    for version in {current.stable, current.canary} - {None, target}:
        mlflow_client.set_model_version_tag(name, str(version), "rolled_back", f"{now} by {by}: {reason}")
    entry = audit(
        storage,
        "rollback",
        {"by": by, "from": current.stable, "canary_dropped": current.canary, "to": target, "why": reason},
    )
    return DeployResult(new, entry, wait_live(settings, new))


def ensure_state(settings: Settings, storage: Storage) -> DeploymentState:
    """The deployment state, created from the champion when nothing was deployed yet."""
    current = read_state(state_path(settings))
    if current is not None:
        return current
    champion = registry.version_for_alias(settings, registry.CHAMPION)
    if champion is None:
        raise DeployError("no champion model yet: train and promote one first (retrain DAG or `mlops train`)")
    deploy(settings, storage, champion, stage="full", by="mlops serve", reason="first deploy of the champion")
    state = read_state(state_path(settings))
    assert state is not None
    return state


def release(
    settings: Settings,
    storage: Storage,
    version: str,
    *,
    stage: str,
    by: str,
    check: bool = True,
    reason: str = "",
) -> dict[str, Any]:
    """Build the bento, run the serving check (unless skipped), deploy. A failed check deploys nothing."""
    bento_tag = build_bento(settings, version)
    result: dict[str, Any] = {"model_version": str(version), "bento_tag": bento_tag}
    if check:
        outcome = serving_check(settings, storage, version, bento_tag)
        result["check"] = outcome.to_dict()
        if not outcome.passed:
            raise DeployError(
                f"serving check of v{version} ({bento_tag}) failed: {'; '.join(outcome.reasons)}"
            )
    return result | deploy(settings, storage, version, stage=stage, by=by, reason=reason).to_dict()
