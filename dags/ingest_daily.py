"""Daily ingestion: wait for the day's labels.csv, validate and curate the day, publish the dataset.

Each task body calls one ``ml`` function; heavy imports happen inside task bodies.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from airflow.sdk import CronDataIntervalTimetable, PokeReturnValue, dag, task
from mlops_airflow.alerts import landing_timeout_callback
from mlops_airflow.assets import CURATED_IMAGES
from mlops_airflow.defaults import date_param, default_args

from ml.config import get_settings

SETTINGS = get_settings()


@dag(
    dag_id="ingest_daily",
    schedule=CronDataIntervalTimetable(SETTINGS.ingest.schedule, timezone="UTC"),
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=8,  # sensors of several days may wait at once
    default_args=default_args(),
    tags=["mlops", "ingestion", "data-quality"],
    doc_md=__doc__,
    params={
        "date": date_param(
            "Landing day", "Day to ingest (YYYY-MM-DD). Empty: the run's data interval start."
        ),
    },
)
def ingest_daily() -> None:
    @task.sensor(
        poke_interval=SETTINGS.ingest.sensor_poke_seconds,
        timeout=SETTINGS.ingest.sensor_timeout_seconds,
        mode="reschedule",
        retries=0,
        on_failure_callback=landing_timeout_callback,
    )
    def wait_for_labels(
        params: dict[str, Any] | None = None, data_interval_start: Any = None
    ) -> PokeReturnValue:
        """Done when landing/DAY/labels.csv exists (images land first, labels.csv last)."""
        from mlops_airflow.storage import dag_storage

        from ml.layout import DayLayout
        from ml.runs import run_day

        day = run_day(params, data_interval_start)
        storage = dag_storage(get_settings())
        labels = DayLayout(day).labels
        present = storage.exists(labels)
        print(f"waiting for {storage.url(labels)}: {'present' if present else 'not yet'}")
        return PokeReturnValue(is_done=present, xcom_value=day.isoformat())

    @task(outlets=[CURATED_IMAGES], max_active_tis_per_dag=1)  # one writer of the catalog at a time
    def ingest(day: str, outlet_events: Any = None) -> dict[str, Any]:
        """Validate every landed object, curate or quarantine it, write the dataset version."""
        from airflow.sdk.exceptions import AirflowFailException
        from mlops_airflow.storage import dag_storage

        from ml.data.ingest import BatchRejected, ingest_day

        settings = get_settings()
        try:
            result = ingest_day(settings, dag_storage(settings), dt.date.fromisoformat(day))
        except BatchRejected as exc:
            raise AirflowFailException(str(exc)) from exc  # a rejected batch is not retried
        print(result.summary_line())
        outlet_events[CURATED_IMAGES].extra = result.asset_extra()
        return result.to_xcom()

    ingest(wait_for_labels())


ingest_daily()
