"""Process-wide memory settings: glibc's for the processes that decode images in a loop, and Python's
cyclic garbage collector for a batch job's burst of long-lived objects."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import importlib
import sys
from collections.abc import Iterator
from types import ModuleType

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


def import_long_lived(name: str) -> ModuleType:
    """Import ``name``; on its first import in this process, move every object alive then to the oldest
    generation, where only full collections walk it (``gc.freeze`` then ``gc.unfreeze``).

    A big library's classes, functions and caches live as long as the process. Great Expectations makes
    ~488,000 tracked objects; imported in a day run with the collector paused, they were all still in
    the youngest generation at its end, and the first collection after it walked them: 0.19-0.20 s at the
    end of each 10,000-image day, 0.03 s with them moved. The day's objects alive at that import move too:
    any cycle among them is freed by the next full collection instead of the first one after the day.
    Objects something froze before (a parent before a fork) go back to the oldest generation as well.
    """
    first = name not in sys.modules
    module = importlib.import_module(name)
    if first:
        gc.freeze()
        gc.unfreeze()
    return module
