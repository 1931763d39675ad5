"""The live guard: one monitoring check of the endpoint, with the power to roll a bad model back.

Monitoring measures and judges (``ml.monitoring.live``); release owns the deployment state and
the rollback, so this is where the two meet: ``monitor_serving`` and ``mlops monitor`` call it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from typing import Any

from ml.alerts import Alert, Notice, Notify, link_in, notice_alert
from ml.config import Settings
from ml.layout import LIVE_CHECK_FAILED_KEY
from ml.monitoring.live import LiveDeployment, check_endpoint
from ml.release.audit import deployed_at
from ml.release.deploy import rollback, withdraw_canary
from ml.serving.auth import admin_key
from ml.serving.replica import live_heartbeats
from ml.serving.state import read_state
from ml.storage import Storage, browsable_link


def live_deployment(settings: Settings, storage: Storage) -> LiveDeployment:
    """What the endpoint is meant to serve, and since when its stable model serves."""
    state = read_state(storage)
    if state is None:
        return LiveDeployment(stable=None)
    return LiveDeployment(state.stable, state.canary, state.previous, deployed_at(storage, state.stable))


def replica_urls(settings: Settings, storage: Storage) -> list[str] | None:
    """Where every live replica answers (from its heartbeats); None: ask the configured endpoint."""
    beats = live_heartbeats(storage, settings.serving.heartbeat_max_age_seconds)
    return sorted({beat.url for beat in beats}) or None


def check_live(
    settings: Settings,
    storage: Storage,
    *,
    notify: Notify | None = None,
    origin: str = "monitor_serving",
    allow_rollback: bool | None = None,
    by: str = "monitor_serving",
    now: dt.datetime | None = None,
    run_id: str = "",
) -> dict[str, Any]:
    """Check the endpoint; alerts go through ``notify`` (titled by rule, deduplicated per ``origin``).

    A check that fails part-way (storage or MLflow down) still pages: ``monitor_check_failed``
    (critical) goes out before the error is raised, so the task fails loudly and is retried.
    """

    def roll_back(reason: str) -> dict[str, Any]:
        return rollback(settings, storage, by=f"{by} (automatic)", reason=reason).to_dict()

    def withdraw(version: str) -> str:
        return withdraw_canary(settings, storage, version, by=f"{by} (automatic)")

    def send(notice: Notice) -> dict[str, str]:
        if not notify:
            return {"log": "no channels"}
        named = link_in(notice.reason)  # e.g. the served-drift report a drift_score notice names
        report = browsable_link(storage, named, settings) if named.startswith(storage.root_url + "/") else ""
        return notify(notice_alert(notice, dag_id=origin, link=report))

    key = f"{origin}/check"
    try:
        record = check_endpoint(
            settings,
            storage,
            live_deployment(settings, storage),
            notify=send if notify else None,
            rollback=roll_back,
            withdraw=withdraw,
            allow_rollback=allow_rollback,
            now=now,
            run_id=run_id,
            scrape_key=admin_key(keys_file=settings.serving.api_keys_file),
            scrape_urls=replica_urls(settings, storage),
        )
    except Exception as exc:
        reason = f"the live check could not finish: {type(exc).__name__}: {exc}"
        if notify:
            notify(Alert("monitor_check_failed", "critical", reason, origin, "check", key=key))
        with contextlib.suppress(Exception):  # storage may be what failed: then no resolve follows
            storage.write_bytes(LIVE_CHECK_FAILED_KEY, json.dumps({"reason": reason}).encode())
        raise
    if storage.exists(LIVE_CHECK_FAILED_KEY):  # the page a failed check sent is closed by this one
        if notify:
            done = "resolved: the live check finishes again"
            notify(
                Alert("monitor_check_failed", "critical", done, origin, "check", key=key, action="resolve")
            )
        storage.delete(LIVE_CHECK_FAILED_KEY)
    return record


def may_promote(settings: Settings, storage: Storage, challenger: str) -> tuple[bool, str]:
    """Whether the canary's live traffic allows promoting ``challenger`` (``ab.*``); why, either way."""
    import datetime as dt

    from ml.monitoring.ab import measure_ab, promotion_allowed

    state = read_state(storage)
    if state is None or state.canary != str(challenger) or state.stable == str(challenger):
        return True, f"v{challenger} is not on the canary: no A/B evidence to weigh"
    end = dt.datetime.now(dt.UTC)
    start = end - dt.timedelta(hours=settings.ab.window_hours)
    report = measure_ab(settings, storage, state.stable, str(challenger), start, end)
    return promotion_allowed(report, settings.ab)
