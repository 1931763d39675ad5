"""Daily ingestion: wait for the day's labels.csv, land the labelled served images (feedback.csv),
validate and curate the day, publish the dataset.

With ``ingest.shards`` > 1 (the production profile) the day fans out: ``plan`` lists it once,
``inspect_shard`` runs once per shard (mapped tasks, spread over the workers; a shard whose worker
dies is retried and rewrites the same staged results), and ``ingest`` merges: the GE suites on
the whole day, dedupe, the gate and one atomic publication. Otherwise ``ingest`` does it all in
one task. Each task body calls one ``ml`` function; heavy imports happen inside task bodies.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from airflow.sdk import CronDataIntervalTimetable, Param, PokeReturnValue, dag, task
from mlops_airflow.alerts import landing_timeout_callback
from mlops_airflow.assets import CURATED_IMAGES
from mlops_airflow.defaults import date_param, default_args

from ml.config import get_settings

SETTINGS = get_settings()
SHARD_PARAMS = (  # the fan-out's form field, only where the DAG fans out (ingest.shards > 1)
    {
        "shards": Param(
            SETTINGS.ingest.shards,
            type="integer",
            minimum=1,
            maximum=256,
            title="Shards",
            description="Mapped inspection tasks the day is split into",
        )
    }
    if SETTINGS.ingest.shards > 1
    else {}
)


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
        **SHARD_PARAMS,
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

    @task
    def land_feedback(day: str) -> str:
        """Land the labelled served images (``serving.log_images``) beside the day's upstream rows."""
        from mlops_airflow.storage import dag_storage

        from ml.data.feedback import land_feedback as land

        settings = get_settings()
        landed = land(
            dag_storage(settings), dt.date.fromisoformat(day), settings.ingest.feedback_lookback_days
        )
        print(landed.to_dict())
        return day

    @task
    def plan(day: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """List the day once; one work item per shard."""
        from mlops_airflow.storage import dag_storage

        from ml.data.shards import plan_day

        settings = get_settings()
        shards = int((params or {}).get("shards") or settings.ingest.shards)
        planned = plan_day(settings, dag_storage(settings), dt.date.fromisoformat(day), shards)
        print(f"{day}: {len(planned.listing)} objects in {planned.shards} shards")
        return [{"day": day, "shard": shard} for shard in range(planned.shards)]

    @task
    def inspect_shard(work: dict[str, Any]) -> dict[str, Any]:
        """Download, inspect and stage one shard's images."""
        from mlops_airflow.storage import dag_storage

        from ml.data.shards import inspect_shard as run_shard

        settings = get_settings()
        summary = run_shard(
            settings, dag_storage(settings), dt.date.fromisoformat(work["day"]), work["shard"]
        )
        print(summary.to_dict())
        return summary.to_dict()

    @task(outlets=[CURATED_IMAGES], max_active_tis_per_dag=1)  # one writer of the catalog at a time
    def ingest(day: str, shards: Any = None, outlet_events: Any = None) -> dict[str, Any]:
        """Validate every landed object (or merge the shards'), curate or quarantine it, version the day."""
        from airflow.sdk.exceptions import AirflowFailException
        from mlops_airflow.storage import dag_storage

        from ml.data.ingest import BatchRejected, ingest_day
        from ml.data.shards import merge_day

        settings = get_settings()
        run = merge_day if shards is not None else ingest_day
        try:
            result = run(settings, dag_storage(settings), dt.date.fromisoformat(day))
        except BatchRejected as exc:
            raise AirflowFailException(str(exc)) from exc  # a rejected batch is not retried
        print(result.summary_line())
        outlet_events[CURATED_IMAGES].extra = result.asset_extra()
        return result.to_xcom()

    day = land_feedback(wait_for_labels())
    if SETTINGS.ingest.shards > 1:
        ingest(day, inspect_shard.expand(work=plan(day)))
    else:
        ingest(day)


ingest_daily()
