"""``model.precision: int8`` end to end: a retrain caches INT8 features under its own key, registers a
bundle whose served graph computes exactly those features, and the service answers from it.

One small world: 80 generated images, the pretrained EfficientNet-Lite0 quantised, 3 epochs,
validation on its quick samples, an acceptance bar of 0.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from ml.config import Settings, load_settings
from ml.layout import quantized_backbone_key
from ml.storage import LocalStorage
from ml.training.quantize import QUANTIZATION, graph_name, precision_name
from tests.conftest import NO_ACCEPTANCE_BAR, world_env

pytestmark = [pytest.mark.integration]
DAY = dt.date(2026, 6, 1)


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Settings, LocalStorage, dict[str, Any]]]:
    from ml.data.ingest import ingest_day
    from ml.demo.landing import land_days
    from ml.training.pipeline import retrain

    root = tmp_path_factory.mktemp("int8")
    env = world_env(
        root,
        model__precision="int8",
        training__epochs=3,
        **NO_ACCEPTANCE_BAR,
    )
    settings = load_settings(environ=env)
    storage = LocalStorage(root / "store")
    land_days(storage, DAY, 1, settings.classes, count=80, seed=4)
    ingest_day(settings, storage, DAY)
    result = retrain(settings, storage).to_dict()
    assert result["model_version"] == "1", result
    yield settings, storage, result


def test_the_retrain_records_int8_and_caches_under_its_own_key(world) -> None:
    from ml import registry
    from ml.training.features import cache_id
    from ml.training.model import backbone_from_settings
    from ml.training.preprocessing import Preprocessing

    settings, storage, result = world
    run = registry.client(settings).get_run(result["run_id"])
    assert run.data.params["precision"] == precision_name("int8") == f"int8/{QUANTIZATION}"
    assert run.data.metrics["onnx_max_abs_diff"] < 1e-5  # served graph vs quantised runner + torch head
    assert "validation/robustness_ratio" in run.data.metrics  # validation ran in the int8 world
    backbone = backbone_from_settings(settings)
    prep = Preprocessing.from_settings(settings.preprocessing)
    kinds = settings.preprocessing.augmentation
    views = settings.training.augmented_views + 1
    int8, fp32 = cache_id(backbone, prep, views, kinds, "int8"), cache_id(backbone, prep, views, kinds)
    shards = {key.split("/")[1] for key in storage.list("features") if key.endswith(".npz")}
    assert shards == {int8} and int8 != fp32
    assert storage.exists(quantized_backbone_key(graph_name(backbone, prep)))  # the one graph they came from


def test_validating_the_int8_version_under_an_fp32_config_is_refused(world) -> None:
    from ml.training.revalidate import validate_version

    settings, storage, _ = world
    fp32 = settings.model_copy(update={"model": settings.model.model_copy(update={"precision": "fp32"})})
    with pytest.raises(ValueError, match="trained in precision int8/"):
        validate_version(fp32, storage, "1")


def test_the_bundle_serves_the_features_its_head_was_trained_on(world, tmp_path: Path) -> None:
    import bentoml

    from ml.data.catalog import dataset_rows, split_rows
    from ml.data.images import ImageLimits
    from ml.release.build import import_model
    from ml.serving.bundle import BUNDLE_ONNX, BundleMeta
    from ml.serving.predictor import Predictor
    from ml.training.features import feature_cache
    from ml.training.model import backbone_from_settings, torch_runner
    from ml.training.preprocessing import Preprocessing, batch_arrays, decode_rgb

    settings, storage, _ = world
    tag = import_model(settings, "1")
    bundle = Path(bentoml.models.get(tag).path)
    graph = onnx.load(str(bundle / BUNDLE_ONNX))
    assert "QuantizeLinear" in {node.op_type for node in graph.graph.node}

    _, rows = dataset_rows(storage)
    test = split_rows(rows, "test").head(8)
    data = [storage.read_bytes(key) for key in test["curated_key"]]
    prep = BundleMeta.read(bundle).preprocessing
    assert prep == Preprocessing.from_settings(settings.preprocessing)
    session = ort.InferenceSession(str(bundle / BUNDLE_ONNX), providers=["CPUExecutionProvider"])
    served = np.concatenate(
        [session.run(["features"], {"image": batch_arrays([decode_rgb(d, prep)], prep)})[0] for d in data]
    )
    backbone = backbone_from_settings(settings)
    cached, stats = feature_cache(settings, storage, backbone, prep).features_for(test)
    assert stats.misses == 0  # the retrain cached them
    # the cache stores float16: served features equal the cached ones to float16 rounding...
    np.testing.assert_allclose(served, cached[:, 0], rtol=2e-3, atol=2e-3)
    # ...which FP32 features, what a bundle without the quantised backbone would serve, are not
    fp32 = torch_runner(backbone)(batch_arrays([decode_rgb(d, prep) for d in data], prep))
    assert np.abs(fp32 - cached[:, 0]).max() > 0.05

    predictor = Predictor(
        lambda _: bundle,
        ImageLimits.from_settings(settings.ingest),
        default_version="1",
        default_tag=tag,
    )
    assert predictor.refresh()
    try:
        answers = asyncio.run(_ask(predictor, data[:2]))
    finally:
        predictor.close()
    from ml.release.check import offline_probabilities

    offline = offline_probabilities(bundle, data[:2])
    for answer, expected in zip(answers, offline, strict=True):
        got = [answer["probabilities"][name] for name in settings.classes]
        np.testing.assert_allclose(got, expected, atol=1e-5)


async def _ask(predictor: Any, data: list[bytes]) -> list[dict[str, Any]]:
    return [await predictor.predict(item) for item in data]
