"""bench/ingest.py's cache of generated days: a killed generation leaves nothing behind for long."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

from ml.storage import LocalStorage

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["a", "b", "c"]


def bench_ingest() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_ingest", REPO / "bench" / "ingest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_sigkilled_generation_leaves_no_half_made_day_for_the_next_run(tmp_path: Path) -> None:
    cache = tmp_path / "landed"
    generate = (
        "import sys; sys.path.insert(0, sys.argv[1]); import importlib.util as u; from pathlib import Path;"
        "from ml.storage import LocalStorage;"
        "s = u.spec_from_file_location('b', sys.argv[1] + '/bench/ingest.py'); m = u.module_from_spec(s);"
        "s.loader.exec_module(m);"
        "m.landed_day(LocalStorage(Path(sys.argv[2])), 100000, 64, ['a', 'b', 'c'], Path(sys.argv[3]))"
    )
    child = subprocess.Popen([sys.executable, "-c", generate, str(REPO), str(tmp_path / "s1"), str(cache)])
    try:
        deadline = time.monotonic() + 120
        while not list(cache.glob(".*/landing/*/images/img_00010.jpg")):
            assert child.poll() is None and time.monotonic() < deadline, "the generation did not start"
            time.sleep(0.1)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
        orphaned = list(cache.glob(".*"))
        assert len(orphaned) == 1 and str(child.pid) in orphaned[0].name

        running = cache / f".5x64-00000000-{os.getpid()}-abcdefgh"  # a live run's folder: left alone
        running.mkdir()
        sizes = bench_ingest().landed_day(LocalStorage(tmp_path / "s2"), 5, 64, CLASSES, cache)
    finally:
        child.kill()
        child.wait(30)
    assert len(sizes) == 5
    assert not orphaned[0].exists()
    assert [path.name for path in cache.glob(".*")] == [running.name]
    assert [path.name for path in cache.iterdir() if not path.name.startswith(".")] != []
