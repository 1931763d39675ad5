"""Hourly check of the live prediction endpoint: latency, errors, live accuracy, drift of served traffic.

Reads ``/metrics`` and the prediction and feedback logs since the previous check, judges the
rules in ``alerts.rules`` (accuracy < 0.80 critical, p99 > 1000 ms warning, drift > 0.1 warning,
5xx share > 5% critical, endpoint down critical) and alerts through Slack / PagerDuty once per
incident, with a "resolved" message when it clears. A critical rule marked ``auto_rollback`` that
fires for a model not yet checked good since its deploy rolls the endpoint back to the previous
champion. Each check's record: ``monitoring/serving/checks/`` in storage.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from airflow.sdk import Param, dag, task
from mlops_airflow.defaults import default_args

from ml.config import get_settings


@dag(
    dag_id="monitor_serving",
    schedule=get_settings().serving_monitor.schedule,
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(retries=1),
    tags=["mlops", "monitoring", "serving"],
    doc_md=__doc__,
    params={
        "auto_rollback": Param(
            True,
            type="boolean",
            title="Automatic rollback",
            description="Off: alert only, even when a rule asks for a rollback",
        ),
    },
)
def monitor_serving() -> None:
    @task
    def check(params: dict[str, Any] | None = None, run_id: str | None = None) -> dict[str, Any]:
        """Measure the window, alert on changes, roll back a bad new model."""
        from mlops_airflow.alerts import notifier
        from mlops_airflow.storage import dag_storage

        from ml.monitoring.live import rule_lines
        from ml.release.guard import check_live

        settings = get_settings()
        record = check_live(
            settings,
            dag_storage(settings),
            notify=notifier(settings),
            allow_rollback=None if (params or {}).get("auto_rollback", True) else False,  # None: the config's
            run_id=run_id or "",
        )
        print("\n".join(rule_lines(record)))
        return {key: record[key] for key in ("at", "deployment", "metrics", "rollback", "record")}

    check()


monitor_serving()
