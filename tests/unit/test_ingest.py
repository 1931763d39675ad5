from __future__ import annotations

import csv
import datetime as dt
import gc
import hashlib
import io
import json
import logging
import os
import resource
import signal
import subprocess
import sys
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import boto3
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ml.config import Settings
from ml.data import catalog
from ml.data.images import ImageLimits
from ml.data.ingest import (
    BatchRejected,
    LedgerEntry,
    NothingLanded,
    ingest_day,
    read_manifest,
    reconcile,
)
from ml.data.inspection import FileInspection, Inspection, chunk_for, inspect_file, inspect_files
from ml.demo.drawing import render_image
from ml.storage import LocalStorage, S3Storage
from tests.hostile import (
    CLASSES,
    encode,
    land_awkward_names,
    land_hostile_day,
    padded_png,
    photo,
    write_labels,
)

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


def stored_day(storage: LocalStorage, day: dt.date) -> dict[str, object]:
    """What an ingest left: ledger, result, catalog rows and every curated object's bytes, with the
    storage's own root written as ROOT."""
    root = storage.root_url

    def text(key: str) -> str:
        return storage.read_bytes(key).decode().replace(root, "ROOT")

    return {
        "ledger": text(f"reports/ingest/{day}/ledger.csv"),
        "result": text(f"reports/ingest/{day}/result.json"),
        "catalog": catalog.load_catalog(storage).to_dict("records"),
        "curated": {
            key: hashlib.sha256(storage.read_bytes(key)).hexdigest() for key in storage.list("curated")
        },
        "quarantine": {key: storage.read_bytes(key) for key in storage.list("quarantine")},
    }


def test_linked_spool_gives_what_copied_files_give_and_shares_no_file_with_a_landed_object(
    tmp_path: Path, make_settings
) -> None:
    """The fast path (spool files hard-linked to the landed objects, streamed to the workers as they
    come, curated files linked into the store) against plain copies (a spool on another filesystem,
    where no link can be made), on the hostile day: the same ledger, result, catalog and objects."""
    elsewhere = Path("/dev/shm")
    assert os.stat(elsewhere).st_dev != os.stat(tmp_path).st_dev, "needs a second filesystem for the spool"
    outcomes = {}
    for path, spool_dir in (("linked", tmp_path / "spool"), ("copied", elsewhere)):
        storage = LocalStorage(tmp_path / path)
        land_hostile_day(storage, DAY)
        settings = make_settings(
            ingest__max_rejected_share=0.4, ingest__workers=2, ingest__spool_dir=str(spool_dir)
        )
        ingest_day(settings, storage, DAY)
        outcomes[path] = stored_day(storage, DAY)
        landed = {os.stat(p).st_ino for p in (storage.root / "landing").rglob("*") if p.is_file()}
        for key in storage.list("curated"):
            stat = os.stat(storage.root / key)
            assert stat.st_ino not in landed and stat.st_nlink == 1, key  # its own file, nobody else's
        assert all(os.stat(p).st_nlink == 1 for p in (storage.root / "landing").rglob("*") if p.is_file())
    assert outcomes["linked"] == outcomes["copied"]
    assert len(outcomes["linked"]["curated"]) > 40


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


def test_a_day_ingested_after_a_later_one_does_not_catalogue_its_images_again(
    storage: LocalStorage, settings: Settings
) -> None:
    early, late = DAY, DAY + dt.timedelta(days=1)
    land(storage, late, [(f"a{i}.png", encode(photo(i), "PNG"), "books") for i in range(6)])
    ingest_day(settings, storage, late)  # the later day first: a backfill, or a late labels.csv
    again = [(f"b{i}.png", encode(photo(i), "PNG"), "books") for i in range(3)]
    conflict = [("c.png", encode(photo(4), "PNG"), "toys")]
    fresh = [(f"d{i}.png", encode(photo(100 + i), "PNG"), "home") for i in range(6)]
    land(storage, early, again + conflict + fresh)
    result = ingest_day(settings, storage, early).to_dict()
    assert result["curated"]["new_images"] == 6
    assert result["quarantined"]["by_reason"] == {"label_conflicts_with_catalog": 2}
    notes = {e["ref"].rsplit("/", 1)[-1]: e["note"] for e in ledger(storage, early) if e["kind"] == "file"}
    assert notes["b0.png"] == "already_in_catalog"
    for day in (late, early):  # re-runs, in either order, keep one row per image
        ingest_day(settings, storage, day)
        rows = catalog.load_catalog(storage)
        assert len(rows) == 12 and rows["sha256"].is_unique
    assert set(catalog.load_catalog(storage)["source_key"].str.split("/").str[1]) == {str(early), str(late)}


def test_a_landed_object_named_like_the_quarantines_own_files_is_kept_apart(
    storage: LocalStorage, settings: Settings
) -> None:
    from ml.data.ingest import key_digest

    land(storage, DAY, [(f"a{i}.png", encode(photo(i), "PNG"), "books") for i in range(6)])
    stray = {  # e.g. a quarantine folder copied back into landing to ingest it again
        f"landing/{DAY}/_reasons.csv": b"an operator's copy of an old _reasons.csv",
        f"landing/{DAY}/unsafe_keys/0123": b"an operator's copy of an unsafe key's bytes",
    }
    for key, data in stray.items():
        storage.write_bytes(key, data)
    result = ingest_day(settings, storage, DAY).to_dict()
    assert result["reconciled"] and result["curated"]["new_images"] == 6
    reasons = reasons_csv(storage, DAY)  # the day's own reasons file, not the landed one
    entries = {e["ref"]: e for e in ledger(storage, DAY)}
    for key, data in stray.items():
        assert reasons[key] == "unexpected_location"
        kept = f"quarantine/{DAY}/unsafe_keys/{key_digest(key)}"
        assert storage.read_bytes(kept) == data and kept in entries[key]["detail"]


def test_a_day_rerun_without_an_image_a_later_day_left_to_it_hands_the_image_to_that_day(
    storage: LocalStorage, settings: Settings
) -> None:
    early, late = DAY, DAY + dt.timedelta(days=1)
    shared = ("x.png", encode(photo(50), "PNG"), "toys")
    first = [(f"a{i}.png", encode(photo(i), "PNG"), "books") for i in range(6)]
    land(storage, early, [*first, shared])
    ingest_day(settings, storage, early)
    land(
        storage,
        late,
        [
            ("again.png", shared[1], "toys"),
            *((f"b{i}.png", encode(photo(20 + i), "PNG"), "home") for i in range(6)),
        ],
    )
    ingest_day(settings, storage, late)
    notes = {e["ref"].rsplit("/", 1)[-1]: e["note"] for e in ledger(storage, late) if e["kind"] == "file"}
    assert notes["again.png"] == "already_in_catalog"  # the early day holds its row

    storage.delete(f"landing/{early}/images/x.png")  # upstream takes it back from the early day
    land(storage, early, first)
    result = ingest_day(settings, storage, early).to_dict()
    assert result["reingested"] == {str(late): "published"}
    rows = catalog.load_catalog(storage)
    held = rows[rows["source_key"].str.endswith("/again.png")]
    assert rows["sha256"].is_unique and len(rows) == 13 and len(held) == 1
    assert held["source_key"].iloc[0].startswith(f"landing/{late}/")
    assert ingest_day(settings, storage, early).to_dict()["reingested"] == {}  # nothing dropped this time


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
    docs = f"reports/data_docs/{DAY}"
    index = storage.read_bytes(f"{docs}/index.html").decode()
    for suite in ("manifest", "image_properties"):  # one site, built once, shows both suites' runs
        (page,) = [key for key in storage.list(f"{docs}/validations/{suite}") if key.endswith(".html")]
        assert page.removeprefix(f"{docs}/") in index and f"expectations/{suite}.html" in index
        assert storage.exists(f"{docs}/expectations/{suite}.html")
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


def test_a_trailing_comma_on_every_line_is_no_column() -> None:
    for header in (b"filename,label", b"filename,label,"):  # as spreadsheet exports write it
        frame, error = read_manifest(header + b"\na.png,books,\nb.png,toys, \n")
        assert error is None
        assert list(frame.columns) == ["filename", "label"]
        assert frame.loc[2].tolist() == ["a.png", "books"] and frame.loc[3].tolist() == ["b.png", "toys"]


def test_rows_are_numbered_by_the_line_they_start_on() -> None:
    manifest = b'filename,label,note\n\na.png,books,x\nb.png,toys,"two\nlines"\n,,\nc.png,home,y\n'
    frame, error = read_manifest(manifest)
    assert error is None
    assert frame["filename"].to_dict() == {3: "a.png", 4: "b.png", 7: "c.png"}  # b.png spans 4-5
    assert frame.loc[4, "note"] == "two\nlines"


@pytest.mark.parametrize(
    ("manifest", "why"),
    [
        (b"filename,label,Label\na.png,books,toys\n", "names the column 'label' more than once"),
        (b"FileName,filename,label\na.png,b.png,books\n", "names the column 'filename' more than once"),
        (b"filename,label\na.png,books\nb.png,toys,extra\n", "line 3 has 3 fields where the header names 2"),
        (b"", "it is empty"),
        (b"\n\n", "it is empty"),
    ],
)
def test_a_manifest_that_cannot_be_read_as_one_table_says_why(manifest: bytes, why: str) -> None:
    frame, error = read_manifest(manifest)
    assert error is not None and why in error and error.startswith("labels.csv is unreadable")
    assert frame.empty and list(frame.columns) == ["filename", "label"]


def test_a_manifest_with_a_repeated_column_rejects_the_day_with_its_reason(
    storage: LocalStorage, settings: Settings
) -> None:
    storage.write_bytes(f"landing/{DAY}/images/a.png", encode(photo(1), "PNG"))
    storage.write_bytes(f"landing/{DAY}/labels.csv", b"filename,label,LABEL\na.png,books,toys\n")
    with pytest.raises(BatchRejected, match="unreadable.*'label' more than once"):
        ingest_day(settings, storage, DAY)
    result = json.loads(storage.read_bytes(f"reports/ingest/{DAY}/result.json"))
    assert result["status"] == "rejected" and result["reconciled"]


# -- keys a real bucket holds ----------------------------------------------------------------------


def s3_storage(s3_endpoint: str, bucket: str) -> S3Storage:
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    return S3Storage(client, bucket, "mlops")


def reasons_csv(storage, day: dt.date) -> dict[str, str]:
    text = storage.read_bytes(f"quarantine/{day}/_reasons.csv").decode()
    return {row["ref"]: row["reason"] for row in csv.DictReader(io.StringIO(text))}


def good_items(count: int, start: int = 0) -> list[tuple[str, bytes, str]]:
    return [(f"g{i}.png", encode(photo(start + i), "PNG"), CLASSES[i % 5]) for i in range(count)]


def test_folder_markers_unsafe_keys_and_awkward_names_on_s3(
    s3_endpoint: str, s3_bucket: str, settings: Settings
) -> None:
    storage = s3_storage(s3_endpoint, s3_bucket)
    base = f"landing/{DAY}"
    items = good_items(10)
    for name, data, _ in items:
        storage.write_bytes(f"{base}/images/{name}", data)
    awkward = land_awkward_names(storage, DAY)
    unsafe = {  # keys a bucket accepts that are no safe path, each with its own bytes
        f"{base}/images/a//b.png": encode(photo(901), "PNG"),
        f"{base}/images/./dot.png": encode(photo(902), "PNG"),
        f"{base}/images/..": b"dot-dot",
        f"{base}/images/back\\slash.png": encode(photo(903), "PNG"),
        f"{base}/images/not-a-marker/": b"a folder-like key with content",
    }
    markers = [f"{base}/", f"{base}/images/", f"{base}/images/sub/"]
    for key, data in [*unsafe.items(), *((m, b"") for m in markers)]:
        storage.client.put_object(Bucket=s3_bucket, Key=f"mlops/{key}", Body=data)
    rows = [(n, label) for n, _, label in items] + [(n, "books") for n in awkward.values()]
    write_labels(storage, DAY, [*rows, ("a//b.png", "toys")])

    result = ingest_day(settings, storage, DAY).to_dict()

    assert result["status"] == "published" and result["reconciled"]
    assert result["landed"]["folder_markers"] == 3
    entries = {e["ref"]: e for e in ledger(storage, DAY)}
    assert not set(markers) & set(entries)
    for key, data in unsafe.items():
        assert entries[key]["reason"] == "unsafe_key", entries[key]
        kept = f"quarantine/{DAY}/unsafe_keys/{hashlib.sha256(key.encode()).hexdigest()}"
        assert storage.read_bytes(kept) == data
    assert {k for k, reason in reasons_csv(storage, DAY).items() if reason == "unsafe_key"} == set(unsafe)
    for key in awkward:
        assert entries[key]["outcome"] == "curated", entries[key]
    assert entries[f"labels.csv:{len(rows) + 2}"]["reason"] == "unsafe_filename"
    assert result["curated"]["new_images"] == len(items) + len(awkward)


def test_awkward_names_and_unsafe_file_names_on_local_storage(
    storage: LocalStorage, settings: Settings
) -> None:
    items = good_items(10)
    land(storage, DAY, items)
    awkward = land_awkward_names(storage, DAY)
    images = storage.root / f"landing/{DAY}/images"
    (images / "back\\slash.png").write_bytes(b"backslash bytes")
    (images / os.fsdecode(b"latin1-caf\xe9.png")).write_bytes(b"not utf-8")
    rows = [(n, label) for n, _, label in items] + [(n, "home") for n in awkward.values()]
    write_labels(storage, DAY, rows)

    result = ingest_day(settings, storage, DAY).to_dict()

    assert result["status"] == "published" and result["reconciled"]
    entries = {e["ref"]: e for e in ledger(storage, DAY)}
    assert all(entries[key]["outcome"] == "curated" for key in awkward)
    assert entries[f"landing/{DAY}/images/back\\slash.png"]["reason"] == "unsafe_key"
    latin1 = f"landing/{DAY}/images/latin1-caf\\udce9.png"  # how the ledger writes a non-UTF-8 name
    assert entries[latin1]["reason"] == "unsafe_key"
    kept = {storage.read_bytes(key) for key in storage.list(f"quarantine/{DAY}/unsafe_keys")}
    assert kept == {b"backslash bytes", b"not utf-8"}


# -- size limit, spool, crashes --------------------------------------------------------------------


class RequestLog(logging.Handler):
    """The moto server's access log (werkzeug): one line per HTTP request it answered."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def gets(self, fragment: str) -> list[str]:
        return [line for line in self.lines if '"GET ' in line and fragment in line]


def test_an_object_over_the_limit_is_quarantined_from_the_listing_and_never_read(
    s3_endpoint: str, s3_bucket: str, make_settings
) -> None:
    settings = make_settings(
        ingest__max_rejected_share=0.4, ingest__workers=2, ingest__max_file_bytes=300_000
    )
    storage = s3_storage(s3_endpoint, s3_bucket)
    items = good_items(10)
    land(storage, DAY, [*items, ("huge.png", padded_png(7, 400_000), "toys")])
    storage.write_bytes(f"landing/{DAY}/huge-notes.bin", padded_png(8, 500_000))
    log = RequestLog()
    werkzeug = logging.getLogger("werkzeug")
    werkzeug.addHandler(log)
    try:
        result = ingest_day(settings, storage, DAY).to_dict()
    finally:
        werkzeug.removeHandler(log)

    assert log.gets("/images/g3.png")  # the log sees every download: its silence below means something
    assert not log.gets("huge.png") and not log.gets("huge-notes.bin")
    entries = {e["ref"]: e for e in ledger(storage, DAY)}
    for key in (f"landing/{DAY}/images/huge.png", f"landing/{DAY}/huge-notes.bin"):
        assert entries[key]["reason"] == "file_too_large" and "not downloaded" in entries[key]["detail"]
        assert storage.exists(key)  # left where it landed, never copied
    assert entries[f"labels.csv:{len(items) + 2}"]["reason"] == "file_too_large"  # its row follows
    assert result["reconciled"] and result["curated"]["new_images"] == len(items)
    assert not [key for key in storage.list(f"quarantine/{DAY}") if "huge" in key]


KILL_MARKER = b"KILL-THIS-WORKER"


def kill_on_marker(path: Path, limits: ImageLimits, out_dir: Path) -> FileInspection:
    """A decoder that dies like a segfaulting codec (SIGKILL to its own process) on marked input."""
    if KILL_MARKER in path.read_bytes():
        os.kill(os.getpid(), signal.SIGKILL)
    return inspect_file(path, limits, out_dir)


def test_a_decoder_that_kills_its_worker_costs_that_object_only(
    storage: LocalStorage, settings: Settings
) -> None:
    items = good_items(60)
    crashers = {5, 37}  # in different chunks of 16
    items = [
        (name, data + KILL_MARKER if index in crashers else data, label)
        for index, (name, data, label) in enumerate(items)
    ]
    land(storage, DAY, items)

    result = ingest_day(settings, storage, DAY, inspect=kill_on_marker).to_dict()

    assert result["status"] == "published" and result["reconciled"]
    assert result["quarantined"]["by_reason"] == {"decoder_crashed": 2 * len(crashers)}  # file and row
    entries = {e["ref"]: e for e in ledger(storage, DAY)}
    for index in crashers:
        entry = entries[f"landing/{DAY}/images/g{index}.png"]
        assert entry["reason"] == "decoder_crashed" and "SIGKILL" in entry["detail"], entry
        assert entries[f"labels.csv:{index + 2}"]["reason"] == "decoder_crashed"
    assert result["curated"]["new_images"] == len(items) - len(crashers)


def test_files_added_after_a_worker_died_are_still_inspected_and_only_the_crasher_is_lost(
    tmp_path: Path,
) -> None:
    """Streaming: the pool breaks on the first chunk while files are still being added; later chunks
    (refused by the broken pool) are redone in fresh processes like the unfinished ones."""
    spool = tmp_path / "spool"
    spool.mkdir()
    files = {}
    for index, (name, data, _) in enumerate(good_items(40)):
        files[name] = spool / f"{index:07d}"
        files[name].write_bytes(data + KILL_MARKER if index == 3 else data)
    limits = ImageLimits(frozenset({"PNG", "JPEG"}), 50_000_000, 20_000_000)
    with Inspection({}, limits, 2, spool, inspect=kill_on_marker, more_to_come=True) as inspection:
        names = list(files)
        for name in names[:16]:
            inspection.add(name, files[name])
        first = inspection._futures[0][1]
        with pytest.raises(BrokenProcessPool):
            first.result(timeout=60)
        for name in names[16:]:
            inspection.add(name, files[name])
        found = inspection.results(names)
    assert found[names[3]].report.reason == "decoder_crashed"
    assert all(found[name].report.reason is None for name in names if name != names[3])
    expected = inspect_files({n: p for n, p in files.items() if n != names[3]}, limits, 1, tmp_path)
    assert {n: found[n].report for n in expected} == {n: r.report for n, r in expected.items()}


MEMORY_PROBE = """
import datetime as dt, json, resource, sys
from pathlib import Path
from ml.config import load_settings
from ml.data.ingest import ingest_day
from ml.storage import LocalStorage

def peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

settings = load_settings(environ={"MLOPS__INGEST__WORKERS": "2", "MLOPS__INGEST__MAX_FILE_BYTES": "2000000"})
storage = LocalStorage(Path(sys.argv[1]))
ingest_day(settings, storage, dt.date.fromisoformat(sys.argv[2]))  # warm-up: imports, GE, one small day
before = peak()
ingest_day(settings, storage, dt.date.fromisoformat(sys.argv[3]))
print(json.dumps({"before": before, "after": peak()}))
"""


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_days_bytes(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    small, big = DAY, DAY + dt.timedelta(days=1)
    each = 1_000_000
    land(storage, small, [(f"s{i}.png", padded_png(i, each), CLASSES[i % 5]) for i in range(16)])
    land(storage, big, [(f"b{i}.png", padded_png(100 + i, each), CLASSES[i % 5]) for i in range(160)])
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(storage.root), str(small), str(big)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    growth = peaks["after"] - peaks["before"]
    assert json.loads(storage.read_bytes(f"reports/ingest/{big}/result.json"))["curated"]["files"] == 160
    # the day is 160 MB; holding it (or a list of its blobs) would grow the peak by about that much
    assert growth < 40_000_000, f"peak RSS grew {growth / 1e6:.0f} MB while ingesting a 160 MB day"


# -- the ledger: duplicate rows, reconciliation ----------------------------------------------------


def test_a_duplicate_row_follows_its_primary_into_quarantine(
    storage: LocalStorage, settings: Settings
) -> None:
    items = good_items(12)
    jpeg = encode(photo(500, (300, 200)), "JPEG")
    for name, data, label in [
        ("corrupt.jpg", jpeg[: len(jpeg) // 2], "toys"),
        ("black.png", encode(Image.new("RGB", (200, 200)), "PNG"), "home"),
        ("conflict_a.png", encode(photo(501), "PNG"), "toys"),
        ("conflict_b.png", encode(photo(501), "PNG"), "books"),
    ]:
        items.append((name, data, label))
    land(storage, DAY, items)
    rows = [(name, label) for name, _, label in items]
    repeated = [("corrupt.jpg", "toys"), ("black.png", "home"), ("conflict_a.png", "toys")]
    write_labels(storage, DAY, [*rows, *repeated, ("never.jpg", "toys"), ("never.jpg", "toys")])

    result = ingest_day(settings, storage, DAY).to_dict()

    entries = {e["ref"]: e for e in ledger(storage, DAY)}
    primary_line = {name: index + 2 for index, (name, _) in reversed(list(enumerate(rows)))}
    expected = {"corrupt.jpg": "corrupt_image", "black.png": "blank_or_saturated"}
    expected["conflict_a.png"] = "conflicting_labels_same_content"
    for offset, (name, _) in enumerate(repeated):
        duplicate = entries[f"labels.csv:{len(rows) + 2 + offset}"]
        assert duplicate["note"] == f"duplicate_row_of=labels.csv:{primary_line[name]}"
        assert duplicate["outcome"] == "quarantined" and duplicate["reason"] == expected[name], duplicate
    last = len(rows) + 2 + len(repeated)
    assert (
        entries[f"labels.csv:{last}"]["reason"]
        == entries[f"labels.csv:{last + 1}"]["reason"]
        == "file_missing"
    )
    assert result["reconciled"] and result["curated"]["rows"] == 12


def test_reconcile_finds_what_the_ledger_lost_or_left_unsettled() -> None:
    a, b = "landing/D/images/a.png", "landing/D/images/b.png"
    good = [
        LedgerEntry("row", "labels.csv:2", file_ref=a),
        LedgerEntry("file", a),
        LedgerEntry("file", b, outcome="quarantined", reason="orphan_file"),
    ]
    assert reconcile([a, b], [2], good).ok
    bad = [
        LedgerEntry("row", "labels.csv:2", file_ref=b),  # curated, but its file was quarantined
        LedgerEntry("row", "labels.csv:2"),  # the same line twice
        LedgerEntry("file", a, outcome="quarantined"),  # no reason
        LedgerEntry("file", "landing/D/images/ghost.png"),  # never listed
        LedgerEntry("file", b, outcome="pending", reason="x"),
    ]
    found = reconcile([a, b, "landing/D/images/c.png"], [2, 3], bad)
    assert not found.ok
    text = "\n".join(found.problems)
    for expected in (
        "object 'landing/D/images/c.png': 0 ledger entries, expected 1",
        "object 'landing/D/images/ghost.png': 1 ledger entries, expected 0",
        "row 'labels.csv:2': 2 ledger entries, expected 1",
        "row 'labels.csv:3': 0 ledger entries, expected 1",
        f"{a} is quarantined without a reason",
        f"{b} is 'pending'",
        f"labels.csv:2 is curated but the file it names ({b}) is not",
    ):
        assert expected in text, (expected, text)


def numpy_blas_threads() -> list[int]:
    """Thread counts of the BLAS numpy's matrix products call (scipy loads a BLAS of its own)."""
    from threadpoolctl import threadpool_info

    return [info["num_threads"] for info in threadpool_info() if "numpy" in info["filepath"]]


def inspect_noting_blas_threads(path: Path, limits: ImageLimits, out_dir: Path) -> FileInspection:
    """``inspect_file``, noting in ``out_dir`` how many threads numpy's BLAS (the pHash's resize) may use."""
    (out_dir / f"blas-{os.getpid()}").write_text(json.dumps(numpy_blas_threads()))
    return inspect_file(path, limits, out_dir)


def test_inspection_workers_run_blas_on_one_thread_and_leave_the_parents_alone(tmp_path: Path) -> None:
    """Two workers already take one core each: a BLAS pool per worker would oversubscribe them."""
    before = numpy_blas_threads()
    spool = tmp_path / "spool"
    spool.mkdir()
    files = {}
    for index, (name, data, _) in enumerate(good_items(40)):
        files[name] = spool / f"{index:07d}"
        files[name].write_bytes(data)
    limits = ImageLimits(frozenset({"PNG", "JPEG"}), 50_000_000, 20_000_000)
    with Inspection(files, limits, 2, spool, inspect=inspect_noting_blas_threads) as inspection:
        found = inspection.results(list(files))
    assert all(result.report.reason is None for result in found.values())
    notes = [json.loads(path.read_text()) for path in spool.glob("blas-*")]
    # both workers, or one that took every chunk while the other waited for a core (make test runs two
    # test workers beside each other)
    assert 1 <= len(notes) <= 2 and all(note == [1] for note in notes), notes
    assert numpy_blas_threads() == before


def inspect_noting_the_collector(path: Path, limits: ImageLimits, out_dir: Path) -> FileInspection:
    """``inspect_file``, noting in the folder ``$COLLECTOR_NOTES`` whether the worker's collector is on."""
    (Path(os.environ["COLLECTOR_NOTES"]) / f"gc-{os.getpid()}").write_text(json.dumps(gc.isenabled()))
    return inspect_file(path, limits, out_dir)


def test_a_day_runs_with_the_collector_paused_and_its_workers_collect(
    storage: LocalStorage, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No automatic collection in the parent during a day (each walks every object: ~1 s of a 10,000-image
    day's CPU), the collector on again after it, accepted or rejected; the workers collect as ever."""
    collections: list[int] = []
    day = getattr(ingest_day, "__wrapped__", ingest_day).__code__

    def note(phase: str, info: dict) -> None:
        frame = sys._getframe(1)
        while frame is not None and frame.f_code is not day:
            frame = frame.f_back
        if phase == "start" and frame is not None:  # a collection while the day runs
            collections.append(info["generation"])

    land(storage, DAY, good_items(30))
    notes_dir = tmp_path / "notes"
    notes_dir.mkdir()
    monkeypatch.setenv("COLLECTOR_NOTES", str(notes_dir))  # the forked workers inherit it
    gc.callbacks.append(note)
    try:
        ingest_day(settings, storage, DAY, inspect=inspect_noting_the_collector)
    finally:
        gc.callbacks.remove(note)
    assert collections == [] and gc.isenabled()
    notes = [json.loads(path.read_text()) for path in notes_dir.glob("gc-*")]
    assert notes and all(notes), notes
    land(storage, DAY + dt.timedelta(days=1), [(f"j{i}.jpg", b"garbage", "books") for i in range(5)])
    with pytest.raises(BatchRejected):
        ingest_day(settings, storage, DAY + dt.timedelta(days=1))
    assert gc.isenabled()


def inspect_counting_page_faults(path: Path, limits: ImageLimits, out_dir: Path) -> FileInspection:
    """``inspect_file``, noting in ``out_dir`` the page faults it cost the worker that ran it."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    found = inspect_file(path, limits, out_dir)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    with (out_dir / f"faults-{os.getpid()}").open("a") as notes:
        notes.write(f"{faults}\n")
    return found


FAULTS_PROBE = """
import sys
from pathlib import Path
from ml.data.images import ImageLimits
from ml.data.inspection import Inspection
from tests.unit.test_ingest import inspect_counting_page_faults

spool = Path(sys.argv[1])
files = {path.name: path for path in sorted(spool.glob("*.jpg"))}
limits = ImageLimits(frozenset({"JPEG"}), 50_000_000, 20_000_000)
with Inspection(files, limits, 1, spool, inspect=inspect_counting_page_faults, chunk=4) as inspection:
    assert all(found.report.reason is None for found in inspection.results(list(files)).values())
"""


def test_inspection_workers_reuse_the_memory_of_one_image_for_the_next(tmp_path: Path) -> None:
    """A worker that hands each image's memory back to the kernel faults it in again for the next
    (hundreds of page faults per 500 px image, a third of the inspection's time on a VM). The worker of
    a fresh process (this one's malloc has grown its thresholds) inspects the demo's ~500 px images."""
    rng = np.random.default_rng(7)
    for index in range(48):  # as bench/ingest.py lands them
        image = render_image(CLASSES[index % 5], CLASSES, rng)
        scale = 500 / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)))
        (tmp_path / f"p{index:02d}.jpg").write_bytes(encode(image, "JPEG", quality=90))
    # glibc's threshold starts at 128 KB and slides up to the largest block freed so far, so whether a
    # worker faults depended on the order of its images; pinned at the start value (as it is before the
    # first free), a worker faults on every image unless its start changes the setting. One worker: two
    # on a busy machine may split the images too unevenly to judge each.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    subprocess.run([sys.executable, "-c", FAULTS_PROBE, str(tmp_path)], env=env, timeout=300, check=True)
    (faults,) = [[int(n) for n in path.read_text().split()] for path in tmp_path.glob("faults-*")]
    assert len(faults) == 48, faults
    after_warm_up = sorted(faults[4:])
    assert after_warm_up[len(after_warm_up) // 2] < 20, faults  # the median image: none (~1,600 without)


def test_a_large_day_goes_to_the_workers_in_larger_chunks(tmp_path: Path) -> None:
    """Fewer round trips for the parent on a large day, ~8 chunks a worker on a middling one, and the
    usual 16 on a small one; an inspection of files it is given sizes its chunks so."""
    assert chunk_for(10_000, 2) == 64  # ~160 tasks, not ~630
    assert chunk_for(500, 2) == 31
    assert chunk_for(30, 2) == 16 and chunk_for(0, 0) == 16
    files = {}
    for index in range(400):
        files[f"f{index}"] = tmp_path / f"{index:04d}"
        files[f"f{index}"].write_bytes(b"not an image")
    limits = ImageLimits(frozenset({"JPEG"}), 50_000_000, 20_000_000)
    with Inspection(files, limits, 2, tmp_path) as inspection:
        assert inspection._chunk == chunk_for(400, 2) == 25
        found = inspection.results(list(files))
    assert {result.report.reason for result in found.values()} == {"not_an_image"}


@pytest.mark.parametrize("sharded", [False, True], ids=["one-process", "sharded"])
def test_an_archived_object_is_quarantined_as_unreadable_and_curated_once_restored(
    s3_endpoint: str, s3_bucket: str, make_settings, sharded: bool
) -> None:
    from ml.data import shards

    settings = make_settings(ingest__max_rejected_share=0.4, ingest__workers=1)
    storage = s3_storage(s3_endpoint, s3_bucket)
    items = good_items(10)
    land(storage, DAY, items)
    base = f"landing/{DAY}"
    archived = {  # moved to Glacier by a lifecycle rule: listed, but a GET answers InvalidObjectState
        f"{base}/images/cold.png": encode(photo(77), "PNG"),
        f"{base}/notes.txt": b"an object outside images/, archived too",
    }
    for key, data in archived.items():
        storage.client.put_object(Bucket=s3_bucket, Key=f"mlops/{key}", Body=data, StorageClass="GLACIER")
    write_labels(storage, DAY, [*((n, label) for n, _, label in items), ("cold.png", "toys")])

    def ingest() -> dict:
        if not sharded:
            return ingest_day(settings, storage, DAY).to_dict()
        shards.plan_day(settings, storage, DAY, 2)
        for shard in range(2):
            shards.inspect_shard(settings, storage, DAY, shard)
        return shards.merge_day(settings, storage, DAY).to_dict()

    result = ingest()
    entries = {e["ref"]: e for e in ledger(storage, DAY)}
    for key in archived:
        assert entries[key]["reason"] == "unreadable_object", entries[key]
        assert "InvalidObjectState" in entries[key]["detail"] and "re-run the day" in entries[key]["detail"]
    assert entries[f"labels.csv:{len(items) + 2}"]["reason"] == "unreadable_object"  # its row follows
    assert result["reconciled"] and result["status"] == "published"
    assert result["curated"]["new_images"] == len(items)
    assert set(reasons_csv(storage, DAY)) >= set(archived)
    assert not [key for key in storage.list(f"quarantine/{DAY}") if "cold" in key or "notes" in key]

    for key in archived:  # restored (moto restores at once), the re-run reads it
        storage.client.restore_object(Bucket=s3_bucket, Key=f"mlops/{key}", RestoreRequest={"Days": 1})
    result = ingest()
    entries = {e["ref"]: e for e in ledger(storage, DAY)}
    assert entries[f"{base}/images/cold.png"]["outcome"] == "curated"
    assert entries[f"{base}/notes.txt"]["reason"] == "unexpected_location"
    assert result["curated"]["new_images"] == len(items) + 1
