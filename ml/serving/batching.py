"""Adaptive batching: concurrent requests share one model call, sized to the latency budget."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ml.serving.bundle import Outputs

log = logging.getLogger(__name__)


class AdaptiveBatcher:
    """Groups concurrent requests into one model call, sized to keep a call under ``max_latency_ms``.

    An idle model takes whatever is queued at once (a lone request never waits for company);
    while it runs, new requests queue and the next call takes them together. The batch size is
    capped by ``max_batch_size`` and by how many images the measured per-image time allows in
    ``max_latency_ms``, so batching raises throughput under load without stretching the tail.
    """

    def __init__(
        self,
        run: Callable[[np.ndarray], Outputs],
        max_batch_size: int,
        max_latency_ms: float,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._run = run
        self._on_batch = on_batch  # told the image count of every model call that answered
        self.max_batch_size = max_batch_size
        self.max_latency_s = max_latency_ms / 1000.0
        self._per_image_s = 0.0  # moving average of one image's share of a call
        self._queue: (
            asyncio.Queue[tuple[np.ndarray, asyncio.Future[tuple[np.ndarray, np.ndarray]]]] | None
        ) = None
        self._worker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

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
            for i, (_, future) in enumerate(items):
                if not future.done():
                    future.set_result((outputs.proba[i], outputs.projected[i]))
            if self._on_batch is not None:
                try:
                    self._on_batch(len(items))
                except Exception:  # a metrics failure must not stop the loop every request waits on
                    log.exception("the batch-size observer failed")

    def idle(self) -> bool:
        return self._queue is None or self._queue.empty()

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
