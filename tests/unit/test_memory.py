"""``ml.memory``: calls into glibc, and what they give where a function is missing."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import pytest

from ml.config import REPO_ROOT
from ml.memory import collector_paused, glibc_call, libc

FIRST_IMPORT = """
import datetime as dt, gc, json, sys
gc.disable()  # as in a day: the collector paused (ml.memory.collector_paused)
from ml.data.quality import QualityRunner
loaded_before = "great_expectations" in sys.modules
QualityRunner("first", dt.datetime(2026, 1, 1, tzinfo=dt.UTC)).close()
frozen, young = gc.get_freeze_count(), len(gc.get_objects(generation=0))
QualityRunner("second", dt.datetime(2026, 1, 2, tzinfo=dt.UTC)).close()
print(json.dumps([loaded_before, frozen, young, gc.get_freeze_count()]))
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


def test_great_expectations_first_import_is_kept_out_of_every_collection() -> None:
    """A fresh interpreter, its collector paused as in a day: the first ``QualityRunner`` imports GE and
    freezes what is alive (GE's ~475,000 objects), so the collection after the day walks only what the
    day made since; a second runner freezes nothing more."""
    done = subprocess.run(
        [sys.executable, "-c", FIRST_IMPORT], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    loaded_before, frozen, young, frozen_after_second = json.loads(done.stdout.splitlines()[-1])
    assert not loaded_before  # importing ml.data.quality does not import GE
    assert frozen > 200_000  # GE's modules, classes and functions
    assert young < frozen / 4  # left for collections: what the runner made after the import
    assert frozen_after_second == frozen
