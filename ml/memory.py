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
import sys
import threading
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


class Deferred(ModuleType):
    """Stands in for a module not run yet: the first use of an attribute the stand-in lacks imports the
    module (as usual, once, under the import system's locks) and every such use reads it from there."""

    def __getattr__(self, attribute: str) -> Any:
        # The import system reads __path__ as it makes the stand-in (and before a submodule import,
        # which through a stand-in would run the submodule twice): it stays missing.
        if attribute == "__path__":
            raise AttributeError(f"{self.__name__} is deferred: import it before its submodules")
        return getattr(_import_deferred(self), attribute)


_swapping = threading.Lock()


def _take_out(stand_in: Deferred) -> None:
    """``stand_in`` out of ``sys.modules`` if still there (never a real module put there meanwhile)."""
    with _swapping:
        if sys.modules.get(stand_in.__name__) is stand_in:
            del sys.modules[stand_in.__name__]


def _import_deferred(stand_in: Deferred) -> ModuleType:
    _take_out(stand_in)
    return importlib.import_module(stand_in.__name__)


class _StandInLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return Deferred(spec.name)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the stand-in imports the module on first use."""


class _DeferringFinder(importlib.abc.MetaPathFinder):
    """For a first import of one of ``names`` that the other finders can find: a stand-in."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = set(names)
        self.deferred: list[str] = []

    def find_spec(
        self, name: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name not in self.names:
            return None
        self.names.discard(name)  # the stand-in's own import of it, and any later one, is the real one
        if not any(self._others_find(name, path, target)):
            return None  # not installed: the import raises ImportError as it would have
        self.deferred.append(name)
        return importlib.machinery.ModuleSpec(name, _StandInLoader())

    def _others_find(self, name: str, path: Any, target: Any) -> Iterator[bool]:
        for finder in list(sys.meta_path):
            find_spec = getattr(finder, "find_spec", None)
            if not isinstance(finder, _DeferringFinder) and find_spec is not None:
                yield find_spec(name, path, target) is not None

    def remove_stand_ins(self) -> None:
        """Out of ``sys.modules`` and their parent packages: a later import there is the real one."""
        for name in self.deferred:
            stand_in = sys.modules.get(name)
            if isinstance(stand_in, Deferred):
                _take_out(stand_in)
                parent, _, child = name.rpartition(".")
                package = sys.modules.get(parent) if parent else None
                if package is not None and vars(package).get(child) is stand_in:  # not its __getattr__
                    delattr(package, child)


@contextlib.contextmanager
def deferred_imports(names: Iterable[str]) -> Iterator[None]:
    """Inside the block, a first import of one of ``names`` binds a stand-in (``Deferred``) and runs
    nothing; the first use of one of the stand-in's attributes imports the module.

    For a library that imports, at its own import, modules that only some of its features use: its
    references keep the stand-ins, which forward every attribute they lack to the real module. After
    the block the stand-ins are out of ``sys.modules``, so any later import is the usual one. Already
    imported modules are as usual; one not installed raises ImportError at its import, as before.
    Limits: inside the block a submodule of a stand-in cannot be imported (ImportError), and
    ``importlib.util.find_spec`` of a listed name ends its deferral; a module that fails to run fails
    at each first use, not at the import. The finder is process-wide while the block runs: import in
    it from one thread, and use the stand-ins from one thread or after the block.
    """
    finder = _DeferringFinder(names)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(finder)
        finder.remove_stand_ins()


def import_long_lived(name: str, defer: Iterable[str] = ()) -> ModuleType:
    """Import ``name`` (its imports of ``defer`` deferred to their first use: ``deferred_imports``); on its
    first import in this process, move every object alive then to the oldest generation, where only full
    collections walk it (``gc.freeze`` then ``gc.unfreeze``).

    A big library's classes, functions and caches live as long as the process. Great Expectations makes
    ~360,000 tracked objects (~470,000 with altair and scipy.stats run); imported in a day run with the
    collector paused, they were all still in the youngest generation at its end, and the first collection
    after it walked them: 0.19-0.20 s at the end of each 10,000-image day, 0.03 s with them moved. The
    day's objects alive at that import move too: any cycle among them is freed by the next full
    collection instead of the first one after the day. Where something froze objects before (a worker
    freezes what its fork inherited, so collections never write to those pages), nothing moves: an
    unfreeze would release them too.
    """
    first = name not in sys.modules
    with deferred_imports(defer):
        module = importlib.import_module(name)
    if first and gc.get_freeze_count() == 0:
        gc.freeze()
        gc.unfreeze()
    return module
