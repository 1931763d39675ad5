"""What a scheduled run is for: the day(s) it works on, why it was started, who answered it.

The DAGs hand their run's context (params, data interval, triggering Asset events, run type)
to these functions instead of interpreting it themselves. Standard library only.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


def run_day(params: Mapping[str, Any] | None, data_interval_start: dt.datetime | None) -> dt.date:
    """The day a run works on: the ``date`` param if given, else the start of its data interval."""
    chosen = (params or {}).get("date")
    if chosen:
        return dt.date.fromisoformat(str(chosen))
    if data_interval_start is None:
        raise ValueError("this run has no data interval: trigger it with the 'date' parameter")
    return data_interval_start.date()


def event_extras(events: Mapping[Any, Iterable[Any]] | None) -> list[dict[str, Any]]:
    """The ``extra`` of every triggering Asset event, in order."""
    return [dict(event.extra or {}) for batch in (events or {}).values() for event in batch]


def monitored_days(
    params: Mapping[str, Any] | None, extras: list[dict[str, Any]], logical_date: dt.datetime | None
) -> list[dt.date]:
    """The ``date`` param, else every day the triggering ingests published, else the run's date."""
    if (params or {}).get("date"):
        return [dt.date.fromisoformat(str(params["date"]))]  # type: ignore[index]
    published = {dt.date.fromisoformat(str(extra["day"])) for extra in extras if extra.get("day")}
    if published:  # several ingests can finish before this run starts: each day is compared
        return sorted(published)
    if logical_date is None:
        raise ValueError("no day to monitor: trigger with the 'date' parameter")
    return [logical_date.date()]


@dataclass(frozen=True)
class RunContext:
    """Why and by whom a training run was started (logged to MLflow)."""

    trigger: str = "manual"  # manual | schedule | drift
    airflow_run_id: str = ""
    reason: str = ""
    report: str = ""
    note: str = ""


def retrain_context(run_id: str, run_type: str, extras: list[dict[str, Any]], note: str = "") -> RunContext:
    """A drift event makes it a drift retrain; a manual run is manual; anything else is the schedule."""
    if extras:
        last = extras[-1]
        return RunContext("drift", run_id, str(last.get("reason", "")), str(last.get("report", "")), note)
    return RunContext("manual" if run_type == "manual" else "schedule", run_id, note=note)


AUTO_APPROVER = "auto-approve (mlflow.auto_approve config)"


def approver(answer: Mapping[str, Any] | None) -> str:
    """Who answered a human-in-the-loop approval (the config auto-approves when nobody did)."""
    if not answer:
        return AUTO_APPROVER
    user = answer.get("responded_by_user") or {}
    return str(user.get("name") or user.get("id") or "airflow-ui")
