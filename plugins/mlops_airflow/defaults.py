"""What every DAG shares: owner, retries with backoff, the failure alert, the landing day."""

from __future__ import annotations

import datetime as dt
from typing import Any

from airflow.sdk import Param

from mlops_airflow.alerts import failure_callback

OWNER = "mlops"


def default_args(retries: int = 2) -> dict[str, Any]:
    return {
        "owner": OWNER,
        "retries": retries,
        "retry_delay": dt.timedelta(minutes=2),
        "retry_exponential_backoff": True,
        "max_retry_delay": dt.timedelta(minutes=30),
        "on_failure_callback": failure_callback,
    }


def date_param(title: str, description: str) -> Param:
    """An optional YYYY-MM-DD day for the trigger form (empty: the run decides)."""
    return Param(None, type=["null", "string"], format="date", title=title, description=description)


def run_day(params: dict[str, Any] | None, data_interval_start: Any) -> dt.date:
    """The day a run works on: the ``date`` param if given, else the start of its data interval."""
    chosen = (params or {}).get("date")
    if chosen:
        return dt.date.fromisoformat(str(chosen))
    if data_interval_start is None:
        raise ValueError("this run has no data interval: trigger it with the 'date' parameter")
    return data_interval_start.date()
