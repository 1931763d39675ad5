"""Process-wide memory settings: glibc's for the processes that decode images in a loop, Python's
cyclic garbage collector for a batch job's burst of long-lived objects, and a big library's import."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import Any

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit


@functools.cache
def libc() -> ctypes.CDLL | None:
    """This process's C library, or None where ``libc.so.6`` cannot be loaded."""
    with contextlib.suppress(OSError):
        return ctypes.CDLL("libc.so.6", use_errno=True)
    return None


def glibc_call(name: str, *args: int) -> int | None:
    """``name(*args)`` from glibc: its return value, or None where there is no such C function."""
    function = getattr(libc(), name, None)
    return None if function is None else int(function(*args))


def keep_freed_memory() -> None:
    """Ask glibc to keep the memory this process frees (blocks up to 32 MB) for its next allocations.

    By default a freed block over 128 KB-32 MB goes back to the kernel, so a loop that decodes one image
    after another (a 500 px decode is ~0.6 MB, its float copies more) faults every page of it in again
    for the next image: ~200-800 page faults per image, measured at 30-40% of an inspection's time on
    this VM. The cost is up to 128 MB kept in the process. Without glibc nothing changes.
    """
    glibc_call("mallopt", M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
    glibc_call("mallopt", M_TRIM_THRESHOLD, 4 * MMAP_THRESHOLD_MAX)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off inside the block, and as it was after it.

    For a batch job whose objects live to its end (a day's ledger, reports and catalog rows, and Great
    Expectations' import): each full collection walks every tracked object, 0.12-0.21 s once GE is
    imported, six times in a 10,000-image day for ~1 s of the parent's CPU, and finds almost nothing
    to free (0-54 objects each). Reference counting still frees everything not in a cycle at once.
    The collector is process-wide: blocks in two threads at once end the pause at the first one's end.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class _DeferringFinder(importlib.abc.MetaPathFinder):
    """Finds ``names`` as the finders after it do, with a loader that runs them on first use."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(names)

    def find_spec(
        self, name: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name not in self.names:
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            if finder is self or find_spec is None:
                continue
            spec = find_spec(name, path, target)
            if spec is None:
                continue
            if isinstance(spec.loader, importlib.machinery.SourceFileLoader):  # not C extensions
                spec.loader = importlib.util.LazyLoader(spec.loader)
            return spec
        return None


@contextlib.contextmanager
def deferred_imports(names: Iterable[str]) -> Iterator[None]:
    """Inside the block, a first import of one of ``names`` (Python source modules) binds the module
    without running it; it runs on the first use of one of its attributes (``importlib.util.LazyLoader``).

    For a library that imports, at its own import, modules that only some of its features use. Already
    imported modules, and imports after the block, are as usual. A deferred module is then the same
    object to everyone who imports it; on this Python (3.11) its first use must not race another
    thread's (LazyLoader took a lock only in 3.12).
    """
    finder = _DeferringFinder(names)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


def import_long_lived(name: str, defer: Iterable[str] = ()) -> ModuleType:
    """Import ``name`` (its imports of ``defer`` deferred to their first use: ``deferred_imports``); on its
    first import in this process, move every object alive then to the oldest generation, where only full
    collections walk it (``gc.freeze`` then ``gc.unfreeze``).

    A big library's classes, functions and caches live as long as the process. Great Expectations makes
    ~488,000 tracked objects; imported in a day run with the collector paused, they were all still in
    the youngest generation at its end, and the first collection after it walked them: 0.19-0.20 s at the
    end of each 10,000-image day, 0.03 s with them moved. The day's objects alive at that import move too:
    any cycle among them is freed by the next full collection instead of the first one after the day.
    Objects something froze before (a parent before a fork) go back to the oldest generation as well.
    """
    first = name not in sys.modules
    with deferred_imports(defer):
        module = importlib.import_module(name)
    if first:
        gc.freeze()
        gc.unfreeze()
    return module
