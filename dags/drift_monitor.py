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


def monitored_days(params: dict[str, Any] | None, events: Any, logical_date: Any) -> list[dt.date]:
    """The ``date`` param, else every day the triggering ingests published, else the run's date."""
    if (params or {}).get("date"):
        return [dt.date.fromisoformat(str(params["date"]))]
    published = {
        dt.date.fromisoformat(str(event.extra["day"]))
        for batch in (events or {}).values()
        for event in batch
        if (event.extra or {}).get("day")
    }
    if published:  # several ingests can finish before this run starts: each day is compared
        return sorted(published)
    if logical_date is None:
        raise ValueError("no day to monitor: trigger with the 'date' parameter")
    return [logical_date.date()]


def drift_alert(summary: dict[str, Any]) -> Any:
    from mlops_airflow.alerts import Alert

    return Alert(
        title="data_drift_detected",
        severity="warning",
        reason=f"{'; '.join(summary['reasons'])}. Retrain: {summary['retrain']['why']}.",
        dag_id="drift_monitor",
        task_id="measure",
        date=summary["day"],
        link=summary.get("report", ""),
        details={"drift_score": summary["drift_score"], "prediction_kl": summary["prediction_kl"]},
    )


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
        from mlops_airflow.alerts import send_alert
        from mlops_airflow.storage import dag_storage

        from ml.drift import monitor_day, should_request_retrain

        settings = get_settings()
        storage = dag_storage(settings)
        summaries = [
            monitor_day(settings, storage, day)
            for day in monitored_days(params, triggering_asset_events, logical_date)
        ]
        for summary in summaries:
            request, why = should_request_retrain(storage, summary, settings.monitoring.cooldown_days)
            summary["retrain"] = {"request": request, "why": why}
            print(
                f"{summary['day']}: {summary['status']}; drift_score {summary['drift_score']}, "
                f"prediction_kl {summary.get('prediction_kl')}; detected {summary['drift_detected']}; "
                f"retrain: {why}; report {summary.get('report', '-')}"
            )
            if summary["drift_detected"]:
                summary["alert"] = send_alert(drift_alert(summary), settings)
        requests = [summary for summary in summaries if summary["retrain"]["request"]]
        chosen = requests[-1] if requests else summaries[-1]  # one retrain covers every day it sees
        return {key: value for key, value in chosen.items() if key != "columns"}

    @task.branch
    def route(summary: dict[str, Any]) -> str | None:
        """Drift outside the cooldown asks for a retrain; anything else ends here."""
        return "request_retrain" if summary["retrain"]["request"] else None

    @task(outlets=[RETRAIN_REQUESTED])
    def request_retrain(summary: dict[str, Any], outlet_events: Any = None) -> dict[str, Any]:
        """Emit the ``retrain_requested`` event (reason, report, score) and record it for the cooldown."""
        from mlops_airflow.storage import dag_storage

        from ml.drift import record_retrain_request

        reason = f"drift on {summary['day']}: {'; '.join(summary['reasons'])}"
        outlet_events[RETRAIN_REQUESTED].extra = {
            "reason": reason,
            "report": summary.get("report", ""),
            "drift_score": summary["drift_score"],
            "prediction_kl": summary["prediction_kl"],
            "day": summary["day"],
        }
        return record_retrain_request(dag_storage(get_settings()), summary, summary["retrain"]["why"])

    summary = measure()
    route(summary) >> request_retrain(summary)


drift_monitor()
