"""Weekly retraining, or on a "retrain requested" Asset event (drift): train, gate, register, deploy.

A gated model is registered with alias ``challenger``, built into a bento and checked while it
serves on a scratch port (golden images, latency, auth: a failure pages and deploys nothing),
then staged on the live endpoint as the canary (``serving.canary_share`` of traffic). Promotion
to ``champion`` needs a human approval in the Airflow UI (the ``approve`` task);
``mlflow.auto_approve: true`` skips the human (demo only) and is recorded as such. The champion
then takes all traffic; a challenger that is not approved is withdrawn from the canary.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task
from mlops_airflow.assets import RETRAIN_REQUESTED
from mlops_airflow.defaults import default_args

from ml.config import get_settings

SETTINGS = get_settings()


@task(execution_timeout=dt.timedelta(hours=6))
def train(
    params: dict[str, Any] | None = None, dag_run: Any = None, triggering_asset_events: Any = None
) -> dict:
    """Train, evaluate and gate a challenger; register it when the gate passes."""
    from mlops_airflow.storage import dag_storage

    from ml.release.links import approval_links
    from ml.runs import event_extras, retrain_context
    from ml.training.pipeline import retrain as run_retrain
    from ml.training.tune import tuned_training

    params = params or {}
    context = retrain_context(
        getattr(dag_run, "run_id", ""),
        getattr(dag_run, "run_type", ""),
        event_extras(triggering_asset_events),
        note=params.get("note", ""),
    )
    settings = get_settings()
    storage = dag_storage(settings)
    form = {key: params.get(key) for key in ("epochs", "learning_rate", "batch_size")}
    tuned = tuned_training(settings, storage, form)  # the tune DAG's parameters, unless set in the form
    result = run_retrain(
        settings,
        storage,
        overrides=tuned.overrides,
        context=context,
        force=bool(params.get("force")),
        tags=tuned.tags,
    )
    print(f"retrain: {result.status}; model version {result.model_version}; gate {result.gate}")
    print(f"tuned parameters: {tuned.shown}")
    done = result.to_dict()
    links = approval_links(settings, storage, done, context.report) if result.model_version else {}
    return done | {"tuned": tuned.shown, "links": links}


@task.short_circuit
def registered(result: dict) -> bool:
    """Only a registered challenger goes on to build, check and deploy."""
    return result["status"] == "registered"


@task(execution_timeout=dt.timedelta(minutes=30))
def build_and_check(result: dict) -> dict:
    """Build the bento and run it on a scratch port against golden test images; page on failure."""
    from mlops_airflow.alerts import notifier
    from mlops_airflow.storage import dag_storage

    from ml.release.check import build_and_check as check

    settings = get_settings()
    outcome = check(settings, dag_storage(settings), result["model_version"], notifier(settings))
    print(f"serving check of {outcome.bento_tag}: {outcome.to_dict()}")
    return outcome.to_dict()


@task
def deploy_canary(result: dict, check: dict) -> dict:
    """Stage the challenger on the canary share of live traffic (the first model takes all of it)."""
    from mlops_airflow.storage import dag_storage

    from ml.release.deploy import deploy

    settings = get_settings()
    version = result["model_version"]
    return deploy(settings, dag_storage(settings), version, stage="canary", by="retrain DAG").to_dict()


@task.branch
def route(result: dict) -> str:
    """A human approves the promotion, unless the config auto-approves (demo only) and nothing the spec
    reserves for a human changed since the champion (architecture, preprocessing, classes, storage root)."""
    from ml.training.governance import approval_decision

    changes = (result.get("validation") or {}).get("lineage_changes", [])
    decision = approval_decision(get_settings().mlflow.auto_approve, changes)
    print(f"approval route: {decision.route}: {decision.reason}")
    return decision.route


@task(trigger_rule="none_failed_min_one_success")
def promote(result: dict, ti: Any = None) -> dict:
    """Move the champion alias; record who approved it (or that the config auto-approved)."""
    from dataclasses import asdict

    from airflow.sdk.exceptions import AirflowFailException
    from mlops_airflow.storage import dag_storage

    from ml import registry
    from ml.release.guard import may_promote
    from ml.runs import approver

    settings = get_settings()
    storage = dag_storage(settings)
    answer = ti.xcom_pull(task_ids="approve") if ti else None
    version, note = result["model_version"], f"retrain {result['run_id']}"
    allowed, why = may_promote(settings, storage, version)  # the canary's live A/B evidence (ab.*)
    if not allowed:
        raise AirflowFailException(f"v{version} not promoted: {why}")
    return asdict(registry.promote(settings, storage, version, approver(answer), note=note))


@task
def deploy_champion(result: dict) -> dict:
    """The approved champion takes all live traffic; the previous one is kept for rollback."""
    from mlops_airflow.storage import dag_storage

    from ml.release.deploy import deploy

    settings = get_settings()
    version = result["model_version"]
    return deploy(settings, dag_storage(settings), version, stage="full", by="retrain DAG").to_dict()


@task(trigger_rule="all_done")
def withdraw_unapproved(result: dict) -> str:
    """A staged challenger that did not become champion (rejected, failed) leaves the canary."""
    from mlops_airflow.storage import dag_storage

    from ml.release.deploy import withdraw_unapproved as withdraw

    settings = get_settings()
    return withdraw(settings, dag_storage(settings), result.get("model_version"), by="retrain DAG")


@dag(
    dag_id="retrain",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(SETTINGS.training.schedule, timezone="UTC"), assets=[RETRAIN_REQUESTED]
    ),
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(retries=1),
    tags=["mlops", "training", "registry"],
    doc_md=__doc__,
    params={
        "epochs": Param(SETTINGS.training.epochs, type="integer", minimum=1, maximum=500, title="Max epochs"),
        "learning_rate": Param(
            SETTINGS.training.learning_rate, type="number", exclusiveMinimum=0, title="Learning rate"
        ),
        "batch_size": Param(
            SETTINGS.training.batch_size, type="integer", minimum=1, maximum=4096, title="Batch size"
        ),
        "force": Param(
            False, type="boolean", title="Force", description="Retrain even on an unchanged dataset"
        ),
        "note": Param("", type="string", title="Note", description="Recorded with the MLflow run"),
    },
)
def retrain() -> None:
    approve = ApprovalOperator(
        task_id="approve",
        subject="Promote model version {{ ti.xcom_pull(task_ids='train')['model_version'] }} to champion?",
        body=(
            "{% set r = ti.xcom_pull(task_ids='train') %}{% set v = r.get('validation') or {} %}"
            "Dataset {{ r['dataset_version'] }}; gate {{ 'passed' if r['gate']['passed'] else 'failed' }}.\n"
            "{% for name, figure in (v.get('headline') or {}).items() %}"
            "\n- {{ name }}: {{ figure }}{% endfor %}\n\n"
            "Why a human: {{ (v.get('approval') or {}).get('reason', 'mlflow.auto_approve is off') }}\n\n"
            "Model card: {{ v.get('model_card', 'none (validation is off)') }}\n\n"
            "{% for name, url in (r.get('links') or {}).items() %}"
            "[Open the {{ name }}]({{ url }})\n\n{% endfor %}"
            "tuned parameters: {{ ti.xcom_pull(task_ids='train')['tuned'] }}"
        ),
        response_timeout=dt.timedelta(days=7),
    )

    trained = train()
    checked = build_and_check(trained)
    registered(trained) >> checked
    staged = deploy_canary(trained, checked)
    branch = route(trained)
    promoted = promote(trained)
    served = deploy_champion(trained)
    staged >> branch >> [approve, promoted]
    approve >> promoted >> served
    [served, approve] >> withdraw_unapproved(trained)


retrain()
