"""``ml.memory``: calls into glibc, and what they give where a function is missing."""

from __future__ import annotations

import gc
import importlib
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ml.config import REPO_ROOT
from ml.memory import Deferred, collector_paused, deferred_imports, glibc_call, libc

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

FROZEN_BEFORE = """
import gc, json, sys
from ml.memory import import_long_lived
assert "xml.dom.minidom" not in sys.modules
gc.freeze()  # as an inspection worker does with what its fork inherited
before = gc.get_freeze_count()
import_long_lived("xml.dom.minidom")  # a first import
print(json.dumps([before, gc.get_freeze_count()]))
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
    moves what is alive (GE's ~360,000 objects) to the oldest generation, so the collection after the day
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


def probe_module(folder: Path, name: str, body: str = "VALUE = 42\n") -> Path:
    """A module ``name`` in ``folder`` that adds a line to ``runs.log`` each time it runs; that file."""
    log = folder / "runs.log"
    path = folder / (name.replace(".", "/") + ".py")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"with open({str(log)!r}, 'a') as log:\n    log.write({name!r} + '\\n')\n{body}")
    return log


def runs(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


@pytest.fixture
def probes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh name prefix for probe modules in ``tmp_path``; their modules gone afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    prefix = f"probe_{uuid.uuid4().hex}"
    yield prefix
    for name in [name for name in sys.modules if name.startswith(prefix)]:
        del sys.modules[name]


def test_a_deferred_module_runs_at_the_first_use_of_its_binding_and_others_at_once(
    tmp_path: Path, probes: str
) -> None:
    deferred, later, unlisted, inside = (f"{probes}_{n}" for n in ("deferred", "later", "unlisted", "inside"))
    log = [probe_module(tmp_path, name) for name in (deferred, later, unlisted, inside)][0]
    with deferred_imports([deferred, later, inside]):
        binding = importlib.import_module(deferred)
        importlib.import_module(unlisted)
        assert importlib.import_module(inside).VALUE == 42  # used inside the block: run then
    assert runs(log) == [unlisted, inside]  # the listed one bound, not run; the other run at its import
    assert not isinstance(sys.modules[inside], Deferred)
    del sys.modules[inside]
    assert isinstance(binding, Deferred) and deferred not in sys.modules  # the stand-in is out
    assert binding.VALUE == 42 and runs(log) == [unlisted, inside, deferred]  # its first use runs it
    assert binding.VALUE == 42 and runs(log) == [unlisted, inside, deferred]  # once
    module = sys.modules[deferred]
    assert not isinstance(module, Deferred) and importlib.import_module(deferred) is module
    importlib.import_module(later)
    assert runs(log) == [unlisted, inside, deferred, later]  # imported after the block: at once
    assert not any(hasattr(finder, "deferred") for finder in sys.meta_path)  # the finder is gone


def test_a_deferred_package_whose_submodule_is_imported_first_runs_each_module_once(
    tmp_path: Path, probes: str
) -> None:
    """The first use after the block is an import of a submodule the package imports itself (a
    lazily run package in ``sys.modules`` would run that submodule a second time here)."""
    package = f"{probes}_package"
    log = probe_module(tmp_path, f"{package}.__init__", f"from {package} import sub\n")
    probe_module(tmp_path, f"{package}.sub")
    with deferred_imports([package]):
        binding = importlib.import_module(package)
    assert runs(log) == []
    sub = importlib.import_module(f"{package}.sub")
    assert runs(log) == [f"{package}.__init__", f"{package}.sub"]
    assert binding.sub is sub is sys.modules[f"{package}.sub"] and sub.VALUE == 42


def test_a_deferred_name_that_is_not_installed_raises_at_its_import_and_a_failed_block_cleans_up(
    tmp_path: Path, probes: str
) -> None:
    present = f"{probes}_present"
    probe_module(tmp_path, present)
    with pytest.raises(ModuleNotFoundError), deferred_imports([f"{probes}_missing", present]):
        binding = importlib.import_module(present)
        importlib.import_module(f"{probes}_missing")
    assert present not in sys.modules  # the stand-in is out although the block failed
    assert not any(hasattr(finder, "deferred") for finder in sys.meta_path)
    assert binding.VALUE == 42


def test_a_deferred_submodule_leaves_its_package_as_it_was_after_the_block(
    tmp_path: Path, probes: str
) -> None:
    package = f"{probes}_plain"
    log = probe_module(tmp_path, f"{package}.__init__", "")
    probe_module(tmp_path, f"{package}.sub")
    parent = importlib.import_module(package)
    with deferred_imports([f"{package}.sub"]):
        binding = importlib.import_module(f"{package}.sub")
        assert vars(parent)["sub"] is binding  # bound on its package, as an import does
    assert "sub" not in vars(parent) and f"{package}.sub" not in sys.modules
    assert runs(log) == [f"{package}.__init__"]
    assert binding.VALUE == 42 and runs(log) == [f"{package}.__init__", f"{package}.sub"]
    assert parent.sub is sys.modules[f"{package}.sub"] and not isinstance(parent.sub, Deferred)


def test_two_threads_first_using_a_stand_in_at_once_run_the_module_once(tmp_path: Path, probes: str) -> None:
    """The module is still running for the first thread when the second uses the stand-in: the second
    waits for it (the import system's module lock) instead of taking it out and running it again."""
    gate, slow = f"{probes}_gate", f"{probes}_slow"
    (tmp_path / f"{gate}.py").write_text(
        "import threading\nstarted, release = threading.Event(), threading.Event()\n"
    )
    events = importlib.import_module(gate)
    log = probe_module(
        tmp_path, slow, f"from {gate} import started, release\nstarted.set()\nrelease.wait(10)\nVALUE = 42\n"
    )
    with deferred_imports([slow]):
        binding = importlib.import_module(slow)
    values: list[int] = []
    first = threading.Thread(target=lambda: values.append(binding.VALUE))
    first.start()
    assert events.started.wait(10)  # the first thread is running the module now
    second = threading.Thread(target=lambda: values.append(binding.VALUE))
    second.start()
    second.join(0.3)
    events.release.set()
    first.join(10)
    second.join(10)
    assert values == [42, 42] and runs(log) == [slow]


def test_an_inner_block_listing_the_same_name_leaves_the_outer_block_deferring_it(
    tmp_path: Path, probes: str
) -> None:
    name = f"{probes}_nested"
    log = probe_module(tmp_path, name)
    with deferred_imports([name]):
        with deferred_imports([name]):
            assert isinstance(importlib.import_module(name), Deferred)
        assert isinstance(importlib.import_module(name), Deferred)  # still deferred by the outer block
    assert runs(log) == [] and name not in sys.modules


def test_a_first_import_leaves_what_something_froze_before_frozen() -> None:
    """A worker froze its inherited objects: a long-lived import in it must not unfreeze them."""
    done = subprocess.run(
        [sys.executable, "-c", FROZEN_BEFORE], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    before, after = json.loads(done.stdout)
    assert before > 1000
    assert after == before


def test_a_stand_in_taken_out_in_one_thread_never_removes_the_module_another_thread_imported() -> None:
    """Thread A has found its stand-in in ``sys.modules`` and is about to remove it; thread B takes it
    out and imports the real module meanwhile. A must then remove nothing (``ml.memory._swapping``)."""
    from ml import memory

    name = f"mlops_swap_probe_{uuid.uuid4().hex}"
    a_checked, b_done = threading.Event(), threading.Event()

    class SlowToName(Deferred):
        """Its second name lookup in thread A (the removal, after the check) waits for thread B."""

        lookups = 0

        @property  # type: ignore[override]
        def __name__(self) -> str:
            if threading.current_thread().name == "A":
                SlowToName.lookups += 1
                if SlowToName.lookups == 2:
                    a_checked.set()
                    b_done.wait(1)  # with the lock held, B cannot finish: A goes on after 1 s
            return name

    stand_in, real = SlowToName(name), type(sys)(name)
    sys.modules[name] = stand_in
    try:
        thread_a = threading.Thread(target=memory._take_out, args=(stand_in,), name="A")
        thread_a.start()
        assert a_checked.wait(5)
        memory._take_out(stand_in)  # B: as ``_import_deferred`` does, then the import binds the real one
        sys.modules.setdefault(name, real)
        b_done.set()
        thread_a.join(5)
        assert sys.modules.get(name) is real
    finally:
        sys.modules.pop(name, None)
