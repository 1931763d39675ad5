"""The Great Expectations runner: one Data Docs site, built once, nothing left in the temporary folder."""

from __future__ import annotations

import datetime as dt
import tempfile
from pathlib import Path

import pandas as pd
import pytest

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
