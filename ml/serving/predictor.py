"""What the prediction service does, independent of the web framework.

``Predictor`` decodes and checks uploads by content, routes a request to the stable model or
the canary, batches concurrent requests adaptively and keeps the prediction log. The BentoML
service in ``bentos/service.py`` is a thin HTTP layer over it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import secrets
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ml.data.images import ImageLimits
from ml.layout import (
    FEEDBACK_PREFIX,
    PREDICTIONS_PREFIX,
    SERVING_ACCESS_AUDIT_PREFIX,
    SHADOW_PREFIX,
    feedback_claim_key,
    request_image_key,
)
from ml.serving.auth import ANONYMOUS
from ml.serving.batching import AdaptiveBatcher
from ml.serving.binding import RequestIds, well_formed
from ml.serving.bundle import ServingModel
from ml.serving.log import PredictionLog, now_iso
from ml.serving.replica import Heartbeat, remove_heartbeat, this_host, write_heartbeat
from ml.serving.replica import now_iso as heartbeat_time
from ml.serving.state import DeploymentState, read_state_tagged
from ml.serving.uploads import BadRequest, Decoded, decode_upload, incident_id
from ml.storage import Storage

log = logging.getLogger(__name__)


RETRY_MAX_SECONDS = 60.0  # the longest a replica waits before trying a state that failed to load again


def not_ready() -> BadRequest:
    return BadRequest(503, "not_ready", "no model is loaded yet: retry in a few seconds")


def canary_bucket(key: str) -> float:
    """A stable number in [0, 1) for a routing key: the same client always lands on the same side."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0x1_0000_0000


@dataclass
class Lane:
    """A loaded model version with its own batcher (a batch never mixes versions)."""

    model: ServingModel
    batcher: AdaptiveBatcher

    @property
    def version(self) -> str:
        return self.model.version


Observer = Callable[[str, str, float], None]  # (model version, predicted class, seconds)


@dataclass(frozen=True)
class ReplicaIdentity:
    """Who this worker is in the heartbeats: its replica, its worker number, where it answers."""

    replica: str
    worker: int
    url: str
    bento_tag: str
    heartbeat_seconds: float = 2.0


class Predictor:
    """Stable model + optional canary (and shadow), hot-swapped from the deployment state in storage.

    ``resolve`` maps a model tag to its bundle folder (the BentoML model store in the service, else
    a copy fetched from storage). Without a state the predictor serves ``default_version`` (the
    model packed into a bento). A new state is loaded completely before it is switched in, so
    requests never see a gap. With ``identity`` it publishes a heartbeat after every change and
    every ``heartbeat_seconds``.
    """

    def __init__(
        self,
        resolve: Callable[[str], Path],
        limits: ImageLimits,
        *,
        state_storage: Storage | None = None,
        identity: ReplicaIdentity | None = None,
        default_version: str | None = None,
        default_tag: str | None = None,
        threads: int = 1,
        max_batch_size: int = 16,
        max_latency_ms: float = 20.0,
        prediction_log: PredictionLog | None = None,
        log_images: bool = False,
        observe: Observer | None = None,
        observe_batch: Callable[[str, int], None] | None = None,
        request_ids: RequestIds | None = None,
    ) -> None:
        self.resolve = resolve
        self.limits = limits
        self.state_storage = state_storage
        self.identity = identity
        self.default_version = default_version
        self.default_tag = default_tag or default_version
        self.threads = threads
        self.max_batch_size = max_batch_size
        self.max_latency_ms = max_latency_ms
        self.prediction_log = prediction_log
        self.log_images = log_images
        self.observe = observe
        self.observe_batch = observe_batch  # (model version, images in one model call)
        self.request_ids = request_ids or RequestIds(secrets.token_bytes(32))
        self._claimed: set[str] = set()  # where no storage is configured (the log is off)
        self.stable: Lane | None = None
        self.canary: Lane | None = None
        self.canary_share = 0.0
        self.state: DeploymentState | None = None
        self._lanes: dict[str, Lane] = {}
        self._tags: dict[str, str] = {}
        self._retired: list[tuple[float, Lane]] = []
        self._state_tag: str | None = None
        self._wanted_revision = -1
        self._failed_tag: str | None = None  # the state that failed to load, tried again at ``_retry_at``
        self._failures = 0
        self._retry_at = 0.0
        self._last_beat = 0.0
        self.shadow: Lane | None = None
        self._shadows: set[asyncio.Task[None]] = set()  # shadow calls in flight (kept so none is collected)
        self._decode_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        self.load_error = ""  # the internal reason, for the log only; clients see ``load_incident``
        self.load_incident = ""

    # -- deployment state ---------------------------------------------------------------------
    def _lane(self, version: str, tag: str) -> Lane:
        if version not in self._lanes or self._tags.get(version) != tag:
            model = ServingModel(self.resolve(tag), self.threads)
            self._tags[version] = tag
            on_batch = partial(self.observe_batch, version) if self.observe_batch else None
            self._lanes[version] = Lane(
                model, AdaptiveBatcher(model.infer, self.max_batch_size, self.max_latency_ms, on_batch)
            )
        return self._lanes[version]

    def _wanted(self) -> tuple[DeploymentState | None, str | None]:
        """The deployment state to serve and its storage tag (the packed model when there is none)."""
        found = read_state_tagged(self.state_storage) if self.state_storage is not None else None
        if found is not None:
            return found
        if self.default_version:
            models = {self.default_version: self.default_tag or self.default_version}
            packed = DeploymentState(
                stable=self.default_version, reason="model packed in the bento", models=models
            )
            return packed, None
        return None, None

    def refresh(self) -> bool:
        """Load the deployment state if it changed; True when the routing changed."""
        try:
            state, tag = self._wanted()
        except Exception as exc:  # noqa: BLE001 - storage down: keep serving, try again next poll
            self._load_failed(f"the deployment state could not be read: {type(exc).__name__}: {exc}")
            return False
        if self.stable is not None and (tag is None or tag == self._state_tag):
            return False
        if tag is not None and tag == self._failed_tag and time.monotonic() < self._retry_at:
            return False  # this state failed to load: tried again after a backoff, not on every poll
        if state is None:
            self._load_failed("no deployment state in storage and no packed model")
            return False
        self._wanted_revision = state.revision
        try:
            lanes = self._lanes_for(state)
        except Exception as exc:  # keep serving what runs; report why the new state failed
            self._load_failed(f"{type(exc).__name__}: {exc}")
            log.exception("deployment state %s could not be loaded; keeping the current models", state)
            self._back_off(tag)
            if self.stable is None:  # a worker starting on an unloadable state: serve what loads
                self._fall_back(state)
            self.beat(force=True)
            return False
        self._switch(state, tag, *lanes)
        self._failed_tag, self._failures = None, 0
        self.beat(force=True)
        return True

    def _back_off(self, tag: str | None) -> None:
        """Try a state that failed to load again later (a bundle not yet uploaded, storage down for a
        while): after 2, 4, 8 ... up to ``RETRY_MAX_SECONDS`` seconds, so a replica catches up on its own."""
        self._failures = self._failures + 1 if tag == self._failed_tag else 1
        self._failed_tag = tag
        self._retry_at = time.monotonic() + min(RETRY_MAX_SECONDS, 2.0**self._failures)

    def _lanes_for(self, state: DeploymentState) -> tuple[Lane, Lane | None, Lane | None]:
        """Every model ``state`` asks for, loaded (stable, canary, shadow)."""
        stable = self._lane(state.stable, state.tag(state.stable))
        canary = None
        if state.canary and state.canary_share > 0:
            canary = self._lane(state.canary, state.tag(state.canary))
        shadow = None
        if state.shadow and state.shadow not in (state.stable, state.canary):
            shadow = self._lane(state.shadow, state.tag(state.shadow))
        return stable, canary, shadow

    def _switch(
        self, state: DeploymentState, tag: str | None, stable: Lane, canary: Lane | None, shadow: Lane | None
    ) -> None:
        self.stable, self.canary, self.shadow = stable, canary, shadow
        self.canary_share = state.canary_share if canary else 0.0
        self.state, self._state_tag, self.load_error, self.load_incident = state, tag, "", ""
        serving = {stable.version, canary and canary.version, shadow and shadow.version}
        for version in [v for v in self._lanes if v not in serving]:
            # requests already routed to it still finish there; `watch` closes it once it is idle
            self._retired.append((time.monotonic(), self._lanes.pop(version)))
        log.info(
            "serving v%s%s%s",
            stable.version,
            f" + canary v{canary.version} ({self.canary_share:.0%})" if canary else "",
            f" + shadow v{shadow.version}" if shadow else "",
        )

    def heartbeat(self) -> Heartbeat | None:
        """This worker's report for the heartbeats (None when it is no replica)."""
        if self.identity is None:
            return None
        host, pid = this_host()
        return Heartbeat(
            replica=self.identity.replica,
            worker=self.identity.worker,
            url=self.identity.url,
            revision=self.state.revision if self.state else -1,
            stable=self.stable.version if self.stable else None,
            canary=self.canary.version if self.canary else None,
            canary_share=self.canary_share,
            shadow=self.shadow.version if self.shadow else None,
            bento_tag=self.identity.bento_tag,
            load_error=self.load_incident,
            wanted_revision=self._wanted_revision,
            at=heartbeat_time(),
            host=host,
            pid=pid,
        )

    def beat(self, force: bool = False) -> None:
        """Publish the heartbeat when due (or now, after a change)."""
        if self.identity is None or self.state_storage is None:
            return
        if not force and time.monotonic() - self._last_beat < self.identity.heartbeat_seconds:
            return
        beat = self.heartbeat()
        if beat is not None:
            write_heartbeat(self.state_storage, beat)
            self._last_beat = time.monotonic()

    def _fall_back(self, state: DeploymentState) -> None:
        """Serve ``state``'s stable model alone when it loads (its canary or shadow did not); else the
        newest earlier stable version that loads (the other workers kept it), never the one a
        rollback to ``state`` removed."""
        removed = state.previous if state.reason.startswith("rollback") else None
        earlier = [v for v in reversed(state.history[:-1]) if v not in (state.stable, removed)]
        if not earlier and state.previous and state.previous != removed:
            earlier = [state.previous]
        for version in [state.stable, *earlier]:
            try:
                self.stable = self._lane(version, state.tag(version))
            except Exception as exc:  # noqa: BLE001 - try the next one
                log.warning("v%s cannot be loaded either: %s: %s", version, type(exc).__name__, exc)
                continue
            if version != state.stable:
                log.warning("serving v%s until v%s can be loaded", version, state.stable)
            return

    def _load_failed(self, reason: str) -> None:
        if reason != self.load_error:
            self.load_error, self.load_incident = reason, incident_id()
            log.error("deployment state not loaded [incident %s]: %s", self.load_incident, reason)

    async def watch(self, every_seconds: float = 2.0) -> None:
        """Poll the deployment state; load (and beat) off the event loop so requests keep flowing."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every_seconds)
            try:
                await loop.run_in_executor(None, self.refresh)
                await loop.run_in_executor(None, self.beat)
            except Exception:  # the watcher must survive anything
                log.exception("deployment state refresh failed")
            self.reap_retired()

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

    def route(self, key: str | None) -> tuple[Lane, str]:
        """The lane of a request: by its client key's bucket, or at random for a request without one."""
        if self.stable is None:
            raise not_ready()
        if self.canary is not None:
            bucket = canary_bucket(key) if key else random.random()  # noqa: S311 - a traffic split, no secret
            if bucket < self.canary_share:
                return self.canary, "canary"
        return self.stable, "stable"

    # -- requests -----------------------------------------------------------------------------
    async def predict(
        self, data: bytes, route_key: str | None = None, key_id: str = ANONYMOUS
    ) -> dict[str, Any]:
        """Classify one upload for the caller ``key_id``. Raises ``BadRequest`` for a bad image."""
        started = time.perf_counter()
        lane, track = self.route(route_key)
        request_id = self.request_ids.mint(lane.version, key_id)
        loop = asyncio.get_running_loop()
        decoded = await loop.run_in_executor(
            self._decode_pool, decode_upload, data, self.limits, lane.model.prep
        )
        try:
            proba, projected = await lane.batcher.submit(decoded.array)
        except Exception as exc:
            self._log_failure(request_id, lane.version, track, started, exc)
            raise
        # track: "stable" or "canary", which of the deployed models answered
        result = {**lane.model.answer(proba), "track": track, "request_id": request_id}
        seconds = time.perf_counter() - started
        if self.observe:
            self.observe(lane.version, result["predicted_class"], seconds)
        self._log(result, decoded, projected, track, seconds, data)
        if self.shadow is not None and track == "stable":
            self._shadows.add(asyncio.create_task(self._shadow(self.shadow, decoded, request_id)))
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
            key = request_image_key(record["time"][:10], result["request_id"])
            if self.prediction_log.add_blob(key, data):
                record["image_key"] = key
        self.prediction_log.add(PREDICTIONS_PREFIX, record)

    async def _shadow(self, lane: Lane, decoded: Decoded, request_id: str) -> None:
        """The shadow model answers a copy of the request after the client has its answer; logged only."""
        await asyncio.sleep(0)  # let the response go out first
        started = time.perf_counter()
        try:
            proba, _ = await lane.batcher.submit(decoded.array)
        except Exception as exc:  # noqa: BLE001 - a failing shadow never touches live traffic
            log.warning("shadow v%s failed on %s: %s", lane.version, request_id, exc)
            return
        finally:
            self._shadows.discard(asyncio.current_task())  # type: ignore[arg-type]
        if self.prediction_log is None:
            return
        best = int(np.argmax(proba))
        record = {
            "request_id": request_id,
            "time": now_iso(),
            "model_version": lane.version,
            "track": "shadow",
            "predicted_class": lane.model.meta.classes[best],
            "confidence": round(float(proba[best]), 6),
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        }
        self.prediction_log.add(SHADOW_PREFIX, record)

    def _log_failure(self, request_id: str, version: str, track: str, started: float, exc: Exception) -> None:
        """A request the model failed (a 5xx): logged per version, so the monitor can judge each one."""
        if self.prediction_log is None:
            return
        record = {
            "request_id": request_id,
            "time": now_iso(),
            "model_version": version,
            "track": track,
            "status": 500,
            "error": type(exc).__name__,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        }
        self.prediction_log.add(PREDICTIONS_PREFIX, record)

    def feedback(
        self, request_id: str, label: str, classes: Sequence[str], key_id: str = ANONYMOUS
    ) -> dict[str, Any]:
        """Record the true label of an earlier prediction, once, by the key that made it."""
        if not well_formed(request_id):
            raise BadRequest(400, "bad_request_id", "request_id must be the id a prediction returned")
        if label not in classes:
            raise BadRequest(400, "unknown_label", f"label must be one of {', '.join(classes)}")
        bound = self.request_ids.verify(request_id)
        if bound is None:
            raise BadRequest(404, "unknown_request", "no prediction of this service has that request_id")
        if bound.key_id != key_id:
            raise BadRequest(
                403, "not_your_prediction", "only the API key that made a prediction may label it"
            )
        record = {
            "request_id": request_id,
            "label": label,
            "time": now_iso(),
            "model_version": bound.model_version,
            "key_id": key_id,
            "bound": True,
        }
        self._claim(bound.nonce, record)
        if self.prediction_log is not None:
            self.prediction_log.add(FEEDBACK_PREFIX, record)
        return {"status": "recorded", **record}

    def _claim(self, nonce: str, record: dict[str, Any]) -> None:
        """Create-if-absent: the first label of a prediction wins, across workers and replicas."""
        if self.prediction_log is None:
            claimed = nonce not in self._claimed
            self._claimed.add(nonce)
        else:
            data = json.dumps(record, sort_keys=True).encode()
            try:
                claimed = self.prediction_log.storage.write_if(feedback_claim_key(nonce), data, None)
            except Exception as exc:  # noqa: BLE001 - any storage failure is the same to the client
                incident = incident_id()
                log.error("feedback claim failed [incident %s]: %r", incident, exc)
                raise BadRequest(
                    503,
                    "storage_unavailable",
                    f"feedback cannot be stored now: retry later (incident {incident})",
                ) from None
        if not claimed:
            raise BadRequest(409, "already_labelled", "this prediction has a label already")

    def record_admin(self, key_id: str, method: str, path: str, status: int) -> None:
        """One record per admin request (who by key id, what, when) through the buffered writer."""
        if self.prediction_log is not None:
            record = {"time": now_iso(), "key_id": key_id, "method": method, "path": path, "status": status}
            self.prediction_log.add(SERVING_ACCESS_AUDIT_PREFIX, record)

    def classes(self) -> list[str]:
        if self.stable is None:
            raise not_ready()
        return list(self.stable.model.meta.classes)

    def close(self) -> None:
        if self.identity is not None and self.state_storage is not None:
            remove_heartbeat(self.state_storage, self.identity.replica, self.identity.worker)
        for lane in [*self._lanes.values(), *(lane for _, lane in self._retired)]:
            lane.batcher.close()
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        if self.prediction_log is not None:
            self.prediction_log.close()
