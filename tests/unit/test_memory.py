"""``ml.memory``: calls into glibc, and what they give where a function is missing."""

from __future__ import annotations

import os

from ml.memory import glibc_call, libc


def test_glibc_call_returns_what_the_c_function_returns() -> None:
    assert libc() is not None  # this machine kind runs glibc
    assert glibc_call("getpid") == os.getpid()
    assert glibc_call("abs", -7) == 7


def test_glibc_call_of_a_function_the_library_lacks_gives_none() -> None:
    assert glibc_call("no_such_function_in_glibc") is None
