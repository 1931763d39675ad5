"""What the prediction service does, independent of the web framework.

A *bundle* is one registered model version made servable: its ONNX export (outputs ``logits``
and ``features``), the PCA of its drift reference and a ``meta.json`` (version, dataset, classes,
preprocessing). ``Predictor`` decodes and checks uploads by content, routes a request to the
stable model or the canary, batches concurrent requests adaptively and keeps the prediction log.
The BentoML service in ``bentos/service.py`` is a thin HTTP layer over it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ml.images import ImageLimits, Rejected, measure, open_checked
from ml.preprocessing import Preprocessing, to_array
from ml.storage import Storage

log = logging.getLogger(__name__)

BUNDLE_ONNX = "model.onnx"
BUNDLE_META = "meta.json"
BUNDLE_PCA = "pca.npz"
PREDICTIONS_PREFIX = "serving/predictions"
FEEDBACK_PREFIX = "serving/feedback"
REQUEST_IMAGES_PREFIX = "serving/images"
KEYS_ENV = "MLOPS_API_KEYS"
KEYS_FILE_ENV = "MLOPS_API_KEYS_FILE"


class BadRequest(ValueError):
    """A client error: ``status`` (4xx), a stable ``code`` and a message for the JSON body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def body(self) -> dict[str, str]:
        return {"error": self.code, "detail": self.message}


_REJECTION_STATUS = {"file_too_large": 413, "too_many_pixels": 413, "empty_file": 400}


def rejection(exc: Rejected) -> BadRequest:
    """Map an image rejection to its HTTP status: 413 for size limits, 415 for formats, else 400."""
    status = _REJECTION_STATUS.get(
        exc.reason, 415 if exc.reason in ("not_an_image", "format_not_allowed") else 400
    )
    return BadRequest(status, exc.reason, exc.detail)


@dataclass(frozen=True)
class BundleMeta:
    model_version: str
    dataset_version: str
    run_id: str
    classes: list[str]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(self.image_size, tuple(self.mean), tuple(self.std))  # type: ignore[arg-type]

    @classmethod
    def read(cls, folder: Path) -> BundleMeta:
        raw = json.loads((folder / BUNDLE_META).read_text())
        return cls(**{key: raw[key] for key in cls.__dataclass_fields__})


def write_bundle(folder: Path, onnx_file: Path, pca_file: Path, meta: BundleMeta) -> None:
    """Lay a bundle out in ``folder`` (a BentoML model directory in production)."""
    from dataclasses import asdict

    folder.mkdir(parents=True, exist_ok=True)
    (folder / BUNDLE_ONNX).write_bytes(onnx_file.read_bytes())
    (folder / BUNDLE_PCA).write_bytes(pca_file.read_bytes())
    (folder / BUNDLE_META).write_text(json.dumps(asdict(meta), indent=2))


@dataclass
class Outputs:
    """Model outputs for a batch: class probabilities and the embedding's PCA projection."""

    proba: np.ndarray  # (N, classes)
    projected: np.ndarray  # (N, components)


class ServingModel:
    """One bundle loaded into ONNX Runtime. ``infer`` is thread-safe (ORT sessions are)."""

    def __init__(self, folder: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        self.meta = BundleMeta.read(folder)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # idle threads sleep instead of spinning: the other workers and the decoders need the cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(folder / BUNDLE_ONNX), options, providers=["CPUExecutionProvider"]
        )
        outputs = {out.name for out in self.session.get_outputs()}
        if not {"logits", "features"} <= outputs:
            raise ValueError(f"{folder / BUNDLE_ONNX} must output logits and features, has {sorted(outputs)}")
        with np.load(folder / BUNDLE_PCA) as pca:
            self.pca_mean, self.pca_components = pca["mean"], pca["components"]
        self.version = self.meta.model_version
        self.prep = self.meta.preprocessing

    def infer(self, batch: np.ndarray) -> Outputs:
        logits, features = self.session.run(["logits", "features"], {"image": batch})
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        proba = shifted / shifted.sum(axis=1, keepdims=True)
        return Outputs(proba, (features - self.pca_mean) @ self.pca_components.T)


class AdaptiveBatcher:
    """Groups concurrent requests into one model call, sized to keep a call under ``max_latency_ms``.

    An idle model takes whatever is queued at once (a lone request never waits for company);
    while it runs, new requests queue and the next call takes them together. The batch size is
    capped by ``max_batch_size`` and by how many images the measured per-image time allows in
    ``max_latency_ms``, so batching raises throughput under load without stretching the tail.
    """

    def __init__(
        self, run: Callable[[np.ndarray], Outputs], max_batch_size: int, max_latency_ms: float
    ) -> None:
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_latency_s = max_latency_ms / 1000.0
        self._per_image_s = 0.0  # moving average of one image's share of a call
        self._queue: (
            asyncio.Queue[tuple[np.ndarray, asyncio.Future[tuple[np.ndarray, np.ndarray]]]] | None
        ) = None
        self._worker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.batches = 0
        self.images = 0

    def batch_limit(self) -> int:
        if self._per_image_s <= 0:
            return self.max_batch_size
        return max(1, min(self.max_batch_size, int(self.max_latency_s / self._per_image_s)))

    async def submit(self, array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, projected embedding) of one preprocessed image."""
        loop = asyncio.get_running_loop()
        if self._queue is None or self._loop is not loop:  # a queue belongs to the loop that made it
            self._queue, self._loop = asyncio.Queue(), loop
            self._worker = asyncio.create_task(self._serve(self._queue))
        future: asyncio.Future[tuple[np.ndarray, np.ndarray]] = loop.create_future()
        await self._queue.put((array, future))
        return await future

    async def _serve(self, queue: asyncio.Queue[Any]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await queue.get()]
            limit = self.batch_limit()
            while len(items) < limit and not queue.empty():
                items.append(queue.get_nowait())
            items = [item for item in items if not item[1].done()]  # cancelled by a gone client
            if not items:
                continue
            started = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(
                    self._executor, self._run, np.stack([array for array, _ in items])
                )
            except Exception as exc:  # noqa: BLE001 - a failed call fails its requests, not the loop
                for _, future in items:
                    if not future.done():
                        future.set_exception(exc)
                continue
            took = (time.perf_counter() - started) / len(items)
            self._per_image_s = took if self._per_image_s == 0 else 0.8 * self._per_image_s + 0.2 * took
            self.batches += 1
            self.images += len(items)
            for i, (_, future) in enumerate(items):
                if not future.done():
                    future.set_result((outputs.proba[i], outputs.projected[i]))

    def idle(self) -> bool:
        return self._queue is None or self._queue.empty()

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class Decoded:
    array: np.ndarray  # (3, S, S) float32, the model's input
    properties: dict[str, float]  # what drift compares (sizes, bytes, brightness, contrast, blur)
    image_format: str


def decode_upload(data: bytes, limits: ImageLimits, prep: Preprocessing) -> Decoded:
    """Check an upload by content and turn it into the model's input; ``BadRequest`` when it is not one."""
    try:
        _, rgb, props = open_checked(data, limits)
    except Rejected as exc:
        raise rejection(exc) from None
    measured = measure(rgb, phash=False)
    properties = {
        "width": float(rgb.width),
        "height": float(rgb.height),
        "file_bytes": float(len(data)),
        **{key: float(value) for key, value in measured.items()},
    }
    return Decoded(to_array(rgb, prep), properties, str(props["format"]))


def canary_bucket(key: str) -> float:
    """A stable number in [0, 1) for a routing key: the same client always lands on the same side."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0x1_0000_0000


@dataclass(frozen=True)
class DeploymentState:
    """Which model versions the live endpoint serves. Written by deploy/rollback, read by the service."""

    stable: str
    canary: str | None = None
    canary_share: float = 0.0
    previous: str | None = None
    updated_at: str = ""
    updated_by: str = ""
    reason: str = ""
    models: dict[str, str] = field(default_factory=dict)  # version -> model-store tag of its bundle

    def tag(self, version: str) -> str:
        return self.models.get(version, version)

    def to_json(self) -> str:
        from dataclasses import asdict

        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DeploymentState:
        raw = json.loads(text)
        return cls(**{key: raw[key] for key in cls.__dataclass_fields__ if key in raw})


def read_state(path: Path) -> DeploymentState | None:
    try:
        return DeploymentState.from_json(path.read_text())
    except FileNotFoundError:
        return None


def write_state(path: Path, state: DeploymentState) -> None:
    """Atomic replace: a service polling the file never reads half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(state.to_json())
    os.replace(tmp, path)


def api_keys(environ: dict[str, str] | None = None, keys_file: str | None = None) -> frozenset[str]:
    """Accepted API keys: ``MLOPS_API_KEYS`` (comma-separated) plus one per line of the keys file."""
    env = os.environ if environ is None else environ
    keys = {key.strip() for key in env.get(KEYS_ENV, "").split(",") if key.strip()}
    path = env.get(KEYS_FILE_ENV) or keys_file
    if path:
        keys |= {line.strip() for line in Path(path).read_text().splitlines() if line.strip()}
    return frozenset(keys)


def key_matches(header: str | None, keys: frozenset[str]) -> bool:
    """Constant-time check of an ``Authorization: Bearer <key>`` header against the keys."""
    import hmac

    if not header or not header.startswith("Bearer "):
        return False
    offered = header.removeprefix("Bearer ").strip().encode()
    return any(hmac.compare_digest(offered, key.encode()) for key in keys)


@dataclass
class PredictionLog:
    """Buffers prediction and feedback records; writes them to storage as JSONL files in batches."""

    storage: Storage
    flush_rows: int = 256
    flush_seconds: float = 5.0
    writer_id: str = field(default_factory=lambda: f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
    _rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _last_flush: float = field(default_factory=time.monotonic)
    _sequence: int = 0

    def add(self, prefix: str, record: dict[str, Any]) -> None:
        with self._lock:
            self._rows.setdefault(prefix, []).append(record)
            due = sum(map(len, self._rows.values())) >= self.flush_rows
        if due or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def due(self) -> bool:
        """Rows are waiting longer than ``flush_seconds`` (quiet traffic must not hold them back)."""
        return bool(self._rows) and time.monotonic() - self._last_flush >= self.flush_seconds

    def flush(self) -> list[str]:
        """Write what is buffered; return the keys written. Failures keep the rows for the next try."""
        with self._lock:  # keys are numbered under the lock: two flushes never write the same file
            pending, self._rows = self._rows, {}
            self._last_flush = time.monotonic()
            batches = []
            for prefix, rows in pending.items():
                if rows:
                    self._sequence += 1
                    key = f"{prefix}/{rows[0]['time'][:10]}/{self.writer_id}-{self._sequence:06d}.jsonl"
                    batches.append((prefix, key, rows))
        written = []
        for prefix, key, rows in batches:
            body = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode()
            try:
                self.storage.write_bytes(key, body)
                written.append(key)
            except Exception:  # storage outages must not fail predictions
                log.exception("prediction log: could not write %s; keeping %d rows", key, len(rows))
                with self._lock:
                    self._rows.setdefault(prefix, [])[:0] = rows
        return written


def read_records(storage: Storage, prefix: str, days: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Every record under a log prefix (optionally only some days), in key order."""
    records = []
    for key in storage.list(prefix):
        if days is not None and key.removeprefix(prefix + "/")[:10] not in days:
            continue
        records.extend(json.loads(line) for line in storage.read_bytes(key).decode().splitlines() if line)
    return records


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


@dataclass
class Lane:
    """A loaded model version with its own batcher (a batch never mixes versions)."""

    model: ServingModel
    batcher: AdaptiveBatcher

    @property
    def version(self) -> str:
        return self.model.version


Observer = Callable[[str, str, float], None]  # (model version, predicted class, seconds)


class Predictor:
    """Stable model + optional canary, hot-swapped from the deployment state file.

    ``resolve`` maps a model tag to its bundle folder (the BentoML model store in the service).
    Without a state file the predictor serves ``default_version`` (the model packed into a bento).
    A new state is loaded completely before it is switched in, so requests never see a gap.
    """

    def __init__(
        self,
        resolve: Callable[[str], Path],
        limits: ImageLimits,
        *,
        state_path: Path | None = None,
        default_version: str | None = None,
        default_tag: str | None = None,
        threads: int = 1,
        max_batch_size: int = 16,
        max_latency_ms: float = 20.0,
        prediction_log: PredictionLog | None = None,
        log_images: bool = False,
        observe: Observer | None = None,
    ) -> None:
        self.resolve = resolve
        self.limits = limits
        self.state_path = state_path
        self.default_version = default_version
        self.default_tag = default_tag or default_version
        self.threads = threads
        self.max_batch_size = max_batch_size
        self.max_latency_ms = max_latency_ms
        self.prediction_log = prediction_log
        self.log_images = log_images
        self.observe = observe
        self.stable: Lane | None = None
        self.canary: Lane | None = None
        self.canary_share = 0.0
        self.state: DeploymentState | None = None
        self._lanes: dict[str, Lane] = {}
        self._tags: dict[str, str] = {}
        self._retired: list[tuple[float, Lane]] = []
        self._state_stamp: tuple[float, int] | None = None
        self._decode_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        self.load_error = ""

    # -- deployment state ---------------------------------------------------------------------
    def _lane(self, version: str, tag: str) -> Lane:
        if version not in self._lanes or self._tags.get(version) != tag:
            model = ServingModel(self.resolve(tag), self.threads)
            self._tags[version] = tag
            self._lanes[version] = Lane(
                model, AdaptiveBatcher(model.infer, self.max_batch_size, self.max_latency_ms)
            )
        return self._lanes[version]

    def _wanted(self) -> DeploymentState | None:
        state = read_state(self.state_path) if self.state_path else None
        if state is None and self.default_version:
            models = {self.default_version: self.default_tag or self.default_version}
            state = DeploymentState(
                stable=self.default_version, reason="model packed in the bento", models=models
            )
        return state

    def refresh(self) -> bool:
        """Load the deployment state if it changed; True when the routing changed."""
        stamp = None
        if self.state_path is not None:
            try:
                info = self.state_path.stat()
                stamp = (info.st_mtime, info.st_size)
            except FileNotFoundError:
                stamp = None
        if self.stable is not None and stamp == self._state_stamp:
            return False
        state = self._wanted()
        if state is None:
            self.load_error = f"no deployment state at {self.state_path} and no packed model"
            return False
        try:
            stable = self._lane(state.stable, state.tag(state.stable))
            canary = None
            if state.canary and state.canary_share > 0:
                canary = self._lane(state.canary, state.tag(state.canary))
        except Exception as exc:  # keep serving what runs; report why the new state failed
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("deployment state %s could not be loaded; keeping the current models", state)
            self._state_stamp = stamp
            return False
        self.stable, self.canary, self.canary_share = stable, canary, state.canary_share if canary else 0.0
        self.state, self._state_stamp, self.load_error = state, stamp, ""
        for version in [v for v in self._lanes if v not in {stable.version, canary and canary.version}]:
            # requests already routed to it still finish there; `watch` closes it once it is idle
            self._retired.append((time.monotonic(), self._lanes.pop(version)))
        log.info(
            "serving v%s%s",
            stable.version,
            f" + canary v{canary.version} ({self.canary_share:.0%})" if canary else "",
        )
        return True

    async def watch(self, every_seconds: float = 0.5) -> None:
        """Poll the state file; load off the event loop so requests keep flowing during a swap."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every_seconds)
            try:
                await loop.run_in_executor(None, self.refresh)
            except Exception:  # the watcher must survive anything
                log.exception("deployment state refresh failed")
            self.reap_retired()
            if self.prediction_log is not None and self.prediction_log.due():
                await loop.run_in_executor(None, self.prediction_log.flush)

    def reap_retired(self, grace_seconds: float = 30.0) -> int:
        """Close lanes retired more than ``grace_seconds`` ago whose queue is empty; return how many."""
        now, kept, closed = time.monotonic(), [], 0
        for since, lane in self._retired:
            if now - since >= grace_seconds and lane.batcher.idle():
                lane.batcher.close()
                closed += 1
            else:
                kept.append((since, lane))
        self._retired = kept
        return closed

    def ready(self) -> bool:
        return self.stable is not None

    def route(self, key: str) -> tuple[Lane, str]:
        if self.stable is None:
            raise BadRequest(503, "not_ready", self.load_error or "no model loaded yet")
        if self.canary is not None and canary_bucket(key) < self.canary_share:
            return self.canary, "canary"
        return self.stable, "stable"

    # -- requests -----------------------------------------------------------------------------
    async def predict(self, data: bytes, route_key: str | None = None) -> dict[str, Any]:
        """Classify one upload. Raises ``BadRequest`` for anything that is not a usable image."""
        started = time.perf_counter()
        request_id = uuid.uuid4().hex
        lane, track = self.route(route_key or request_id)
        loop = asyncio.get_running_loop()
        decoded = await loop.run_in_executor(
            self._decode_pool, decode_upload, data, self.limits, lane.model.prep
        )
        proba, projected = await lane.batcher.submit(decoded.array)
        classes = lane.model.meta.classes
        best = int(np.argmax(proba))
        result = {
            "predicted_class": classes[best],
            "confidence": float(proba[best]),
            "probabilities": {name: float(p) for name, p in zip(classes, proba, strict=True)},
            "model_version": lane.version,
            "request_id": request_id,
        }
        seconds = time.perf_counter() - started
        if self.observe:
            self.observe(lane.version, classes[best], seconds)
        self._log(result, decoded, projected, track, seconds, data)
        return result

    def _log(
        self,
        result: dict[str, Any],
        decoded: Decoded,
        projected: np.ndarray,
        track: str,
        seconds: float,
        data: bytes,
    ) -> None:
        if self.prediction_log is None:
            return
        record: dict[str, Any] = {
            "request_id": result["request_id"],
            "time": now_iso(),
            "model_version": result["model_version"],
            "track": track,
            "predicted_class": result["predicted_class"],
            "confidence": round(result["confidence"], 6),
            "latency_ms": round(seconds * 1000, 3),
            "image_format": decoded.image_format,
            **decoded.properties,
            **{f"embedding_pc{i}": round(float(value), 6) for i, value in enumerate(projected)},
        }
        if self.log_images:
            key = f"{REQUEST_IMAGES_PREFIX}/{record['time'][:10]}/{result['request_id']}"
            self.prediction_log.storage.write_bytes(key, data)
            record["image_key"] = key
        self.prediction_log.add(PREDICTIONS_PREFIX, record)

    def feedback(self, request_id: str, label: str, classes: Sequence[str]) -> dict[str, Any]:
        """Record the true label of an earlier prediction (live accuracy joins on request_id)."""
        if not request_id or len(request_id) > 64 or not request_id.replace("-", "").isalnum():
            raise BadRequest(400, "bad_request_id", "request_id must be the id a prediction returned")
        if label not in classes:
            raise BadRequest(400, "unknown_label", f"label must be one of {', '.join(classes)}")
        record = {"request_id": request_id, "label": label, "time": now_iso()}
        if self.prediction_log is not None:
            self.prediction_log.add(FEEDBACK_PREFIX, record)
        return {"status": "recorded", **record}

    def classes(self) -> list[str]:
        if self.stable is None:
            raise BadRequest(503, "not_ready", self.load_error or "no model loaded yet")
        return list(self.stable.model.meta.classes)

    def close(self) -> None:
        for lane in [*self._lanes.values(), *(lane for _, lane in self._retired)]:
            lane.batcher.close()
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        if self.prediction_log is not None:
            self.prediction_log.flush()
