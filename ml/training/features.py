"""The feature cache: frozen-backbone features computed once per image, so a retrain pays only for new ones.

Key: ``cache_id`` hashes the backbone name, its weights_id, the preprocessing version, the number
of views, (with more than one view) the augmentation kinds and (for ``model.precision: int8``) the
quantisation. Anything that changes a feature changes the key, so a stale cache is never read; it
is simply not found.

Views: each image gets V cached views. View 0 is the clean eval view (``to_array`` of the image,
exactly what serving sees). Views 1..V-1 are ``augmented_array`` of the image with an RNG seeded
from the image's sha256 and the view number, so they are the same on every machine and every run.
Training draws one view per image per epoch; validation and test use view 0 only.

Runtime: the frozen backbone runs through ONNX Runtime by default (``model.feature_runtime``),
checked against torch on a probe batch when loaded (features agree to ~1e-5, below the float16
they are stored in), so the cache key does not name the runtime; an INT8 backbone
(``ml.training.quantize``) gives other features and has keys of its own. Missing features are computed
``workers`` chunks at a time, each chunk read, decoded, augmented and embedded by its own thread
(Pillow, NumPy, OpenCV and ONNX Runtime release the GIL, so the chunks run on separate cores).

Layout: ``features/<cache_id>/<day>.npz``, one shard per catalog day partition, holding
``sha256`` (str, sorted) and ``features`` (float16, (N, V, D)). A shard is rewritten whole
(atomically) when its day gains images. Two writers racing on one shard lose only cache entries,
which are recomputed on the next call.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image

from ml.config import Settings, resolve_workers
from ml.layout import feature_shard_key
from ml.progress import Progress
from ml.storage import Storage
from ml.training.model import Backbone, FeatureRunner, onnx_runner, torch_runner
from ml.training.preprocessing import (
    AUGMENTATION_VERSION,
    Preprocessing,
    augmented_array,
    batch_arrays,
    decode_rgb,
    to_array,
)
from ml.training.quantize import QUANTIZATION, int8_runner

log = logging.getLogger(__name__)

FEATURES_FORMAT = "pooled-fp16-sha-seeded-views-v1"  # bump when view seeding or the shard layout changes
REQUIRED_COLUMNS = ("sha256", "day", "curated_key")


@dataclass(frozen=True)
class CacheStats:
    hits: int  # distinct images found in the cache
    misses: int  # distinct images computed
    seconds_computing: float


@dataclass(frozen=True)
class _Shard:
    sha256: np.ndarray  # (N,) str, sorted
    features: np.ndarray  # (N, V, D) float16

    def positions(self, sha256: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Index of each ``sha256`` in the shard, and whether it is there at all."""
        if not len(self.sha256):
            return np.zeros(len(sha256), dtype=np.int64), np.zeros(len(sha256), dtype=bool)
        index = np.minimum(np.searchsorted(self.sha256, sha256), len(self.sha256) - 1)
        return index, self.sha256[index] == sha256


def cache_id(
    backbone: Backbone,
    prep: Preprocessing,
    views: int,
    augmentations: Sequence[str] = (),
    precision: str = "fp32",
) -> str:
    """Short hash naming everything that determines a cached feature."""
    kinds = ",".join(sorted(augmentations)) if views > 1 else ""
    parts = [FEATURES_FORMAT, backbone.name, backbone.weights_id, prep.version, str(views), kinds]
    if views > 1:  # the way views are augmented; one-view keys stay what they were
        parts.append(AUGMENTATION_VERSION)
    if precision != "fp32":  # FP32 keys stay what they were before precisions existed
        parts.append(QUANTIZATION if precision == "int8" else precision)
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def feature_runner(
    settings: Settings, storage: Storage, backbone: Backbone, prep: Preprocessing, threads: int
) -> FeatureRunner:
    """The frozen backbone as the config runs it: INT8 (the store's quantised graph), ONNX Runtime
    (FP32) or eager torch."""
    if settings.model.precision == "int8":
        return int8_runner(storage, backbone, prep, threads)
    if settings.model.feature_runtime == "onnxruntime":
        return onnx_runner(backbone, prep.image_size, threads)
    return torch_runner(backbone)


def view_rng(sha256: str, view: int) -> np.random.Generator:
    return np.random.default_rng([int(sha256, 16), view])


def image_views(
    image: Image.Image, sha256: str, views: int, kinds: Sequence[str], prep: Preprocessing
) -> list[np.ndarray]:
    """Model inputs: view 0 is the image itself, views 1..V-1 are seeded augmentations of it."""
    augmented = [augmented_array(image, view_rng(sha256, view), kinds, prep) for view in range(1, views)]
    return [to_array(image, prep), *augmented]


def extract(
    backbone: Backbone,
    images: Sequence[Image.Image],
    prep: Preprocessing,
    batch_size: int,
    runner: FeatureRunner | None = None,
) -> np.ndarray:
    """Pooled features (N, D) float32 of RGB images, preprocessed by ``prep``."""
    batches = (
        batch_arrays(images[start : start + batch_size], prep) for start in range(0, len(images), batch_size)
    )
    return embed(backbone, batches, len(images), runner or torch_runner(backbone))


def embed(backbone: Backbone, batches: Iterable[np.ndarray], count: int, runner: FeatureRunner) -> np.ndarray:
    """Pooled features (count, D) float32 of batches of model inputs (B, 3, size, size)."""
    if backbone.module.training:
        raise ValueError(f"backbone {backbone.name} is in training mode; features need eval mode")
    out = np.zeros((count, backbone.dim), dtype=np.float32)
    start = 0
    for batch in batches:
        out[start : start + len(batch)] = runner(batch)
        start += len(batch)
    return out


def day_string(value: object) -> str:
    """A catalog ``day`` value (ISO string, date or timestamp) as YYYY-MM-DD."""
    if isinstance(value, dt.datetime):  # pandas Timestamps included
        return value.date().isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    return dt.date.fromisoformat(str(value)).isoformat()


class FeatureCache:
    """Cached backbone features per (cache_id, image sha256), sharded by catalog day."""

    def __init__(
        self,
        storage: Storage,
        backbone: Backbone,
        prep: Preprocessing,
        views: int,
        augmentations: Sequence[str],
        batch_size: int = 32,
        runner: FeatureRunner | None = None,
        call_size: int | None = None,
        progress_every: int = 0,
        workers: int = 1,
        precision: str = "fp32",  # what ``runner`` computes in; names the cache
    ) -> None:
        if views < 1:
            raise ValueError(f"views must be at least 1, got {views}")
        if views > 1 and not augmentations:
            raise ValueError(f"{views} views need at least one augmentation kind (or use views=1)")
        self.storage = storage
        self.backbone = backbone
        self.prep = prep
        self.views = views
        self.augmentations = tuple(augmentations)
        self.batch_size = batch_size  # images a worker reads, decodes and embeds as one chunk
        # model inputs (views) per backbone call, by default as many as a chunk has images. One FP32
        # input's activations stay in the core's cache where 16 spill it; the features are the same.
        self.call_size = max(1, call_size or batch_size)
        self.runner = runner or torch_runner(backbone)
        self.progress_every = progress_every  # a log line every this many images computed (0: none)
        self.workers = max(1, workers)  # chunks computed at once
        self.id = cache_id(backbone, prep, views, self.augmentations, precision)

    def shard_key(self, day: str) -> str:
        return feature_shard_key(self.id, day)

    def features_for(self, rows: pd.DataFrame) -> tuple[np.ndarray, CacheStats]:
        """Features (N, V, D) float32 in the order of ``rows``; computes and stores the missing ones."""
        missing_columns = [c for c in REQUIRED_COLUMNS if c not in rows.columns]
        if missing_columns:
            raise ValueError(f"rows lack the columns {missing_columns}")
        shas = np.asarray(rows["sha256"], dtype=str)
        keys = np.asarray(rows["curated_key"], dtype=str)
        days = np.array([day_string(value) for value in rows["day"]], dtype=str)
        shards = {day: self._load(day) for day in sorted(set(days))}

        gains: dict[str, list[str]] = {}  # day -> its sha256s missing from its shard
        missing: dict[str, str] = {}  # sha256 -> curated_key
        for day, shard in shards.items():
            mask = days == day
            _, found = shard.positions(shas[mask])
            gains[day] = sorted(set(shas[mask][~found]))
            missing.update(zip(shas[mask][~found], keys[mask][~found], strict=True))

        started = time.perf_counter()
        computed = self._compute(missing)
        seconds = time.perf_counter() - started if missing else 0.0
        for day, gained in gains.items():
            if gained:
                shards[day] = self._merge(shards[day], gained, computed)
                self._save(day, shards[day])

        out = np.empty((len(rows), self.views, self.backbone.dim), dtype=np.float32)
        for day, shard in shards.items():
            mask = days == day
            index, _ = shard.positions(shas[mask])
            out[mask] = shard.features[index]
        stats = CacheStats(hits=len(set(shas)) - len(missing), misses=len(missing), seconds_computing=seconds)
        log.info("feature cache %s: %s", self.id, stats)
        return out, stats

    def _compute(self, keys: dict[str, str]) -> dict[str, np.ndarray]:
        """Features (V, D) float16 for each sha256, reading images from their curated keys."""
        computed: dict[str, np.ndarray] = {}
        items = list(keys.items())
        chunks = [items[start : start + self.batch_size] for start in range(0, len(items), self.batch_size)]
        workers = min(self.workers, len(chunks)) or 1
        with (
            Progress("feature extraction", len(items), self.progress_every, logger=log) as progress,
            ThreadPoolExecutor(workers, thread_name_prefix="features") as pool,
        ):
            for chunk, features in zip(chunks, pool.map(self._embed, chunks), strict=True):
                computed.update((sha, feature) for (sha, _), feature in zip(chunk, features, strict=True))
                progress.advance(len(chunk))
        return computed

    def _embed(self, chunk: list[tuple[str, str]]) -> np.ndarray:
        """Features (len(chunk), V, D) float16 of (sha256, curated key) pairs: read, decode, view, embed."""
        arrays: list[np.ndarray] = []
        for sha, key in chunk:
            image = decode_rgb(self.storage.read_bytes(key), self.prep)
            arrays += image_views(image, sha, self.views, self.augmentations, self.prep)
        size = self.call_size
        batches = (np.stack(arrays[start : start + size]) for start in range(0, len(arrays), size))
        features = embed(self.backbone, batches, len(arrays), self.runner)
        return features.reshape(len(chunk), self.views, self.backbone.dim).astype(np.float16)

    def _merge(self, shard: _Shard, gained: list[str], computed: dict[str, np.ndarray]) -> _Shard:
        sha256 = np.concatenate([shard.sha256, np.array(gained)])
        features = np.concatenate([shard.features, np.stack([computed[sha] for sha in gained])])
        order = np.argsort(sha256, kind="stable")
        return _Shard(sha256[order], features[order])

    def _load(self, day: str) -> _Shard:
        key = self.shard_key(day)
        if not self.storage.exists(key):
            empty = np.zeros((0, self.views, self.backbone.dim), dtype=np.float16)
            return _Shard(np.array([], dtype="<U64"), empty)
        with np.load(io.BytesIO(self.storage.read_bytes(key)), allow_pickle=False) as data:
            shard = _Shard(data["sha256"], data["features"])
        expected = (len(shard.sha256), self.views, self.backbone.dim)
        if shard.features.shape != expected:
            raise ValueError(f"feature shard {self.storage.url(key)} has shape {shard.features.shape}")
        return shard

    def _save(self, day: str, shard: _Shard) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, sha256=shard.sha256.astype(str), features=shard.features.astype(np.float16))
        self.storage.write_bytes(self.shard_key(day), buffer.getvalue())


def feature_cache(
    settings: Settings, storage: Storage, backbone: Backbone, prep: Preprocessing
) -> FeatureCache:
    """The feature cache the config asks for: the clean view plus augmented views when augmenting."""
    kinds = list(settings.preprocessing.augmentation)
    views = settings.training.augmented_views + 1 if kinds else 1
    runner = feature_runner(settings, storage, backbone, prep, settings.model.feature_threads)
    return FeatureCache(
        storage,
        backbone,
        prep,
        views,
        kinds,
        batch_size=16,
        runner=runner,
        call_size=settings.model.feature_batch,
        progress_every=settings.progress_every,
        workers=resolve_workers(settings.model.feature_workers),
        precision=settings.model.precision,
    )
