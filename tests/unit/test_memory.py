"""``ml.memory``: calls into glibc, and what they give where a function is missing."""

from __future__ import annotations

import gc
import importlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ml.config import REPO_ROOT
from ml.memory import collector_paused, deferred_imports, glibc_call, libc

FIRST_IMPORT = """
import datetime as dt, gc, json, sys, weakref
gc.disable()  # as in a day: the collector paused (ml.memory.collector_paused)
from ml.data.quality import QualityRunner
loaded_before = "great_expectations" in sys.modules
class Day:
    pass
day = Day()
day.itself = day  # a cycle alive at the import, as a day's objects are
alive = weakref.ref(day)
QualityRunner("first", dt.datetime(2026, 1, 1, tzinfo=dt.UTC)).close()
oldest, young = len(gc.get_objects(generation=2)), len(gc.get_objects(generation=0))
frozen = gc.get_freeze_count()
del day  # garbage now: the next full collection must free it
later = [[] for _ in range(1000)]  # made after the first import: the second one must leave it young
QualityRunner("second", dt.datetime(2026, 1, 2, tzinfo=dt.UTC)).close()
later_young = any(item is later for item in gc.get_objects(generation=0))
gc.collect()
print(json.dumps([loaded_before, oldest, young, frozen, later_young, alive() is None]))
"""


def test_glibc_call_returns_what_the_c_function_returns() -> None:
    assert libc() is not None  # this machine kind runs glibc
    assert glibc_call("getpid") == os.getpid()
    assert glibc_call("abs", -7) == 7


def test_glibc_call_of_a_function_the_library_lacks_gives_none() -> None:
    assert glibc_call("no_such_function_in_glibc") is None


def test_collector_paused_turns_collection_off_inside_and_leaves_it_as_it_was() -> None:
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
        with collector_paused():  # nested: the inner block's end does not turn it back on
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("a failed step")
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()  # off before, so off after
    finally:
        gc.enable()


def test_great_expectations_first_import_moves_to_the_oldest_generation() -> None:
    """A fresh interpreter, its collector paused as in a day: the first ``QualityRunner`` imports GE and
    moves what is alive (GE's ~488,000 objects) to the oldest generation, so the collection after the day
    walks only what the day made since; nothing stays frozen (a cycle alive then is still freed by a full
    collection), and a second runner moves nothing."""
    done = subprocess.run(
        [sys.executable, "-c", FIRST_IMPORT], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    loaded_before, oldest, young, frozen, later_young, freed = json.loads(done.stdout.splitlines()[-1])
    assert not loaded_before  # importing ml.data.quality does not import GE
    assert oldest > 200_000  # GE's modules, classes and functions
    assert young < oldest / 20  # left to young collections: what the runner made after the import
    assert frozen == 0 and freed
    assert later_young


def probe_module(folder: Path, name: str) -> Path:
    """A module ``name`` in ``folder`` that leaves a file ``name.ran`` when it runs; the file's path."""
    ran = folder / f"{name}.ran"
    (folder / f"{name}.py").write_text(f"from pathlib import Path\nPath({str(ran)!r}).touch()\nVALUE = 42\n")
    return ran


def test_deferred_imports_run_a_listed_module_on_first_use_and_others_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    deferred, listed_later, unlisted = (f"probe_{uuid.uuid4().hex}" for _ in range(3))
    ran = {name: probe_module(tmp_path, name) for name in (deferred, listed_later, unlisted)}
    try:
        with deferred_imports([deferred, listed_later]):
            module = importlib.import_module(deferred)
            importlib.import_module(unlisted)
        assert sys.modules[deferred] is module
        assert not ran[deferred].exists()  # bound, not run
        assert ran[unlisted].exists()  # not listed: run at its import
        assert module.VALUE == 42 and ran[deferred].exists()  # the first use runs it
        assert importlib.import_module(deferred).VALUE == 42
        importlib.import_module(listed_later)
        assert ran[listed_later].exists()  # imported after the block: at once
    finally:
        for name in ran:
            sys.modules.pop(name, None)
    assert not any(hasattr(finder, "names") for finder in sys.meta_path)  # the finder is gone
