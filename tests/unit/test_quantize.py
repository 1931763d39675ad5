"""The INT8 backbone: one published graph per store, close to FP32 but not equal, served exactly as
cached, and refused where the CPU computes other features than the one that quantised it."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ml.layout import quantized_backbone_key
from ml.storage import LocalStorage
from ml.training import quantize
from ml.training.model import (
    SERVING_OUTPUTS,
    Backbone,
    Head,
    build_backbone,
    compose_serving_graph,
    torch_runner,
)
from ml.training.preprocessing import Preprocessing, batch_arrays
from ml.training.quantize import (
    FINGERPRINT,
    QuantizationError,
    calibration_images,
    graph_name,
    int8_parity,
    int8_runner,
    published_backbone,
)

PREP = Preprocessing(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.fixture(scope="module")
def lite0() -> Backbone:
    return build_backbone("efficientnet_lite0", pretrained=True)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, lite0: Backbone) -> LocalStorage:
    """A store whose quantised backbone is published (quantised once for the module)."""
    storage = LocalStorage(tmp_path_factory.mktemp("store"))
    published_backbone(storage, lite0, PREP)
    return storage


@pytest.fixture(scope="module")
def probe() -> np.ndarray:
    return batch_arrays(calibration_images(6, seed=7), PREP)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_int8_features_are_close_to_fp32_but_not_the_same_features(
    lite0: Backbone, store: LocalStorage, probe: np.ndarray
) -> None:
    int8 = int8_runner(store, lite0, PREP)(probe)
    fp32 = torch_runner(lite0)(probe)
    assert cosine(int8, fp32).min() > 0.95
    assert np.abs(int8 - fp32).max() > 1e-2  # other features: the cache key must tell them apart
    graph = onnx.load_from_string(store.read_bytes(quantized_backbone_key(graph_name(lite0, PREP))))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in graph.graph.node}


def test_the_published_graph_is_reused_and_quantising_again_gives_the_same_features(
    lite0: Backbone, store: LocalStorage, probe: np.ndarray, tmp_path: Path
) -> None:
    key = quantized_backbone_key(graph_name(lite0, PREP))
    published = store.read_bytes(key)
    first = int8_runner(store, lite0, PREP)(probe)
    assert store.read_bytes(key) == published  # found, not made again
    other = LocalStorage(tmp_path)  # a second store quantises on its own (on this machine)
    assert np.array_equal(int8_runner(other, lite0, PREP)(probe), first)


def test_the_served_graph_answers_with_the_features_the_head_was_trained_on(
    lite0: Backbone, store: LocalStorage, probe: np.ndarray, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    head = Head(lite0.dim, 5)
    path = tmp_path / "model.onnx"
    compose_serving_graph(published_backbone(store, lite0, PREP), head, lite0.dim, path)
    runner = int8_runner(store, lite0, PREP)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert tuple(output.name for output in session.get_outputs()) == SERVING_OUTPUTS
    logits, features = session.run(None, {"image": probe[:1]})  # one image, as a request is served
    assert np.array_equal(features, runner(probe)[:1])  # batched in the cache, alone when served
    with torch.inference_mode():
        expected = head.eval()(torch.from_numpy(features)).numpy()
    assert np.abs(logits - expected).max() < 1e-5
    assert int8_parity(path, runner, head, probe) < 1e-5


def test_a_cpu_that_computes_other_int8_features_than_the_quantising_one_is_refused(
    lite0: Backbone, store: LocalStorage, tmp_path: Path
) -> None:
    """What a CPU without VNNI (saturating u8 x s8 products) would see: features that differ from the
    fingerprint the graph was published with. Here the fingerprint is moved instead of the CPU."""
    key = quantized_backbone_key(graph_name(lite0, PREP))
    graph = onnx.load_from_string(store.read_bytes(key))
    props = {prop.key: prop.value for prop in graph.metadata_props}
    recorded = np.frombuffer(base64.b64decode(props[FINGERPRINT]), dtype="<f4")
    moved = base64.b64encode((recorded + np.float32(0.01)).astype("<f4").tobytes()).decode()
    onnx.helper.set_model_props(graph, {**props, FINGERPRINT: moved})
    elsewhere = LocalStorage(tmp_path)
    elsewhere.write_bytes(key, graph.SerializeToString())
    with pytest.raises(QuantizationError, match="this CPU computes other int8 features"):
        int8_runner(elsewhere, lite0, PREP)
    assert int8_runner(store, lite0, PREP) is not None  # the untouched graph still runs here


def test_a_quantisation_far_from_fp32_is_not_published(
    lite0: Backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(quantize, "MIN_COSINE", 1.001)  # no int8 feature is that close
    storage = LocalStorage(tmp_path)
    with pytest.raises(QuantizationError, match="differ from FP32"):
        published_backbone(storage, lite0, PREP)
    assert storage.list("") == []
