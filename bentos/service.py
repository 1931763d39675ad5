"""The prediction service (BentoML 1.4): a thin HTTP layer over ``ml.serving.predictor.Predictor``.

POST /predict (multipart field ``image``), POST /predict_batch (multipart field ``images``,
repeated), POST /feedback (JSON ``request_id``, ``label``), GET /version; BentoML adds /healthz,
/livez, /readyz and /metrics. /predict, the hot path, and /predict_batch are routes of the ASGI app
BentoML mounts: the guard has read and checked their multipart bodies already, and BentoML's API
layer would parse them again with another parser (one that reads a part's headers otherwise, and
fetches a text field as a URL) and write each image to a temporary file (~1 ms of a ~13 ms request,
measured in bench/serve.py); their OpenAPI operations are added to ``/docs.json`` by
``ml.serving.openapi``.
Clients send ``Authorization: Bearer <key>``; keys and their roles come from ``MLOPS_API_KEYS`` or
a keys file, and ``ml.serving.guard`` checks them before anything is parsed. Which model versions
serve (stable, canary, shadow) comes from the deployment state in storage (``serving/state.json``),
polled every ``serving.state_poll_seconds``; each worker publishes a heartbeat of what it serves.
With ``MLOPS_FOLLOW_STATE=off`` (the serving check) it serves the model packed into the bento
(``packed.json``, written at build time).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import bentoml
from prometheus_client import Counter, Histogram
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from ml.config import get_settings
from ml.data.images import ImageLimits
from ml.serving.auth import ANONYMOUS, key_table
from ml.serving.balance import BalancedConnections, worker_balancer
from ml.serving.binding import RequestIds, load_secret, secret_path
from ml.serving.bundle import fetch_bundle
from ml.serving.guard import KEY_ID_HEADER, OPEN_PATHS, UPLOADS_SCOPE_KEY, Guard, GuardPolicy
from ml.serving.lifecycle import refuse_open_endpoint, stop_gracefully
from ml.serving.log import PredictionLog
from ml.serving.openapi import BearerSpec
from ml.serving.page import PAGE_HEADERS, PAGE_LINK_SECONDS, page_html
from ml.serving.predictor import Predictor, ReplicaIdentity
from ml.serving.status import service_status
from ml.serving.uploads import BadRequest, incident_id, uploaded_files
from ml.storage import browsable_url, storage_from_settings

log = logging.getLogger("mlops.service")

PACKED_FILE = Path(__file__).resolve().parent / "packed.json"  # written into a bento at build time
FOLLOW_ENV = "MLOPS_FOLLOW_STATE"  # "off": serve the packed model only (a serving check's scratch service)
REPLICA_ENV = "MLOPS_REPLICA_ID"  # this replica's name in the heartbeats (`mlops serve` sets host-port)
REPLICA_URL_ENV = "MLOPS_REPLICA_URL"
LOG_ENV = "MLOPS_PREDICTION_LOG"  # "off" disables the prediction log (serving checks)
SETTINGS = get_settings()  # at import: only what the @bentoml.service decorator needs; the rest per instance

LATENCY = Histogram(
    "mlops_prediction_latency_seconds",
    "Time from an upload's bytes to its answer, per model version.",
    ["model_version"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0),
)
PREDICTIONS = Counter(
    "mlops_predictions_total",
    "Predictions served, per model version and class.",
    ["model_version", "predicted_class"],
)
BATCH_IMAGES = Histogram(
    "mlops_model_batch_images",
    "Images per model call (adaptive batching), per model version.",
    ["model_version"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
)
ERRORS = Counter(
    "mlops_request_errors_total", "Requests refused, per error code and status.", ["code", "status"]
)
LOG_DROPPED = Counter(
    "mlops_prediction_log_dropped_total",
    "Prediction-log entries dropped because the buffer was full while storage was down, per kind.",
    ["kind"],
)
_WORKER: list[Predictor] = []  # this worker process's predictor, for the guard's admin records


def _observe(version: str, predicted_class: str, seconds: float) -> None:
    LATENCY.labels(version).observe(seconds)
    PREDICTIONS.labels(version, predicted_class).inc()


def _observe_batch(version: str, images: int) -> None:
    BATCH_IMAGES.labels(version).observe(images)


def count_error(code: str, status: int) -> None:
    ERRORS.labels(code, str(status)).inc()


def error_response(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    count_error(code, status)
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def _record_admin(key_id: str, method: str, path: str, status: int) -> None:
    for predictor in _WORKER:
        predictor.record_admin(key_id, method, path, status)


class GuardMiddleware(Guard):
    """``ml.serving.guard.Guard`` with this service's keys, size limits, metrics and audit."""

    def __init__(self, app: Any) -> None:
        serving = get_settings().serving
        policy = GuardPolicy(
            key_table(keys_file=serving.api_keys_file), serving.max_request_bytes, serving.drain_request_bytes
        )
        super().__init__(app, policy, count_error, _record_admin)


class BalanceMiddleware(BalancedConnections):
    """``ml.serving.balance``: this worker's share of the keep-alive connections (inside the guard:
    only requests it let through count)."""

    def __init__(self, app: Any) -> None:
        serving = get_settings().serving
        worker = int(getattr(bentoml.server_context, "worker_index", 0) or 0)
        balancing = serving.balance_connections
        super().__init__(app, worker_balancer(worker, serving.workers) if balancing else None)


async def version_endpoint(request: Request) -> Response:
    try:
        return JSONResponse(bentoml.get_current_service().version_info())
    except bentoml.exceptions.BentoMLException:
        return error_response(503, "not_ready", "the service is starting: retry in a few seconds")


async def page_endpoint(_: Request) -> Response:
    """The page people use: try the model, label an answer, see the status (it asks for a key)."""
    return HTMLResponse(page_html(), headers=PAGE_HEADERS)


@functools.cache
def _status_storage() -> Any:
    """One storage client for the status panel (a client per request would rebuild its pool)."""
    return storage_from_settings(get_settings())


def status_endpoint(_: Request) -> Response:
    """The page's status panel (run in a thread: it reads storage)."""
    settings = get_settings()
    storage = _status_storage()
    status = service_status(
        storage,
        settings.serving.heartbeat_max_age_seconds,
        lambda key: browsable_url(storage, key, settings, expires_seconds=PAGE_LINK_SECONDS),
    )
    return JSONResponse(status.to_dict())


async def _uploads(request: Request) -> list[bytes] | tuple[int, str, str]:
    """The files of a file route's body: as the guard parsed and checked them (the one parse)."""
    files = request.scope.get(UPLOADS_SCOPE_KEY)
    if files is None:
        return uploaded_files(request.url.path, await request.body(), request.headers.get("content-type", ""))
    return files


async def predict_endpoint(request: Request) -> Response:
    """Classify one image (multipart field ``image``): class, confidence, probabilities, version, id."""
    files = await _uploads(request)
    if isinstance(files, tuple):
        return error_response(*files)
    if not _WORKER:
        return error_response(503, "not_ready", "the service is starting: retry in a few seconds")
    who = request.headers.get(KEY_ID_HEADER.decode(), ANONYMOUS)
    try:
        result = await _WORKER[0].predict(files[0], request.headers.get("x-client-id"), who)
    except BadRequest as exc:
        return error_response(exc.status, exc.code, exc.message)
    except Exception:  # noqa: BLE001 - the client gets an incident id, the log the traceback
        failure = internal_failure("predict")
        return error_response(failure.status, failure.code, failure.message)
    return JSONResponse(result)


async def predict_batch_endpoint(request: Request) -> Response:
    """Classify several images (repeated multipart field ``images``); a bad one gets its own error.
    Served here, not by BentoML's API layer, so its body is parsed once, by the guard."""
    files = await _uploads(request)
    if isinstance(files, tuple):
        return error_response(*files)
    limit = get_settings().serving.max_batch_images
    if len(files) > limit:
        return error_response(413, "too_many_images", f"at most {limit} images per request")
    if not _WORKER:
        return error_response(503, "not_ready", "the service is starting: retry in a few seconds")
    predictor, key = _WORKER[0], request.headers.get("x-client-id")
    who = request.headers.get(KEY_ID_HEADER.decode(), ANONYMOUS)

    async def one(data: bytes) -> dict[str, Any]:
        try:
            return await predictor.predict(data, key, who)
        except BadRequest as exc:
            count_error(exc.code, exc.status)
            return {**exc.body(), "status": exc.status}

    try:
        results = await asyncio.gather(*(one(data) for data in files))
    except Exception:  # noqa: BLE001 - the client gets an incident id, the log the traceback
        failure = internal_failure("predict_batch")
        return error_response(failure.status, failure.code, failure.message)
    every_one_bad = all("error" in result for result in results)
    return JSONResponse({"results": results}, status_code=int(results[0]["status"]) if every_one_bad else 200)


async def docs_endpoint(_: Request) -> Response:
    return RedirectResponse("/")  # BentoML's Swagger UI lives at the root


def refuse(ctx: bentoml.Context, exc: BadRequest) -> dict[str, str]:
    """A client error from inside an API: BentoML takes the status from the context."""
    count_error(exc.code, exc.status)
    ctx.response.status_code = exc.status
    return exc.body()


def internal_failure(what: str) -> BadRequest:
    """A 500 that says what the client can do; the detail goes to the log under an incident id."""
    incident = incident_id()
    log.exception("%s failed [incident %s]", what, incident)
    detail = f"the service failed on this request: retry, and quote incident {incident} if it persists"
    return BadRequest(500, "internal_error", detail)


def internal_error(ctx: bentoml.Context, what: str) -> dict[str, str]:
    return refuse(ctx, internal_failure(what))


def caller_id(ctx: bentoml.Context) -> str:
    """The caller's key id, as the guard authenticated it."""
    return str(ctx.request.headers.get(KEY_ID_HEADER.decode(), ANONYMOUS))


def _prediction_log() -> PredictionLog | None:
    if os.environ.get(LOG_ENV, "").lower() == "off":
        return None
    serving = get_settings().serving
    return PredictionLog(
        storage_from_settings(get_settings()),
        serving.log_flush_rows,
        serving.log_flush_seconds,
        max_buffer_rows=serving.log_max_buffer_rows,
        max_buffer_bytes=serving.log_max_buffer_bytes,
        on_drop=lambda kind, count: LOG_DROPPED.labels(kind).inc(count),
    )


def _resolve(tag: str) -> Path:
    """Bundle folder of a model tag: this host's BentoML model store, else fetched from storage."""
    settings = get_settings()
    full = tag if ":" in tag else f"{settings.mlflow.registered_model}:v{tag}"
    try:
        return Path(bentoml.models.get(full).path)
    except bentoml.exceptions.NotFound:
        cache = settings.serving.bundle_cache_dir or str(
            Path(os.environ.get("BENTOML_HOME", ".")) / "bundle-cache"
        )
        return fetch_bundle(storage_from_settings(settings), full, Path(cache))


def _identity(bento_tag: str) -> ReplicaIdentity | None:
    """This worker in the heartbeats (none for a scratch service that follows no state)."""
    if os.environ.get(FOLLOW_ENV, "").lower() == "off":
        return None
    serving = get_settings().serving
    replica = os.environ.get(REPLICA_ENV) or f"{socket.gethostname()}-{serving.port}"
    worker = int(getattr(bentoml.server_context, "worker_index", 0) or 0)
    url = os.environ.get(REPLICA_URL_ENV) or serving.live_url
    return ReplicaIdentity(replica, worker, url, bento_tag, serving.heartbeat_seconds)


def _predictor() -> Predictor:
    """Fail closed first (no open endpoint, no short key), then the predictor for this worker."""
    settings = get_settings()
    keys = key_table(keys_file=settings.serving.api_keys_file)  # a short or malformed key raises here
    refuse_open_endpoint(settings.serving.host, bool(keys))
    secret = load_secret(secret_path(settings.serving.state_dir, settings.serving.feedback_secret_file))
    packed = json.loads(PACKED_FILE.read_text()) if PACKED_FILE.exists() else {}
    follow = os.environ.get(FOLLOW_ENV, "").lower() != "off"
    if not keys:
        log.warning("no API key configured: every local caller is accepted (the service listens on loopback)")
    return Predictor(
        _resolve,
        ImageLimits.from_settings(settings.ingest),
        state_storage=storage_from_settings(settings) if follow else None,
        identity=_identity(str(packed.get("bento_tag", "development"))),
        default_version=packed.get("model_version"),
        default_tag=packed.get("model_tag"),
        threads=settings.serving.threads,
        max_batch_size=settings.serving.max_batch_size,
        max_latency_ms=settings.serving.max_latency_ms,
        prediction_log=_prediction_log(),
        log_images=settings.serving.log_images,
        observe=_observe,
        observe_batch=_observe_batch,
        request_ids=RequestIds(secret),
    )


@bentoml.service(
    name=SETTINGS.serving.bento_name,
    workers=SETTINGS.serving.workers,
    traffic={"timeout": 60, "max_concurrency": 512},
    logging={"access": {"enabled": False}},  # every prediction is in the prediction log already
    # no tracer is configured: an OpenTelemetry span per prediction only costs the hot path (~5% of a worker)
    tracing={"excluded_urls": ["/predict"]},
)
@bentoml.asgi_app(
    Starlette(
        routes=[
            Route("/version", version_endpoint, methods=["GET"]),
            Route("/ui", page_endpoint, methods=["GET"]),
            Route("/ui/status", status_endpoint, methods=["GET"]),
            Route("/docs", docs_endpoint, methods=["GET"]),
            Route("/predict", predict_endpoint, methods=["POST"]),
            Route("/predict_batch", predict_batch_endpoint, methods=["POST"]),
        ]
    ),
    path="/",
    name="pages",
)
class ImageClassifier:
    def __init__(self) -> None:
        packed = json.loads(PACKED_FILE.read_text()) if PACKED_FILE.exists() else {}
        self.bento_tag = str(packed.get("bento_tag", "development"))
        self.predictor = _predictor()
        self.predictor.refresh()
        _WORKER[:] = [self.predictor]
        self._watcher: asyncio.Task[None] | None = None

    @bentoml.on_startup
    async def start_watching(self) -> None:
        self._watcher = asyncio.create_task(self.predictor.watch(get_settings().serving.state_poll_seconds))
        if not stop_gracefully(get_settings().serving.drain_seconds):
            log.warning("SIGTERM stops this worker at once: uvicorn's signal handler was not found")

    @bentoml.on_shutdown
    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        self.predictor.close()

    def __is_ready__(self) -> bool:
        return self.predictor.ready()

    def version_info(self) -> dict[str, Any]:
        state = self.predictor.state
        stable = self.predictor.stable
        canary = self.predictor.canary
        incident = self.predictor.load_incident
        return {
            "model_version": stable.version if stable else None,
            "dataset_version": stable.model.meta.dataset_version if stable else None,
            "canary_version": canary.version if canary else None,
            "canary_share": self.predictor.canary_share,
            "previous_version": state.previous if state else None,
            "shadow_version": self.predictor.shadow.version if self.predictor.shadow else None,
            "revision": state.revision if state else None,
            "bento_tag": self.bento_tag,
            "ready": self.predictor.ready(),
            "load_error": f"the deployment state could not be loaded: see the log, incident {incident}"
            if incident
            else "",
        }

    @bentoml.api(route="/feedback")
    def feedback(self, request_id: str, label: str, ctx: bentoml.Context) -> Any:
        """Record the true label of an earlier prediction (``request_id``), once, by the key that asked."""
        try:
            return self.predictor.feedback(request_id, label, self.predictor.classes(), caller_id(ctx))
        except BadRequest as exc:
            return refuse(ctx, exc)
        except Exception:  # noqa: BLE001 - the client gets an incident id, the log the traceback
            return internal_error(ctx, "feedback")


ImageClassifier.add_asgi_middleware(GuardMiddleware)  # the first added is the outermost
ImageClassifier.add_asgi_middleware(BalanceMiddleware)
ImageClassifier.add_asgi_middleware(BearerSpec, open_paths=OPEN_PATHS)
