"""The Great Expectations runner: one Data Docs site, built once, nothing left in the temporary folder."""

from __future__ import annotations

import datetime as dt
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from ml.config import REPO_ROOT
from ml.data.quality import QualityRunner
from ml.storage import LocalStorage

PARAMETERS = {"classes": ["cat", "dog"], "min_valid_share": 0.5}


@pytest.fixture
def temporary_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_docs_are_built_once_into_storage_and_nothing_is_left_in_the_temporary_folder(
    tmp_path: Path, temporary_folder: Path
) -> None:
    storage = LocalStorage(tmp_path / "store")
    frame = pd.DataFrame({"filename": ["a.jpg", "b.jpg", "c.jpg"], "label": ["cat", "dog", "cow"]})
    with QualityRunner("ingest-2026-01-05", dt.datetime(2026, 1, 5, tzinfo=dt.UTC)) as quality:
        outcome = quality.validate("manifest", frame, PARAMETERS)
        url = quality.publish_docs(storage, "reports/data_docs/2026-01-05")
        assert quality.context.get_site_names() == ["local"]
        site = quality.docs_dir
        assert (site / "index.html").is_file()
    assert outcome.success and outcome.row_reasons == {2: ["unknown_label"]}
    assert url.endswith("reports/data_docs/2026-01-05/index.html")
    published = {
        p.relative_to(storage.root / "reports/data_docs/2026-01-05").as_posix()
        for p in (storage.root / "reports/data_docs/2026-01-05").rglob("*")
        if p.is_file()
    }
    assert "index.html" in published and any(p.startswith("validations/") for p in published)
    assert not site.exists()
    assert list(temporary_folder.iterdir()) == []  # GX's default site built no second copy here


DEFERRED_IN_A_FRESH_PROCESS = """
import datetime as dt, json, sys
import pandas as pd
from ml.data.quality import QualityRunner
frame = pd.DataFrame({"filename": ["a.jpg", "b.jpg"], "label": ["cat", "cow"]})
with QualityRunner("fresh", dt.datetime(2026, 1, 5, tzinfo=dt.UTC)) as quality:
    outcome = quality.validate("manifest", frame, {"classes": ["cat", "dog"], "min_valid_share": 0.5})
deferred_and_theirs = ("scipy.stats", "scipy.optimize", "scipy.sparse", "altair")
run = sorted(name for name in sys.modules if name.startswith(deferred_and_theirs))
from great_expectations.expectations.core import expect_column_kl_divergence_to_be_less_than as kl
bindings = [type(kl.stats).__name__, type(kl.alt).__name__]  # GE's own references
entropy = float(kl.stats.entropy([0.5, 0.5], [0.25, 0.75]))  # used: scipy.stats runs now
from scipy.stats import ks_2samp
import scipy.stats.mstats  # its package first, then the submodule: each once
import altair
print(json.dumps([outcome.row_reasons, run, bindings, entropy, ks_2samp([1, 2, 3], [1, 2, 3]).pvalue,
                  kl.alt.Chart is altair.Chart, kl.stats is not sys.modules["scipy.stats"]]))
"""


def test_great_expectations_imports_altair_and_scipy_stats_deferred_and_they_work_when_used() -> None:
    """GE's import (in a fresh interpreter) runs neither altair nor scipy.stats; a suite validates
    without them, and GE's own references to them and later imports of them work as usual."""
    done = subprocess.run(
        [sys.executable, "-c", DEFERRED_IN_A_FRESH_PROCESS],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    reasons, run, bindings, entropy, p_value, same_chart, stand_in = json.loads(done.stdout.splitlines()[-1])
    assert reasons == {"1": ["unknown_label"]}
    assert run == []  # neither they nor what they import (scipy.optimize, scipy.sparse) ran
    assert bindings == ["Deferred", "Deferred"]
    assert entropy == pytest.approx(0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75))
    assert p_value == 1.0 and same_chart and stand_in
