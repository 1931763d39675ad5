"""What a DAG run is for, read from its context: days, trigger, approver."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

import pytest

from ml.runs import AUTO_APPROVER, approver, event_extras, monitored_days, retrain_context, run_day


def test_drift_monitor_compares_every_day_the_triggering_ingests_published() -> None:
    events = {"curated_images": [SimpleNamespace(extra={"day": d}) for d in ("2026-05-02", "2026-05-01")]}
    extras = event_extras(events)
    assert monitored_days({}, extras, None) == [dt.date(2026, 5, 1), dt.date(2026, 5, 2)]
    assert monitored_days({"date": "2026-04-30"}, extras, None) == [dt.date(2026, 4, 30)]
    assert monitored_days({}, event_extras({}), dt.datetime(2026, 6, 1, 3)) == [dt.date(2026, 6, 1)]
    with pytest.raises(ValueError, match="'date' parameter"):
        monitored_days({}, [], None)


def test_the_run_day_is_the_date_param_else_the_data_interval() -> None:
    assert run_day({"date": "2026-01-05"}, None) == dt.date(2026, 1, 5)
    assert run_day({"date": None}, dt.datetime(2026, 2, 1, 0, tzinfo=dt.UTC)) == dt.date(2026, 2, 1)
    with pytest.raises(ValueError, match="no data interval"):
        run_day({}, None)


def test_a_drift_event_makes_a_drift_retrain_else_manual_or_schedule() -> None:
    extras = [{"reason": "old"}, {"reason": "drift on 2026-01-11: data drift", "report": "file:///r.html"}]
    drift = retrain_context("run-1", "asset_triggered", extras, note="n")
    assert (drift.trigger, drift.reason, drift.report, drift.note) == (
        "drift",
        "drift on 2026-01-11: data drift",
        "file:///r.html",
        "n",
    )
    assert retrain_context("run-2", "manual", []).trigger == "manual"
    assert retrain_context("run-3", "scheduled", []).trigger == "schedule"
    assert retrain_context("run-3", "scheduled", []).airflow_run_id == "run-3"


def test_the_approver_is_whoever_answered_else_the_config() -> None:
    assert approver(None) == AUTO_APPROVER
    assert approver({"responded_by_user": {"id": "7", "name": "alice"}}) == "alice"
    assert approver({"responded_by_user": {"id": "7"}}) == "7"
    assert approver({"chosen_options": ["Approve"]}) == "airflow-ui"
