"""Hyperparameter search and cross-validation on synthetic features, with real Optuna studies (SQLite)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from ml.config import ConfigError, TuningConfig, load_settings
from ml.training.crossval import (
    CrossValidation,
    FoldResult,
    cross_validate,
    fold_figures,
    pool,
    stratified_folds,
    train_on_train_and_val,
)
from ml.training.train import Hyperparameters, SplitData
from ml.training.tune import (
    BudgetSpent,
    SearchSpace,
    budget_state,
    guarded,
    make_objective,
    open_study,
    with_tuned,
    work,
)

SETTINGS = load_settings(environ={})
CLASSES = ["a", "b", "c", "d", "e"]
GOOD = {"learning_rate": 0.01, "batch_size": 16, "dropout_rate": 0.1}
BAD = {"learning_rate": 0.0001, "batch_size": 64, "dropout_rate": 0.5}  # barely moves in a few epochs


def clusters(n: int, views: int, seed: int, labels: np.ndarray | None = None, dim: int = 16) -> SplitData:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(size=(len(CLASSES), dim)).astype(np.float32)
    labels = rng.integers(0, len(CLASSES), size=n) if labels is None else labels
    features = centres[labels][:, None, :] + rng.normal(scale=0.6, size=(n, views, dim))
    return SplitData(features.astype(np.float32), labels.astype(np.int64), [f"{seed}-{i}" for i in range(n)])


def separable(train: int = 300, val: int = 100) -> dict[str, SplitData]:
    return {"train": clusters(train, 2, 1), "val": clusters(val, 1, 2), "test": clusters(100, 1, 3)}


def base(**overrides: object) -> Hyperparameters:
    values = {"epochs": 6, "patience": 6, "monitor": "val_accuracy", **overrides}
    return Hyperparameters.from_settings(SETTINGS, **values)


def study(tmp_path: Path, name: str = "s", **tuning: object) -> optuna.Study:
    config = TuningConfig(**{"pruner_startup_trials": 2, "pruner_warmup_epochs": 1, **tuning})
    created, _ = open_study(config, f"sqlite:///{tmp_path / 'optuna.db'}", name)
    created.sampler = optuna.samplers.TPESampler(seed=0)
    return created


SPACE = SearchSpace.from_settings(SETTINGS)


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("LEARNING_RATE", "[0.00001, 0.01]", r"tuning\.learning_rate: .*outside the spec's \[0\.0001, 0\.01"),
        ("LEARNING_RATE", "[0.01, 0.001]", r"tuning\.learning_rate: .*is empty"),
        ("DROPOUT_RATE", "[0.0, 0.5]", r"tuning\.dropout_rate: .*outside the spec's \[0\.1, 0\.5\]"),
        ("BATCH_SIZE", "[8, 32]", r"tuning\.batch_size: .*among the spec's \[16, 32, 64\]"),
    ],
)
def test_a_space_outside_the_spec_fails_naming_the_parameter(key: str, value: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(environ={f"MLOPS__TUNING__{key}": value})


def test_a_search_space_built_in_code_is_checked_against_the_spec_too() -> None:
    with pytest.raises(ValueError, match=r"bad search space: learning_rate: .*outside the spec's"):
        SearchSpace((0.0001, 0.1), (16, 32), (0.1, 0.5))
    with pytest.raises(ValueError, match=r"bad search space: batch_size"):
        SearchSpace((0.0001, 0.01), (128,), (0.1, 0.5))
    assert SPACE == SearchSpace((0.0001, 0.01), (16, 32, 64), (0.1, 0.5))  # the spec's space is the default


def test_an_empty_split_fails_naming_it() -> None:
    data = separable()
    empty = SplitData(np.zeros((0, 2, 16), np.float32), np.zeros(0, np.int64), [])
    with pytest.raises(ValueError, match="the train split is empty"):
        make_objective({**data, "train": empty}, CLASSES, base(), SPACE)
    with pytest.raises(ValueError, match="the val split is empty"):
        make_objective({**data, "val": empty}, CLASSES, base(), SPACE)


def test_the_objective_learns_separable_features_and_not_shuffled_labels(tmp_path: Path) -> None:
    data = separable()
    rng = np.random.default_rng(9)
    noise = {split: SplitData(d.features, rng.permutation(d.labels), d.sha256) for split, d in data.items()}
    found = []
    for name, features in (("real", data), ("shuffled", noise)):
        s = study(tmp_path, name)
        s.enqueue_trial(GOOD)
        work(s, make_objective(features, CLASSES, base(), SPACE), budget=1)
        found.append(s.trials[0])
    real, shuffled = found
    assert real.state == shuffled.state == TrialState.COMPLETE
    assert real.value > 0.95  # best val accuracy of the trained head
    assert shuffled.value < 0.45  # 5 classes: chance is 0.2
    assert real.params == GOOD and real.user_attrs["epochs_run"] >= 1


def test_trials_in_a_bad_region_are_pruned_on_the_median(tmp_path: Path) -> None:
    s = study(tmp_path)
    for params in (GOOD, GOOD, GOOD, BAD, BAD):
        s.enqueue_trial(params)
    work(s, make_objective(separable(), CLASSES, base(), SPACE), budget=5)
    states = [t.state for t in s.trials]
    assert states == [TrialState.COMPLETE] * 3 + [TrialState.PRUNED] * 2
    for pruned in s.trials[3:]:
        reported = pruned.intermediate_values
        assert max(reported) < 5  # stopped before its last epoch
        assert reported[max(reported)] < 0.9  # while the good trials were at ~1.0


def test_a_crashing_trial_is_recorded_as_failed_and_the_study_goes_on(tmp_path: Path) -> None:
    s = study(tmp_path)
    objective = make_objective(separable(), CLASSES, base(epochs=3), SPACE)

    def crashes_once(trial: optuna.Trial) -> float:
        if trial.number == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return objective(trial)

    ran = work(s, crashes_once, budget=4)
    assert ran == 4 and [t.number for t in s.trials] == [0, 1, 2, 3]
    assert [t.state for t in s.trials].count(TrialState.COMPLETE) == 3
    failed = s.trials[1]
    assert failed.state == TrialState.FAIL
    assert failed.user_attrs["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert budget_state(s.trials).counted == 4  # its own error: it counts toward the budget


def test_running_trials_hold_their_slots_and_a_late_trial_is_surplus(tmp_path: Path) -> None:
    s = study(tmp_path)
    elsewhere = s.ask()  # another worker's trial, still running
    objective = make_objective(separable(), CLASSES, base(epochs=2), SPACE)
    ran = work(s, objective, budget=3, timeout=8, poll_seconds=0.2)
    assert ran == 2  # the third slot is held by the running trial: the worker waits instead of overshooting
    assert budget_state(s.trials).to_dict() == {"counted": 2, "running": 1, "ignored": 0}

    s.tell(elsewhere, 0.5)
    late = s.ask()  # a worker that checked before the last slot was taken
    with pytest.raises(BudgetSpent, match="budget of 3 trials was spent"):
        guarded(lambda trial: 1.0, budget=3, worker=1)(late)
    s.tell(late, state=TrialState.FAIL)
    state = budget_state(s.get_trials())
    assert (state.counted, state.ignored) == (3, 1)  # the surplus trial costs no budget
    assert s.get_trials()[-1].user_attrs == {"surplus": True}


def test_cv_folds_are_stratified_and_partition_the_data() -> None:
    labels = np.repeat(np.arange(5), [50, 30, 20, 10, 5])
    folds = stratified_folds(labels, CLASSES, 5, seed=3)
    held = [set(h) for _, h in folds]
    assert set().union(*held) == set(range(len(labels))) and sum(map(len, held)) == len(labels)
    for train_at, held_at in folds:
        assert not set(train_at) & set(held_at)
        counts = np.bincount(labels[held_at], minlength=5)
        assert np.all(np.abs(counts - np.bincount(labels) / 5) <= 1), counts
    with pytest.raises(ValueError, match=r"at least 5 train\+val images of every class; too few: \{'e': 3\}"):
        stratified_folds(np.repeat(np.arange(5), [10, 10, 10, 10, 3]), CLASSES, 5, seed=3)


def test_each_folds_figures_come_from_its_own_held_out_part() -> None:
    pooled = clusters(250, 2, 4)
    flipped = np.random.default_rng(5).choice(len(pooled), size=20, replace=False)
    labels = pooled.labels.copy()
    labels[flipped] = (labels[flipped] + 1) % 5  # no model can get these right from their features
    pooled = SplitData(pooled.features, labels, pooled.sha256)
    seen: list[FoldResult] = []
    cv = cross_validate(pooled, CLASSES, base(epochs=8, patience=8), 5, seed=1, on_fold=seen.append)
    assert list(cv.folds) == seen and len(cv.folds) == 5
    accuracies = set()
    for fold in cv.folds:
        held = np.array(fold.held_out)
        assert (fold.accuracy, fold.f1_macro) == fold_figures(labels[held], np.array(fold.predictions))
        wrong_by_construction = np.isin(held, flipped).sum()
        assert fold.accuracy == pytest.approx(1 - wrong_by_construction / len(held), abs=1.5 / len(held))
        accuracies.add(round(fold.accuracy, 3))
    assert len(accuracies) > 1  # the folds differ: each is judged on its own held-out images
    assert cv.accuracy_mean == pytest.approx(np.mean([f.accuracy for f in cv.folds]))


def test_the_final_epochs_are_the_median_best_epoch_and_sd_is_the_sample_sd() -> None:
    folds = tuple(
        FoldResult(i, 80, 20, acc, acc, best, best + 3, (), ())
        for i, (acc, best) in enumerate([(0.9, 2), (0.8, 4), (1.0, 5), (0.9, 7), (0.9, 9)])
    )
    cv = CrossValidation(folds, seed=0)
    assert cv.final_epochs == 6  # best epochs 2,4,5,7,9 are 0-based: 3,5,6,8,10 epochs, median 6
    assert cv.accuracy_sd == pytest.approx(np.std([0.9, 0.8, 1.0, 0.9, 0.9], ddof=1))
    assert cv.to_dict()["k"] == 5 and cv.to_dict()["folds"][0] == folds[0].to_dict()


def test_the_final_model_trains_on_train_and_val_for_exactly_the_given_epochs() -> None:
    # class "e" exists only in val and test: a model that never trained on val cannot know it
    train = clusters(300, 2, 1, labels=np.random.default_rng(1).integers(0, 4, 300))
    val = clusters(100, 2, 2, labels=np.full(100, 4))  # every split has the cache's views
    test = clusters(100, 2, 3)
    logged: list[int] = []
    data = {"train": train, "val": val, "test": test}
    result = train_on_train_and_val(data, CLASSES, base(epochs=7), lambda m, step: logged.append(step))
    assert logged == list(range(1, 7))  # every epoch after the first is logged; none stopped early
    assert result.fit.best_epoch == 6 and not result.fit.stopped_early
    assert result.evaluation.recall["e"].value > 0.9
    assert len(pool(train, val)) == 400


def test_tuned_parameters_fill_in_what_the_form_left_at_the_default() -> None:
    defaults = {"epochs": 50, "learning_rate": 0.001, "batch_size": 32}
    tuned = {"params": {"learning_rate": 0.004, "batch_size": 64, "dropout": 0.2}}
    form = {"epochs": 50, "learning_rate": 0.001, "batch_size": 16}
    assert with_tuned(form, defaults, tuned) == {
        "epochs": 50,
        "learning_rate": 0.004,  # left at the default: the tuned value
        "batch_size": 16,  # chosen in the form: it wins
        "dropout": 0.2,
    }
    assert with_tuned(form, defaults, None) == form


def test_a_study_resumes_only_under_the_same_space_features_and_recipe() -> None:
    from ml.training.tune import SearchSpace, study_name, study_setup

    def name(environ: dict[str, str], cache_id: str = "features-a") -> str:
        settings = load_settings(environ=environ)
        return study_name(
            "2026-06-03.abc", study_setup(settings, SearchSpace.from_settings(settings), cache_id)
        )

    base = name({})
    assert base == name({}) and base.startswith("tune-2026-06-03.abc-")
    changed = [
        name({"MLOPS__TUNING__BATCH_SIZE": "[16, 32]"}),
        name({"MLOPS__TUNING__LEARNING_RATE": "[0.0001, 0.001]"}),
        name({"MLOPS__TUNING__EPOCHS": "10"}),
        name({}, cache_id="features-b"),  # another backbone, preprocessing or precision
    ]
    assert base not in changed and len(set(changed)) == len(changed)
    assert name({"MLOPS__TUNING__TRIALS": "200"}) == base  # a bigger budget goes on with the same study


def test_the_tuned_model_leaves_half_of_each_val_class_out_to_calibrate_on() -> None:
    from ml.training.crossval import halve_by_class

    labels = np.array([0] * 7 + [1] * 4 + [2])  # 7, 4 and a lone image
    val = SplitData(np.zeros((12, 1, 2), np.float32), labels, [f"s{i}" for i in range(12)])
    kept, held = halve_by_class(val, seed=3)
    assert sorted(kept.sha256 + held.sha256) == sorted(val.sha256) and not set(kept.sha256) & set(held.sha256)
    assert np.bincount(held.labels, minlength=3).tolist() == [3, 2, 0]  # the lone image is trained on
    assert halve_by_class(val, seed=3)[1].sha256 == held.sha256  # the same halves for the same seed

    train = clusters(300, 2, 1, labels=np.random.default_rng(1).integers(0, 5, 300))
    data = {"train": train, "val": clusters(100, 2, 2), "test": clusters(100, 2, 3)}
    result = train_on_train_and_val(data, CLASSES, base(epochs=3))
    assert result.held_out is not None and 40 <= len(result.held_out) <= 50
    assert set(result.held_out.sha256) <= set(data["val"].sha256)
