"""Ingest one landing day: validate every landed object, curate or quarantine it, version the dataset.

Every landed object (each labels.csv row and each file) ends up in the ledger as ``curated`` or
``quarantined`` with a reason, and the ledger is reconciled against the listing. A batch gate (a
failed table-level expectation, too large a rejected share, a ledger that does not reconcile)
publishes nothing and raises ``BatchRejected``. Re-running a day writes the same bytes.

Keys are taken as the bucket lists them: folder markers are ignored; a key that is not a safe
path and an object over ``ingest.max_file_bytes`` are quarantined from the listing alone (the
latter is never downloaded). Everything else is streamed to a local spool, inspected there by
worker processes and published from there, so memory does not grow with the day's size.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from ml.config import Settings, resolve_workers
from ml.data import catalog
from ml.data.images import ImageLimits
from ml.data.inspection import FileInspection, InspectFile, Inspection, chunk_for, inspect_all, inspect_file
from ml.data.privacy import mask_pii, masked_counts
from ml.data.quality import QualityRunner, SuiteOutcome
from ml.data.spool import Spool, read_unsafe_key
from ml.layout import (
    FEEDBACK_LABELS_FILE,
    INGEST_REPORTS_PREFIX,
    LABELS_FILE,
    QUARANTINE_REASONS_FILE,
    QUARANTINE_UNSAFE_FOLDER,
    DayLayout,
    curated_key,
)
from ml.memory import collector_paused
from ml.storage import (
    ObjectInfo,
    Storage,
    StorageError,
    UnreadableObject,
    UnsafeKeyError,
    io_map,
    join_key,
    safe_key,
)

__all__ = ["BatchRejected", "IngestResult", "NothingLanded", "ingest_day", "inspect_all", "reconcile"]

REQUIRED_COLUMNS = ("filename", "label")
UNREADABLE_OBJECT = "unreadable_object"  # the reason of a listed object storage will not give
PUBLISH_THREADS = 8  # curated writes in flight (below botocore's default pool of 10 connections)
KNOWN_COLUMNS = ("sha256", "label", "split", "phash")  # what dedupe and splits read of the catalog
FEEDBACK_LINE_OFFSET = 1_000_000_000  # feedback.csv's rows, numbered after any labels.csv could reach
ERASED = "erased"  # the quarantine reason of an image `mlops forget` erased (its bytes are not kept)


class NothingLanded(FileNotFoundError):
    """The day's labels.csv is not there (yet)."""


class IngestStatus(StrEnum):
    PUBLISHED = "published"
    REJECTED = "rejected"


@dataclass(frozen=True)
class Landed:
    rows: int
    files: int
    objects: int
    folder_markers: int = 0  # empty ``folder/`` objects: listed, ignored, not in the ledger


@dataclass(frozen=True)
class Curated:
    rows: int
    files: int
    new_images: int
    duplicates: int


@dataclass(frozen=True)
class Quarantined:
    rows: int
    files: int
    by_reason: dict[str, int]


@dataclass(frozen=True)
class BatchGate:
    passed: bool
    reasons: list[str]


@dataclass(frozen=True)
class IngestResult:
    """What one day's ingestion did; ``to_dict()`` is ``result.json`` and the CLI's ``--json``."""

    day: str
    status: IngestStatus
    landed: Landed
    curated: Curated
    quarantined: Quarantined
    rejected_share: float
    gate: BatchGate
    suites: dict[str, dict[str, Any]]
    reconciled: bool
    reports: dict[str, str]
    pii_masked: dict[str, int] = field(default_factory=dict)  # masks in the new rows' metadata, by kind
    reingested: dict[str, str] = field(default_factory=dict)  # other days ingested again after this one
    dataset_version: str | None = None  # set when published
    quarantine: str | None = None  # URL of the day's quarantine, set when published

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["status"] = str(self.status)
        return {key: value for key, value in out.items() if value is not None}

    def summary_line(self) -> str:
        return (
            f"{self.day}: landed {self.landed.objects} objects, curated {self.curated.files} files "
            f"({self.curated.new_images} new images), quarantined {self.quarantined.files} files "
            f"and {self.quarantined.rows} rows; dataset {self.dataset_version}"
        )

    def to_xcom(self) -> dict[str, Any]:
        """The small summary a DAG task hands on."""
        full = self.to_dict()
        return {
            key: full[key]
            for key in ("day", "landed", "curated", "quarantined", "dataset_version", "reports")
        }

    def asset_extra(self) -> dict[str, Any]:
        """What the ``curated_images`` event carries to drift monitoring."""
        return {"day": self.day, "dataset_version": self.dataset_version}


class BatchRejected(RuntimeError):
    """The batch gate failed: nothing was published for the day."""

    def __init__(self, message: str, result: IngestResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class LedgerEntry:
    kind: str  # "row" (a labels.csv or feedback.csv line) or "file"
    ref: str  # "labels.csv:LINE", "feedback.csv:LINE" or the landed key
    outcome: str = "curated"  # or "quarantined"
    reason: str = ""
    detail: str = ""
    label: str = ""
    sha256: str = ""
    duplicate_of_line: int | None = None  # a row repeating an earlier labels.csv line
    duplicate_of: str = ""  # a file with the same content as this earlier landed key
    already_in_catalog: bool = False  # a file whose content an earlier day curated
    file_ref: str = ""  # a row: the landed key of the file it names, if that was landed

    @property
    def note(self) -> str:
        """The ledger's ``note`` column."""
        if self.duplicate_of_line is not None:
            return f"duplicate_row_of={row_ref(self.duplicate_of_line)}"
        if self.duplicate_of:
            return f"duplicate_of={self.duplicate_of}"
        return "already_in_catalog" if self.already_in_catalog else ""

    @property
    def is_duplicate(self) -> bool:
        return self.duplicate_of_line is not None or bool(self.duplicate_of) or self.already_in_catalog


LEDGER_COLUMNS = ("kind", "ref", "outcome", "reason", "detail", "label", "sha256", "note")


def unsafe_key_reason(key: str) -> str | None:
    """Why a listed key cannot be used as a path (None when it can)."""
    try:
        key.encode("utf-8")
        if safe_key(key) != key:
            return f"unsafe key {key!r}: not in normal form"
    except UnsafeKeyError as exc:
        return str(exc)
    except UnicodeEncodeError:
        return f"unsafe key {key!r}: not valid UTF-8"
    return None


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class Landing:
    """One day's listing, sorted: every object besides labels.csv and folder markers, by kind."""

    objects: list[ObjectInfo]  # keys exactly as listed
    files: dict[str, str]  # filename (relative to images/) -> landed key
    stray: list[str]  # safe keys outside images/
    unsafe: dict[str, str]  # key that is not a safe path -> why
    folder_markers: int = 0


def sort_listing(listed: Iterable[ObjectInfo], layout: DayLayout) -> Landing:
    """Sort the day's listing: folder markers counted and dropped, unsafe keys set apart with why."""
    objects, files, stray, unsafe, markers = [], {}, [], {}, 0
    for info in listed:
        if info.is_folder_marker:
            markers += 1
            continue
        if info.key in (layout.labels, layout.feedback_labels):
            continue
        objects.append(info)
        reason = unsafe_key_reason(info.key)
        if reason:
            unsafe[info.key] = reason
        elif info.key.startswith(layout.images + "/"):
            files[info.key.removeprefix(layout.images + "/")] = info.key
        else:
            stray.append(info.key)
    return Landing(objects, files, stray, unsafe, markers)


@dataclass
class Batch:
    """Working state of one day's ingestion."""

    layout: DayLayout
    manifest: pd.DataFrame
    landing: Landing
    spooled: dict[str, Path] = field(default_factory=dict)  # landed key -> its file in the spool
    rows: dict[int, LedgerEntry] = field(default_factory=dict)
    file_entries: dict[str, LedgerEntry] = field(default_factory=dict)
    suites: dict[str, SuiteOutcome] = field(default_factory=dict)
    gate_reasons: list[str] = field(default_factory=list)
    # landed keys not spooled here whose originals are copied within storage when quarantined (sharded)
    copied_originals: set[str] = field(default_factory=set)
    # sha256s `mlops forget` erased: never curated, nor kept in quarantine
    erased: frozenset[str] = frozenset()
    upstream_missing: tuple[str, ...] = ()  # required columns labels.csv lacks (feedback.csv's do not count)

    @property
    def files(self) -> dict[str, str]:
        return self.landing.files

    @property
    def stray(self) -> list[str]:
        return self.landing.stray


class InspectionResults(Protocol):
    """Where the images' inspections come from: worker processes here, or a sharded ingest's shards."""

    def results(self, names: Iterable[str]) -> dict[str, FileInspection]: ...


@dataclass(frozen=True)
class StagedDay:
    """A sharded ingest's merge input: the listing its plan took and its shards' inspections."""

    listing: list[ObjectInfo]
    inspection: InspectionResults
    unreadable: dict[str, str] = field(default_factory=dict)  # landed key -> why its shard could not read it


def read_manifest(data: bytes) -> tuple[pd.DataFrame, str | None]:
    """Parse labels.csv into strings (``line`` = the CSV line a row starts on; blank lines are no row);
    an unreadable file gives an error that says why."""
    try:
        records = csv_records(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, csv.Error) as exc:
        return pd.DataFrame(columns=list(REQUIRED_COLUMNS)), f"labels.csv is unreadable: {exc}"
    try:
        frame = manifest_frame(records)
    except ValueError as exc:
        return pd.DataFrame(columns=list(REQUIRED_COLUMNS)), f"labels.csv is unreadable: {exc}"
    frame = frame.apply(lambda column: column.str.strip())
    frame = frame.replace({"": None})
    return frame, None


def csv_records(text: str) -> list[tuple[int, list[str]]]:
    """(line it starts on, fields) of each record of ``text``; a quoted field may span lines."""
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True)
    records, read = [], 0
    for fields in reader:
        if any(field.strip() for field in fields):  # a blank line (or one of commas only) is no record
            records.append((read + 1, fields))
        read = reader.line_num
    return records


def manifest_frame(records: list[tuple[int, list[str]]]) -> pd.DataFrame:
    """The rows under the header, indexed by line. A trailing comma (an empty last field, as spreadsheet
    exports write) is no column; a row longer than the header otherwise, or two columns of one name, is
    a ``ValueError``."""
    if not records:
        raise ValueError("it is empty: the first line must name the columns (filename,label)")
    (header_line, header), rows = records[0], records[1:]
    names = [name.strip().lower() for name in header]
    while (
        names
        and not names[-1]
        and all(len(fields) < len(names) or not fields[-1].strip() for _, fields in rows)
    ):
        names.pop()
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(
            f"line {header_line} names the column {', '.join(map(repr, repeated))} more than once"
        )
    names = [name or f"unnamed: {index}" for index, name in enumerate(names)]
    table = []
    for line, fields in rows:
        extra = fields[len(names) :]
        if any(value.strip() for value in extra):
            raise ValueError(f"line {line} has {len(fields)} fields where the header names {len(names)}")
        table.append(fields[: len(names)] + [""] * (len(names) - len(fields)))
    return pd.DataFrame(table, columns=names, index=[line for line, _ in rows], dtype=object)


def row_ref(line: int) -> str:
    """A manifest row as the ledger names it: ``labels.csv:LINE`` or ``feedback.csv:LINE``."""
    if line >= FEEDBACK_LINE_OFFSET:
        return f"{FEEDBACK_LABELS_FILE}:{line - FEEDBACK_LINE_OFFSET}"
    return f"{LABELS_FILE}:{line}"


def with_feedback_rows(manifest: pd.DataFrame, feedback: pd.DataFrame) -> pd.DataFrame:
    """Upstream's rows and the landed feedback's, one frame; feedback lines numbered past
    ``FEEDBACK_LINE_OFFSET`` so every row keeps the line of its own file."""
    if feedback.empty:
        return manifest
    feedback = feedback.set_axis(feedback.index + FEEDBACK_LINE_OFFSET)
    return pd.concat([manifest, feedback]).astype(object).where(lambda frame: frame.notna(), None)


def _quarantine(entry: LedgerEntry, reason: str, detail: str = "") -> None:
    if entry.outcome != "quarantined":
        entry.outcome, entry.reason, entry.detail = "quarantined", reason, detail


def _label(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)


def check_manifest(batch: Batch, quality: QualityRunner, settings: Settings) -> None:
    """Run the manifest suite on the rows (exact duplicate rows collapsed) and record row reasons."""
    frame = batch.manifest
    labels = frame["label"].tolist() if "label" in frame else [""] * len(frame)
    for line, label in zip(frame.index.tolist(), labels, strict=True):
        batch.rows[line] = LedgerEntry("row", row_ref(line), label=_label(label))
    has_columns = all(column in frame for column in REQUIRED_COLUMNS)
    collapsed = frame.drop_duplicates(subset=list(REQUIRED_COLUMNS)) if has_columns else frame
    if has_columns:
        first_line: dict[tuple[Any, ...], int] = {}
        for line, *key in collapsed[list(REQUIRED_COLUMNS)].itertuples(name=None):
            first_line[tuple(key)] = line
        for line, *key in frame[list(REQUIRED_COLUMNS)].itertuples(name=None):
            primary = first_line[tuple(key)]
            if primary != line:
                batch.rows[line].duplicate_of_line = primary
    outcome = quality.validate("manifest", collapsed, manifest_parameters(settings))
    batch.suites["manifest"] = outcome
    batch.gate_reasons += [f"manifest suite: {reason}" for reason in outcome.gate_failures]
    for line, reasons in outcome.row_reasons.items():
        _quarantine(batch.rows[int(line)], reasons[0], "; ".join(reasons))
    if not has_columns:
        for entry in batch.rows.values():
            _quarantine(entry, "manifest_missing_columns", f"labels.csv needs columns {REQUIRED_COLUMNS}")
    elif batch.upstream_missing:  # feedback.csv brought the columns: upstream's own rows still lack them
        batch.gate_reasons.append(f"labels.csv lacks the columns {list(batch.upstream_missing)}")
        for line, entry in batch.rows.items():
            if line < FEEDBACK_LINE_OFFSET:
                _quarantine(entry, "manifest_missing_columns", f"labels.csv needs columns {REQUIRED_COLUMNS}")
    _follow_primaries(batch)


def _follow_primaries(batch: Batch) -> None:
    for entry in batch.rows.values():
        if entry.duplicate_of_line is not None:
            primary = batch.rows[entry.duplicate_of_line]
            if primary.outcome == "quarantined":
                _quarantine(entry, primary.reason, primary.detail)


def manifest_parameters(settings: Settings) -> dict[str, Any]:
    return {"classes": list(settings.classes), "min_valid_share": 1.0 - settings.ingest.max_rejected_share}


def properties_parameters(settings: Settings) -> dict[str, Any]:
    ingest = settings.ingest
    return {
        "min_side_px": ingest.min_side_px,
        "max_side_px": ingest.max_side_px,
        "brightness_min": ingest.brightness_range[0],
        "brightness_max": ingest.brightness_range[1],
        "min_contrast": ingest.min_contrast,
        "min_valid_share": 1.0 - ingest.max_rejected_share,
    }


def pair_rows_and_files(batch: Batch) -> dict[str, int]:
    """Match rows to files; returns filename -> line of the one valid row that claims it."""
    rows_by_name: dict[str, list[int]] = defaultdict(list)
    if "filename" in batch.manifest:
        for line, name in batch.manifest["filename"].items():
            if name is not None:
                rows_by_name[str(name)].append(int(line))
    for key in batch.stray:
        entry = batch.file_entries.setdefault(key, LedgerEntry("file", key))
        target = quarantine_target(batch, key)
        kept = (
            ""
            if target.endswith(key.removeprefix(batch.layout.landing))
            else f"; its bytes are kept as {target}"
        )
        _quarantine(entry, "unexpected_location", f"only labels.csv and images/ are read{kept}")
    claimed: dict[str, int] = {}
    for name, key in sorted(batch.files.items()):
        entry = batch.file_entries.setdefault(key, LedgerEntry("file", key))
        lines = rows_by_name.get(name, [])
        for line in lines:
            batch.rows[line].file_ref = key
        valid = [line for line in lines if batch.rows[line].outcome == "curated"]
        if entry.outcome == "quarantined":  # decided from the listing (too large): its rows follow
            for line in valid:
                _quarantine(batch.rows[line], entry.reason, entry.detail)
        elif not lines:
            _quarantine(entry, "orphan_file", "no labels.csv row names this file")
        elif not valid:
            first = batch.rows[lines[0]]
            _quarantine(entry, first.reason, f"its row {row_ref(lines[0])} was quarantined")
        else:
            claimed[name] = valid[0]
            entry.label = batch.rows[valid[0]].label
    names = batch.manifest["filename"].to_dict() if "filename" in batch.manifest else {}
    for line, entry in batch.rows.items():
        name = names.get(line)
        if entry.outcome == "curated" and name is not None and str(name) not in batch.files:
            _quarantine(entry, "file_missing", f"images/{name} was not landed")
    return claimed


def quarantine_from_listing(batch: Batch, max_file_bytes: int) -> None:
    """Keys that are not a safe path, and objects over the size limit: decided from the listing alone."""
    for info in batch.landing.objects:
        why = batch.landing.unsafe.get(info.key)
        too_large = info.size > max_file_bytes
        size_note = f"{info.size} bytes > max_file_bytes {max_file_bytes}"
        if why is not None:
            kept = (
                f"{size_note}: not copied, left where it landed"
                if too_large
                else f"its bytes are kept as {batch.layout.quarantine_unsafe(key_digest(info.key))}"
            )
            entry = batch.file_entries[info.key] = LedgerEntry("file", info.key)
            _quarantine(entry, "unsafe_key", f"{why}; {kept}")
        elif too_large:
            entry = batch.file_entries[info.key] = LedgerEntry("file", info.key)
            detail = f"{size_note} (from the listing: not downloaded, left where it landed)"
            _quarantine(entry, "file_too_large", detail)


def quarantine_unreadable(batch: Batch, key: str, why: str) -> None:
    """A listed object storage would not give (access denied, archived): quarantined with why; its rows
    follow it, as with a file decided from the listing. Nothing is copied: it stays where it landed."""
    entry = batch.file_entries.setdefault(key, LedgerEntry("file", key))
    detail = f"{why}; not read, left where it landed: make it readable, then re-run the day"
    _quarantine(entry, UNREADABLE_OBJECT, detail)


def is_unreadable(batch: Batch, key: str) -> bool:
    entry = batch.file_entries.get(key)
    return entry is not None and entry.reason == UNREADABLE_OBJECT


def fetch_landed(
    storage: Storage,
    batch: Batch,
    spool: Spool,
    max_file_bytes: int,
    *,
    images: bool = True,
    inspection: Inspection | None = None,
) -> None:
    """Stream every object ingestion reads into the spool: none over the limit, unsafe keys read as listed.

    ``inspection`` gets each landed image as soon as it is spooled. ``images=False`` (a sharded ingest's
    merge: the shards inspected the images) leaves the images where they landed; a quarantined one is
    copied within storage."""
    readable = [
        info
        for info in batch.landing.objects
        if info.size <= max_file_bytes and not is_unreadable(batch, info.key)
    ]
    if not images:
        landed_images = set(batch.files.values())
        batch.copied_originals = {info.key for info in readable if info.key in landed_images}
        readable = [info for info in readable if info.key not in batch.copied_originals]
    name_of = {key: name for name, key in batch.files.items()}

    def spooled(key: str, path: Path) -> None:
        batch.spooled[key] = path
        if inspection is not None and key in name_of:
            inspection.add(name_of[key], path)

    def unreadable(key: str, exc: UnreadableObject) -> None:
        quarantine_unreadable(batch, key, str(exc))

    spool.fetch(storage, [i.key for i in readable if i.key not in batch.landing.unsafe], spooled, unreadable)
    for info in readable:
        if info.key in batch.landing.unsafe:
            try:
                data = read_unsafe_key(storage, info.key)
            except UnreadableObject as exc:
                quarantine_unreadable(batch, info.key, str(exc))
                continue
            if data is not None:
                spooled(info.key, spool.keep(data))
    if inspection is not None:
        inspection.flush()


def _set_file_and_row(batch: Batch, name: str, line: int, reason: str, detail: str) -> None:
    _quarantine(batch.file_entries[batch.files[name]], reason, detail)
    _quarantine(batch.rows[line], reason, detail)


def check_images(
    batch: Batch,
    claimed: dict[str, int],
    inspection: InspectionResults,
    quality: QualityRunner,
    settings: Settings,
) -> dict[str, FileInspection]:
    """Safety checks in Python (already running in ``inspection``), quality checks in the properties suite."""
    inspected = inspection.results(claimed)
    decoded = {}
    for name, result in inspected.items():
        report = result.report
        batch.file_entries[batch.files[name]].sha256 = report.sha256
        if report.reason:
            _set_file_and_row(batch, name, claimed[name], report.reason, report.detail)
        elif {report.sha256, report.source_sha256} & batch.erased:
            _set_file_and_row(
                batch, name, claimed[name], ERASED, "this image was erased (catalog/erasures.jsonl)"
            )
        else:
            decoded[name] = report.properties()
    frame = pd.DataFrame.from_dict(decoded, orient="index")
    if frame.empty:
        frame = pd.DataFrame(columns=["width", "height", "brightness", "contrast", "phash"])
    outcome = quality.validate("image_properties", frame, properties_parameters(settings))
    batch.suites["image_properties"] = outcome
    batch.gate_reasons += [f"image_properties suite: {reason}" for reason in outcome.gate_failures]
    for name, reasons in outcome.row_reasons.items():
        _set_file_and_row(batch, str(name), claimed[str(name)], reasons[0], "; ".join(reasons))
    return inspected


def _collapse_duplicates(
    batch: Batch, claimed: dict[str, int], inspected: dict[str, FileInspection], known_labels: dict[str, str]
) -> dict[str, str]:
    """Collapse identical content, quarantine label conflicts; returns new sha256 -> its first file."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in sorted(claimed):
        if batch.file_entries[batch.files[name]].outcome == "curated":
            groups[inspected[name].report.sha256].append(name)
    new: dict[str, str] = {}
    for sha, names in groups.items():
        labels = {batch.rows[claimed[name]].label for name in names}
        if len(labels) > 1:
            for name in names:
                detail = f"the same image is labelled {sorted(labels)} in this batch"
                _set_file_and_row(batch, name, claimed[name], "conflicting_labels_same_content", detail)
        elif sha in known_labels and known_labels[sha] not in labels:
            for name in names:
                detail = f"already catalogued as {known_labels[sha]!r}"
                _set_file_and_row(batch, name, claimed[name], "label_conflicts_with_catalog", detail)
        elif sha in known_labels:
            for name in names:
                batch.file_entries[batch.files[name]].already_in_catalog = True
        else:
            new[sha] = names[0]
            for name in names[1:]:
                batch.file_entries[batch.files[name]].duplicate_of = batch.files[names[0]]
    return new


def row_metadata(manifest: pd.DataFrame, line: int, mask: bool = True) -> str:
    """The labels.csv row's columns besides filename and label, as the catalog's ``metadata``; with
    ``mask``, personal data in the values masked (``ml.data.privacy``)."""
    extra = [column for column in manifest.columns if column not in REQUIRED_COLUMNS]
    values = {column: manifest.at[line, column] for column in extra}
    if mask:
        values = {k: v if not isinstance(v, str) else mask_pii(v)[0] for k, v in values.items()}
    return catalog.metadata_json(values)


def _catalog_row(
    batch: Batch, name: str, line: int, split: str, inspected: FileInspection, mask: bool
) -> dict[str, Any]:
    report = inspected.report
    label = batch.rows[line].label
    return {
        "sha256": report.sha256,
        "label": label,
        "split": split,
        "day": batch.layout.day.isoformat(),
        "curated_key": curated_key(report.sha256, report.curated_ext),
        "source_key": batch.files[name],
        "source_sha256": report.source_sha256,
        "format": report.format,
        "width": report.width,
        "height": report.height,
        "file_bytes": report.file_bytes,
        "brightness": report.brightness,
        "contrast": report.contrast,
        "blur": report.blur,
        "phash": report.phash,
        "metadata": row_metadata(batch.manifest, line, mask),
    }


def dedupe_and_split(
    batch: Batch,
    claimed: dict[str, int],
    inspected: dict[str, FileInspection],
    known: pd.DataFrame,
    settings: Settings,
) -> list[dict[str, Any]]:
    """Collapse exact duplicates, quarantine label conflicts, assign splits; return new catalog rows."""
    known_labels = dict(zip(known["sha256"], known["label"], strict=True))
    new = _collapse_duplicates(batch, claimed, inspected, known_labels)
    fractions = (settings.data.splits.train, settings.data.splits.val, settings.data.splits.test)
    splits = catalog.assign_splits(
        [catalog.SplitCandidate(sha, inspected[name].report.phash) for sha, name in new.items()],
        list(known["phash"]),
        list(known["split"]),
        fractions,
        settings.ingest.near_duplicate_max_distance,
    )
    return [
        _catalog_row(batch, name, claimed[name], splits[sha], inspected[name], settings.ingest.mask_pii)
        for sha, name in sorted(new.items())
    ]


def ledger(batch: Batch) -> list[LedgerEntry]:
    return [batch.rows[line] for line in sorted(batch.rows)] + [
        batch.file_entries[key] for key in sorted(batch.file_entries)
    ]


@dataclass(frozen=True)
class Reconciliation:
    """Whether the ledger holds every listed object and every labels.csv line exactly once, each settled."""

    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def _count_problems(what: str, expected: Counter[str], found: Counter[str]) -> list[str]:
    return [
        f"{what} {ref!r}: {found[ref]} ledger entries, expected {expected[ref]}"
        for ref in sorted(set(expected) | set(found))
        if found[ref] != expected[ref]
    ]


def _entry_problem(entry: LedgerEntry, files: dict[str, LedgerEntry]) -> str | None:
    if entry.outcome not in ("curated", "quarantined"):
        return f"{entry.ref} is {entry.outcome!r}: neither curated nor quarantined"
    if entry.outcome == "quarantined" and not entry.reason:
        return f"{entry.ref} is quarantined without a reason"
    if entry.kind == "row" and entry.outcome == "curated":
        named = files.get(entry.file_ref)
        if named is None or named.outcome != "curated":
            return f"{entry.ref} is curated but the file it names ({entry.file_ref or 'none'}) is not"
    return None


def reconcile(listed: Iterable[str], lines: Iterable[int], entries: Sequence[LedgerEntry]) -> Reconciliation:
    """Check the ledger against the listing (keys besides labels.csv and folder markers) and the manifest."""
    files = {entry.ref: entry for entry in entries if entry.kind == "file"}
    problems = _count_problems(
        "object", Counter(listed), Counter(entry.ref for entry in entries if entry.kind == "file")
    )
    problems += _count_problems(
        "row",
        Counter(row_ref(line) for line in lines),
        Counter(entry.ref for entry in entries if entry.kind == "row"),
    )
    problems += [problem for entry in entries if (problem := _entry_problem(entry, files))]
    return Reconciliation(problems)


def _gate(
    batch: Batch, entries: list[LedgerEntry], share: float, settings: Settings, reconciled: Reconciliation
) -> BatchGate:
    limit = settings.ingest.max_rejected_share
    reasons = list(batch.gate_reasons)
    if share > limit:
        reasons.append(f"rejected share {share:.3f} > max_rejected_share {limit}")
    if not entries:
        reasons.append("nothing landed besides labels.csv")
    if not reconciled.ok:
        shown = "; ".join(reconciled.problems[:5])
        reasons.append(f"the ledger does not reconcile ({len(reconciled.problems)} problems): {shown}")
    return BatchGate(not reasons, reasons)


def summarise(
    batch: Batch, new_rows: list[dict[str, Any]], settings: Settings, reports: dict[str, str]
) -> IngestResult:
    entries = ledger(batch)
    rows = [e for e in entries if e.kind == "row"]
    files = [e for e in entries if e.kind == "file"]
    quarantined = [e for e in entries if e.outcome == "quarantined"]
    share = len(quarantined) / len(entries) if entries else 0.0
    reconciled = reconcile(
        [info.key for info in batch.landing.objects], [int(line) for line in batch.manifest.index], entries
    )
    gate = _gate(batch, entries, share, settings, reconciled)
    return IngestResult(
        day=batch.layout.day.isoformat(),
        status=IngestStatus.PUBLISHED if gate.passed else IngestStatus.REJECTED,
        landed=Landed(len(rows), len(files), len(entries), batch.landing.folder_markers),
        curated=Curated(
            rows=sum(e.outcome == "curated" for e in rows),
            files=sum(e.outcome == "curated" for e in files),
            new_images=len(new_rows),
            duplicates=sum(e.outcome == "curated" and e.is_duplicate for e in files),
        ),
        quarantined=Quarantined(
            rows=sum(e.outcome == "quarantined" for e in rows),
            files=sum(e.outcome == "quarantined" for e in files),
            by_reason=dict(sorted(Counter(e.reason for e in quarantined).items())),
        ),
        rejected_share=round(share, 4),
        gate=gate,
        suites={
            name: {"success": o.success, "failed_expectations": o.failed_expectations}
            for name, o in batch.suites.items()
        },
        reconciled=reconciled.ok,
        reports=reports,
        pii_masked=masked_counts(str(row["metadata"]) for row in new_rows),
    )


def ledger_csv(entries: list[LedgerEntry]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(LEDGER_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows({column: getattr(entry, column) for column in LEDGER_COLUMNS} for entry in entries)
    return buffer.getvalue().encode("utf-8", "backslashreplace")


def quarantine_target(batch: Batch, key: str) -> str:
    """Where a quarantined original is kept: its path under the day; by the hash of its key for an
    unsafe key, and for one whose path is the quarantine's own (``_reasons.csv``, ``unsafe_keys/``)."""
    if key in batch.landing.unsafe:
        return batch.layout.quarantine_unsafe(key_digest(key))
    relative = key.removeprefix(batch.layout.landing + "/")
    if relative == QUARANTINE_REASONS_FILE or relative.startswith(QUARANTINE_UNSAFE_FOLDER + "/"):
        return batch.layout.quarantine_unsafe(key_digest(key))
    return join_key(batch.layout.quarantine, relative)


def _write_quarantine(storage: Storage, batch: Batch) -> None:
    """Quarantined originals as landed, the day's ``_reasons.csv``, and nothing stale from a re-run."""
    entries = ledger(batch)
    keep = {batch.layout.quarantine_reasons}
    for entry in entries:
        if entry.kind != "file" or entry.outcome != "quarantined" or entry.reason == ERASED:
            continue
        target = quarantine_target(batch, entry.ref)
        if entry.ref in batch.spooled:
            storage.write_bytes(target, batch.spooled[entry.ref].read_bytes())
            keep.add(target)
        elif entry.ref in batch.copied_originals:
            storage.copy(entry.ref, target)
            keep.add(target)
    quarantined = [entry for entry in entries if entry.outcome == "quarantined"]
    storage.write_bytes(batch.layout.quarantine_reasons, ledger_csv(quarantined))
    for info in storage.list_objects(batch.layout.quarantine):
        if info.key not in keep and unsafe_key_reason(info.key) is None:
            storage.delete(info.key)


def _write_curated(storage: Storage, key: str, inspected: FileInspection) -> None:
    """The curated bytes to ``key``: from the local spool, or copied from where a shard staged them."""
    if inspected.curated_path is not None:
        storage.upload(inspected.curated_path, key)
    elif inspected.curated_key is not None:
        try:
            storage.copy(inspected.curated_key, key)
        except StorageError:
            if not storage.exists(key):  # a retried merge after a cleanup cut short: published already
                raise
    else:
        raise RuntimeError(f"no curated bytes for {inspected.report.source_sha256}")


def in_flight(write: Callable[[Any], None], items: Iterable[Any], storage: Storage) -> None:
    """``write`` each item to ``storage``, as many at a time as it gains from (up to ``PUBLISH_THREADS``);
    the first failure is raised once the writes in flight have ended."""
    for _ in io_map(storage, write, items, PUBLISH_THREADS):
        pass


def publish(
    storage: Storage, batch: Batch, new_rows: list[dict[str, Any]], inspected: dict[str, FileInspection]
) -> dict[str, Any]:
    """Write curated images and quarantined originals (from the spool or the staging area), then the
    catalog (last). The curated writes go ``PUBLISH_THREADS`` at a time: each is one S3 request (a PUT,
    or a server-side COPY from a shard's staging) that waits on the network. Curated keys are named by
    their content, so a re-run rewrites the same bytes and nothing is checked before a write."""

    def put(row: dict[str, Any]) -> None:
        name = row["source_key"].removeprefix(batch.layout.images + "/")
        _write_curated(storage, row["curated_key"], inspected[name])

    in_flight(put, new_rows, storage)  # the first failure is raised: the catalog is not written
    _write_quarantine(storage, batch)
    frame = pd.DataFrame(new_rows, columns=catalog.CATALOG_COLUMNS).sort_values("sha256", ignore_index=True)
    previous = catalog.write_partition(storage, batch.layout.day, catalog.to_parquet_bytes(frame))
    version = catalog.write_version(storage, batch.layout.day)
    return {**version, "dropped": sorted(catalog.partition_hashes(previous) - set(frame["sha256"]))}


def days_relying_on(storage: Storage, hashes: set[str], day: dt.date) -> list[dt.date]:
    """Other days whose ledger found one of ``hashes`` already in the catalog, and so kept no row of it.
    Read only when a re-run of ``day`` dropped images from its partition (upstream changed the day)."""
    days = []
    for key in storage.list(INGEST_REPORTS_PREFIX):
        folder, _, name = key.removeprefix(INGEST_REPORTS_PREFIX + "/").partition("/")
        if name != "ledger.csv" or folder == day.isoformat():
            continue
        rows = csv.DictReader(io.StringIO(storage.read_bytes(key).decode("utf-8", "replace")))
        if any(row["note"] == "already_in_catalog" and row["sha256"] in hashes for row in rows):
            days.append(dt.date.fromisoformat(folder))
    return sorted(days)


def load_batch(
    storage: Storage, day: dt.date, listing: list[ObjectInfo] | None = None
) -> tuple[Batch, str | None]:
    """The day's manifest and listing (``listing``: one taken earlier, e.g. by a sharded ingest's plan)."""
    layout = DayLayout(day)
    if not storage.exists(layout.labels):
        raise NothingLanded(f"nothing landed for {day}: {storage.url(layout.labels)} does not exist")
    manifest, parse_error = read_manifest(storage.read_bytes(layout.labels))
    upstream_missing = tuple(column for column in REQUIRED_COLUMNS if column not in manifest.columns)
    if storage.exists(layout.feedback_labels):
        feedback, feedback_error = read_manifest(storage.read_bytes(layout.feedback_labels))
        manifest = with_feedback_rows(manifest, feedback)
        parse_error = parse_error or (
            feedback_error and feedback_error.replace(LABELS_FILE, FEEDBACK_LABELS_FILE)
        )
    landing = sort_listing(storage.list_objects(layout.landing) if listing is None else listing, layout)
    batch = Batch(
        layout, manifest, landing, erased=catalog.erased_images(storage), upstream_missing=upstream_missing
    )
    return batch, parse_error


def local_inspection(
    settings: Settings, batch: Batch, spool: Spool, inspect: InspectFile = inspect_file
) -> Inspection:
    """The spooled images inspected by worker processes on this host (they start at once); with
    nothing spooled yet, an inspection that takes the images as ``fetch_landed`` spools them."""
    images = {name: batch.spooled[key] for name, key in sorted(batch.files.items()) if key in batch.spooled}
    limits = ImageLimits.from_settings(settings.ingest)
    workers = resolve_workers(settings.ingest.workers)
    return Inspection(
        images,
        limits,
        workers,
        spool.curated,
        chunk=chunk_for(len(batch.files), workers),
        inspect=inspect,
        progress_every=settings.progress_every,
        more_to_come=not images and bool(batch.files),
    )


def validate_batch(
    settings: Settings, storage: Storage, batch: Batch, inspection: InspectionResults
) -> tuple[IngestResult, list[dict[str, Any]], dict[str, FileInspection]]:
    """Run every check on a batch whose images ``inspection`` inspects: (result, new catalog rows,
    inspection of each image)."""
    day = batch.layout.day
    run_time = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
    with QualityRunner(f"ingest-{day.isoformat()}", run_time) as quality:
        check_manifest(batch, quality, settings)
        claimed = pair_rows_and_files(batch)
        inspected = check_images(batch, claimed, inspection, quality, settings)
        # every other day, later ones too: a day ingested out of order (a backfill, a late labels.csv)
        # must not catalogue again an image a later day holds
        known = catalog.load_catalog(storage, other_than=day, columns=KNOWN_COLUMNS)
        new_rows = dedupe_and_split(batch, claimed, inspected, known, settings)
        _follow_primaries(batch)  # a repeated row shares its primary's fate, whichever step decided it
        reports = {
            "data_docs": quality.publish_docs(storage, batch.layout.data_docs),
            "ledger": storage.url(batch.layout.ledger),
            "result": storage.url(batch.layout.result),
        }
    return summarise(batch, new_rows, settings, reports), new_rows, inspected


def reingest_days(settings: Settings, storage: Storage, days: Sequence[dt.date]) -> dict[str, str]:
    """Ingest ``days`` again, one after the other; each day's status (a rejected one does not stop the
    rest: it is reported, as its own run would report it)."""
    statuses = {}
    for other in days:
        try:
            statuses[other.isoformat()] = str(ingest_day(settings, storage, other).status)
        except BatchRejected as exc:
            statuses[other.isoformat()] = str(exc.result.status)
    return statuses


def spool_parent(settings: Settings) -> Path | None:
    return Path(settings.ingest.spool_dir).expanduser() if settings.ingest.spool_dir else None


@collector_paused()  # the day's objects live to its end; its workers collect as usual (start_worker)
def ingest_day(
    settings: Settings,
    storage: Storage,
    day: dt.date,
    *,
    inspect: InspectFile = inspect_file,
    staged: StagedDay | None = None,
) -> IngestResult:
    """Validate, curate or quarantine, and version one landing day; return the run's result.

    Runs with Python's cyclic garbage collector paused (``ml.memory.collector_paused``): process-wide,
    so other threads of the process do not collect until the day ends either.
    ``inspect`` checks one spooled file in a worker process (module-level, so it can be pickled).
    ``staged``: a sharded ingest's merge (``ml.data.shards``): the plan's listing, and the images as
    its shards inspected and staged them, instead of downloading and inspecting them here.
    """
    batch, parse_error = load_batch(storage, day, staged.listing if staged else None)
    if parse_error:
        batch.gate_reasons.append(parse_error)
    max_bytes = settings.ingest.max_file_bytes
    with Spool(spool_parent(settings)) as spool:
        quarantine_from_listing(batch, max_bytes)
        for key, why in (staged.unreadable if staged else {}).items():
            quarantine_unreadable(batch, key, why)
        inspection = staged.inspection if staged else local_inspection(settings, batch, spool, inspect)
        try:
            fetch_landed(
                storage,
                batch,
                spool,
                max_bytes,
                images=staged is None,
                inspection=inspection if isinstance(inspection, Inspection) else None,
            )
            result, new_rows, inspected = validate_batch(settings, storage, batch, inspection)
        finally:
            if isinstance(inspection, Inspection):
                inspection.close()
        storage.write_bytes(batch.layout.ledger, ledger_csv(ledger(batch)))
        dropped: set[str] = set()
        if result.gate.passed:
            version = publish(storage, batch, new_rows, inspected)
            dropped = set(version["dropped"])
            result = replace(
                result, dataset_version=version["version"], quarantine=storage.url(batch.layout.quarantine)
            )
    if dropped:  # images this day no longer holds that other days left to it: they catalogue them now
        result = replace(
            result, reingested=reingest_days(settings, storage, days_relying_on(storage, dropped, day))
        )
    storage.write_bytes(batch.layout.result, json.dumps(result.to_dict(), indent=2, sort_keys=True).encode())
    if not result.gate.passed:
        reasons = "; ".join(result.gate.reasons)
        raise BatchRejected(
            f"ingest {day} rejected, nothing published: {reasons}. Data Docs: {result.reports['data_docs']}",
            result,
        )
    return result
