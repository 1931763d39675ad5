"""The one typed config: params.yaml, overlaid by a file, overlaid by environment variables.

Precedence (last wins): the repo's ``params.yaml`` < ``--config FILE`` or ``MLOPS_CONFIG``
< ``MLOPS__SECTION__KEY=value`` environment variables (values parsed as YAML).
Unknown keys and bad values fail with a message naming them.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_FILE = REPO_ROOT / "params.yaml"
ENV_PREFIX = "MLOPS__"


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Splits(_Strict):
    train: float = Field(gt=0, lt=1)
    val: float = Field(gt=0, lt=1)
    test: float = Field(gt=0, lt=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> Splits:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"splits must sum to 1.0, got {total:.4f}")
        return self


class DataConfig(_Strict):
    classes: list[str] = Field(min_length=2)
    splits: Splits

    @field_validator("classes")
    @classmethod
    def _unique_names(cls, classes: list[str]) -> list[str]:
        if len(set(classes)) != len(classes):
            raise ValueError(f"class names must be unique, got {classes}")
        if any(not name.strip() or "," in name for name in classes):
            raise ValueError(f"class names must be non-empty and contain no comma, got {classes}")
        return classes


class StorageConfig(_Strict):
    root: str
    aws_conn_id: str = "aws_default"
    endpoint_url: str | None = None
    server_side_encryption: Literal["AES256", "aws:kms"] | None = None
    kms_key_id: str | None = None
    timeout_seconds: float = Field(default=30.0, gt=0)
    # presigned links in alerts and the approval form live this long (SigV4 allows 7 days at most)
    link_expiry_seconds: int = Field(default=604_800, ge=1, le=604_800)

    @model_validator(mode="after")
    def _kms_needs_its_mode(self) -> StorageConfig:
        if self.kms_key_id and self.server_side_encryption != "aws:kms":
            raise ValueError("kms_key_id needs server_side_encryption: aws:kms")
        return self


ImageFormat = Literal["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"]


class IngestConfig(_Strict):
    schedule: str
    allowed_formats: list[ImageFormat]
    min_side_px: int = Field(ge=1)
    max_side_px: int = Field(ge=1)
    max_pixels: int = Field(ge=1, le=89_478_485)
    max_file_bytes: int = Field(ge=1)
    max_rejected_share: float = Field(ge=0, le=1)
    brightness_range: tuple[float, float]
    min_contrast: float = Field(ge=0)
    near_duplicate_max_distance: int = Field(ge=0, le=32)
    workers: int = Field(ge=0)
    shards: int = Field(default=1, ge=1, le=256)  # >1: the DAG validates a day in this many mapped tasks
    sensor_poke_seconds: int = Field(ge=1)
    sensor_timeout_seconds: int = Field(ge=1)
    spool_dir: str | None = None  # local folder for the day's downloads; None = the system temp dir
    feedback_lookback_days: int = Field(default=2, ge=1)  # labelled served images landed with each day
    mask_pii: bool = True  # emails, phone and card numbers, IPs in labels.csv's extra columns: masked


class PreprocessingConfig(_Strict):
    image_size: int = Field(ge=8)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    augmentation: list[Literal["rotation", "flip", "crop", "color_jitter"]]
    jpeg_draft: bool = False  # decode large JPEGs at 1/2..1/8 scale (libjpeg DCT scaling) for the model


class ModelConfig(_Strict):
    architecture: Literal["efficientnet_lite0", "resnet18", "resnet50", "mobilenet_v3_small"]
    pretrained: bool
    weights_path: str | None = None
    dropout_rate: float = Field(ge=0, lt=1)
    freeze_backbone: bool
    feature_runtime: Literal["onnxruntime", "torch"] = "onnxruntime"
    feature_threads: int = Field(default=1, ge=0)  # ONNX Runtime intra-op threads; 0 = its default
    feature_workers: int = Field(default=0, ge=0)  # chunks embedded at once (threads); 0 = one per core
    feature_batch: int = Field(default=1, ge=1)  # views per backbone call (feature cache)
    precision: Literal["fp32", "int8"] = "fp32"  # int8: a quantised frozen backbone, trained and served

    @model_validator(mode="after")
    def _int8_needs_a_frozen_onnx_backbone(self) -> ModelConfig:
        if self.precision == "int8" and (not self.freeze_backbone or self.feature_runtime != "onnxruntime"):
            raise ValueError(
                "model.precision int8 quantises the frozen backbone in ONNX Runtime: it needs "
                "model.freeze_backbone true and model.feature_runtime onnxruntime"
            )
        return self


class EarlyStopping(_Strict):
    monitor: str
    patience: int = Field(ge=1)


class TrainingConfig(_Strict):
    schedule: str
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    epochs: int = Field(ge=1)
    optimizer: Literal["Adam", "AdamW", "SGD"]
    scheduler: Literal["ReduceLROnPlateau", "none"]
    early_stopping: EarlyStopping
    seed: int
    augmented_views: int = Field(ge=0, le=16)
    accelerator: Literal["cpu", "gpu", "auto"] = "cpu"  # auto: a GPU when there is one
    devices: int = Field(default=1, ge=1, le=64)  # >1: data-parallel (DDP) over this many processes or GPUs
    strategy: Literal["auto", "ddp", "ddp_fork", "ddp_spawn"] = "auto"  # with devices > 1 on CPU: ddp_fork
    backbone_lr_factor: float = Field(default=0.1, gt=0, le=1)  # fine-tuning: backbone lr factor


class AcceptanceConfig(_Strict):
    accuracy_min: float = Field(ge=0, le=1)
    precision_min: float = Field(ge=0, le=1)
    recall_min: float = Field(ge=0, le=1)
    f1_macro_min: float = Field(ge=0, le=1)
    non_inferiority_margin: float = Field(ge=0, le=1)
    alpha: float = Field(gt=0, lt=1)
    onnx_max_abs_diff: float = Field(gt=0)
    slice_accuracy_min: float = Field(default=0.70, ge=0, le=1)  # no slice significantly below this
    slice_gap_max: float = Field(default=0.10, ge=0, le=1)  # ...nor significantly further below the rest
    robustness_ratio_min: float = Field(default=0.75, ge=0, le=1)  # mean corruption accuracy / clean
    robustness_margin: float = Field(default=0.05, ge=0, le=1)  # under corruptions, vs the champion


class InferenceConfig(_Strict):
    latency_p99_ms: float = Field(gt=0)
    throughput_rps: float = Field(gt=0)
    memory_mb: int = Field(gt=0)


class ServingConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=3000, ge=1, le=65535)
    workers: int = Field(default=2, ge=1, le=64)
    threads: int = Field(default=1, ge=0, le=64)
    balance_connections: bool = True  # a worker holding 2+ more connections than another closes one
    max_batch_size: int = Field(default=16, ge=1, le=512)
    max_latency_ms: float = Field(default=20.0, gt=0, le=1000)
    max_request_bytes: int = Field(default=25_000_000, ge=1024)
    max_batch_images: int = Field(default=32, ge=1, le=1024)
    canary_share: float = Field(default=0.1, ge=0, le=1)
    api_keys_file: str | None = None
    state_dir: str = ".data/serving"
    bento_name: str = "product-classifier-service"
    bentoml_home: str = ".data/bentoml"
    log_flush_rows: int = Field(default=256, ge=1)
    log_flush_seconds: float = Field(default=5.0, gt=0)
    log_images: bool = False
    log_max_buffer_rows: int = Field(default=50_000, ge=1)
    log_max_buffer_bytes: int = Field(default=100_000_000, ge=0)
    drain_request_bytes: int = Field(default=64_000_000, ge=0)
    drain_seconds: float = Field(default=2.0, ge=0, le=60)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    feedback_secret_file: str | None = None
    check_images: int = Field(default=20, ge=1)
    check_latency_p99_ms: float = Field(default=500.0, gt=0)
    check_timeout_seconds: float = Field(default=120.0, gt=0)
    # the check's load test, held to the spec's inference figures: off, measured and reported, or a gate
    check_load: Literal["off", "report", "enforce"] = "report"
    check_load_seconds: float = Field(default=3.0, gt=0)
    check_load_concurrency: int = Field(default=8, ge=1)
    switch_timeout_seconds: float = Field(default=60.0, gt=0)  # a live endpoint must follow a deploy in this
    state_poll_seconds: float = Field(default=2.0, gt=0)  # replicas read the deployment state this often
    heartbeat_seconds: float = Field(default=2.0, gt=0)  # and publish what they serve this often
    heartbeat_max_age_seconds: float = Field(default=15.0, gt=0)  # an older heartbeat is a replica gone
    bundle_cache_dir: str | None = None  # bundles replicas fetched from storage (None: BentoML home)
    shadow: str | None = None  # a version every deploy stages as the shadow (copy of traffic, logged only)
    coverage: float = Field(default=0.95, gt=0, lt=1)  # target coverage of the conformal prediction sets

    @model_validator(mode="after")
    def _tls_needs_both_files(self) -> ServingConfig:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        return self

    @property
    def live_url(self) -> str:
        """Where this machine reaches the live endpoint (https when TLS is on)."""
        bind_all = ("0.0.0.0", "::", "")  # noqa: S104 - compared with, never bound: reach it on loopback
        host = "127.0.0.1" if self.host in bind_all else self.host
        return f"{'https' if self.tls_cert else 'http'}://{host}:{self.port}"

    @property
    def ca_file(self) -> str | None:
        """What local clients verify the service's certificate with (None when TLS is off)."""
        name = self.tls_ca or self.tls_cert
        return str((REPO_ROOT / name).resolve()) if name else None


class ReportsConfig(_Strict):
    """The stack's report server: a local storage root's ``reports/`` over HTTP on 127.0.0.1."""

    port: int = Field(default=8090, ge=1, le=65535)
    url: str | None = None  # the base URL people open reports at (null: http://127.0.0.1:PORT)


class MonitoringConfig(_Strict):
    data_drift_threshold: float = Field(gt=0, lt=1)
    prediction_drift_kl_threshold: float = Field(gt=0)
    column_effect_threshold: float = Field(default=0.1, gt=0)
    column_alpha: float = Field(default=0.05, gt=0, lt=1)
    embedding_components: int = Field(default=8, ge=1, le=64)
    reference_max_rows: int = Field(default=10000, ge=50)
    cooldown_days: int = Field(default=3, ge=0)
    severe_drift_score: float = Field(default=0.5, gt=0, le=1)
    severe_prediction_kl: float = Field(default=0.5, gt=0)


class ServingMonitorConfig(_Strict):
    schedule: str = "@hourly"
    lookback_minutes: float = Field(default=60, gt=0)
    min_requests: int = Field(default=20, ge=1)
    min_feedback: int = Field(default=30, ge=1)
    min_drift_rows: int = Field(default=100, ge=10)
    repeat_hours: float = Field(default=24, ge=0)
    auto_rollback: bool = True
    scrape_timeout_seconds: float = Field(default=10, gt=0)


class AbConfig(_Strict):
    """Challenger (canary) against control (stable) on live traffic: ``mlops ab``, ml/monitoring/ab.py."""

    window_hours: float = Field(default=24, gt=0)
    confidence: float = Field(default=0.95, gt=0.5, lt=1)
    min_requests: int = Field(default=500, ge=1)
    min_labelled: int = Field(default=200, ge=1)
    non_inferiority_margin: float = Field(default=0.02, ge=0, lt=1)
    superiority_margin: float = Field(default=0.02, gt=0, lt=1)
    latency_margin_ms: float = Field(default=10.0, ge=0)
    latency_superiority_ms: float = Field(default=5.0, gt=0)
    error_rate_margin: float = Field(default=0.01, ge=0, lt=1)
    bootstrap_resamples: int = Field(default=2000, ge=100)
    bootstrap_seed: int = 0
    require_not_worse_to_promote: bool = False


# The spec's hyperparameter_tuning search space: a configured space must lie inside it.
SPEC_LEARNING_RATE = (0.0001, 0.01)
SPEC_BATCH_SIZES = (16, 32, 64)
SPEC_DROPOUT_RATE = (0.1, 0.5)


def _inside(name: str, bounds: tuple[float, float], spec: tuple[float, float]) -> tuple[float, float]:
    low, high = bounds
    if not low < high:
        raise ValueError(f"{name} range [{low}, {high}] is empty: the low bound must be below the high one")
    if low < spec[0] or high > spec[1]:
        raise ValueError(f"{name} range [{low}, {high}] lies outside the spec's [{spec[0]}, {spec[1]}]")
    return bounds


class TuningConfig(_Strict):
    """Optuna search and cross-validation of the head (``mlops tune``, DAG ``tune``, ml/training/tune.py)."""

    trials: int = Field(default=50, ge=1)
    timeout_seconds: float | None = Field(default=None, gt=0)
    learning_rate: tuple[float, float] = SPEC_LEARNING_RATE
    batch_size: list[int] = Field(default_factory=lambda: list(SPEC_BATCH_SIZES), min_length=1)
    dropout_rate: tuple[float, float] = SPEC_DROPOUT_RATE
    epochs: int = Field(default=30, ge=1)
    patience: int = Field(default=5, ge=1)
    seed: int = 42
    startup_trials: int = Field(default=10, ge=1)
    pruner_startup_trials: int = Field(default=5, ge=0)
    pruner_warmup_epochs: int = Field(default=2, ge=0)
    cv_folds: int = Field(default=5, ge=2, le=20)
    parallel: int = Field(default=1, ge=1, le=32)
    torch_threads: int = Field(default=1, ge=0)
    storage_url: str | None = None
    heartbeat_seconds: int = Field(default=10, ge=1)
    grace_seconds: int = Field(default=60, ge=2)

    @field_validator("learning_rate")
    @classmethod
    def _learning_rate_in_spec(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        return _inside("learning_rate", bounds, SPEC_LEARNING_RATE)

    @field_validator("dropout_rate")
    @classmethod
    def _dropout_in_spec(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        return _inside("dropout_rate", bounds, SPEC_DROPOUT_RATE)

    @field_validator("batch_size")
    @classmethod
    def _batch_sizes_in_spec(cls, sizes: list[int]) -> list[int]:
        outside = sorted(set(sizes) - set(SPEC_BATCH_SIZES))
        if outside or len(set(sizes)) != len(sizes):
            spec = list(SPEC_BATCH_SIZES)
            raise ValueError(f"batch_size choices {sizes} must be distinct and among the spec's {spec}")
        return sizes

    @model_validator(mode="after")
    def _grace_outlasts_heartbeat(self) -> TuningConfig:
        if self.grace_seconds <= self.heartbeat_seconds:
            raise ValueError("grace_seconds must be longer than heartbeat_seconds")
        return self


CORRUPTIONS = ("gaussian_noise", "blur", "brightness", "contrast", "jpeg", "rotation", "occlusion")
Corruption = Literal["gaussian_noise", "blur", "brightness", "contrast", "jpeg", "rotation", "occlusion"]


class ValidationConfig(_Strict):
    """The model-validation stage between evaluation and registration (ml/training/validate.py)."""

    enabled: bool = True
    seed: int = 0
    bootstrap: int = Field(default=1000, ge=0)
    threads: int = Field(default=1, ge=0)  # ONNX Runtime threads of the validation's scoring
    robustness_sample: int = Field(default=48, ge=1)
    corruptions: list[Corruption] = Field(default_factory=lambda: list(CORRUPTIONS), min_length=1)
    adversarial_sample: int = Field(default=8, ge=1)
    adversarial_eps: list[float] = Field(default_factory=lambda: [1.0, 2.0, 4.0], min_length=1)
    pgd_steps: int = Field(default=3, ge=1)
    min_slice_support: int = Field(default=20, ge=1)
    slice_columns: list[str] | None = None
    explain_per_class: int = Field(default=2, ge=0)
    explain_confusions: int = Field(default=4, ge=0)
    deletion_sample: int = Field(default=24, ge=2)
    deletion_fractions: list[float] = Field(default_factory=lambda: [0.1, 0.2, 0.3, 0.5], min_length=1)
    calibration_bins: int = Field(default=10, ge=2)

    @field_validator("deletion_fractions")
    @classmethod
    def _shares(cls, fractions: list[float]) -> list[float]:
        if any(not 0 < f <= 1 for f in fractions) or fractions != sorted(set(fractions)):
            raise ValueError(f"deletion_fractions must rise strictly within (0, 1], got {fractions}")
        return fractions


class CeleryWorkerConfig(_Strict):
    """One Celery worker of the production profile; ``name`` is the hostname its tasks record."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    queues: list[str] = Field(default_factory=lambda: ["default"], min_length=1)
    # One task at a time, in the worker's main process (Celery's solo pool): Airflow's task supervisor
    # needs the main thread (no threads pool) and ingestion's decoder processes need a parent that may
    # have children (prefork's daemonic pool processes may not). More parallelism: more workers.
    concurrency: int = Field(default=1, ge=1, le=1)


class ProductionConfig(_Strict):
    """The production profile's components (``make up PROFILE=production``, ml/ops/production.py).

    ML settings of the profile (storage on S3, the MLflow server, the Optuna database) live in
    their own sections of the same overlay; this section holds what only the stack needs."""

    airflow_home: str = ".airflow-production"  # relative to the working directory unless absolute
    database_url: str  # Airflow's metadata database (PostgreSQL), created when missing
    broker_url: str  # Celery broker (Redis)
    api_port: int = Field(default=8180, ge=1, le=65535)
    workers: list[CeleryWorkerConfig] = Field(min_length=1)
    mlflow_backend_store: str  # the MLflow server's store (PostgreSQL), created when missing
    mlflow_artifacts: str  # the MLflow server's artifact destination (s3://...)
    start_s3_endpoint: bool = False  # start a local S3 API (moto_server) on storage.endpoint_url's port
    buckets: list[str] = Field(default_factory=list)  # created on the endpoint when missing
    replica_ports: list[int] = Field(default_factory=lambda: [3101, 3102], min_length=1)

    @field_validator("workers")
    @classmethod
    def _distinct_names(cls, workers: list[CeleryWorkerConfig]) -> list[CeleryWorkerConfig]:
        names = [worker.name for worker in workers]
        if len(set(names)) != len(names):
            raise ValueError(f"worker names must be distinct, got {names}")
        return workers


class MlflowConfig(_Strict):
    tracking_uri: str | None = None
    experiment_name: str
    registered_model: str
    auto_approve: bool = False
    ui_url: str | None = None  # the MLflow UI people open (null: an http tracking URI, else the stack's UI)


Severity = Literal["warning", "critical"]
Channel = Literal["slack", "pagerduty", "email"]


LiveMetric = Literal[
    "accuracy",
    "p99_latency_ms",
    "p50_latency_ms",
    "error_rate",
    "drift_score",
    "throughput_rps",
    "service_up",
]


class AlertRule(_Strict):
    name: str
    metric: LiveMetric
    op: Literal["<", "<=", ">", ">="]
    threshold: float
    severity: Severity
    auto_rollback: bool = False  # firing for a model not yet checked good since its deploy: roll back


class AlertsConfig(_Strict):
    slack_conn_id: str
    pagerduty_conn_id: str
    email_conn_id: str = "smtp_alerts"  # an Airflow SMTP connection (host, port, login, password, extras)
    email_to: list[str] = []  # who the email channel writes to
    failure_severity: Severity
    send_timeout_seconds: float = Field(10, gt=0)  # a channel that hangs costs at most this, per alert
    channels: dict[Severity, list[Channel]]
    rules: list[AlertRule]

    @model_validator(mode="after")
    def _email_has_recipients(self) -> AlertsConfig:
        if any("email" in channels for channels in self.channels.values()) and not self.email_to:
            raise ValueError("alerts.email_to: the email channel is routed to but names no recipients")
        return self


class Settings(_Strict):
    project: str
    data: DataConfig
    storage: StorageConfig
    ingest: IngestConfig
    preprocessing: PreprocessingConfig
    model: ModelConfig
    training: TrainingConfig
    acceptance: AcceptanceConfig
    inference: InferenceConfig
    serving: ServingConfig = ServingConfig()
    reports: ReportsConfig = ReportsConfig()
    monitoring: MonitoringConfig
    serving_monitor: ServingMonitorConfig = ServingMonitorConfig()
    ab: AbConfig = AbConfig()
    validation: ValidationConfig = ValidationConfig()
    tuning: TuningConfig = TuningConfig()
    production: ProductionConfig | None = None  # only in the production profile's overlay
    mlflow: MlflowConfig
    alerts: AlertsConfig
    progress_every: int = Field(default=100, ge=0)  # long steps log a progress line every N items (0: none)

    @property
    def classes(self) -> list[str]:
        return self.data.classes


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``overlay`` merged in; nested dicts merge, everything else replaces."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return loaded


def env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """Turn ``MLOPS__A__B=value`` variables into ``{"a": {"b": value}}`` (values parsed as YAML)."""
    overrides: dict[str, Any] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__") if part]
        if not path:
            raise ConfigError(f"environment variable {name} names no config key")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"environment variable {name}: value is not valid YAML: {exc}") from exc
        node = overrides
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return overrides


def _format_errors(exc: ValidationError, sources: list[str]) -> str:
    lines = [f"invalid config (from {', '.join(sources)}):"]
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Build settings from params.yaml, an optional overlay file and ``MLOPS__*`` variables."""
    env = dict(os.environ if environ is None else environ)
    raw = _read_yaml(DEFAULT_CONFIG_FILE)
    sources = [str(DEFAULT_CONFIG_FILE.name)]
    overlay_path = config_file or env.get("MLOPS_CONFIG")
    if overlay_path:
        raw = deep_merge(raw, _read_yaml(Path(overlay_path)))
        sources.append(str(overlay_path))
    overrides = env_overrides(env)
    if overrides:
        raw = deep_merge(raw, overrides)
        sources.append("MLOPS__* environment")
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, sources)) from None


@lru_cache(maxsize=8)
def _cached(config_file: str | None, env_key: tuple[tuple[str, str], ...]) -> Settings:
    return load_settings(config_file, dict(env_key))


def get_settings(config_file: str | None = None) -> Settings:
    """Settings for this process (cached per overlay file and relevant environment)."""
    relevant = tuple(
        sorted((k, v) for k, v in os.environ.items() if k.startswith(ENV_PREFIX) or k == "MLOPS_CONFIG")
    )
    return _cached(config_file, relevant)


def resolve_workers(configured: int) -> int:
    """A configured worker count where 0 means one per core this process may run on."""
    return configured if configured > 0 else max(1, len(os.sched_getaffinity(0)))
