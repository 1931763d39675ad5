"""Every storage key and prefix the pipeline reads or writes, in one place (standard library only).

Keys are relative to ``storage.root``. A DAG sensor or a callback can import this module
without pulling in pandas, PIL or torch. The MLflow artifact paths a run logs are listed at
the end: they are how training, release and monitoring find each other's files.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

# -- landing, quarantine, curated images ----------------------------------------------------------
LANDING_PREFIX = "landing"
LABELS_FILE = "labels.csv"
FEEDBACK_LABELS_FILE = "feedback.csv"  # labelled served images, beside upstream's rows (source=feedback)
FEEDBACK_IMAGES_FOLDER = "feedback"  # under the day's images/
CURATED_IMAGES_PREFIX = "curated/images"
QUARANTINE_PREFIX = "quarantine"
INGEST_STAGING_PREFIX = "staging/ingest"  # sharded ingests in progress
QUARANTINE_REASONS_FILE = "_reasons.csv"
QUARANTINE_UNSAFE_FOLDER = "unsafe_keys"  # copies of objects whose landed key is not a safe path


@dataclass(frozen=True)
class DayLayout:
    """Where one landing day's objects, quarantine and reports live."""

    day: dt.date

    @property
    def landing(self) -> str:
        return f"{LANDING_PREFIX}/{self.day.isoformat()}"

    @property
    def labels(self) -> str:
        return f"{self.landing}/{LABELS_FILE}"

    @property
    def feedback_labels(self) -> str:
        return f"{self.landing}/{FEEDBACK_LABELS_FILE}"

    @property
    def images(self) -> str:
        return f"{self.landing}/images"

    @property
    def feedback_images(self) -> str:
        return f"{self.images}/{FEEDBACK_IMAGES_FOLDER}"

    @property
    def quarantine(self) -> str:
        return f"{QUARANTINE_PREFIX}/{self.day.isoformat()}"

    @property
    def quarantine_reasons(self) -> str:
        return f"{self.quarantine}/{QUARANTINE_REASONS_FILE}"

    def quarantine_unsafe(self, key_digest: str) -> str:
        """Where an object whose key is not a safe path is kept: named by the sha256 of its key."""
        return f"{self.quarantine}/{QUARANTINE_UNSAFE_FOLDER}/{key_digest}"

    @property
    def reports(self) -> str:
        return f"{INGEST_REPORTS_PREFIX}/{self.day.isoformat()}"

    @property
    def ledger(self) -> str:
        return f"{self.reports}/ledger.csv"

    @property
    def result(self) -> str:
        return f"{self.reports}/result.json"

    @property
    def data_docs(self) -> str:
        return f"{DATA_DOCS_PREFIX}/{self.day.isoformat()}"

    @property
    def staging(self) -> str:
        """A sharded ingest in progress (plan, shard results, curated bytes); removed once published."""
        return f"{INGEST_STAGING_PREFIX}/{self.day.isoformat()}"

    @property
    def shard_plan(self) -> str:
        return f"{self.staging}/plan.json"

    def shard_result(self, shard: int) -> str:
        return f"{self.staging}/shard-{shard:03d}.json"

    def staged_curated(self, sha256: str, ext: str) -> str:
        return f"{self.staging}/curated/{sha256}.{ext}"


def curated_key(sha256: str, ext: str) -> str:
    """Accepted images are content-addressed: ``curated/images/ab/<sha256>.<ext>``."""
    return f"{CURATED_IMAGES_PREFIX}/{sha256[:2]}/{sha256}.{ext}"


# -- the catalog and dataset versions -------------------------------------------------------------
CATALOG_DAYS_PREFIX = "catalog/days"
CATALOG_VERSIONS_PREFIX = "catalog/versions"
CATALOG_VERSIONS_BY_ID_PREFIX = f"{CATALOG_VERSIONS_PREFIX}/by_id"
CATALOG_LATEST_KEY = "catalog/LATEST"
CATALOG_ERASURES_KEY = "catalog/erasures.jsonl"  # one record per erased image: why, by whom, what was removed
# a cache, never the truth: each partition's sha256 and row counts, with the listing tag they were read at
CATALOG_SUMMARIES_KEY = "catalog/partition_summaries.json"


def partition_key(day: dt.date) -> str:
    return f"{CATALOG_DAYS_PREFIX}/{day.isoformat()}.parquet"


def version_key(day: dt.date) -> str:
    """The current dataset version of ``day`` (rewritten when that day or an earlier one is re-ingested)."""
    return f"{CATALOG_VERSIONS_PREFIX}/{day.isoformat()}.json"


def version_id_key(version: str) -> str:
    """A dataset version by its id, written once and never rewritten."""
    return f"{CATALOG_VERSIONS_BY_ID_PREFIX}/{version}.json"


# -- reports --------------------------------------------------------------------------------------
INGEST_REPORTS_PREFIX = "reports/ingest"
DATA_DOCS_PREFIX = "reports/data_docs"
DRIFT_REPORTS_PREFIX = "reports/drift"
SERVING_DRIFT_REPORTS_PREFIX = "reports/serving_drift"


def drift_summary_key(day: object) -> str:
    return f"{DRIFT_REPORTS_PREFIX}/{day}/summary.json"


def drift_report_key(day: object) -> str:
    """The day's Evidently report as HTML (``ml.monitoring.drift.write_report`` writes it)."""
    return f"{DRIFT_REPORTS_PREFIX}/{day}/report.html"


# -- the feature cache ----------------------------------------------------------------------------
FEATURES_PREFIX = "features"


def feature_shard_key(cache_id: str, day: str) -> str:
    return f"{FEATURES_PREFIX}/{cache_id}/{day}.npz"


def quantized_backbone_key(name: str) -> str:
    """The one quantised backbone graph every int8 feature and served model of a store comes from."""
    return f"{FEATURES_PREFIX}/backbones/{name}.onnx"


# -- drift monitoring and live monitoring ---------------------------------------------------------
RETRAIN_REQUESTS_KEY = "monitoring/drift/retrain_requests.jsonl"
LIVE_MONITOR_PREFIX = "monitoring/serving"
LIVE_MONITOR_STATE_KEY = f"{LIVE_MONITOR_PREFIX}/state.json"
LIVE_CHECKS_PREFIX = f"{LIVE_MONITOR_PREFIX}/checks"
LIVE_CHECK_FAILED_KEY = f"{LIVE_MONITOR_PREFIX}/check_failed.json"  # a failed check paged: the next resolves


def live_check_key(at: dt.datetime) -> str:
    return f"{LIVE_CHECKS_PREFIX}/{at:%Y-%m-%d}/{at:%H%M%S%f}.json"


# -- registry and serving -------------------------------------------------------------------------
REGISTRY_AUDIT_PREFIX = "registry/audit"
SERVING_AUDIT_PREFIX = "serving/audit"
SERVING_STATE_KEY = "serving/state.json"  # the deployment state every replica follows (compare-and-swap)
SERVING_BUNDLES_PREFIX = "serving/bundles"  # one folder per servable model: model.onnx, pca.npz, meta.json
REPLICAS_PREFIX = "serving/replicas"  # one heartbeat per replica worker: what it serves, when it last looked


def bundle_key(name: str, file: str) -> str:
    """A file of the bundle ``name`` (the model-store version, e.g. ``v3-0123456789ab``)."""
    return f"{SERVING_BUNDLES_PREFIX}/{name}/{file}"


def heartbeat_key(replica: str, worker: int) -> str:
    return f"{REPLICAS_PREFIX}/{replica}-w{worker}.json"


PREDICTIONS_PREFIX = "serving/predictions"
SHADOW_PREFIX = "serving/shadow"  # what a shadow model answered (never returned to a client)
FEEDBACK_PREFIX = "serving/feedback"
REQUEST_IMAGES_PREFIX = "serving/images"
SERVING_ACCESS_AUDIT_PREFIX = "serving/access_audit"  # every admin request: key id, method, path, time
FEEDBACK_CLAIMS_PREFIX = "serving/feedback_claims"  # one object per labelled prediction (create-if-absent)


def feedback_claim_key(nonce: str) -> str:
    return f"{FEEDBACK_CLAIMS_PREFIX}/{nonce}"


def request_image_key(day: str, request_id: str) -> str:
    return f"{REQUEST_IMAGES_PREFIX}/{day}/{request_id}"


def log_batch_key(prefix: str, day: str, writer_id: str, sequence: int) -> str:
    """One flushed batch of a JSONL log (predictions, feedback): ``prefix/DAY/<writer>-<seq>.jsonl``."""
    return f"{prefix}/{day}/{writer_id}-{sequence:06d}.jsonl"


# -- MLflow artifact paths of a training run ------------------------------------------------------
ONNX_ARTIFACT = "onnx/model.onnx"
REFERENCE_ARTIFACTS = "drift_reference"
REFERENCE_PCA_ARTIFACT = f"{REFERENCE_ARTIFACTS}/pca.npz"
CLASS_NAMES_ARTIFACT = "model_meta/class_names.json"
HEAD_WEIGHTS_ARTIFACT = "model_meta/head.pt"  # the head's state dict: loadable with weights_only=True
HEAD_META_ARTIFACT = "model_meta/head.json"  # what builds the empty head those weights load into
