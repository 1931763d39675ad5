"""Erasure: forget one image everywhere the pipeline keeps it, and record that it was done.

``forget`` removes, in this order, so that a run cut short can be run again and finishes the job:

1. the feature-cache rows (every cache id's shard of the image's day: ``features/<cache_id>/<day>.npz``);
2. the landed objects with its content and their quarantine copies, as the ingest ledgers name them,
   and the curated object;
3. the catalog rows: the day's partition is rewritten without them and new dataset versions of that
   day and every later one are written, so the next retrain no longer sees the image (until this
   step a re-run finds the image in the catalog again and finishes);

then appends one record to ``catalog/erasures.jsonl``. Ingestion reads that record: the image is
refused (reason ``erased``, its bytes not kept in quarantine) if it lands again, upstream or as
feedback. What it cannot undo it lists: the registered
model versions whose dataset version held the image (retrain without it and retire them). Dataset
versions written before keep their ids; reading their rows now raises ``DatasetIntegrityError``
(see ``ml.data.catalog``), so no retrain can pick the erased rows up again.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
from collections.abc import Collection
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ml.config import Settings
from ml.data import catalog
from ml.layout import (
    CATALOG_ERASURES_KEY,
    CURATED_IMAGES_PREFIX,
    FEATURES_PREFIX,
    INGEST_REPORTS_PREFIX,
    DayLayout,
)
from ml.ops.lineage import SHA256, ModelUse, image_lineage, models_holding, unknown_image
from ml.storage import Storage, UnsafeKeyError, append_jsonl, join_key, safe_key


@dataclass(frozen=True)
class Erasure:
    """What one ``forget`` removed, what it wrote, and the model versions trained with the image."""

    sha256: str
    source_sha256: tuple[str, ...]
    reason: str
    erased_by: str
    erased_at: str
    days: tuple[str, ...]
    deleted: tuple[str, ...]  # storage keys: landed and quarantined copies, curated objects
    feature_rows: dict[str, int]  # feature shard key -> rows removed
    dataset_versions: tuple[str, ...]  # the new version of each rewritten day
    latest_dataset_version: str | None
    models: tuple[ModelUse, ...]
    audit_key: str = CATALOG_ERASURES_KEY

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _usable(key: str) -> bool:
    try:
        return safe_key(key) == key
    except UnsafeKeyError:
        return False


def ledger_copies(storage: Storage, sha256s: Collection[str]) -> list[str]:
    """Landed objects with this content and their quarantine copies, as the ingest ledgers name them."""
    keys: list[str] = []
    for ledger in storage.list(INGEST_REPORTS_PREFIX):
        if not ledger.endswith("/ledger.csv"):
            continue
        with contextlib.suppress(ValueError):
            layout = DayLayout(dt.date.fromisoformat(ledger.removeprefix(INGEST_REPORTS_PREFIX + "/")[:10]))
            for entry in csv.DictReader(io.StringIO(storage.read_bytes(ledger).decode("utf-8", "replace"))):
                if entry.get("kind") != "file" or entry.get("sha256") not in sha256s:
                    continue
                keys.append(entry["ref"])
                if entry.get("outcome") == "quarantined" and entry["ref"].startswith(layout.landing + "/"):
                    keys.append(join_key(layout.quarantine, entry["ref"].removeprefix(layout.landing + "/")))
    return [key for key in dict.fromkeys(keys) if _usable(key) and storage.exists(key)]


def curated_copies(storage: Storage, sha256s: Collection[str]) -> list[str]:
    """The curated objects of these images, whatever their extension."""
    found = []
    for sha256 in sha256s:
        for key in storage.list(f"{CURATED_IMAGES_PREFIX}/{sha256[:2]}"):
            if key.rsplit("/", 1)[-1].split(".", 1)[0] == sha256:
                found.append(key)
    return found


def drop_feature_rows(storage: Storage, days: Collection[str], sha256s: Collection[str]) -> dict[str, int]:
    """Rewrite each cached shard of these days without these images; rows removed per shard key."""
    removed: dict[str, int] = {}
    for key in storage.list(FEATURES_PREFIX):
        if not key.endswith(".npz") or key.rsplit("/", 1)[-1].removesuffix(".npz") not in days:
            continue
        with np.load(io.BytesIO(storage.read_bytes(key)), allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        keep = ~np.isin(arrays["sha256"], list(sha256s))
        if keep.all():
            continue
        buffer = io.BytesIO()
        np.savez(buffer, **{name: array[keep] for name, array in arrays.items()})
        storage.write_bytes(key, buffer.getvalue())
        removed[key] = int((~keep).sum())
    return removed


def forget(
    settings: Settings,
    storage: Storage,
    sha256: str,
    reason: str,
    by: str,
    now: dt.datetime | None = None,
) -> Erasure:
    """Erase one image (its curated sha256 or the sha256 it landed with) and record the erasure."""
    if not SHA256.fullmatch(sha256):
        raise ValueError(f"{sha256!r} is not a sha256 (64 lowercase hex digits)")
    if not reason.strip():
        raise ValueError("an erasure needs a reason (recorded in the audit)")
    images = image_lineage(storage, catalog.image_rows(storage, sha256))
    targets = {image.sha256 for image in images} or {sha256}
    landed = [image.source_key for image in images if image.landed_present]
    copies = list(dict.fromkeys(landed + ledger_copies(storage, targets)))
    curated = curated_copies(storage, targets)
    if not (images or copies or curated):
        raise unknown_image(storage, sha256)
    models = models_holding(settings, storage, images) if images else ()
    days = sorted({image.day for image in images})
    feature_rows = drop_feature_rows(storage, days, targets)
    # bytes first, the catalog rows last: a run cut short is found again from the catalog and re-run
    for key in copies + curated:
        storage.delete(key)
    versions = [catalog.remove_images(storage, dt.date.fromisoformat(day), sorted(targets)) for day in days]
    latest = catalog.latest_day(storage)
    erasure = Erasure(
        sha256=sorted(targets)[0] if len(targets) == 1 else sha256,
        source_sha256=tuple(sorted({image.source_sha256 for image in images})),
        reason=reason,
        erased_by=by,
        erased_at=(now or dt.datetime.now(dt.UTC)).isoformat(timespec="seconds"),
        days=tuple(days),
        deleted=tuple(copies + curated),
        feature_rows=feature_rows,
        dataset_versions=tuple(version["version"] for version in versions if version is not None),
        latest_dataset_version=catalog.read_version(storage)["version"] if latest else None,
        models=models,
    )
    append_jsonl(storage, CATALOG_ERASURES_KEY, erasure.to_dict())
    return erasure
