"""Roll the live endpoint back to the previous champion (or a named version), from the Airflow UI.

Triggered by hand with a reason. The previous version serves all traffic again, becomes the
champion in the MLflow registry, the rolled-back version is tagged, and an audit record says
who, when, from, to and why. Slack hears about it.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from airflow.sdk import Param, dag, task
from mlops_airflow.defaults import default_args


@dag(
    dag_id="rollback",
    schedule=None,
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(retries=0),
    tags=["mlops", "serving"],
    doc_md=__doc__,
    params={
        "version": Param(
            None,
            type=["null", "string"],
            pattern=r"^[0-9]+$",
            title="Model version",
            description="Version to return to; empty = the previous champion",
        ),
        "reason": Param("", type="string", minLength=3, title="Reason", description="Recorded in the audit"),
    },
)
def rollback() -> None:
    @task
    def roll_back(params: dict[str, Any] | None = None, dag_run: Any = None) -> dict:
        """Serve the previous (or chosen) version again and make it the champion."""
        from mlops_airflow.alerts import notifier
        from mlops_airflow.storage import dag_storage

        from ml.config import get_settings
        from ml.release.deploy import rollback as roll

        params = params or {}
        settings = get_settings()
        who = str(getattr(dag_run, "triggering_user_name", "") or "airflow")
        storage = dag_storage(settings)
        result = roll(settings, storage, to=params.get("version") or None, by=who, reason=params["reason"])
        notifier(settings)(result.alert(who))
        return result.to_dict()

    roll_back()


rollback()
