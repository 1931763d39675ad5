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
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from typing import Any

import pandas as pd

from ml import catalog
from ml.config import Settings
from ml.images import ImageLimits, Inspected, inspect_for_pool, inspect_image
from ml.quality import QualityRunner, SuiteOutcome
from ml.storage import Storage, join_key

REQUIRED_COLUMNS = ("filename", "label")
SERIAL_BELOW = 24  # smaller batches are not worth starting worker processes for
FETCH_THREADS = 16


class NothingLanded(FileNotFoundError):
    """The day's labels.csv is not there (yet)."""


class BatchRejected(RuntimeError):
    """The batch gate failed: nothing was published for the day."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
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
    note: str = ""


@dataclass
class DayLayout:
    day: dt.date

    @property
    def landing(self) -> str:
        return f"landing/{self.day.isoformat()}"

    @property
    def labels(self) -> str:
        return f"{self.landing}/labels.csv"

    @property
    def images(self) -> str:
        return f"{self.landing}/images"

    @property
    def quarantine(self) -> str:
        return f"quarantine/{self.day.isoformat()}"

    @property
    def reports(self) -> str:
        return f"reports/ingest/{self.day.isoformat()}"

    @property
    def data_docs(self) -> str:
        return f"reports/data_docs/{self.day.isoformat()}"


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


def curated_key(sha256: str, ext: str) -> str:
    return f"curated/images/{sha256[:2]}/{sha256}.{ext}"


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
                batch.rows[int(line)].note = f"duplicate_row_of=labels.csv:{primary}"
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
        if entry.note.startswith("duplicate_row_of="):
            primary = batch.rows[int(entry.note.rsplit(":", 1)[1])]
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


def dedupe_and_split(
    batch: Batch,
    claimed: dict[str, int],
    inspected: dict[str, Inspected],
    known: pd.DataFrame,
    settings: Settings,
) -> list[dict[str, Any]]:
    """Collapse exact duplicates, quarantine label conflicts, assign splits; return new catalog rows."""
    known_labels = dict(zip(known["sha256"], known["label"], strict=True))
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
                batch.file_entries[batch.files[name]].note = "already_in_catalog"
        else:
            new[sha] = names[0]
            for name in names[1:]:
                batch.file_entries[batch.files[name]].note = f"duplicate_of={batch.files[names[0]]}"
    fractions = (settings.data.splits.train, settings.data.splits.val, settings.data.splits.test)
    splits = catalog.assign_splits(
        [catalog.SplitCandidate(sha, inspected[name].report.phash) for sha, name in new.items()],
        list(known["phash"]),
        list(known["split"]),
        fractions,
        settings.ingest.near_duplicate_max_distance,
    )
    rows = []
    for sha, name in sorted(new.items()):
        report = inspected[name].report
        rows.append(
            {
                "sha256": sha,
                "label": batch.rows[claimed[name]].label,
                "split": splits[sha],
                "day": batch.layout.day.isoformat(),
                "curated_key": curated_key(sha, report.curated_ext),
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
        )
    return rows


def ledger(batch: Batch) -> list[LedgerEntry]:
    return [batch.rows[line] for line in sorted(batch.rows)] + [
        batch.file_entries[key] for key in sorted(batch.file_entries)
    ]


def summarise(batch: Batch, new_rows: list[dict[str, Any]], settings: Settings) -> dict[str, Any]:
    entries = ledger(batch)
    rows = [e for e in entries if e.kind == "row"]
    files = [e for e in entries if e.kind == "file"]
    quarantined = [e for e in entries if e.outcome == "quarantined"]
    share = len(quarantined) / len(entries) if entries else 0.0
    limit = settings.ingest.max_rejected_share
    gate_reasons = list(batch.gate_reasons)
    if share > limit:
        gate_reasons.append(f"rejected share {share:.3f} > max_rejected_share {limit}")
    if not entries:
        gate_reasons.append("nothing landed besides labels.csv")
    return {
        "day": batch.layout.day.isoformat(),
        "status": "rejected" if gate_reasons else "published",
        "landed": {"rows": len(rows), "files": len(files), "objects": len(entries)},
        "curated": {
            "rows": sum(e.outcome == "curated" for e in rows),
            "files": sum(e.outcome == "curated" for e in files),
            "new_images": len(new_rows),
            "duplicates": sum(e.outcome == "curated" and bool(e.note) for e in files),
        },
        "quarantined": {
            "rows": sum(e.outcome == "quarantined" for e in rows),
            "files": sum(e.outcome == "quarantined" for e in files),
            "by_reason": dict(sorted(Counter(e.reason for e in quarantined).items())),
        },
        "rejected_share": round(share, 4),
        "gate": {"passed": not gate_reasons, "reasons": gate_reasons},
        "suites": {
            name: {"success": o.success, "failed_expectations": o.failed_expectations}
            for name, o in batch.suites.items()
        },
        "reconciled": all(e.outcome in ("curated", "quarantined") for e in entries)
        and len(entries) == len(rows) + len(files),
    }


def ledger_csv(entries: list[LedgerEntry]) -> bytes:
    buffer = io.StringIO()
    names = list(LedgerEntry.__dataclass_fields__)
    writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    writer.writerows(asdict(entry) for entry in entries)
    return buffer.getvalue().encode()


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
    entries = ledger(batch)
    keep = {join_key(batch.layout.quarantine, "_reasons.csv")}
    for entry in entries:
        if entry.kind == "file" and entry.outcome == "quarantined":
            target = join_key(batch.layout.quarantine, entry.ref.removeprefix(batch.layout.landing + "/"))
            storage.write_bytes(target, blobs[entry.ref])
            keep.add(target)
    quarantined = [entry for entry in entries if entry.outcome == "quarantined"]
    storage.write_bytes(join_key(batch.layout.quarantine, "_reasons.csv"), ledger_csv(quarantined))
    for stale in set(storage.list(batch.layout.quarantine)) - keep:
        storage.delete(stale)
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


def ingest_day(settings: Settings, storage: Storage, day: dt.date) -> dict[str, Any]:
    """Validate, curate or quarantine, and version one landing day; return the run's result."""
    batch, parse_error = load_batch(storage, day)
    if parse_error:
        batch.gate_reasons.append(parse_error)
    blobs = fetch_all(storage, [*batch.files.values(), *batch.stray])
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
        known = catalog.load_catalog(storage, before=day)
        new_rows = dedupe_and_split(batch, claimed, inspected, known, settings)
        result = summarise(batch, new_rows, settings)
        result["reports"] = {
            "data_docs": quality.publish_docs(storage, batch.layout.data_docs),
            "ledger": storage.url(join_key(batch.layout.reports, "ledger.csv")),
            "result": storage.url(join_key(batch.layout.reports, "result.json")),
        }
    storage.write_bytes(join_key(batch.layout.reports, "ledger.csv"), ledger_csv(ledger(batch)))
    if result["gate"]["passed"]:
        version = publish(storage, batch, new_rows, inspected, blobs)
        result["dataset_version"] = version["version"]
        result["quarantine"] = storage.url(batch.layout.quarantine)
    storage.write_bytes(
        join_key(batch.layout.reports, "result.json"), json.dumps(result, indent=2, sort_keys=True).encode()
    )
    if not result["gate"]["passed"]:
        reasons = "; ".join(result["gate"]["reasons"])
        docs = result["reports"]["data_docs"]
        raise BatchRejected(
            f"ingest {day} rejected, nothing published: {reasons}. Data Docs: {docs}",
            result,
        )
    return result
