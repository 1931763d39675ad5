"""Hyperparameter search on demand: Optuna trials as parallel mapped tasks, then CV and the tuned model.

Triggered by hand from its form (trials, parallel workers, timeout, dataset version, note).
``prepare`` reads the dataset version's cached features (computing the missing ones once) and
creates the study (``tune-<dataset version>``, in ``tuning.storage_url`` or SQLite under a local
storage root) with its MLflow parent run. ``search`` runs once per worker slot (``.expand``): every
worker runs trials of the one shared study until the study's trial budget is spent, so more
workers finish sooner and a retried or killed worker loses no trial. ``finish`` cross-validates the
best parameters (stratified k-fold on train+val), trains the final model on train+val for the CV's
median best epoch count, gates it on the untouched test split and registers it as ``challenger``
when it passes, and writes the tuned parameters to ``tuning/best_params.json``.

What happens next stays the ``retrain`` DAG's job: its ``train`` task trains with the tuned
parameters (a form value changed from the config default still wins), shows them in the approval
form, and takes the model through the serving check, the canary and the human approval. The tuned
challenger itself can be promoted directly with ``mlops promote`` (then ``mlops deploy``).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from airflow.sdk import Param, dag, task
from mlops_airflow.defaults import default_args

from ml.config import get_settings

SETTINGS = get_settings()


@task
def prepare(params: dict[str, Any] | None = None) -> dict:
    """The dataset version's features (cached once) and the shared study with its MLflow parent run."""
    from mlops_airflow.storage import dag_storage

    from ml.training.tune import open_session

    params = params or {}
    settings = get_settings()
    session = open_session(settings, dag_storage(settings), params.get("dataset_version") or None)
    return {
        "dataset_version": session.dataset_version,
        "study": session.study.study_name,
        "parent_run_id": session.tracker.parent,
        "trials": int(params.get("trials") or settings.tuning.trials),
        "timeout": params.get("timeout"),
    }


@task
def worker_slots(params: dict[str, Any] | None = None) -> list[int]:
    """One slot per parallel worker (each seeds its sampler with its slot)."""
    return list(range(int((params or {}).get("parallel") or 1)))


@task(execution_timeout=dt.timedelta(hours=12))
def search(worker: int, prepared: dict) -> dict:
    """Run trials of the shared study until its budget is spent (by this and every other worker)."""
    from mlops_airflow.storage import dag_storage

    from ml.training.tune import open_session
    from ml.training.tune import search as run_search

    settings = get_settings()
    session = open_session(settings, dag_storage(settings), prepared["dataset_version"], worker)
    summary = run_search(session, prepared["trials"], prepared["timeout"])
    print(f"worker {worker}: ran {summary.ran_here} trials; study {summary.to_dict()}")
    return summary.to_dict()


@task(execution_timeout=dt.timedelta(hours=6))
def finish(prepared: dict, params: dict[str, Any] | None = None, dag_run: Any = None) -> dict:
    """Cross-validate the best parameters, train the final model on train+val, gate and register it."""
    from mlops_airflow.storage import dag_storage

    from ml.runs import RunContext
    from ml.training.tune import finish as finish_study
    from ml.training.tune import open_session

    settings = get_settings()
    session = open_session(settings, dag_storage(settings), prepared["dataset_version"])
    context = RunContext(
        trigger="manual",
        airflow_run_id=getattr(dag_run, "run_id", ""),
        reason=f"tuned: study {prepared['study']}",
        note=(params or {}).get("note", ""),
    )
    result = finish_study(session, context, budget=prepared["trials"])
    print(f"tuned {result.best_params}; cv {result.cv.to_dict() if result.cv else None}")
    return result.to_dict()


@dag(
    dag_id="tune",
    schedule=None,
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(retries=1),
    tags=["mlops", "training", "tuning"],
    doc_md=__doc__,
    params={
        "trials": Param(
            SETTINGS.tuning.trials, type="integer", minimum=1, maximum=1000, title="Trials (study budget)"
        ),
        "parallel": Param(
            SETTINGS.tuning.parallel,
            type="integer",
            minimum=1,
            maximum=32,
            title="Parallel workers",
            description="Mapped search tasks sharing the study",
        ),
        "timeout": Param(
            SETTINGS.tuning.timeout_seconds,
            type=["null", "number"],
            title="Timeout (s)",
            description="A worker starts no trial after this long; empty = no limit",
        ),
        "dataset_version": Param(
            None, type=["null", "string"], title="Dataset version", description="Empty = LATEST"
        ),
        "note": Param("", type="string", title="Note", description="Recorded with the final MLflow run"),
    },
)
def tune() -> None:
    prepared = prepare()
    searched = search.partial(prepared=prepared).expand(worker=worker_slots())
    searched >> finish(prepared)


tune()
