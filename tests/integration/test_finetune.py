"""``model.freeze_backbone: false`` fine-tunes the backbone for real: its weights change, the logged
evaluation is the fine-tuned model's (its ONNX export on the test images gives the same accuracy), and
the drift monitor runs a fine-tuned champion on the day's images."""

from __future__ import annotations

import datetime as dt
import tempfile
from pathlib import Path

import numpy as np
import pytest

from ml.config import load_settings
from ml.data.ingest import ingest_day
from ml.demo.landing import land_day, land_days
from ml.storage import LocalStorage
from tests.conftest import world_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]
START = dt.date(2026, 6, 1)


def test_fine_tuning_changes_the_backbone_and_everything_after_sees_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ml import registry
    from ml.data.catalog import dataset_rows, read_partition, split_rows
    from ml.monitoring.drift import measure_day
    from ml.training.model import backbone_from_settings
    from ml.training.pipeline import download_onnx, load_images, retrain
    from ml.training.preprocessing import Preprocessing, batch_arrays

    env = world_env(
        tmp_path,
        model__freeze_backbone=False,
        training__epochs=3,
        training__early_stopping__patience=3,
        training__batch_size=16,
    )
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings(environ=env)
    storage = LocalStorage(tmp_path / "store")
    land_days(storage, START, 3, settings.classes, count=60, seed=11)
    for offset in range(3):
        ingest_day(settings, storage, START + dt.timedelta(days=offset))

    result = retrain(settings, storage)
    assert result.status == "registered", result.gate
    client = registry.client(settings)
    run = client.get_run(result.run_id)
    assert run.data.params["frozen_backbone"] == "False"
    assert run.data.params["fine_tuned_backbone_weights"].startswith("ft-")

    import onnxruntime as ort

    _, rows = dataset_rows(storage)
    test = split_rows(rows, "test")
    prep = Preprocessing.from_settings(settings.preprocessing)
    images = batch_arrays(load_images(storage, list(test["curated_key"])), prep)
    labels = test["label"].map({name: i for i, name in enumerate(settings.classes)}).to_numpy()
    with tempfile.TemporaryDirectory() as folder:
        session = ort.InferenceSession(str(download_onnx(settings, result.model_version, Path(folder))))
        logits, features = session.run(["logits", "features"], {"image": images})
    pretrained = backbone_from_settings(settings)
    import torch

    with torch.inference_mode():
        before = pretrained.module(torch.from_numpy(images)).numpy()
    assert float(np.max(np.abs(features - before))) > 1e-2  # the served backbone is not the pretrained one
    served_accuracy = float((logits.argmax(1) == labels).mean())
    assert served_accuracy == pytest.approx(run.data.metrics["accuracy"], abs=1e-6)

    registry.promote(settings, storage, result.model_version, "test")
    day = START + dt.timedelta(days=5)
    land_day(storage, day, settings.classes, count=40, seed=3)
    ingest_day(settings, storage, day)
    measured = measure_day(settings, storage, day)
    assert measured.model_version == result.model_version
    assert measured.rows_current == len(read_partition(storage, day)) > 30  # the champion ran on the day
