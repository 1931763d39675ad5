"""``ml.memory``: calls into glibc, and what they give where a function is missing."""

from __future__ import annotations

import gc
import os

import pytest

from ml.memory import collector_paused, glibc_call, libc


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
