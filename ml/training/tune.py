"""Hyperparameter search of the classifier head (Optuna), then cross-validation and the tuned model.

Search: an Optuna study (TPE sampler, seeded; MedianPruner on each epoch's val accuracy) over the
``tuning`` space (learning rate log-uniform, batch size categorical, dropout uniform; all inside
the spec's bounds). The objective is the best val accuracy of a head trained on the cached
features of one dataset version, read once per process: every trial trains on the same arrays.

Study: in an RDB storage (``tuning.storage_url``; default SQLite ``<storage root>/tuning/optuna.db``),
named ``tune-<dataset version>`` and created or loaded, so a killed run resumes and several
processes share one study. The trial budget is the study's: a trial counts when it completed,
was pruned, or failed with an error of its own, and a worker stops once the study holds
``trials`` counted trials. A trial whose process died (no heartbeat for ``tuning.grace_seconds``)
is marked failed by the next worker and does not count, so its slot runs again; a trial that
finds the budget spent by others (workers racing for the last slot) fails at once as ``surplus``
and does not count either.

Then ``finish``: stratified k-fold CV of the best parameters on train+val (``ml.training.crossval``),
and the final model, trained on train+val for the CV's median best epoch count, through the
retrain pipeline: gated on the untouched test split, registered as challenger when it passes.

MLflow (experiment ``<experiment>-tuning``): one parent run per study, a nested run per trial
(params, curves, state) and per fold; importances and optimisation history as images, the best
parameters on the parent. The final retrain run (main experiment) is tagged with the study.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from ml import registry
from ml.config import Settings, TuningConfig
from ml.data.catalog import dataset_rows
from ml.progress import Progress
from ml.runs import RunContext
from ml.storage import LocalStorage, Storage, StorageError
from ml.training.crossval import (
    CrossValidation,
    FoldResult,
    cross_validate,
    epochs_trained,
    pool,
    train_on_train_and_val,
    with_params,
)
from ml.training.model import Head
from ml.training.pipeline import RetrainResult, retrain, snapshot
from ml.training.train import Hyperparameters, SplitData, fit_head, split_data

log = logging.getLogger(__name__)

STUDY_PREFIX = "tune-"
TUNING_DB_KEY = "tuning/optuna.db"
TUNED_PARAMS_KEY = "tuning/best_params.json"
PARENT_RUN_ATTR = "mlflow_parent_run_id"
HPARAM_NAMES = {"learning_rate": "learning_rate", "batch_size": "batch_size", "dropout_rate": "dropout"}


def study_name(dataset_version: str, setup: dict[str, Any]) -> str:
    """``tune-<dataset version>-<setup digest>``: a study resumes only under the same search space,
    features and trial recipe; trials measured otherwise would mix into its best parameters (a
    narrowed range returned a best outside it, a changed batch-size list failed every new trial)."""
    digest = hashlib.sha256(json.dumps(setup, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{STUDY_PREFIX}{dataset_version}-{digest}"


def study_setup(settings: Settings, space: SearchSpace, cache_id: str) -> dict[str, Any]:
    """What a trial's score depends on besides its parameters and the dataset version."""
    tuning = settings.tuning
    return {
        "space": space.to_dict(),
        "features": cache_id,
        "epochs": tuning.epochs,
        "patience": tuning.patience,
        "pruner": [tuning.pruner_startup_trials, tuning.pruner_warmup_epochs],
    }


def study_storage_url(settings: Settings, storage: Storage) -> str:
    """``tuning.storage_url``, else a SQLite file under a local storage root."""
    if settings.tuning.storage_url:
        return settings.tuning.storage_url
    if not isinstance(storage, LocalStorage):
        raise ValueError(
            f"tuning.storage_url must be set: storage.root {storage.root_url} is not a local folder, and "
            "every tuning worker must reach the study (e.g. postgresql://user@host/optuna)"
        )
    path = storage.root / TUNING_DB_KEY
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@dataclass(frozen=True)
class SearchSpace:
    """The searched parameters (spec names); construction checks them against the spec's bounds."""

    learning_rate: tuple[float, float]
    batch_size: tuple[int, ...]
    dropout_rate: tuple[float, float]

    def __post_init__(self) -> None:
        from pydantic import ValidationError

        try:
            TuningConfig(
                learning_rate=self.learning_rate,
                batch_size=list(self.batch_size),
                dropout_rate=self.dropout_rate,
            )
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"bad search space: {problems}") from None

    @classmethod
    def from_settings(cls, settings: Settings) -> SearchSpace:
        t = settings.tuning
        return cls(tuple(t.learning_rate), tuple(t.batch_size), tuple(t.dropout_rate))

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        return {
            "learning_rate": trial.suggest_float("learning_rate", *self.learning_rate, log=True),
            "batch_size": trial.suggest_categorical("batch_size", list(self.batch_size)),
            "dropout_rate": trial.suggest_float("dropout_rate", *self.dropout_rate),
        }

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) for k, v in asdict(self).items()}


def trial_hparams(settings: Settings) -> Hyperparameters:
    """What every trial and CV fold starts from: training's settings, tuning's epochs and patience."""
    t = settings.tuning
    return Hyperparameters.from_settings(
        settings, epochs=t.epochs, patience=t.patience, monitor="val_accuracy"
    )


class TrialPruning(L.Callback):
    """Reports each epoch's val accuracy to the trial; stops the fit when the pruner says so."""

    def __init__(self, trial: optuna.Trial, monitor: str = "val_accuracy") -> None:
        self.trial, self.monitor = trial, monitor
        self.reported: dict[int, float] = {}

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        epoch, value = trainer.current_epoch, float(trainer.callback_metrics[self.monitor])
        self.trial.report(value, epoch)
        self.reported[epoch] = value
        if self.trial.should_prune():
            raise optuna.TrialPruned(
                f"epoch {epoch}: {self.monitor} {value:.4f} below the median of earlier trials"
            )


Objective = Callable[[optuna.Trial], float]


def make_objective(
    data: dict[str, SplitData],
    classes: list[str],
    base: Hyperparameters,
    space: SearchSpace,
    tracker: StudyTracker | None = None,
) -> Objective:
    """Best val accuracy of a head trained with the trial's parameters (pruned on the median)."""
    for split in ("train", "val"):
        if len(data[split]) == 0:
            raise ValueError(f"the {split} split is empty: nothing to tune on")

    def objective(trial: optuna.Trial) -> float:
        params = space.suggest(trial)
        hparams = with_params(base, params)
        curve: dict[int, dict[str, float]] = {}

        def sink(metrics: dict[str, float], step: int) -> None:
            curve.setdefault(step, {}).update(metrics)

        pruning = TrialPruning(trial)
        run = tracker.start_trial(trial, params) if tracker else None
        outcome = "failed"
        try:
            head = Head(data["train"].features.shape[2], len(classes), hparams.dropout)
            fit = fit_head(head, data, hparams, sink, callbacks=[pruning])
            trial.set_user_attr("best_epoch", fit.best_epoch)
            trial.set_user_attr("epochs_run", epochs_trained(fit))
            outcome = "complete"
            return fit.best_val_accuracy
        except optuna.TrialPruned:
            outcome = "pruned"
            raise
        finally:
            if tracker and run:
                for epoch, value in pruning.reported.items():  # epoch 0 reaches only the pruner
                    curve.setdefault(epoch, {}).setdefault("val_accuracy", value)
                tracker.end_trial(run, curve, outcome)

    return objective


class BudgetSpent(Exception):
    """Other workers spent the study's trial budget before this trial began."""


def counts_toward_budget(trial: FrozenTrial) -> bool:
    """Complete, pruned, or failed with its own error (not a dead process, not a surplus trial)."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and "error" in trial.user_attrs


@dataclass(frozen=True)
class BudgetState:
    counted: int
    running: int
    ignored: int  # failed without counting: their process died, or they were surplus

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def budget_state(trials: list[FrozenTrial]) -> BudgetState:
    counted = sum(counts_toward_budget(t) for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    ignored = sum(t.state == TrialState.FAIL and not counts_toward_budget(t) for t in trials)
    return BudgetState(counted, running, ignored)


def guarded(objective: Objective, budget: int, worker: int) -> Objective:
    """The objective behind the budget check; an error is recorded on the trial (which then counts)."""

    def run(trial: optuna.Trial) -> float:
        earlier = [t for t in trial.study.get_trials(deepcopy=False) if t.number < trial.number]
        held = sum(counts_toward_budget(t) or t.state == TrialState.RUNNING for t in earlier)
        if held >= budget:
            trial.set_user_attr("surplus", True)
            raise BudgetSpent(
                f"trial {trial.number}: the budget of {budget} trials was spent by other workers"
            )
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("host", socket.gethostname())
        try:
            return objective(trial)
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:1000])
            raise

    return run


def fail_stale(study: optuna.Study) -> None:
    """Mark trials whose process stopped heartbeating as failed (they free their budget slot)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def work(
    study: optuna.Study,
    objective: Objective,
    budget: int,
    *,
    worker: int = 0,
    timeout: float | None = None,
    poll_seconds: float = 1.0,
) -> int:
    """Run trials until the study holds ``budget`` counted trials (or ``timeout``); return how many ran here.

    When the remaining slots are held by running trials (other workers', or a dead process's not yet
    marked stale) the worker waits for them instead of starting more, so the budget is never exceeded.
    Progress is the study's counted trials (every worker's), one log line per trial.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    ran = 0
    with Progress("tuning trials", budget, 1, unit="trials", logger=log) as progress:
        while deadline is None or time.monotonic() < deadline:
            fail_stale(study)
            state = budget_state(study.get_trials(deepcopy=False))
            progress.reach(state.counted)
            if state.counted >= budget:
                break
            if state.counted + state.running >= budget:
                time.sleep(poll_seconds)
                continue
            study.optimize(guarded(objective, budget, worker), n_trials=1, catch=(Exception,))
            ran += 1
    return ran


def sampler_for(tuning: TuningConfig, worker: int, existing: int) -> optuna.samplers.TPESampler:
    """TPE seeded by the config seed, the worker's slot and the trials already run (a resume draws anew)."""
    seed = int(np.random.SeedSequence([tuning.seed, worker, existing]).generate_state(1)[0])
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=tuning.startup_trials, constant_liar=True)


def open_study(
    tuning: TuningConfig,
    url: str,
    name: str,
    on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None,
) -> tuple[optuna.Study, bool]:
    """The study ``name`` (created, or loaded when it exists) and whether this call created it.

    ``create_study(load_if_exists=True)`` in two steps, so the creator is known: it opens the
    study's MLflow parent run.
    """
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine,
            heartbeat_interval=tuning.heartbeat_seconds,
            grace_period=tuning.grace_seconds,
            heartbeat_stale_trial_callback=on_stale,
        )
    pruner = optuna.pruners.MedianPruner(
        n_startup_trials=tuning.pruner_startup_trials, n_warmup_steps=tuning.pruner_warmup_epochs
    )
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize", pruner=pruner)
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(study_name=name, storage=storage, pruner=pruner), False


@dataclass(frozen=True)
class StudySummary:
    """Where a study stands: its budget, every trial's state, the best trial so far."""

    name: str
    storage: str
    dataset_version: str
    budget: int
    complete: int
    pruned: int
    failed: int
    ignored: int
    running: int
    best_trial: int | None
    best_value: float | None
    best_params: dict[str, Any]
    ran_here: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarise(
    study: optuna.Study, url: str, dataset_version: str, budget: int, ran_here: int, seconds: float
) -> StudySummary:
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: (t.value, -t.number)) if complete else None
    return StudySummary(
        name=study.study_name,
        storage=redacted(url),
        dataset_version=dataset_version,
        budget=budget,
        complete=len(complete),
        pruned=states.count(TrialState.PRUNED),
        failed=sum(t.state == TrialState.FAIL and counts_toward_budget(t) for t in trials),
        ignored=budget_state(trials).ignored,
        running=states.count(TrialState.RUNNING),
        best_trial=best.number if best else None,
        best_value=float(best.value) if best else None,
        best_params=dict(best.params) if best else {},
        ran_here=ran_here,
        seconds=round(seconds, 2),
    )


def _experiment_id(settings: Settings) -> str:
    from mlflow.exceptions import MlflowException

    name = f"{settings.mlflow.experiment_name}-tuning"
    try:
        return registry.ensure_experiment(settings, name)
    except MlflowException:  # another worker created it at the same moment
        return registry.ensure_experiment(settings, name)


class StudyTracker:
    """The study in MLflow through the client API (no active-run state): safe across workers."""

    def __init__(self, settings: Settings, study_name: str, parent_run_id: str) -> None:
        self.client = registry.client(settings)
        self.experiment_id = _experiment_id(settings)
        self.study_name, self.parent = study_name, parent_run_id

    @classmethod
    def attach(
        cls,
        settings: Settings,
        study: optuna.Study,
        created: bool,
        params: dict[str, Any],
        wait_s: float = 60,
    ) -> StudyTracker:
        """The study creator opens the parent run; other workers wait for its id on the study."""
        deadline = time.monotonic() + (0 if created else wait_s)
        while PARENT_RUN_ATTR not in study.user_attrs and time.monotonic() < deadline:
            time.sleep(0.5)
        if PARENT_RUN_ATTR in study.user_attrs:
            return cls(settings, study.study_name, str(study.user_attrs[PARENT_RUN_ATTR]))
        tracker = cls(settings, study.study_name, "")
        tags = {"optuna_study": study.study_name, "role": "study"}
        run = tracker.client.create_run(tracker.experiment_id, tags=tags, run_name=study.study_name)
        tracker.parent = run.info.run_id
        tracker.client.log_batch(tracker.parent, params=_params(params))
        study.set_user_attr(PARENT_RUN_ATTR, tracker.parent)
        return tracker

    def child(self, name: str, tags: dict[str, str]) -> str:
        tags = {"mlflow.parentRunId": self.parent, "optuna_study": self.study_name, **tags}
        return self.client.create_run(self.experiment_id, tags=tags, run_name=name).info.run_id

    def start_trial(self, trial: optuna.Trial, params: dict[str, Any]) -> str:
        run = self.child(f"trial-{trial.number:03d}", {"optuna_trial": str(trial.number)})
        trial.set_user_attr("mlflow_run_id", run)
        self.client.log_batch(run, params=_params(params))
        return run

    def end_trial(self, run: str, curve: dict[int, dict[str, float]], outcome: str) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for step, row in curve.items() for k, v in row.items()]
        self.client.log_batch(run, metrics=metrics, tags=[RunTag("state", outcome)])
        self.client.set_terminated(run, "FAILED" if outcome == "failed" else "FINISHED")

    def log_fold(self, fold: FoldResult, params: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        run = self.child(f"cv-fold-{fold.fold}", {"cv_fold": str(fold.fold)})
        now = int(time.time() * 1000)
        figures = {k: float(v) for k, v in fold.to_dict().items() if k != "fold"}
        metrics = [Metric(k, v, now, 0) for k, v in figures.items()]
        self.client.log_batch(run, metrics=metrics, params=_params(params))
        self.client.set_terminated(run, "FINISHED")


def _params(values: dict[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(k, str(v)) for k, v in values.items()]


def mark_killed(settings: Settings) -> Callable[[optuna.Study, FrozenTrial], None]:
    """For trials failed as stale: their MLflow run (left RUNNING by the dead process) becomes KILLED."""

    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        run = trial.user_attrs.get("mlflow_run_id")
        log.warning(
            "trial %s of %s: its process died; marked failed (not counted)", trial.number, study.study_name
        )
        if run:
            client = registry.client(settings)
            client.set_tag(run, "state", "failed (process died)")
            client.set_terminated(run, "KILLED")

    return callback


@dataclass(frozen=True)
class Session:
    """One process's view of a study: the dataset version's features and the study, tracked."""

    settings: Settings
    storage: Storage
    dataset_version: str
    data: dict[str, SplitData]
    study: optuna.Study
    url: str
    tracker: StudyTracker
    worker: int


def configure_process(settings: Settings) -> None:
    """Torch threads per tuning worker, and quiet per-fit Lightning banners (50 trials print 50)."""
    import torch

    if settings.tuning.torch_threads:
        torch.set_num_threads(settings.tuning.torch_threads)
    for name in ("lightning.pytorch.utilities.rank_zero", "pytorch_lightning.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def open_session(
    settings: Settings, storage: Storage, dataset_version: str | None = None, worker: int = 0
) -> Session:
    """Features of the dataset version (LATEST by default; computed once, cached) and its study."""
    configure_process(settings)
    version, rows = dataset_rows(storage, version=dataset_version)
    snap = snapshot(settings, storage, version, rows)
    data = split_data(rows, snap.features, list(settings.classes))
    url = study_storage_url(settings, storage)
    space = SearchSpace.from_settings(settings)
    name = study_name(version["version"], study_setup(settings, space, snap.cache_id))
    study, created = open_study(settings.tuning, url, name, mark_killed(settings))
    study.sampler = sampler_for(settings.tuning, worker, len(study.get_trials(deepcopy=False)))
    described = {
        "dataset_version": version["version"],
        "space": json.dumps(space.to_dict()),
        "sampler": f"TPE(seed={settings.tuning.seed}+worker, startup={settings.tuning.startup_trials})",
        "pruner": f"Median(startup={settings.tuning.pruner_startup_trials}, "
        f"warmup={settings.tuning.pruner_warmup_epochs}) on val_accuracy",
        "cv_folds": settings.tuning.cv_folds,
        "storage": redacted(url),
    }
    tracker = StudyTracker.attach(settings, study, created, described)
    return Session(settings, storage, version["version"], data, study, url, tracker, worker)


def search(session: Session, trials: int | None = None, timeout: float | None = None) -> StudySummary:
    """This worker's share of the study's trials; the summary of the whole study afterwards."""
    settings = session.settings
    budget = trials or settings.tuning.trials
    timeout = timeout if timeout is not None else settings.tuning.timeout_seconds
    session.tracker.client.set_tag(session.tracker.parent, "budget", str(budget))
    objective = make_objective(
        session.data,
        list(settings.classes),
        trial_hparams(settings),
        SearchSpace.from_settings(settings),
        session.tracker,
    )
    started = time.perf_counter()
    poll = min(float(settings.tuning.heartbeat_seconds), 5.0)
    ran = work(session.study, objective, budget, worker=session.worker, timeout=timeout, poll_seconds=poll)
    seconds = time.perf_counter() - started
    return summarise(session.study, session.url, session.dataset_version, budget, ran, seconds)


@dataclass(frozen=True)
class TuneResult:
    """The study, its best parameters, their cross-validation and the final retrain (None: search only)."""

    study: StudySummary
    best_params: dict[str, Any]
    cv: CrossValidation | None = None
    retrain: RetrainResult | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": self.study.to_dict(),
            "best_params": self.best_params,
            "cv": self.cv.to_dict() if self.cv else None,
            "retrain": self.retrain.to_dict() if self.retrain else None,
        }


def best_params(study: optuna.Study) -> tuple[int, dict[str, Any]]:
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        counts = budget_state(study.get_trials(deepcopy=False)).to_dict()
        raise ValueError(
            f"no trial of study {study.study_name} completed ({counts}): nothing to cross-validate"
        )
    best = max(complete, key=lambda t: (t.value, -t.number))
    return best.number, dict(best.params)


def finish(session: Session, context: RunContext | None = None, budget: int | None = None) -> TuneResult:
    """CV of the best parameters on train+val, then the final model through the retrain pipeline."""
    settings, tracker = session.settings, session.tracker
    number, params = best_params(session.study)
    hparams = with_params(trial_hparams(settings), params)
    cv = cross_validate(
        pool(session.data["train"], session.data["val"]),
        list(settings.classes),
        hparams,
        settings.tuning.cv_folds,
        settings.training.seed,
        on_fold=lambda fold: tracker.log_fold(fold, params),
    )
    overrides = {HPARAM_NAMES[k]: v for k, v in params.items()} | {"epochs": cv.final_epochs}
    tags = {
        "tuning_study": session.study.study_name,
        "tuning_parent_run_id": tracker.parent,
        "tuning_best_trial": str(number),
        "final_fit": f"train+val for {cv.final_epochs} epochs (CV median best epoch); val curves in-sample",
    }
    result = retrain(
        settings,
        session.storage,
        overrides=overrides,
        context=context or RunContext(trigger="manual", reason=f"tuned: study {session.study.study_name}"),
        dataset_version=session.dataset_version,
        force=True,
        fit=train_on_train_and_val,
        tags=tags,
    )
    summary = summarise(
        session.study, session.url, session.dataset_version, budget or settings.tuning.trials, 0, 0.0
    )
    record(session, summary, params, cv, result)
    return TuneResult(summary, params, cv, result)


def record(
    session: Session,
    summary: StudySummary,
    params: dict[str, Any],
    cv: CrossValidation,
    result: RetrainResult,
) -> None:
    """The parent run's outcome (best parameters, CV, plots) and the tuned parameters in storage."""
    from mlflow.entities import Metric, RunTag

    client, parent = session.tracker.client, session.tracker.parent
    now = int(time.time() * 1000)
    figures = {
        "best_value": summary.best_value or 0.0,
        "trials_complete": summary.complete,
        "trials_pruned": summary.pruned,
        "trials_failed": summary.failed,
        "trials_ignored": summary.ignored,
        **{f"cv_{k}": v for k, v in cv.to_dict().items() if k.endswith(("_mean", "_sd"))},
        "final_epochs": cv.final_epochs,
        **{f"importance_{k}": v for k, v in importances(session.study).items()},
    }
    logged = client.get_run(parent).data.params
    best = {f"best_{k}": str(v) for k, v in params.items()}
    client.log_batch(
        parent,
        metrics=[Metric(k, float(v), now, 0) for k, v in figures.items()],
        params=_params({k: v for k, v in best.items() if k not in logged}),
        tags=[
            RunTag("best_params", json.dumps(params)),
            RunTag("retrain_run_id", result.run_id),
            RunTag("model_version", str(result.model_version)),
        ],
    )
    client.log_dict(parent, TuneResult(summary, params, cv, result).to_dict(), "tuning/result.json")
    for path, figure in study_figures(session.study).items():
        client.log_figure(parent, figure, path)
    client.set_terminated(parent, "FINISHED")
    write_tuned(session.storage, summary, params, cv, result)


def importances(study: optuna.Study) -> dict[str, float]:
    """fANOVA importance per parameter; empty with fewer than two completed trials."""
    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (ValueError, RuntimeError) as exc:
        log.warning("no parameter importances for %s: %s", study.study_name, exc)
        return {}


def study_figures(study: optuna.Study) -> dict[str, Any]:
    """Optimisation history and parameter importances (optuna.visualization.matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances

    plots = {"tuning/optimization_history.png": plot_optimization_history}
    if importances(study):
        plots["tuning/param_importances.png"] = plot_param_importances
    figures = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for path, plot in plots.items():
            figure = plot(study).figure
            figure.set_size_inches(8, 5)
            figure.tight_layout()
            figures[path] = figure
    return figures


def write_tuned(
    storage: Storage,
    summary: StudySummary,
    params: dict[str, Any],
    cv: CrossValidation,
    result: RetrainResult,
) -> None:
    """``tuning/best_params.json``: what the retrain DAG trains with (see ``with_tuned``)."""
    document = {
        "study": summary.name,
        "dataset_version": summary.dataset_version,
        "params": {HPARAM_NAMES[k]: v for k, v in params.items()},
        "best_value": summary.best_value,
        "cv": {k: v for k, v in cv.to_dict().items() if k != "folds"},
        "model_version": result.model_version,
        "gate_passed": bool(result.gate.get("passed")),
        "written_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    storage.write_bytes(TUNED_PARAMS_KEY, json.dumps(document, indent=2, sort_keys=True).encode())


def read_tuned(storage: Storage) -> dict[str, Any] | None:
    """The latest tuned parameters, or None when no study has finished."""
    try:
        return json.loads(storage.read_bytes(TUNED_PARAMS_KEY))
    except StorageError:
        return None


def with_tuned(
    form: dict[str, Any], defaults: dict[str, Any], tuned: dict[str, Any] | None
) -> dict[str, Any]:
    """Training overrides: a form value other than the config default wins, else the tuned value."""
    overrides = dict(form)
    for key, value in ((tuned or {}).get("params") or {}).items():
        if form.get(key) is None or form.get(key) == defaults.get(key):
            overrides[key] = value
    return overrides


@dataclass(frozen=True)
class TunedTraining:
    """What a retrain trains with once tuned parameters exist, and how the approval form shows it."""

    overrides: dict[str, Any]
    tags: dict[str, str]
    shown: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tuned_training(settings: Settings, storage: Storage, form: dict[str, Any]) -> TunedTraining:
    """The retrain DAG's overrides: config defaults < the latest tuned parameters < values set in the form."""
    tuned = read_tuned(storage)
    hp = Hyperparameters.from_settings(settings)
    defaults = {"epochs": hp.epochs, "learning_rate": hp.learning_rate, "batch_size": hp.batch_size}
    overrides = with_tuned(form, defaults | {"dropout": hp.dropout}, tuned)
    if not tuned:
        return TunedTraining(overrides, {}, "none (no tuning study has finished)")
    used = {k: v for k, v in tuned["params"].items() if overrides.get(k) == v}
    cv = tuned.get("cv") or {}
    shown = (
        f"study {tuned['study']} (CV accuracy {cv.get('accuracy_mean')} +- {cv.get('accuracy_sd')}): "
        + ", ".join(f"{k}={v:.4g}" for k, v in used.items())
        + ("" if len(used) == len(tuned["params"]) else "; the form set the others")
    )
    return TunedTraining(overrides, {"tuned_from_study": str(tuned["study"])}, shown)


def start_helpers(session: Session, count: int, trials: int, timeout: float | None) -> list[Any]:
    """``count`` more local worker processes on the same study (``mlops tune --search-only``), each with
    its own slot; they load the cached features and share the budget through the study's storage."""
    import os
    import subprocess
    import sys

    helpers = []
    for slot in range(session.worker + 1, session.worker + 1 + count):
        argv = [sys.executable, "-m", "ml", "tune", "--search-only", "--worker", str(slot)]
        argv += ["--dataset-version", session.dataset_version, "--trials", str(trials)]
        argv += ["--timeout", str(timeout)] if timeout is not None else []
        helpers.append(subprocess.Popen(argv, env=dict(os.environ), stdout=subprocess.DEVNULL))  # noqa: S603
    return helpers


def tune_and_train(
    settings: Settings,
    storage: Storage,
    *,
    trials: int | None = None,
    timeout: float | None = None,
    dataset_version: str | None = None,
    worker: int = 0,
    search_only: bool = False,
    parallel: int = 1,
    context: RunContext | None = None,
) -> TuneResult:
    """Search (this process's share of the study, beside ``parallel - 1`` local helper processes), then
    CV and the final tuned model (unless search only)."""
    session = open_session(settings, storage, dataset_version, worker)
    budget = trials or settings.tuning.trials
    helpers = start_helpers(session, parallel - 1, budget, timeout) if parallel > 1 else []
    try:
        summary = search(session, budget, timeout)
    finally:
        failed = [helper.args for helper in helpers if helper.wait() != 0]
    if failed:
        log.warning("tuning helpers exited with an error: %s", failed)
    summary = summarise(
        session.study, session.url, session.dataset_version, budget, summary.ran_here, summary.seconds
    )
    if search_only:
        return TuneResult(summary, summary.best_params)
    finished = finish(session, context, budget=summary.budget)
    return TuneResult(summary, finished.best_params, finished.cv, finished.retrain)
