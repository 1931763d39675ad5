"""Governance: who approves (human_approval_required), the retrain DAG's route, approval form, model card."""

from __future__ import annotations

import jinja2
import pandas as pd
import pytest

from ml.training.card import card_markdown, class_support, known_limits
from ml.training.governance import APPROVE, PROMOTE, approval_decision, lineage_changes
from tests.conftest import REPO

LINEAGE = {
    "architecture": "efficientnet_lite0",
    "backbone_weights": "abc",
    "preprocessing": "resize-bilinear-imagenet-v1:224",
    "precision": "fp32",
    "classes": "a,b",
    "storage_root": "s3://bucket/root",
}


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("architecture", "resnet18", "architecture changed: efficientnet_lite0 -> resnet18"),
        ("backbone_weights", "def", "backbone weights changed"),
        ("preprocessing", "resize-bilinear-imagenet-v1:256", "preprocessing changed"),
        ("precision", "int8", "precision changed: fp32 -> int8"),
        ("classes", "a,b,c", "classes changed: a,b -> a,b,c"),
        ("storage_root", "s3://other/root", "storage root changed"),
    ],
)
def test_a_lineage_change_needs_a_human_even_with_auto_approve(key: str, value: str, named: str) -> None:
    changes = lineage_changes({**LINEAGE, key: value}, LINEAGE)
    assert len(changes) == 1 and named in changes[0]
    decision = approval_decision(True, changes)
    assert decision.human_required and decision.route == APPROVE
    assert named in decision.reason and "auto_approve is on" in decision.reason


def test_auto_approve_only_when_nothing_changed_and_a_human_otherwise() -> None:
    assert lineage_changes(LINEAGE, dict(LINEAGE)) == [] and lineage_changes(LINEAGE, None) == []
    assert approval_decision(True, []).route == PROMOTE and not approval_decision(True, []).human_required
    manual = approval_decision(False, [])
    assert manual.route == APPROVE and "auto_approve is off" in manual.reason


def test_a_champion_without_recorded_lineage_goes_to_a_human() -> None:
    older = {key: value for key, value in LINEAGE.items() if key != "storage_root"}
    changes = lineage_changes(LINEAGE, older)
    assert changes == ["storage root: not recorded for the champion (challenger: s3://bucket/root)"]
    assert approval_decision(True, changes).route == APPROVE


def test_a_champion_from_before_precisions_counts_as_fp32() -> None:
    older = {key: value for key, value in LINEAGE.items() if key != "precision"}
    assert lineage_changes(LINEAGE, older) == []
    assert lineage_changes({**LINEAGE, "precision": "int8"}, older) == ["precision changed: fp32 -> int8"]


@pytest.fixture(scope="module")
def retrain_dag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags" / "retrain.py")).dags["retrain"]


def test_the_dag_routes_a_changed_lineage_to_the_human_despite_auto_approve(
    retrain_dag, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLOPS__MLFLOW__AUTO_APPROVE", "true")
    route = retrain_dag.get_task("route").python_callable
    assert route({"status": "registered", "validation": {"lineage_changes": []}}) == "promote"
    assert route({"status": "registered"}) == "promote"  # a result from before validation
    assert route({"validation": {"lineage_changes": ["classes changed: a -> a,b"]}}) == "approve"
    monkeypatch.setenv("MLOPS__MLFLOW__AUTO_APPROVE", "false")
    assert route({"validation": {"lineage_changes": []}}) == "approve"


class FakeTi:
    def __init__(self, result: dict) -> None:
        self.result = result

    def xcom_pull(self, task_ids: str) -> dict:
        assert task_ids == "train"
        return self.result


def test_the_approval_form_shows_the_headline_figures_and_the_model_card(retrain_dag) -> None:
    headline = {
        "accuracy": "0.984 [0.952, 1.000] (n=62)",
        "worst slice": "source=phone 0.955 [0.864, 1.000] (n=22)",
        "robustness": "0.90 [0.87, 0.93] of clean accuracy under corruptions",
        "ECE": "0.051 [0.031, 0.086] -> 0.029 [0.010, 0.053] (temperature 0.56)",
        "coverage": "0.968 [0.919, 1.000] (target 0.95)",
    }
    result = {
        "model_version": "3",
        "dataset_version": "2026-06-03.abc",
        "gate": {"passed": True, "reasons": ["passed"]},
        "metrics": {"accuracy": 0.98},
        "validation": {
            "headline": headline,
            "model_card": "file:///mlruns/1/run/artifacts/validation/model_card.md",
            "approval": {"reason": "a human must approve: classes changed: a -> a,b"},
        },
    }
    body = jinja2.Template(retrain_dag.get_task("approve").body).render(ti=FakeTi(result))
    for name, figure in headline.items():
        assert f"- {name}: {figure}" in body
    assert "validation/model_card.md" in body and "classes changed" in body
    assert "{'accuracy': 0.98}" not in body  # no raw metrics dict any more
    bare = jinja2.Template(retrain_dag.get_task("approve").body).render(
        ti=FakeTi({**result, "validation": {}})
    )
    assert "Dataset 2026-06-03.abc" in bare


def test_the_model_card_renders_every_section_and_lists_its_limits() -> None:
    rows = pd.DataFrame({"split": ["train", "train", "val", "test"], "label": ["a", "b", "a", "b"]})
    support = class_support(rows, ["a", "b"])
    assert support == {"train": {"a": 1, "b": 1}, "val": {"a": 1, "b": 0}, "test": {"a": 0, "b": 1}}
    metric = {"value": 0.9, "low": 0.8, "high": 1.0}
    validation = {
        "n_test": 1,
        "pgd_steps": 3,
        "slices": [{"name": "source=x", "support": 3, "accuracy": metric, "gap": metric, "judged": False,
                    "passed": True}],
        "adversarial": [{"attack": "none", "eps": 0, "n": 8, "accuracy": metric}],
        "robustness": {"n": 1, "clean_accuracy": metric, "mean_accuracy": metric, "ratio_to_clean": metric,
                       "results": [{"corruption": "blur", "severity": 3, "accuracy": metric}]},
        "calibration": {"temperature": 1.2, "n_calibration": 5, "ece_before": metric, "ece_after": metric,
                        "target_coverage": 0.95, "coverage": metric, "mean_set_size": metric,
                        "abstain_rate": metric},
        "deletion": {"n": 4, "auc_attributed": metric, "auc_random": metric, "p_value": 0.01, "passed": True},
    }  # fmt: skip
    limits = known_limits(validation, min_support=20)
    assert any("source=x" in limit for limit in limits) and any(
        "blur at severity 3" in limit for limit in limits
    )
    card = {
        "model": {"registered_model": "m", "run_id": "r", "architecture": "x", "backbone_weights": "w",
                  "preprocessing": "p", "classes": ["a", "b"]},
        "data": {"dataset_version": "d", "storage_root": "s", "class_support": support},
        "metrics": {"n": 1, "accuracy": metric, "f1_macro": metric, "roc_auc_macro": None},
        "validation": validation,
        "gate": {"passed": True, "checks": [{"name": "slice[source=x]", "passed": True, "detail": "fine"}]},
        "approval": {"reason": "auto-approved"},
        "known_limits": limits,
    }  # fmt: skip
    text = card_markdown(card)
    for section in (
        "# Model card",
        "## Slices",
        "## Robustness",
        "## Calibration",
        "## Gate",
        "## Known limits",
    ):
        assert section in text
    assert "| blur |  |  | 0.900 [0.800, 1.000] |" in text and "`slice[source=x]`: fine" in text
