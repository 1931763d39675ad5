"""What every DAG shares: owner, retries with backoff, the failure alert, the optional day form."""

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
