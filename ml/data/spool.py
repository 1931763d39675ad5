"""A local spool for one day's landed objects: each is streamed to its own file, none held in memory.

Ingestion downloads every object it will read into a private folder on local disk (1 MiB at a
time), inspects the files, writes the curated bytes next to them and publishes from there, so
its memory does not grow with the number or size of the day's objects. The folder is removed
when the run ends; a run that was killed leaves it behind, and the next run on this host removes
every spool whose process is gone.

From a local store a spool file is a hard link to the landed object (no bytes copied), so spool
files are only ever read; the worker that inspects a linked file writes the curated copy itself,
from the bytes it checked, so that a published object never shares a file with a landed one.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ml.storage import LocalStorage, Storage, UnreadableObject, io_map

SPOOL_PREFIX = "mlops-ingest-"
FETCH_THREADS = 16


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_pid(folder: Path, host: str) -> int | None:
    """The pid in a spool's name ``mlops-ingest-<host>-<pid>-<random>``, if this host made it."""
    rest = folder.name.removeprefix(f"{SPOOL_PREFIX}{host}-")
    if rest == folder.name:
        return None
    pid = rest.split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def reap_stale_spools(parent: Path) -> list[Path]:
    """Remove the spools under ``parent`` left by killed runs on this host; return them."""
    host = socket.gethostname()
    removed = []
    for folder in parent.glob(f"{SPOOL_PREFIX}*"):
        pid = _owner_pid(folder, host)
        if folder.is_dir() and pid is not None and not _process_alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def read_unsafe_key(storage: Storage, key: str) -> bytes | None:
    """The bytes of a listed object whose key is not a safe path (None where storage cannot read it)."""
    reader = getattr(storage, "read_unchecked", None)
    if reader is not None:
        return reader(key)
    if isinstance(storage, LocalStorage):
        path = storage.root.joinpath(*key.split("/"))
        if path.resolve().is_relative_to(storage.root) and path.is_file():
            return path.read_bytes()
    return None


class Spool:
    """A private folder for one run: ``landed/`` (downloads, by number) and ``curated/``."""

    def __init__(self, parent: Path | None = None) -> None:
        parent = parent or Path(tempfile.gettempdir())
        parent.mkdir(parents=True, exist_ok=True)
        reap_stale_spools(parent)
        prefix = f"{SPOOL_PREFIX}{socket.gethostname()}-{os.getpid()}-"
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        self.landed = self.path / "landed"
        self.curated = self.path / "curated"
        self.landed.mkdir()
        self.curated.mkdir()
        self._count = 0

    def new_file(self) -> Path:
        """A fresh file name under ``landed/`` (numbers, never the landed key)."""
        self._count += 1
        return self.landed / f"{self._count:07d}"

    def fetch(
        self,
        storage: Storage,
        keys: Iterable[str],
        ready: Callable[[str, Path], None] | None = None,
        unreadable: Callable[[str, UnreadableObject], None] | None = None,
    ) -> dict[str, Path]:
        """Stream each object to its own spool file (threads; a hard link from a local store); returns
        key -> file. ``ready(key, file)`` is called for each in order, in this thread, as soon as it
        and those before it are down. With ``unreadable``, an object storage will not give (access
        denied, archived) is told to it and left out; without, it fails the fetch."""
        targets = {key: self.new_file() for key in keys}

        def download(item: tuple[str, Path]) -> UnreadableObject | None:
            try:
                storage.download(*item, link=True)
            except UnreadableObject as exc:
                if unreadable is None:
                    raise
                item[1].unlink(missing_ok=True)
                return exc
            return None

        failures = io_map(storage, download, targets.items(), FETCH_THREADS)
        for key, failure in zip(list(targets), failures, strict=True):  # as each is down, in order
            if failure is not None and unreadable is not None:
                unreadable(key, failure)
                del targets[key]
            elif ready is not None:
                ready(key, targets[key])
        return targets

    def keep(self, data: bytes) -> Path:
        path = self.new_file()
        path.write_bytes(data)
        return path

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
