"""Images inspected from spool files in worker processes, while ingestion goes on with other work.

Workers get file paths, never bytes, and write the curated bytes to files of their own; only the
small ``ImageReport`` comes back. A decoder that kills its process (a segfault in a codec) costs
that one object, not the day: when the pool breaks, each chunk it had not finished is redone in
a fresh process, and a chunk that crashes again is redone one object at a time, each in its own
process; the object that still crashes is rejected as ``decoder_crashed``.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import signal
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from ml.data.images import ImageLimits, ImageReport, inspect_image
from ml.memory import glibc_call, keep_freed_memory
from ml.progress import Progress

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class FileInspection:
    """One inspected file: the report, and where its curated bytes are (None when rejected): a local
    file, or an object in storage (a shard of a sharded ingest staged them there)."""

    report: ImageReport
    curated_path: Path | None = None
    curated_key: str | None = None


InspectFile = Callable[[Path, ImageLimits, Path], FileInspection]

CHUNK, MAX_CHUNK = 16, 64  # files per task sent to a worker: the fewest and the most ``chunk_for`` gives


def chunk_for(file_count: int, workers: int) -> int:
    """Files per task for a day of ``file_count`` files: ~8 tasks per worker, so none waits long for
    the last one, and no more than ``MAX_CHUNK``, as each task costs the parent a round trip (pickling,
    a wake-up). A chunk that crashes its worker twice is redone one file per process, so a larger
    chunk makes that rare recovery longer."""
    return min(MAX_CHUNK, max(CHUNK, file_count // (8 * max(1, workers))))


class InspectionError(RuntimeError):
    """The inspect function raised in an isolated process (a bug, not a decoder crash)."""


def inspect_file(path: Path, limits: ImageLimits, out_dir: Path) -> FileInspection:
    """Inspect one spooled file; curated bytes go to ``out_dir`` unless they are the landed bytes in a
    file of the spool's own (one not linked to the landed object)."""
    result = inspect_image(path.read_bytes(), limits)
    if result.report.reason or result.curated is None:
        return FileInspection(result.report)
    if result.same_as_source and path.stat().st_nlink == 1:
        return FileInspection(result.report, path)
    target = out_dir / f"{path.name}.{result.report.curated_ext}"
    target.write_bytes(result.curated)
    return FileInspection(result.report, target)


def crashed(path: Path, detail: str) -> FileInspection:
    """The report of a file whose decoder killed the process inspecting it."""
    with path.open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    return FileInspection(ImageReport(digest, path.stat().st_size, "decoder_crashed", detail))


def die_with_parent(parent: int) -> None:
    """Ask the kernel to kill this process when its parent dies, even by SIGKILL (Linux)."""
    glibc_call("prctl", PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def start_worker(parent: int) -> None:
    """A worker's start: it dies with ``parent``, keeps the memory it frees, runs BLAS (the pHash's
    resize) on one thread, as the workers already take one core each, and collects garbage cycles
    (a fork inherits a parent's paused collector: ``ml.memory.collector_paused``)."""
    from threadpoolctl import threadpool_limits

    die_with_parent(parent)
    keep_freed_memory()
    threadpool_limits(1, user_api="blas")
    gc.freeze()  # what the fork inherited is the parent's: collections here never walk (and copy) it
    gc.enable()


def inspect_chunk(inspect: InspectFile, paths: list[Path], limits: ImageLimits, out_dir: Path) -> list[Any]:
    return [inspect(path, limits, out_dir) for path in paths]


def _isolated_child(sender: Any, parent: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    start_worker(parent)
    try:
        sender.send(("ok", fn(*args)))
    except Exception as exc:  # noqa: BLE001 - handed to the parent, which raises it
        sender.send(("error", f"{type(exc).__name__}: {exc}"))
    sender.close()


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def run_isolated(fn: Callable[..., Any], *args: Any) -> tuple[bool, Any, str]:
    """``fn(*args)`` in a fresh forked process: (True, value, "") or (False, None, how it died)."""
    context = get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_isolated_child, args=(sender, os.getpid(), fn, args), daemon=True)
    process.start()
    sender.close()
    try:
        status, value = receiver.recv()
    except EOFError:  # the process died before it could answer
        status, value = "died", None
    finally:
        receiver.close()
        process.join()
    if status == "error":
        raise InspectionError(value)
    if status == "ok" and process.exitcode == 0:
        return True, value, ""
    return False, None, describe_exit(process.exitcode)


class Inspection:
    """Files inspected in worker processes (one per core), in chunks, as they are ``add``-ed.

    The workers are forked when the inspection is created, before the caller starts threads or
    imports Great Expectations; files go to them ``chunk`` at a time while others still download,
    so downloading, the GE import and the manifest suite overlap with decoding.
    """

    def __init__(
        self,
        files: dict[str, Path],
        limits: ImageLimits,
        workers: int,
        out_dir: Path,
        *,
        chunk: int | None = None,
        inspect: InspectFile = inspect_file,
        progress_every: int = 0,
        more_to_come: bool = False,
    ) -> None:
        chunk = chunk or chunk_for(len(files), workers)  # streamed files: the caller knows how many
        self._files: dict[str, Path] = {}
        self._limits, self._out, self._inspect, self._chunk = limits, out_dir, inspect, chunk
        self._progress_every = progress_every  # a log line every this many images inspected (0: none)
        self._futures: list[tuple[list[str], Future[list[Any]]]] = []
        self._pending: list[str] = []
        self._done: dict[str, FileInspection] | None = None
        self._pool: ProcessPoolExecutor | None = None
        if files or more_to_come:
            wanted = workers if more_to_come else -(-len(files) // chunk)
            # fork: workers start in milliseconds and need nothing re-imported; they run pure functions.
            self._pool = ProcessPoolExecutor(
                max_workers=max(1, min(workers, wanted)),
                mp_context=get_context("fork"),
                initializer=start_worker,
                initargs=(os.getpid(),),
            )
            self._pool.submit(int).result()  # a fork pool starts all its workers on its first task
        for name, path in files.items():
            self.add(name, path)
        if not more_to_come:
            self.flush()

    def add(self, name: str, path: Path) -> None:
        """Queue one file; a full chunk goes to the workers at once."""
        if self._pool is None:
            raise RuntimeError("an inspection created without files takes none: pass more_to_come=True")
        self._files[name] = path
        self._pending.append(name)
        if len(self._pending) >= self._chunk:
            self.flush()

    def flush(self) -> None:
        """Send the queued files that do not fill a chunk."""
        if self._pending and self._pool is not None:
            part, self._pending = self._pending, []
            paths = [self._files[name] for name in part]
            try:
                future = self._pool.submit(inspect_chunk, self._inspect, paths, self._limits, self._out)
            except BrokenProcessPool as exc:  # a decoder killed a worker: this chunk is redone with the rest
                future = Future()
                future.set_exception(exc)
            self._futures.append((part, future))

    def results(self, names: Iterable[str]) -> dict[str, FileInspection]:
        """Results for ``names`` (waits for the workers; recovers from a broken pool)."""
        if self._done is None:
            self.flush()
            self._done = self._collect()
        return {name: self._done[name] for name in names}

    def _collect(self) -> dict[str, FileInspection]:
        done: dict[str, FileInspection] = {}
        broken: list[list[str]] = []
        with Progress("ingest inspection", len(self._files), self._progress_every, logger=log) as progress:
            for part, future in self._futures:
                try:
                    done.update(zip(part, future.result(), strict=True))
                    progress.advance(len(part))
                except BrokenProcessPool:
                    broken.append(part)
            if broken:
                self.close()
            for part in broken:
                done.update(self._recover(part))
                progress.advance(len(part))
        return done

    def _recover(self, part: list[str]) -> dict[str, FileInspection]:
        """A chunk the broken pool did not finish: again in a fresh process, then one object at a time."""
        paths = [self._files[name] for name in part]
        ok, values, _ = run_isolated(inspect_chunk, self._inspect, paths, self._limits, self._out)
        if ok:
            return dict(zip(part, values, strict=True))
        out = {}
        for name, path in zip(part, paths, strict=True):
            ok, value, how = run_isolated(self._inspect, path, self._limits, self._out)
            out[name] = value if ok else crashed(path, f"the process decoding it {how}")
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def __enter__(self) -> Inspection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def inspect_files(paths: dict[str, Path], limits: ImageLimits, workers: int, out_dir: Path) -> dict[str, Any]:
    """Inspect every file in worker processes; curated bytes go to ``out_dir``."""
    with Inspection(paths, limits, workers, out_dir) as inspection:
        return inspection.results(paths)


def inspect_all(blobs: dict[str, bytes], limits: ImageLimits, workers: int) -> dict[str, FileInspection]:
    """Inspect in-memory images (spooled to a temporary folder first); reports only."""
    with tempfile.TemporaryDirectory(prefix="mlops-inspect-") as folder:
        root = Path(folder)
        paths = {}
        for index, (name, data) in enumerate(blobs.items()):
            paths[name] = root / f"{index:07d}"
            paths[name].write_bytes(data)
        found = inspect_files(paths, limits, workers, root)
        return {name: replace(result, curated_path=None) for name, result in found.items()}
