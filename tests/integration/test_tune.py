"""`mlops tune` on ingested demo data: Optuna (SQLite study), MLflow (SQLite), real Lightning training.

End to end (nested runs, plots, a tuned challenger gated on test); a tuning process killed mid-study
and resumed (no trial lost or run twice); two processes sharing one study's budget; the tune DAG.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from ml.config import load_settings
from ml.data.catalog import read_version
from ml.data.ingest import ingest_day
from ml.demo.landing import land_days
from ml.storage import LocalStorage
from tests.conftest import REPO, setting_overrides, world_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]
START = dt.date(2026, 6, 1)
DAYS = 3
FAST = {
    "tuning__epochs": 10,
    "tuning__patience": 4,
    "tuning__heartbeat_seconds": 1,
    "tuning__grace_seconds": 3,
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tune")
    env = world_env(root, **FAST)
    settings = load_settings(environ=env)
    storage = LocalStorage(root / "store")
    land_days(storage, START, DAYS, settings.classes, count=120, seed=11)
    for offset in range(DAYS):
        ingest_day(settings, storage, START + dt.timedelta(days=offset))
    return env, settings, storage


def mlops(env: dict[str, str], *args: str, **extra: object) -> subprocess.Popen:
    """``mlops ARGS --json`` in its own process, with the world's settings (and ``extra`` overrides)."""
    environ = {**os.environ, **env, **setting_overrides(**extra)}
    command = [sys.executable, "-m", "ml", *args, "--json"]
    log = tempfile.TemporaryFile()  # read back by stderr_of(); a pipe could fill and block the process
    process = subprocess.Popen(command, cwd=REPO, env=environ, stdout=subprocess.PIPE, stderr=log)
    process.log = log  # type: ignore[attr-defined]
    return process


def stderr_of(process: subprocess.Popen) -> str:
    process.log.seek(0)  # type: ignore[attr-defined]
    return process.log.read().decode()[-3000:]  # type: ignore[attr-defined]


def finished(process: subprocess.Popen, timeout: float = 600) -> dict:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr_of(process)
    return json.loads(out.decode().strip().splitlines()[-1])


def study_of(storage: LocalStorage, day: dt.date | None = None) -> tuple[str, optuna.Study]:
    """The one study of the day's dataset version (``KeyError`` until a process has created it)."""
    version = read_version(storage, day)["version"]
    url = f"sqlite:///{storage.root / 'tuning' / 'optuna.db'}"
    names = [
        s.study_name
        for s in optuna.get_all_study_summaries(url)
        if s.study_name.startswith(f"tune-{version}-")
    ]
    if not names:
        raise KeyError(f"no study of {version} yet")
    (name,) = names
    return version, optuna.load_study(study_name=name, storage=url)


def counted(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    own_failure = [t for t in trials if t.state == TrialState.FAIL and "error" in t.user_attrs]
    return [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)] + own_failure


def assert_tracked(settings, optuna_study: optuna.Study, result: dict) -> None:
    """One parent run for the study: a nested run per trial (params, curve, state) and per fold, plots."""
    from ml import registry

    client, name = registry.client(settings), result["study"]["name"]
    experiment = client.get_experiment_by_name(f"{settings.mlflow.experiment_name}-tuning")
    runs = client.search_runs([experiment.experiment_id], f"tags.optuna_study = '{name}'")
    parents = [r for r in runs if r.data.tags.get("role") == "study"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trials = sorted((r for r in children if "optuna_trial" in r.data.tags), key=lambda r: r.info.run_name)
    folds = [r for r in children if "cv_fold" in r.data.tags]
    assert [r.info.run_name for r in trials] == [f"trial-{n:03d}" for n in range(6)] and len(folds) == 5
    states = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}
    for trial_run, trial in zip(trials, optuna_study.trials, strict=True):
        assert trial_run.data.tags["state"] == states[trial.state]
        assert set(trial_run.data.params) == {"learning_rate", "batch_size", "dropout_rate"}
        curve = client.get_metric_history(trial_run.info.run_id, "val_accuracy")
        assert [m.step for m in sorted(curve, key=lambda m: m.step)] == sorted(trial.intermediate_values)
    assert {f"best_{k}" for k in result["best_params"]} <= set(parent.data.params)
    assert parent.data.metrics["cv_accuracy_mean"] == pytest.approx(result["cv"]["accuracy_mean"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "tuning")}
    assert {"tuning/optimization_history.png", "tuning/param_importances.png"} <= artifacts


def test_mlops_tune_end_to_end_tracks_every_trial_and_registers_a_gated_challenger(world) -> None:
    from ml import registry
    from ml.training.tune import read_tuned

    env, settings, storage = world
    result = finished(mlops(env, "tune", "--trials", "6"))
    study = result["study"]
    assert study["budget"] == 6 and study["complete"] + study["pruned"] + study["failed"] == 6
    assert study["running"] == 0 and result["best_params"] == study["best_params"]
    _, optuna_study = study_of(storage)
    assert [t.number for t in optuna_study.trials] == list(range(6))

    cv = result["cv"]
    assert cv["k"] == 5 and len(cv["folds"]) == 5 and 0.8 <= cv["accuracy_mean"] <= 1.0
    pooled = cv["folds"][0]["held_out_size"] + cv["folds"][0]["train_size"]
    assert sum(f["held_out_size"] for f in cv["folds"]) == pooled  # the held-out parts partition train+val

    retrained = result["retrain"]
    assert retrained["status"] == "registered", retrained["gate"]
    assert (
        retrained["gate"]["passed"] and retrained["metrics"]["accuracy"] >= settings.acceptance.accuracy_min
    )
    assert registry.version_for_alias(settings, registry.CHALLENGER) == retrained["model_version"]

    client = registry.client(settings)
    run = client.get_run(retrained["run_id"])
    assert run.data.tags["tuning_study"] == study["name"]
    best = result["best_params"]
    assert float(run.data.params["learning_rate"]) == best["learning_rate"]
    assert int(run.data.params["batch_size"]) == best["batch_size"]
    assert float(run.data.params["dropout_rate"]) == best["dropout_rate"]
    assert int(run.data.params["epochs_max"]) == cv["final_epochs"]
    assert run.data.params["dataset_version"] == study["dataset_version"]

    assert_tracked(settings, optuna_study, result)

    tuned = read_tuned(storage)
    assert tuned["study"] == study["name"] and tuned["model_version"] == retrained["model_version"]
    expected = {
        "learning_rate": best["learning_rate"],
        "batch_size": best["batch_size"],
        "dropout": best["dropout_rate"],
    }
    assert tuned["params"] == expected


def databases_ready(settings, storage: LocalStorage) -> None:
    """The Optuna and MLflow databases exist before workers race for them (the DAG's prepare does this)."""
    from ml.training.tune import StudyTracker

    (storage.root / "tuning").mkdir(exist_ok=True)
    optuna.storages.RDBStorage(f"sqlite:///{storage.root / 'tuning' / 'optuna.db'}")
    StudyTracker(settings, "none", "")  # the MLflow store and the tuning experiment


def running_trial(study: optuna.Study, after: int) -> list[int]:
    """Poll until ``after`` trials have finished and one is mid-training; the running ones' numbers."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        trials = study.get_trials(deepcopy=False)
        running = [t for t in trials if t.state == TrialState.RUNNING]
        if len(counted(trials)) >= after and running and running[0].intermediate_values:
            return [t.number for t in running]
        time.sleep(0.05)
    raise AssertionError("the tuning process never got going")


def test_a_killed_tuning_process_resumes_without_losing_or_repeating_a_trial(world) -> None:
    from ml import registry

    env, settings, storage = world
    day = START + dt.timedelta(days=1)
    version = read_version(storage, day)["version"]
    databases_ready(settings, storage)
    slow = {"tuning__epochs": 15, "tuning__patience": 15}  # ~1 s a trial: the kill lands mid-trial
    args = ("tune", "--search-only", "--trials", "8", "--dataset-version", version)
    victim = mlops(env, *args, **slow)
    deadline = time.monotonic() + 300
    while True:  # the study appears once the process has its features
        try:
            _, study = study_of(storage, day)
            break
        except KeyError:
            assert time.monotonic() < deadline and victim.poll() is None, stderr_of(victim)
            time.sleep(0.2)
    killed = running_trial(study, after=3)
    victim.kill()  # SIGKILL: no cleanup, the trial stays RUNNING in the study
    victim.wait()
    assert [t.state for t in study.get_trials() if t.number in killed] == [TrialState.RUNNING] * len(killed)

    result = finished(mlops(env, *args, **slow))
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(len(trials)))  # contiguous: none lost, none reused
    assert len(counted(trials)) == 8 == result["study"]["complete"] + result["study"]["pruned"]
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    ignored = [t for t in trials if t not in counted(trials)]
    assert [t.number for t in ignored] == killed  # only the killed trial: failed, not counted, run again
    assert all(t.state == TrialState.FAIL and "error" not in t.user_attrs for t in ignored)
    assert len(trials) == 8 + len(killed)  # every counted trial ran exactly once
    assert result["study"]["ignored"] == len(killed)
    assert result["study"]["ran_here"] == len(trials) - (max(killed) + 1)  # the victim ran trials 0..killed
    client = registry.client(settings)
    for trial in ignored:  # its MLflow run, left RUNNING by the dead process, is closed as KILLED
        assert client.get_run(trial.user_attrs["mlflow_run_id"]).info.status == "KILLED"


def test_two_processes_share_one_study_and_its_budget(world) -> None:
    env, settings, storage = world
    version = read_version(storage, START)["version"]
    databases_ready(settings, storage)
    steady = {"tuning__epochs": 25, "tuning__patience": 25, "tuning__pruner_startup_trials": 100}
    args = ("tune", "--search-only", "--trials", "10", "--dataset-version", version)
    workers = [mlops(env, *args, "--worker", str(slot), **steady) for slot in (0, 1)]
    results = [finished(process) for process in workers]
    _, study = study_of(storage, START)
    trials = study.get_trials()
    assert len(counted(trials)) == 10
    assert all(
        t.user_attrs.get("surplus") for t in trials if t not in counted(trials)
    )  # raced for the last slot
    assert {t.user_attrs["worker"] for t in counted(trials)} == {0, 1}  # both contributed
    assert sum(r["study"]["ran_here"] for r in results) == len(trials)
    assert [t.number for t in trials] == list(range(len(trials)))
    assert len({t.params["learning_rate"] for t in trials if t.params}) == len(
        [t for t in trials if t.params]
    )


def test_the_tune_dag_runs_mapped_workers_and_the_retrain_dag_reads_its_parameters(
    world, monkeypatch: pytest.MonkeyPatch, airflow_db: Path
) -> None:
    from airflow.dag_processing.dagbag import DagBag

    from ml.training.tune import read_tuned, tuned_training

    env, settings, storage = world
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    dag = DagBag(dag_folder=str(REPO / "dags" / "tune.py")).dags["tune"]
    run = dag.test(
        logical_date=dt.datetime(2026, 7, 1, tzinfo=dt.UTC),
        run_conf={"trials": 8, "parallel": 2, "note": "dag"},
    )
    assert run.state == "success"
    searches = [ti for ti in run.get_task_instances() if ti.task_id == "search"]
    assert sorted(ti.map_index for ti in searches) == [0, 1] and {ti.state for ti in searches} == {"success"}
    _, study = study_of(storage)
    assert len(counted(study.get_trials())) == 8  # the end-to-end study's 6, extended to 8
    tuned = read_tuned(storage)
    assert tuned["study"] == study.study_name and tuned["gate_passed"] is True

    form = {
        "epochs": settings.training.epochs,
        "learning_rate": settings.training.learning_rate,
        "batch_size": 16,
    }
    training = tuned_training(settings, storage, form)
    assert training.overrides["learning_rate"] == tuned["params"]["learning_rate"]  # left at the default
    assert training.overrides["dropout"] == tuned["params"]["dropout"]
    assert training.overrides["batch_size"] == 16  # set in the form: it wins
    assert training.tags == {"tuned_from_study": study.study_name} and study.study_name in training.shown
