"""Labelled served images land as a source of their own and meet the same checks as upstream data.

The service's own writer (``PredictionLog``) records the predictions, the kept request images and
the labels; ``land_feedback`` lands them beside an upstream day; ``ingest_day`` validates both.
"""

from __future__ import annotations

import datetime as dt
import io
import json

import pandas as pd
import pytest
from PIL import Image

from ml.data import catalog
from ml.data.feedback import FEEDBACK_SOURCE, from_feedback, land_feedback
from ml.data.ingest import BatchRejected, ingest_day
from ml.demo.landing import labelled_images, land_days
from ml.layout import FEEDBACK_PREFIX, PREDICTIONS_PREFIX, DayLayout, request_image_key
from ml.serving.log import PredictionLog
from ml.storage import LocalStorage

DAY = dt.date(2026, 3, 2)


def serve(log: PredictionLog, when: dt.datetime, request_id: str, data: bytes, label: str | None) -> None:
    """What the service logs for one answered upload (image kept) and, if given, its label."""
    stamp = when.isoformat(timespec="milliseconds")
    key = request_image_key(stamp[:10], request_id)
    log.add_blob(key, data)
    log.add(
        PREDICTIONS_PREFIX,
        {"request_id": request_id, "time": stamp, "image_key": key, "image_format": "JPEG"},
    )
    if label is not None:
        record = {
            "request_id": request_id,
            "time": stamp,
            "label": label,
            "model_version": "1",
            "bound": True,
        }
        log.add(FEEDBACK_PREFIX, record)


def dark_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (96, 96), (1, 1, 1)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture
def store(tmp_path, make_settings):
    settings = make_settings(ingest__max_rejected_share=0.5)
    storage = LocalStorage(tmp_path / "store")
    land_days(storage, DAY, 1, settings.classes, count=24, seed=3)  # upstream's day
    log = PredictionLog(storage)
    noon = dt.datetime.combine(DAY, dt.time(12), dt.UTC)
    served = labelled_images(settings.classes, 6, seed=44)
    for index, (data, label) in enumerate(served):
        serve(log, noon - dt.timedelta(days=index % 2), f"req-{index}", data, label)  # today and yesterday
    serve(log, noon, "req-dark", dark_jpeg(), settings.classes[0])  # a labelled image no check lets through
    serve(log, noon, "req-unlabelled", served[0][0], None)  # answered, never labelled: not training data
    log.add(FEEDBACK_PREFIX, {"request_id": "req-no-image", "time": noon.isoformat(), "label": "x"})
    assert log.flush()
    return settings, storage


def test_labelled_images_land_and_are_ingested_with_the_same_checks(store) -> None:
    settings, storage = store
    landed = land_feedback(storage, DAY, lookback_days=2)
    assert (landed.landed, landed.without_image) == (7, 1)
    manifest = pd.read_csv(io.BytesIO(storage.read_bytes(DayLayout(DAY).feedback_labels)))
    assert set(manifest["source"]) == {FEEDBACK_SOURCE} and "req-unlabelled" not in set(
        manifest["request_id"]
    )
    assert all(name.startswith("feedback/") for name in manifest["filename"])

    result = ingest_day(settings, storage, DAY)

    rows = catalog.read_partition(storage, DAY)
    fed = rows[from_feedback(rows)]
    assert len(fed) == 6 and len(rows) == len(fed) + 24  # the upstream day is untouched
    meta = catalog.metadata_frame(fed)
    assert set(meta["request_id"]) == {f"req-{i}" for i in range(6)} and set(meta["answered_by"]) == {"1"}
    ledger = pd.read_csv(
        io.BytesIO(storage.read_bytes(DayLayout(DAY).ledger)), dtype=str, keep_default_na=False
    )
    dark_row = ledger[ledger["ref"].str.startswith("feedback.csv:") & (ledger["outcome"] == "quarantined")]
    assert len(dark_row) == 1 and dark_row.iloc[0]["reason"], ledger.tail(10)  # quarantined, with a reason
    assert result.gate.passed and result.reconciled  # every object and row accounted for
    assert json.loads(storage.read_bytes(DayLayout(DAY).result))["dataset_version"] == result.dataset_version


def test_landing_again_writes_the_same_manifest_and_a_lookback_of_one_day_takes_only_that_day(store) -> None:
    _, storage = store
    land_feedback(storage, DAY, lookback_days=2)
    first = storage.read_bytes(DayLayout(DAY).feedback_labels)
    assert land_feedback(storage, DAY, lookback_days=2).landed == 7
    assert storage.read_bytes(DayLayout(DAY).feedback_labels) == first
    assert land_feedback(storage, DAY, lookback_days=1).landed == 4  # req-0, 2, 4 and the dark one


def test_without_kept_images_nothing_lands(tmp_path) -> None:
    storage = LocalStorage(tmp_path)
    log = PredictionLog(storage)
    log.add(FEEDBACK_PREFIX, {"request_id": "r1", "time": f"{DAY}T10:00:00", "label": "a"})
    assert log.flush()
    landed = land_feedback(storage, DAY, lookback_days=2)
    assert (landed.landed, landed.without_image, landed.manifest) == (0, 1, "")
    assert not storage.exists(DayLayout(DAY).feedback_labels)


def test_an_erased_image_is_refused_when_it_lands_again_and_not_kept_in_quarantine(
    tmp_path, make_settings
) -> None:
    from ml.ops.erasure import forget

    settings = make_settings(
        ingest__max_rejected_share=0.5, mlflow__tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"
    )
    storage = LocalStorage(tmp_path / "store")
    land_days(storage, DAY, 1, settings.classes, count=8, seed=5)
    ingest_day(settings, storage, DAY)
    target = catalog.read_partition(storage, DAY).iloc[0]
    erased_bytes = storage.read_bytes(target["source_key"])
    forget(settings, storage, target["sha256"], reason="GDPR request 1", by="dpo")

    later = DAY + dt.timedelta(days=1)  # upstream sends the same image again, under another name
    land_days(storage, later, 1, settings.classes, count=8, seed=6)
    layout = DayLayout(later)
    storage.write_bytes(f"{layout.images}/again.jpg", erased_bytes)
    labels = storage.read_bytes(layout.labels).decode() + f"again.jpg,{target['label']}\n"
    storage.write_bytes(layout.labels, labels.encode())
    ingest_day(settings, storage, later)

    assert target["sha256"] not in set(catalog.load_catalog(storage)["sha256"])
    ledger = pd.read_csv(io.BytesIO(storage.read_bytes(layout.ledger)), dtype=str, keep_default_na=False)
    (entry,) = ledger[ledger["ref"] == f"{layout.images}/again.jpg"].itertuples()
    assert (entry.outcome, entry.reason) == ("quarantined", "erased")
    assert not [key for key in storage.list(layout.quarantine) if key.endswith("again.jpg")]


def test_a_broken_feedback_log_is_reported_and_does_not_stop_the_day(tmp_path) -> None:
    storage = LocalStorage(tmp_path)
    storage.write_bytes(f"{FEEDBACK_PREFIX}/{DAY}/w-000001.jsonl", b'{"request_id": "r1", "time": \n')
    landed = land_feedback(storage, DAY, lookback_days=2)
    assert landed.landed == 0 and landed.error.startswith("JSONDecodeError")


def test_feedback_rows_do_not_hide_that_upstream_labels_lack_a_column(store) -> None:
    settings, storage = store
    land_feedback(storage, DAY, lookback_days=2)
    layout = DayLayout(DAY)
    upstream = pd.read_csv(io.BytesIO(storage.read_bytes(layout.labels)), dtype=str)
    storage.write_bytes(layout.labels, upstream.rename(columns={"label": "lbl"}).to_csv(index=False).encode())
    with pytest.raises(BatchRejected, match=r"labels.csv lacks the columns \['label'\]"):
        ingest_day(settings, storage, DAY)


def test_mlops_ingest_lands_the_feedback_first_as_the_dag_does(store, monkeypatch, capsys) -> None:
    from ml.cli import main

    settings, storage = store
    monkeypatch.setenv("MLOPS__STORAGE__ROOT", str(storage.root))
    monkeypatch.setenv("MLOPS__INGEST__MAX_REJECTED_SHARE", "0.5")
    assert main(["ingest", "--date", DAY.isoformat(), "--no-feedback", "--json"]) == 0
    alone = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert alone["feedback"] is None and alone["curated"]["new_images"] == 24

    assert main(["ingest", "--date", DAY.isoformat(), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["feedback"]["landed"], result["feedback"]["without_image"]) == (7, 1)
    rows = catalog.read_partition(storage, DAY)
    assert len(rows[from_feedback(rows)]) == 6 and len(rows) == 30 and result["reconciled"]
