"""Drift monitoring after each ingestion: the day's curated images against the champion's reference.

Runs on the ``curated_images`` Asset (every successful ingest), or by hand for a ``date``.
Writes an Evidently report (HTML + JSON) under ``reports/drift/DAY/`` and an MLflow run. On drift:
a Slack warning with the report link and, unless a retrain was requested within the cooldown
(``monitoring.cooldown_days``; severe drift overrides it), an event on the ``retrain_requested``
Asset, which starts ``retrain`` with the reason and report recorded in its MLflow run.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from airflow.sdk import dag, task
from mlops_airflow.assets import CURATED_IMAGES, RETRAIN_REQUESTED
from mlops_airflow.defaults import date_param, default_args

from ml.config import get_settings


@dag(
    dag_id="drift_monitor",
    schedule=[CURATED_IMAGES],
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(retries=1),
    tags=["mlops", "monitoring", "drift"],
    doc_md=__doc__,
    params={
        "date": date_param(
            "Curated day", "Day to compare (YYYY-MM-DD). Empty: the day the triggering ingest published."
        ),
    },
)
def drift_monitor() -> None:
    @task
    def measure(
        params: dict[str, Any] | None = None, triggering_asset_events: Any = None, logical_date: Any = None
    ) -> dict[str, Any]:
        """Compare each monitored day with the champion's reference; warn on Slack for each drifted one."""
        from mlops_airflow.alerts import notifier
        from mlops_airflow.storage import dag_storage

        from ml.monitoring.drift import monitor_days
        from ml.runs import event_extras, monitored_days

        settings = get_settings()
        days = monitored_days(params, event_extras(triggering_asset_events), logical_date)
        return monitor_days(settings, dag_storage(settings), days, notifier(settings))

    @task.branch
    def route(summary: dict[str, Any]) -> str | None:
        """Drift outside the cooldown asks for a retrain; anything else ends here."""
        return "request_retrain" if summary["retrain"]["request"] else None

    @task(outlets=[RETRAIN_REQUESTED])
    def request_retrain(summary: dict[str, Any], outlet_events: Any = None) -> dict[str, Any]:
        """Emit the ``retrain_requested`` event (reason, report, score) and record it for the cooldown."""
        from mlops_airflow.storage import dag_storage

        from ml.monitoring.drift import record_retrain_request, retrain_request_extra

        outlet_events[RETRAIN_REQUESTED].extra = retrain_request_extra(summary)
        return record_retrain_request(dag_storage(get_settings()), summary, summary["retrain"]["why"])

    @task
    def every_day_measured(summary: dict[str, Any]) -> None:
        """Fail the run, after the measured days were acted on, when a day could not be measured."""
        failed = summary.get("failed_days") or {}
        if failed:
            listed = "; ".join(f"{day}: {error}" for day, error in failed.items())
            raise RuntimeError(
                f"drift was not measured for {len(failed)} day(s): {listed}. Run them by date."
            )

    summary = measure()
    route(summary) >> request_retrain(summary)
    every_day_measured(summary)


drift_monitor()
