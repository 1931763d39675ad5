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
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from ml import registry
from ml.alerts import Alert
from ml.config import Settings
from ml.release.audit import audit
from ml.release.build import build_bento, import_model
from ml.release.check import serving_check
from ml.release.errors import DeployError
from ml.serving.replica import Heartbeat, live_heartbeats, read_heartbeats
from ml.serving.state import DeploymentState, read_state, update_state
from ml.storage import Storage


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


STAGES = ("canary", "full", "shadow")


def _next_state(current: DeploymentState | None, version: str, stage: str, share: float) -> DeploymentState:
    if stage == "shadow":
        if current is None:
            raise DeployError("nothing is deployed yet: a shadow needs a stable model to copy traffic from")
        return replace(current, shadow=version)
    if current is None or (stage == "full" and current.stable == version):
        return DeploymentState(stable=version, previous=current.previous if current else None)
    if stage == "canary":
        if current.stable == version:  # it would take its share from itself: no A/B evidence, then "promoted"
            raise DeployError(f"v{version} is the stable model already: a canary must be another version")
        return replace(current, canary=version, canary_share=share)
    return replace(current, stable=version, previous=current.stable, canary=None, canary_share=0.0)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def require_live(settings: Settings, storage: Storage, state: DeploymentState, what: str) -> bool | None:
    """Wait for every live replica to serve ``state``; ``DeployError`` naming the ones that did not.

    None when no replica runs (the state waits for the first ``mlops serve``).
    """
    laggards = wait_replicas(settings, storage, state)
    if laggards is None or not laggards:
        return None if laggards is None else True
    described = "; ".join(
        f"{beat.replica}-w{beat.worker} at {beat.url} serves v{beat.stable} (revision {beat.revision}"
        f"{f', cannot load: incident {beat.load_error}' if beat.load_error else ''})"
        for beat in laggards
    )
    raise DeployError(
        f"{what}: the deployment state says stable v{state.stable}"
        f"{f' + canary v{state.canary}' if state.canary else ''} (revision {state.revision}), but "
        f"{len(laggards)} replica worker(s) did not switch within "
        f"{settings.serving.switch_timeout_seconds:g} s: "
        f"{described}. The state stays written: a replica follows it once it can load the model"
    )


def follows(beat: Heartbeat, state: DeploymentState) -> bool:
    """A heartbeat shows ``state`` (or a newer one) loaded."""
    return beat.revision >= state.revision and not (beat.revision == state.revision and beat.load_error)


def wait_replicas(
    settings: Settings, storage: Storage, state: DeploymentState, timeout: float | None = None
) -> list[Heartbeat] | None:
    """The live replica workers that have not loaded ``state`` when time ran out ([] = all did).

    None when no replica is live (no fresh heartbeat), also when every replica seen while we waited
    has stopped heartbeating by the deadline (none serves the state: nothing went live). A replica
    that stops heartbeating while others follow stops being waited for after
    ``heartbeat_max_age_seconds``.
    """
    serving = settings.serving
    deadline = time.monotonic() + (timeout or serving.switch_timeout_seconds)
    seen = False
    while True:
        beats = live_heartbeats(storage, serving.heartbeat_max_age_seconds)
        seen = seen or bool(beats)
        lagging = [beat for beat in beats if not follows(beat, state)]
        if not beats and (not seen or time.monotonic() >= deadline):
            return None
        if beats and (not lagging or time.monotonic() >= deadline):
            return lagging
        time.sleep(0.25)


def deploy(
    settings: Settings, storage: Storage, version: str, *, stage: str, by: str, reason: str = ""
) -> DeployResult:
    """Stage ``version`` as the canary or make it stable; fail loudly if a live endpoint does not follow."""
    if stage not in STAGES:
        raise DeployError(f"stage must be one of {', '.join(STAGES)}, not {stage!r}")
    version = str(version)
    tag = import_model(settings, version, storage)
    tags = {version: tag}
    configured = settings.serving.shadow
    if configured and stage != "shadow":
        tags[str(configured)] = import_model(settings, str(configured), storage)

    def change(current: DeploymentState | None) -> DeploymentState:
        new = _next_state(current, version, stage, settings.serving.canary_share)
        if stage != "shadow" and settings.serving.shadow and settings.serving.shadow != new.stable:
            new = replace(new, shadow=settings.serving.shadow)  # the configured shadow rides along
        kept = {
            v: t
            for v, t in (current.models if current else {}).items()
            if v in (new.stable, new.canary, new.previous, new.shadow)
        }
        return replace(
            new,
            updated_at=now_iso(),
            updated_by=by,
            reason=reason or f"{stage} deploy of v{version}",
            models=kept | tags,
        )

    before, new = update_state(storage, change)
    record = {"by": by, "from": before.stable if before else None, "to": version, "why": new.reason}
    entry = audit(storage, f"deploy-{stage}", record | {"state": asdict(new)})
    return DeployResult(new, entry, require_live(settings, storage, new, f"{stage} deploy of v{version}"))


def withdraw_canary(settings: Settings, storage: Storage, version: str, *, by: str) -> str:
    """Take ``version`` off the canary (a challenger that was not approved, a bad canary); idempotent."""
    version = str(version)

    def change(current: DeploymentState | None) -> DeploymentState:
        if current is None or current.canary != version:
            raise _NothingToDo(f"v{version} is not the canary")
        return replace(
            current,
            canary=None,
            canary_share=0.0,
            updated_at=now_iso(),
            updated_by=by,
            reason="canary withdrawn",
        )

    try:
        before, new = update_state(storage, change)
    except _NothingToDo as nothing:
        return str(nothing)
    record = {"by": by, "from": version, "to": new.stable, "why": "not approved", "state": asdict(new)}
    audit(storage, "withdraw-canary", record)
    require_live(settings, storage, new, f"withdrawal of canary v{version}")
    return f"v{version} withdrawn from the canary; v{new.stable} serves all traffic"


class _NothingToDo(Exception):
    """A state change that turned out to be unnecessary (not an error)."""


def withdraw_unapproved(settings: Settings, storage: Storage, version: str | None, *, by: str) -> str:
    """A staged challenger that did not become champion (rejected, failed) leaves the canary."""
    if not version or registry.version_for_alias(settings, registry.CHAMPION) == str(version):
        return "nothing to withdraw"
    return withdraw_canary(settings, storage, str(version), by=by)


def rolled_back(settings: Settings, versions: list[str]) -> set[str]:
    """Which of ``versions`` carry the ``rolled_back`` tag in the registry."""
    client, name = registry.client(settings), settings.mlflow.registered_model
    return {v for v in set(versions) if "rolled_back" in client.get_model_version(name, v).tags}


def rollback_target(settings: Settings, current: DeploymentState) -> str:
    """The newest earlier stable version that was never rolled back (history, else ``previous``)."""
    earlier = [v for v in reversed(current.history) if v != current.stable] or (
        [current.previous] if current.previous else []
    )
    excluded = rolled_back(settings, earlier)
    for version in earlier:
        if version not in excluded:
            return version
    raise DeployError(
        f"v{current.stable} has no previous version to return to (none earlier in its history "
        f"{current.history} that was not itself rolled back); name one with --to"
    )


def rollback(
    settings: Settings, storage: Storage, *, to: str | None = None, by: str, reason: str
) -> DeployResult:
    """Serve an earlier (or the named) version again, make it the champion, record who, when and why.

    By default the newest earlier stable version that was never rolled back: a rollback never
    returns to the model it just removed. Naming a version with ``to`` restores it on purpose.
    """
    imported: dict[
        str, str
    ] = {}  # version -> its tag: a retried change (another writer won) may pick another

    def change(current: DeploymentState | None) -> DeploymentState:
        if current is None:
            raise DeployError(
                f"nothing is deployed (no state in {storage.url('serving')}); nothing to roll back"
            )
        target = str(to) if to else rollback_target(settings, current)
        if target == current.stable and not current.canary:
            raise DeployError(f"v{target} is already the live model")
        if target not in imported:
            imported[target] = import_model(settings, target, storage)
        kept = (current.stable, current.shadow)  # the shadow rides along: its tag goes with it
        models = {v: t for v, t in current.models.items() if v in kept} | {target: imported[target]}
        models.setdefault(current.stable, current.tag(current.stable))
        return replace(
            current,
            models=models,
            stable=target,
            canary=None,
            canary_share=0.0,
            previous=current.stable,
            updated_at=now_iso(),
            updated_by=by,
            reason=f"rollback: {reason}",
        )

    before, new = update_state(storage, change)
    if before is None:  # change() refuses a missing state; this cannot be reached
        raise DeployError("nothing was deployed")
    _record_rollback_in_registry(settings, storage, before, new, by, reason, explicit=bool(to))
    record = {
        "by": by,
        "from": before.stable,
        "canary_dropped": before.canary,
        "to": new.stable,
        "why": reason,
    }
    entry = audit(storage, "rollback", record | {"revision": new.revision})
    return DeployResult(new, entry, require_live(settings, storage, new, f"rollback to v{new.stable}"))


def _record_rollback_in_registry(
    settings: Settings,
    storage: Storage,
    before: DeploymentState,
    new: DeploymentState,
    by: str,
    reason: str,
    explicit: bool,
) -> None:
    """The champion alias follows; what was removed is tagged ``rolled_back``; a named restore is untagged."""
    client, name = registry.client(settings), settings.mlflow.registered_model
    if registry.version_for_alias(settings, registry.CHAMPION) != new.stable:
        registry.promote(settings, storage, new.stable, by, note=f"rollback from v{before.stable}: {reason}")
    for version in {before.stable, before.canary} - {None, new.stable}:
        client.set_model_version_tag(name, str(version), "rolled_back", f"{new.updated_at} by {by}: {reason}")
    if explicit and new.stable in rolled_back(settings, [new.stable]):
        client.delete_model_version_tag(name, new.stable, "rolled_back")


def ensure_state(settings: Settings, storage: Storage) -> DeploymentState:
    """The deployment state, created from the champion when nothing was deployed yet."""
    current = read_state(storage)
    if current is not None:
        return current
    champion = registry.version_for_alias(settings, registry.CHAMPION)
    if champion is None:
        raise DeployError("no champion model yet: train and promote one first (retrain DAG or `mlops train`)")
    first = deploy(
        settings, storage, champion, stage="full", by="mlops serve", reason="first deploy of the champion"
    )
    return first.state


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


def status(settings: Settings, storage: Storage) -> dict[str, Any]:
    """What is deployed, who is champion, and what each replica (live or gone) says it serves."""
    import datetime as dt

    state = read_state(storage)
    now = dt.datetime.now(dt.UTC)
    max_age = settings.serving.heartbeat_max_age_seconds
    replicas: dict[str, dict[str, Any]] = {}
    for beat in read_heartbeats(storage):
        age = beat.age_seconds(now)
        entry = replicas.setdefault(beat.replica, {"replica": beat.replica, "url": beat.url, "workers": []})
        entry["workers"].append(
            {
                "worker": beat.worker,
                "live": age <= max_age,
                "age_seconds": round(age, 1),
                "revision": beat.revision,
                "stable": beat.stable,
                "canary": beat.canary,
                "shadow": beat.shadow,
                "follows_state": bool(state) and follows(beat, state),
                "load_error": beat.load_error,
                "bento_tag": beat.bento_tag,
            }
        )
    return {
        "state": asdict(state) if state else None,
        "champion": registry.version_for_alias(settings, registry.CHAMPION),
        "replicas": sorted(replicas.values(), key=lambda r: r["replica"]),
    }
