"""Ingest one landing day: validate every landed object, curate or quarantine it, version the dataset.

Every landed object (each labels.csv row and each file) ends up in the ledger as ``curated`` or
``quarantined`` with a reason, and the counts reconcile. A batch gate (a failed table-level
expectation, or too large a rejected share) publishes nothing and raises ``BatchRejected``.
Re-running a day writes the same bytes: nothing changes.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from multiprocessing import get_context
from typing import Any

import pandas as pd

from ml.config import Settings
from ml.data import catalog
from ml.data.images import ImageLimits, Inspected, inspect_for_pool, inspect_image
from ml.data.quality import QualityRunner, SuiteOutcome
from ml.layout import DayLayout, curated_key
from ml.storage import Storage, join_key

REQUIRED_COLUMNS = ("filename", "label")
SERIAL_BELOW = 24  # smaller batches are not worth starting worker processes for
FETCH_THREADS = 16


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
    kind: str  # "row" (a labels.csv line) or "file"
    ref: str  # "labels.csv:LINE" or the landed key
    outcome: str = "curated"  # or "quarantined"
    reason: str = ""
    detail: str = ""
    label: str = ""
    sha256: str = ""
    duplicate_of_line: int | None = None  # a row repeating an earlier labels.csv line
    duplicate_of: str = ""  # a file with the same content as this earlier landed key
    already_in_catalog: bool = False  # a file whose content an earlier day curated

    @property
    def note(self) -> str:
        """The ledger's ``note`` column."""
        if self.duplicate_of_line is not None:
            return f"duplicate_row_of=labels.csv:{self.duplicate_of_line}"
        if self.duplicate_of:
            return f"duplicate_of={self.duplicate_of}"
        return "already_in_catalog" if self.already_in_catalog else ""

    @property
    def is_duplicate(self) -> bool:
        return self.duplicate_of_line is not None or bool(self.duplicate_of) or self.already_in_catalog


LEDGER_COLUMNS = ("kind", "ref", "outcome", "reason", "detail", "label", "sha256", "note")


@dataclass
class Batch:
    """Working state of one day's ingestion."""

    layout: DayLayout
    manifest: pd.DataFrame
    files: dict[str, str]  # filename (relative to images/) -> landed key
    stray: list[str]  # landed keys outside images/
    rows: dict[int, LedgerEntry] = field(default_factory=dict)
    file_entries: dict[str, LedgerEntry] = field(default_factory=dict)
    suites: dict[str, SuiteOutcome] = field(default_factory=dict)
    gate_reasons: list[str] = field(default_factory=list)


def read_manifest(data: bytes) -> tuple[pd.DataFrame, str | None]:
    """Parse labels.csv into strings (``line`` = CSV line number); an unreadable file gives an error."""
    try:
        text = data.decode("utf-8-sig")
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, skipinitialspace=True)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        return pd.DataFrame(columns=list(REQUIRED_COLUMNS)), f"labels.csv is unreadable: {exc}"
    frame.columns = [str(column).strip().lower() for column in frame.columns]
    frame = frame.apply(lambda column: column.str.strip())
    frame = frame.replace({"": None})
    frame.index = pd.RangeIndex(2, len(frame) + 2)  # CSV line numbers; the header is line 1
    return frame, None


def _quarantine(entry: LedgerEntry, reason: str, detail: str = "") -> None:
    if entry.outcome != "quarantined":
        entry.outcome, entry.reason, entry.detail = "quarantined", reason, detail


def _label(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)


def check_manifest(batch: Batch, quality: QualityRunner, settings: Settings) -> None:
    """Run the manifest suite on the rows (exact duplicate rows collapsed) and record row reasons."""
    frame = batch.manifest
    for line in frame.index:
        label = _label(frame.at[line, "label"]) if "label" in frame else ""
        batch.rows[int(line)] = LedgerEntry("row", f"labels.csv:{line}", label=label)
    has_columns = all(column in frame for column in REQUIRED_COLUMNS)
    collapsed = frame.drop_duplicates(subset=list(REQUIRED_COLUMNS)) if has_columns else frame
    if has_columns:
        first_line = {
            (row.filename, row.label): int(line) for line, row in collapsed[list(REQUIRED_COLUMNS)].iterrows()
        }
        for line, row in frame[list(REQUIRED_COLUMNS)].iterrows():
            primary = first_line[(row.filename, row.label)]
            if primary != int(line):
                batch.rows[int(line)].duplicate_of_line = primary
    outcome = quality.validate("manifest", collapsed, manifest_parameters(settings))
    batch.suites["manifest"] = outcome
    batch.gate_reasons += [f"manifest suite: {reason}" for reason in outcome.gate_failures]
    for line, reasons in outcome.row_reasons.items():
        _quarantine(batch.rows[int(line)], reasons[0], "; ".join(reasons))
    if not has_columns:
        for entry in batch.rows.values():
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
        batch.file_entries[key] = LedgerEntry("file", key)
        _quarantine(batch.file_entries[key], "unexpected_location", "only labels.csv and images/ are read")
    claimed: dict[str, int] = {}
    for name, key in sorted(batch.files.items()):
        entry = batch.file_entries[key] = LedgerEntry("file", key)
        lines = rows_by_name.get(name, [])
        valid = [line for line in lines if batch.rows[line].outcome == "curated"]
        if not lines:
            _quarantine(entry, "orphan_file", "no labels.csv row names this file")
        elif not valid:
            first = batch.rows[lines[0]]
            _quarantine(entry, first.reason, f"its row labels.csv:{lines[0]} was quarantined")
        else:
            claimed[name] = valid[0]
            entry.label = batch.rows[valid[0]].label
    for line, entry in batch.rows.items():
        name = batch.manifest.at[line, "filename"] if "filename" in batch.manifest else None
        if entry.outcome == "curated" and name is not None and str(name) not in batch.files:
            _quarantine(entry, "file_missing", f"images/{name} was not landed")
    return claimed


def fetch_all(storage: Storage, keys: Iterable[str]) -> dict[str, bytes]:
    keys = list(keys)
    with ThreadPoolExecutor(max_workers=FETCH_THREADS) as pool:
        return dict(zip(keys, pool.map(storage.read_bytes, keys), strict=True))


def _inspect_chunk(chunk: list[bytes], limits: ImageLimits) -> list[Inspected]:
    return [inspect_for_pool(data, limits) for data in chunk]


class Inspection:
    """Images inspected in worker processes (one per core) while the caller goes on with other work.

    Workers are forked as soon as the work is submitted, before Great Expectations is imported,
    so the GE import and the manifest suite overlap with decoding. Small batches run inline.
    """

    def __init__(self, blobs: dict[str, bytes], limits: ImageLimits, workers: int, chunk: int = 16) -> None:
        self._blobs, self._limits = blobs, limits
        self._pool: ProcessPoolExecutor | None = None
        self._futures: list[tuple[list[str], Any]] = []
        if workers > 1 and len(blobs) >= SERIAL_BELOW:
            # fork: workers start in milliseconds and need nothing re-imported; they run pure functions.
            self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("fork"))
            names = list(blobs)
            for start in range(0, len(names), chunk):
                part = names[start : start + chunk]
                future = self._pool.submit(_inspect_chunk, [blobs[n] for n in part], limits)
                self._futures.append((part, future))

    def results(self, names: Iterable[str]) -> dict[str, Inspected]:
        """Results for ``names`` (waits for the workers)."""
        wanted = list(names)
        if self._pool is None:
            return {name: inspect_image(self._blobs[name], self._limits) for name in wanted}
        done: dict[str, Inspected] = {}
        for part, future in self._futures:
            done.update(zip(part, future.result(), strict=True))
        return {name: done[name] for name in wanted}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def __enter__(self) -> Inspection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def inspect_all(blobs: dict[str, bytes], limits: ImageLimits, workers: int) -> dict[str, Inspected]:
    """Inspect every image (in worker processes when the batch is large enough)."""
    with Inspection(blobs, limits, workers) as inspection:
        return inspection.results(blobs)


def resolve_workers(configured: int) -> int:
    return configured if configured > 0 else max(1, len(os.sched_getaffinity(0)))


def _set_file_and_row(batch: Batch, name: str, line: int, reason: str, detail: str) -> None:
    _quarantine(batch.file_entries[batch.files[name]], reason, detail)
    _quarantine(batch.rows[line], reason, detail)


def check_images(
    batch: Batch, claimed: dict[str, int], inspection: Inspection, quality: QualityRunner, settings: Settings
) -> dict[str, Inspected]:
    """Safety checks in Python (already running in ``inspection``), quality checks in the properties suite."""
    inspected = inspection.results(claimed)
    decoded = {}
    for name, result in inspected.items():
        report = result.report
        batch.file_entries[batch.files[name]].sha256 = report.sha256
        if report.reason:
            _set_file_and_row(batch, name, claimed[name], report.reason, report.detail)
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
    batch: Batch, claimed: dict[str, int], inspected: dict[str, Inspected], known_labels: dict[str, str]
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


def _catalog_row(batch: Batch, name: str, label: str, split: str, inspected: Inspected) -> dict[str, Any]:
    report = inspected.report
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
    }


def dedupe_and_split(
    batch: Batch,
    claimed: dict[str, int],
    inspected: dict[str, Inspected],
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
        _catalog_row(batch, name, batch.rows[claimed[name]].label, splits[sha], inspected[name])
        for sha, name in sorted(new.items())
    ]


def ledger(batch: Batch) -> list[LedgerEntry]:
    return [batch.rows[line] for line in sorted(batch.rows)] + [
        batch.file_entries[key] for key in sorted(batch.file_entries)
    ]


def _gate(batch: Batch, entries: list[LedgerEntry], share: float, settings: Settings) -> BatchGate:
    limit = settings.ingest.max_rejected_share
    reasons = list(batch.gate_reasons)
    if share > limit:
        reasons.append(f"rejected share {share:.3f} > max_rejected_share {limit}")
    if not entries:
        reasons.append("nothing landed besides labels.csv")
    return BatchGate(not reasons, reasons)


def summarise(
    batch: Batch, new_rows: list[dict[str, Any]], settings: Settings, reports: dict[str, str]
) -> IngestResult:
    entries = ledger(batch)
    rows = [e for e in entries if e.kind == "row"]
    files = [e for e in entries if e.kind == "file"]
    quarantined = [e for e in entries if e.outcome == "quarantined"]
    share = len(quarantined) / len(entries) if entries else 0.0
    gate = _gate(batch, entries, share, settings)
    return IngestResult(
        day=batch.layout.day.isoformat(),
        status=IngestStatus.PUBLISHED if gate.passed else IngestStatus.REJECTED,
        landed=Landed(len(rows), len(files), len(entries)),
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
        reconciled=all(e.outcome in ("curated", "quarantined") for e in entries)
        and len(entries) == len(rows) + len(files),
        reports=reports,
    )


def ledger_csv(entries: list[LedgerEntry]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(LEDGER_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows({column: getattr(entry, column) for column in LEDGER_COLUMNS} for entry in entries)
    return buffer.getvalue().encode()


def _write_quarantine(storage: Storage, batch: Batch, blobs: dict[str, bytes]) -> None:
    """Quarantined originals as landed, the day's ``_reasons.csv``, and nothing stale from a re-run."""
    entries = ledger(batch)
    keep = {batch.layout.quarantine_reasons}
    for entry in entries:
        if entry.kind == "file" and entry.outcome == "quarantined":
            target = join_key(batch.layout.quarantine, entry.ref.removeprefix(batch.layout.landing + "/"))
            storage.write_bytes(target, blobs[entry.ref])
            keep.add(target)
    quarantined = [entry for entry in entries if entry.outcome == "quarantined"]
    storage.write_bytes(batch.layout.quarantine_reasons, ledger_csv(quarantined))
    for stale in set(storage.list(batch.layout.quarantine)) - keep:
        storage.delete(stale)


def publish(
    storage: Storage,
    batch: Batch,
    new_rows: list[dict[str, Any]],
    inspected: dict[str, Inspected],
    blobs: dict[str, bytes],
) -> dict[str, Any]:
    """Write curated images, quarantined originals, then the catalog partition and version (last)."""
    for row in new_rows:
        if not storage.exists(row["curated_key"]):
            name = row["source_key"].removeprefix(batch.layout.images + "/")
            curated = inspected[name].curated_bytes(blobs[row["source_key"]])
            storage.write_bytes(row["curated_key"], curated or b"")
    _write_quarantine(storage, batch, blobs)
    frame = pd.DataFrame(new_rows, columns=catalog.CATALOG_COLUMNS).sort_values("sha256", ignore_index=True)
    storage.write_bytes(catalog.partition_key(batch.layout.day), catalog.to_parquet_bytes(frame))
    return catalog.write_version(storage, batch.layout.day)


def load_batch(storage: Storage, day: dt.date) -> tuple[Batch, str | None]:
    layout = DayLayout(day)
    if not storage.exists(layout.labels):
        raise NothingLanded(f"nothing landed for {day}: {storage.url(layout.labels)} does not exist")
    manifest, parse_error = read_manifest(storage.read_bytes(layout.labels))
    files: dict[str, str] = {}
    stray: list[str] = []
    for key in storage.list(layout.landing):
        if key == layout.labels:
            continue
        if key.startswith(layout.images + "/"):
            files[key.removeprefix(layout.images + "/")] = key
        else:
            stray.append(key)
    return Batch(layout, manifest, files, stray), parse_error


def validate_batch(
    settings: Settings, storage: Storage, batch: Batch, blobs: dict[str, bytes]
) -> tuple[IngestResult, list[dict[str, Any]], dict[str, Inspected]]:
    """Run every check on a loaded batch: (result, new catalog rows, inspection of each image)."""
    day = batch.layout.day
    run_time = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
    limits = ImageLimits.from_settings(settings.ingest)
    images = {name: blobs[key] for name, key in batch.files.items()}
    with (
        Inspection(images, limits, resolve_workers(settings.ingest.workers)) as inspection,
        QualityRunner(f"ingest-{day.isoformat()}", run_time) as quality,
    ):
        check_manifest(batch, quality, settings)
        claimed = pair_rows_and_files(batch)
        inspected = check_images(batch, claimed, inspection, quality, settings)
        new_rows = dedupe_and_split(
            batch, claimed, inspected, catalog.load_catalog(storage, before=day), settings
        )
        reports = {
            "data_docs": quality.publish_docs(storage, batch.layout.data_docs),
            "ledger": storage.url(batch.layout.ledger),
            "result": storage.url(batch.layout.result),
        }
    return summarise(batch, new_rows, settings, reports), new_rows, inspected


def ingest_day(settings: Settings, storage: Storage, day: dt.date) -> IngestResult:
    """Validate, curate or quarantine, and version one landing day; return the run's result."""
    batch, parse_error = load_batch(storage, day)
    if parse_error:
        batch.gate_reasons.append(parse_error)
    blobs = fetch_all(storage, [*batch.files.values(), *batch.stray])
    result, new_rows, inspected = validate_batch(settings, storage, batch, blobs)
    storage.write_bytes(batch.layout.ledger, ledger_csv(ledger(batch)))
    if result.gate.passed:
        version = publish(storage, batch, new_rows, inspected, blobs)
        result = replace(
            result, dataset_version=version["version"], quarantine=storage.url(batch.layout.quarantine)
        )
    storage.write_bytes(batch.layout.result, json.dumps(result.to_dict(), indent=2, sort_keys=True).encode())
    if not result.gate.passed:
        reasons = "; ".join(result.gate.reasons)
        raise BatchRejected(
            f"ingest {day} rejected, nothing published: {reasons}. Data Docs: {result.reports['data_docs']}",
            result,
        )
    return result
