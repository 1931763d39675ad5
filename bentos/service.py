"""The prediction service (BentoML 1.4): a thin HTTP layer over ``ml.serving.predictor.Predictor``.

POST /predict (multipart field ``image``), POST /predict_batch (multipart field ``images``,
repeated), POST /feedback (JSON ``request_id``, ``label``), GET /version; BentoML adds /healthz,
/livez, /readyz and /metrics. Clients send ``Authorization: Bearer <key>``; keys come from
``MLOPS_API_KEYS`` or a keys file. Which model versions serve (stable + canary) comes from the
deployment state file named by ``MLOPS_DEPLOYMENT_STATE``; a built bento without one serves the
model packed into it (``packed.json``, written at build time).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

import bentoml
from prometheus_client import Counter, Histogram
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ml.config import get_settings
from ml.data.images import ImageLimits
from ml.serving import uploads
from ml.serving.auth import api_keys, key_matches
from ml.serving.log import PredictionLog
from ml.serving.predictor import Predictor
from ml.serving.uploads import BadRequest
from ml.storage import storage_from_settings

log = logging.getLogger("mlops.service")

PACKED_FILE = Path(__file__).resolve().parent / "packed.json"  # written into a bento at build time
STATE_ENV = "MLOPS_DEPLOYMENT_STATE"
LOG_ENV = "MLOPS_PREDICTION_LOG"  # "off" disables the prediction log (serving checks)
OPEN_PATHS = ("/healthz", "/livez", "/readyz", "/metrics")
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
ERRORS = Counter(
    "mlops_request_errors_total", "Requests refused, per error code and status.", ["code", "status"]
)


def _observe(version: str, predicted_class: str, seconds: float) -> None:
    LATENCY.labels(version).observe(seconds)
    PREDICTIONS.labels(version, predicted_class).inc()


def error_response(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    ERRORS.labels(code, str(status)).inc()
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


class GuardMiddleware:
    """API-key auth and the request-size limit, before BentoML parses anything.

    A body over ``max_bytes`` is refused with 413 whether or not it declares its length.
    """

    def __init__(self, app: Any) -> None:
        settings = get_settings()
        self.app = app
        self.keys = api_keys(keys_file=settings.serving.api_keys_file)
        self.max_bytes = settings.serving.max_request_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        if self.keys and not key_matches(headers.get("authorization"), self.keys):
            reply = error_response(
                401, "unauthorized", "send Authorization: Bearer <api key>", {"WWW-Authenticate": "Bearer"}
            )
            await reply(scope, receive, send)
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(413, "request_too_large", f"body over {self.max_bytes} bytes")(
                scope, receive, send
            )
            return
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await error_response(413, "request_too_large", f"body over {self.max_bytes} bytes")(
                    scope, receive, send
                )
                return
        problem = uploads.upload_problem(scope["path"], bytes(body), headers.get("content-type", ""))
        if problem:
            await error_response(*problem)(scope, receive, send)
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


async def version_endpoint(request: Request) -> Response:
    try:
        return JSONResponse(bentoml.get_current_service().version_info())
    except bentoml.exceptions.BentoMLException:
        return JSONResponse({"error": "not_ready", "detail": "service is starting"}, status_code=503)


def refuse(ctx: bentoml.Context, exc: BadRequest) -> dict[str, str]:
    """A client error from inside an API: BentoML takes the status from the context."""
    ERRORS.labels(exc.code, str(exc.status)).inc()
    ctx.response.status_code = exc.status
    return exc.body()


def _prediction_log() -> PredictionLog | None:
    if os.environ.get(LOG_ENV, "").lower() == "off":
        return None
    return PredictionLog(
        storage_from_settings(SETTINGS),
        get_settings().serving.log_flush_rows,
        get_settings().serving.log_flush_seconds,
    )


def _resolve(tag: str) -> Path:
    """Bundle folder of a model tag (or bare version) in the BentoML model store."""
    return Path(
        bentoml.models.get(tag if ":" in tag else f"{get_settings().mlflow.registered_model}:v{tag}").path
    )


@bentoml.service(
    name=SETTINGS.serving.bento_name,
    workers=SETTINGS.serving.workers,
    traffic={"timeout": 60, "max_concurrency": 512},
    logging={"access": {"enabled": False}},  # every prediction is in the prediction log already
)
@bentoml.asgi_app(
    Starlette(routes=[Route("/version", version_endpoint, methods=["GET"])]), path="/", name="version"
)
class ImageClassifier:
    def __init__(self) -> None:
        keys = api_keys(keys_file=get_settings().serving.api_keys_file)
        if not keys:
            log.warning(
                "NO API KEY CONFIGURED (MLOPS_API_KEYS): every caller is accepted; bind to 127.0.0.1 only"
            )
        packed = json.loads(PACKED_FILE.read_text()) if PACKED_FILE.exists() else {}
        state = os.environ.get(STATE_ENV)
        self.bento_tag = str(packed.get("bento_tag", "development"))
        self.predictor = Predictor(
            _resolve,
            ImageLimits.from_settings(get_settings().ingest),
            state_path=Path(state) if state else None,
            default_version=packed.get("model_version"),
            default_tag=packed.get("model_tag"),
            threads=get_settings().serving.threads,
            max_batch_size=get_settings().serving.max_batch_size,
            max_latency_ms=get_settings().serving.max_latency_ms,
            prediction_log=_prediction_log(),
            log_images=get_settings().serving.log_images,
            observe=_observe,
        )
        self.predictor.refresh()
        self._watcher: asyncio.Task[None] | None = None

    @bentoml.on_startup
    async def start_watching(self) -> None:
        self._watcher = asyncio.create_task(self.predictor.watch())

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
        return {
            "model_version": stable.version if stable else None,
            "dataset_version": stable.model.meta.dataset_version if stable else None,
            "canary_version": canary.version if canary else None,
            "canary_share": self.predictor.canary_share,
            "previous_version": state.previous if state else None,
            "bento_tag": self.bento_tag,
            "ready": self.predictor.ready(),
            "load_error": self.predictor.load_error,
        }

    @bentoml.api(route="/predict")
    async def predict(self, image: Path, ctx: bentoml.Context) -> Any:
        """Classify one image (multipart field ``image``): class, confidence, probabilities, version, id."""
        try:
            return await self.predictor.predict(image.read_bytes(), ctx.request.headers.get("x-client-id"))
        except BadRequest as exc:
            return refuse(ctx, exc)

    @bentoml.api(route="/predict_batch")
    async def predict_batch(self, images: list[Path], ctx: bentoml.Context) -> Any:
        """Classify several images (repeated multipart field ``images``); a bad one gets its own error."""
        if len(images) > get_settings().serving.max_batch_images:
            return error_response(
                413, "too_many_images", f"at most {get_settings().serving.max_batch_images} per request"
            )
        key = ctx.request.headers.get("x-client-id")

        async def one(path: Path) -> dict[str, Any]:
            try:
                return await self.predictor.predict(path.read_bytes(), key)
            except BadRequest as exc:
                ERRORS.labels(exc.code, str(exc.status)).inc()
                return {**exc.body(), "status": exc.status}

        results = await asyncio.gather(*(one(path) for path in images))
        if images and all("error" in result for result in results):
            ctx.response.status_code = int(results[0]["status"])
        return {"results": results}

    @bentoml.api(route="/feedback")
    def feedback(self, request_id: str, label: str, ctx: bentoml.Context) -> Any:
        """Record the true label for an earlier prediction's ``request_id``."""
        try:
            return self.predictor.feedback(request_id, label, self.predictor.classes())
        except BadRequest as exc:
            return refuse(ctx, exc)


ImageClassifier.add_asgi_middleware(GuardMiddleware)
