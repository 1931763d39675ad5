"""Labelled served images as a landing source of their own.

With ``serving.log_images`` on, the service keeps each request's image (``serving/images/DAY/ID``)
and every label a caller sends back (``serving/feedback``). ``land_feedback`` lands those pairs in a
landing day beside upstream's data: the images under ``images/feedback/`` and one row each in the
day's ``feedback.csv`` (``source=feedback``, the request id and the model version that answered).
The day's ingest then reads both manifests, so a feedback image meets the same checks, Great
Expectations suites, dedupe and quarantine as any upstream image, and the next retrain uses it.

Feedback of the last ``ingest.feedback_lookback_days`` days is landed each time, so feedback that
came in after a day's ingest is landed on the next; images already curated are only noted as
duplicates by the ingest. Landing the same day again writes the same objects.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import logging
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd

from ml.data.catalog import metadata_frame
from ml.layout import FEEDBACK_IMAGES_FOLDER, FEEDBACK_PREFIX, PREDICTIONS_PREFIX, DayLayout
from ml.storage import Storage, StorageError, read_jsonl

log = logging.getLogger(__name__)

FEEDBACK_SOURCE = "feedback"
FEEDBACK_COLUMNS = ("filename", "label", "source", "request_id", "answered_by")
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tif"}


@dataclass(frozen=True)
class FeedbackLanding:
    day: str
    landed: int  # labelled images written into the day's landing
    without_image: int  # labels whose request image was not kept (log_images off, or dropped)
    manifest: str  # the feedback.csv written, "" when nothing was landed
    error: str = ""  # why nothing could be landed (the day's upstream ingest goes on)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def days_back(day: dt.date, count: int) -> list[str]:
    return [(day - dt.timedelta(days=back)).isoformat() for back in range(max(count, 1))]


def feedback_filename(request_id: str, image_format: str) -> str:
    """``feedback/<hash of the request id>.<ext>``: a safe name whatever the id holds."""
    digest = hashlib.sha256(request_id.encode()).hexdigest()[:32]
    return f"{FEEDBACK_IMAGES_FOLDER}/{digest}.{EXTENSIONS.get(image_format.upper(), 'img')}"


def labelled_requests(storage: Storage, days: list[str]) -> dict[str, dict[str, Any]]:
    """request id -> its feedback record of one of ``days`` (the first label wins, as the service's
    claim does). A log file is named by its first record's day, so each record's own time decides."""
    found: dict[str, dict[str, Any]] = {}
    records = read_jsonl(storage, FEEDBACK_PREFIX, days)
    for record in sorted(records, key=lambda r: str(r.get("time", ""))):
        if str(record.get("time", ""))[:10] in days:
            found.setdefault(str(record.get("request_id", "")), record)
    found.pop("", None)
    return found


def kept_images(storage: Storage, days: list[str], wanted: set[str]) -> dict[str, dict[str, Any]]:
    """request id -> its prediction record, for the wanted ids whose image the service kept."""
    return {
        str(record["request_id"]): record
        for record in read_jsonl(storage, PREDICTIONS_PREFIX, days)
        if record.get("request_id") in wanted and record.get("image_key")
    }


def manifest_bytes(rows: list[dict[str, str]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(FEEDBACK_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def land_feedback(storage: Storage, day: dt.date, lookback_days: int) -> FeedbackLanding:
    """Land the labelled request images of the last ``lookback_days`` days into ``day``'s landing.
    Feedback never holds up upstream's data: a failure is logged and reported in ``error``."""
    try:
        return _land(storage, day, lookback_days)
    except Exception as exc:  # a bad log line or a storage error must not block the ingest
        log.exception("feedback for %s not landed", day)
        return FeedbackLanding(day.isoformat(), 0, 0, "", error=f"{type(exc).__name__}: {exc}")


def _land(storage: Storage, day: dt.date, lookback_days: int) -> FeedbackLanding:
    layout = DayLayout(day)
    labels = labelled_requests(storage, days_back(day, lookback_days))
    # a prediction may be a day older than its label (answered before midnight, labelled after)
    predictions = kept_images(storage, days_back(day, lookback_days + 1), set(labels))
    rows, missing = [], 0
    for request_id, record in sorted(labels.items()):
        prediction = predictions.get(request_id)
        try:
            data = storage.read_bytes(prediction["image_key"]) if prediction else None
        except StorageError:
            data = None
        if data is None:
            missing += 1
            continue
        name = feedback_filename(request_id, str(prediction.get("image_format", "")))
        storage.write_bytes(f"{layout.images}/{name}", data)
        rows.append(
            {
                "filename": name,
                "label": str(record.get("label", "")),
                "source": FEEDBACK_SOURCE,
                "request_id": request_id,
                "answered_by": str(record.get("model_version", "")),
            }
        )
    if rows:
        storage.write_bytes(layout.feedback_labels, manifest_bytes(rows))
    return FeedbackLanding(
        day.isoformat(), len(rows), missing, storage.url(layout.feedback_labels) if rows else ""
    )


def from_feedback(rows: pd.DataFrame) -> pd.Series:
    """Which catalog rows came from feedback (``source=feedback`` in their metadata)."""
    meta = metadata_frame(rows)
    if "source" not in meta:
        return pd.Series(False, index=rows.index)
    return meta["source"].eq(FEEDBACK_SOURCE).fillna(False).astype(bool)
