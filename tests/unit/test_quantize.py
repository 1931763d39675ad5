"""The INT8 backbone: reproducible, close to FP32 but not equal, and served exactly as cached."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ml.training import quantize
from ml.training.model import SERVING_OUTPUTS, Backbone, Head, build_backbone, torch_runner
from ml.training.preprocessing import Preprocessing, batch_arrays
from ml.training.quantize import (
    QuantizationError,
    calibration_images,
    export_int8_serving_graph,
    int8_parity,
    int8_runner,
    quantized_backbone,
)

PREP = Preprocessing(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.fixture(scope="module")
def lite0() -> Backbone:
    return build_backbone("efficientnet_lite0", pretrained=True)


@pytest.fixture(scope="module")
def probe() -> np.ndarray:
    return batch_arrays(calibration_images(6, seed=7), PREP)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_int8_features_are_close_to_fp32_but_not_the_same_features(
    lite0: Backbone, probe: np.ndarray
) -> None:
    int8 = int8_runner(lite0, PREP)(probe)
    fp32 = torch_runner(lite0)(probe)
    assert cosine(int8, fp32).min() > 0.95
    assert np.abs(int8 - fp32).max() > 1e-2  # other features: the cache key must tell them apart
    ops = {node.op_type for node in onnx.load(str(quantized_backbone(lite0, PREP))).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_quantising_again_elsewhere_gives_the_same_features(
    lite0: Backbone, probe: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each worker, machine or retrain quantises on its own: the cache holds features from all of them."""
    first = int8_runner(lite0, PREP)(probe)
    monkeypatch.setattr(quantize, "ONNX_BACKBONE_DIR", tmp_path)
    again = quantized_backbone(lite0, PREP)
    assert again.parent == tmp_path
    assert np.array_equal(int8_runner(lite0, PREP)(probe), first)


def test_the_served_graph_answers_with_the_features_the_head_was_trained_on(
    lite0: Backbone, probe: np.ndarray, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    head = Head(lite0.dim, 5)
    path = tmp_path / "model.onnx"
    export_int8_serving_graph(lite0, head, PREP, path)
    runner = int8_runner(lite0, PREP)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert tuple(output.name for output in session.get_outputs()) == SERVING_OUTPUTS
    logits, features = session.run(None, {"image": probe[:1]})  # one image, as a request is served
    assert np.array_equal(features, runner(probe)[:1])  # batched in the cache, alone when served
    with torch.inference_mode():
        expected = head.eval()(torch.from_numpy(features)).numpy()
    assert np.abs(logits - expected).max() < 1e-5
    assert int8_parity(path, runner, head, probe) < 1e-5


def test_a_quantised_backbone_whose_features_stray_from_fp32_is_refused(
    lite0: Backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard against int8 kernels that misbehave on a CPU: here, the quantised graph of other weights."""
    other = quantized_backbone(build_backbone("efficientnet_lite0", pretrained=False), PREP)
    mine = quantized_backbone(lite0, PREP)
    monkeypatch.setattr(quantize, "ONNX_BACKBONE_DIR", tmp_path)
    shutil.copy(other, tmp_path / mine.name)
    with pytest.raises(QuantizationError, match="differ from FP32"):
        int8_runner(lite0, PREP)
