from __future__ import annotations

import csv
import datetime as dt
import io
import json
from pathlib import Path

import pandas as pd
import pytest

from ml.config import Settings
from ml.data import catalog
from ml.data.ingest import BatchRejected, NothingLanded, ingest_day, read_manifest
from ml.storage import LocalStorage
from tests.hostile import encode, land_hostile_day, photo

DAY = dt.date(2026, 2, 1)


@pytest.fixture
def settings(make_settings) -> Settings:
    return make_settings(ingest__max_rejected_share=0.4, ingest__workers=2)


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "store")


def land(storage: LocalStorage, day: dt.date, items: list[tuple[str, bytes, str]]) -> None:
    for name, data, _ in items:
        storage.write_bytes(f"landing/{day}/images/{name}", data)
    csv_text = "filename,label\n" + "".join(f"{name},{label}\n" for name, _, label in items)
    storage.write_bytes(f"landing/{day}/labels.csv", csv_text.encode())


def ledger(storage: LocalStorage, day: dt.date) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(storage.read_bytes(f"reports/ingest/{day}/ledger.csv").decode())))


def test_hostile_day_every_object_gets_its_expected_outcome(
    storage: LocalStorage, settings: Settings
) -> None:
    spec = land_hostile_day(storage, DAY)
    result = ingest_day(settings, storage, DAY).to_dict()
    assert result["reconciled"] and result["status"] == "published"
    entries = ledger(storage, DAY)
    assert len(entries) == len(spec.expect_file) + len(spec.rows)
    for entry in entries:
        if entry["kind"] == "file":
            assert entry["reason"] == spec.expect_file[entry["ref"]], entry
        else:
            assert entry["reason"] == spec.expect_row_reason[int(entry["ref"].split(":")[1])], entry
    reasons = list(csv.DictReader(io.StringIO(storage.read_bytes(f"quarantine/{DAY}/_reasons.csv").decode())))
    assert len(reasons) == result["quarantined"]["rows"] + result["quarantined"]["files"]
    frame = catalog.load_catalog(storage)
    assert len(frame) == result["curated"]["new_images"] == frame["sha256"].nunique()
    assert set(frame["label"]) <= set(settings.classes)
    for key in frame["curated_key"]:
        assert storage.exists(key)


def test_rerun_changes_nothing(storage: LocalStorage, settings: Settings) -> None:
    land_hostile_day(storage, DAY)
    first = ingest_day(settings, storage, DAY).to_dict()
    snapshot = {
        k: storage.read_bytes(k) for p in ("curated", "quarantine", "catalog") for k in storage.list(p)
    }
    second = ingest_day(settings, storage, DAY).to_dict()
    assert second == first
    assert {
        k: storage.read_bytes(k) for p in ("curated", "quarantine", "catalog") for k in storage.list(p)
    } == snapshot


def test_fixing_a_day_and_rerunning_removes_stale_quarantine(
    storage: LocalStorage, settings: Settings
) -> None:
    items = [(f"g{i}.png", encode(photo(i), "PNG"), "books") for i in range(8)]
    land(storage, DAY, [*items, ("x.png", encode(photo(50), "PNG"), "spaceships")])
    ingest_day(settings, storage, DAY)
    assert storage.exists(f"quarantine/{DAY}/images/x.png")
    land(storage, DAY, [*items, ("x.png", encode(photo(50), "PNG"), "toys")])  # label fixed upstream
    result = ingest_day(settings, storage, DAY).to_dict()
    assert result["quarantined"]["files"] == 0
    assert storage.list(f"quarantine/{DAY}") == [f"quarantine/{DAY}/_reasons.csv"]


def test_duplicates_and_conflicts_across_days(storage: LocalStorage, settings: Settings) -> None:
    day1, day2 = DAY, DAY + dt.timedelta(days=1)
    land(storage, day1, [(f"a{i}.png", encode(photo(i), "PNG"), "books") for i in range(6)])
    ingest_day(settings, storage, day1)
    again = [(f"b{i}.png", encode(photo(i), "PNG"), "books") for i in range(3)]  # same content, same label
    conflict = [("c.png", encode(photo(4), "PNG"), "toys")]  # same content, other label
    fresh = [(f"d{i}.png", encode(photo(100 + i), "PNG"), "home") for i in range(6)]
    land(storage, day2, again + conflict + fresh)
    result = ingest_day(settings, storage, day2).to_dict()
    assert result["curated"]["new_images"] == 6
    assert result["quarantined"]["by_reason"] == {"label_conflicts_with_catalog": 2}  # the row and the file
    notes = {e["ref"].rsplit("/", 1)[-1]: e["note"] for e in ledger(storage, day2) if e["kind"] == "file"}
    assert notes["b0.png"] == "already_in_catalog"
    assert len(catalog.load_catalog(storage)) == 12


def test_near_duplicate_lands_in_the_split_of_its_original(storage: LocalStorage, settings: Settings) -> None:
    import numpy as np

    from ml.demo.drawing import render_image

    rng = np.random.default_rng(4)
    images = [render_image(settings.classes[i % 5], settings.classes, rng) for i in range(16)]
    land(storage, DAY, [(f"o{i}.png", encode(im, "PNG"), "books") for i, im in enumerate(images)])
    ingest_day(settings, storage, DAY)
    first = catalog.load_catalog(storage).set_index("source_key")["split"]
    resaved = [
        (
            f"n{i}.jpg",
            encode(im.resize((int(im.width * 0.9), int(im.height * 0.9))), "JPEG", quality=80),
            "books",
        )
        for i, im in enumerate(images)
    ]
    day2 = DAY + dt.timedelta(days=1)
    land(storage, day2, resaved)
    ingest_day(settings, storage, day2)
    frame = catalog.load_catalog(storage).set_index("source_key")["split"]
    assert len(set(first)) > 1  # the originals are spread over splits, so inheriting is not luck
    for i in range(16):
        assert frame[f"landing/{day2}/images/n{i}.jpg"] == first[f"landing/{DAY}/images/o{i}.png"]


def test_gate_rejects_a_bad_batch_and_publishes_nothing(storage: LocalStorage, settings: Settings) -> None:
    land(
        storage,
        DAY,
        [(f"j{i}.jpg", b"garbage", "books") for i in range(5)]
        + [("ok.png", encode(photo(1), "PNG"), "books")],
    )
    with pytest.raises(BatchRejected, match="rejected share") as caught:
        ingest_day(settings, storage, DAY)
    assert "Data Docs: file://" in str(caught.value)
    assert caught.value.result.to_dict()["gate"]["passed"] is False
    assert not storage.list("curated") and not storage.list("catalog") and not storage.list("quarantine")
    assert storage.exists(f"reports/data_docs/{DAY}/index.html")
    result = json.loads(storage.read_bytes(f"reports/ingest/{DAY}/result.json"))
    assert result["status"] == "rejected" and result["reconciled"]


@pytest.mark.parametrize(
    ("manifest", "reason"),
    [
        (b"name,class\na.png,books\n", "manifest_missing_columns"),
        (b"filename,label\n", "manifest_empty"),
        (b"\xff\xfe\x00garbage\x00\xff", "unreadable"),
    ],
)
def test_structural_manifest_failures_fail_the_gate(
    storage: LocalStorage, settings: Settings, manifest: bytes, reason: str
) -> None:
    storage.write_bytes(f"landing/{DAY}/images/a.png", encode(photo(1), "PNG"))
    storage.write_bytes(f"landing/{DAY}/labels.csv", manifest)
    with pytest.raises(BatchRejected, match=reason):
        ingest_day(settings, storage, DAY)


def test_nothing_landed_is_a_clear_error(storage: LocalStorage, settings: Settings) -> None:
    with pytest.raises(NothingLanded, match=f"nothing landed for {DAY}.*labels.csv does not exist"):
        ingest_day(settings, storage, DAY)


def test_manifest_parsing_strips_and_numbers_lines() -> None:
    frame, error = read_manifest(b"\xef\xbb\xbfFilename , Label,extra\n a.png , books ,x\nb.png,,\n")
    assert error is None
    assert list(frame.columns) == ["filename", "label", "extra"]
    assert frame.loc[2, "filename"] == "a.png" and frame.loc[2, "label"] == "books"
    assert pd.isna(frame.loc[3, "label"])
