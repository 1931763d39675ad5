"""INT8 frozen backbone (``model.precision: int8``): one quantised graph for features and serving.

The backbone's ONNX export is statically quantised by ONNX Runtime (QDQ, uint8 activations, int8
per-channel weights, min/max calibration) once per store and published there
(``features/backbones/``): the feature cache embeds with that graph, and the served ONNX is that
graph with the trained head appended, so a head is served the features it was trained on (in
``bench/int8.py`` an INT8-trained head scored on FP32 features lost 2.5 points on MNIST).

Calibration uses a built-in, deterministic set of 1/f-noise images (the spectrum of natural
images, nothing downloaded), so no data goes into the graph: the cache key names the backbone, its
weights, the preprocessing and the recipe (``QUANTIZATION``).

Integer kernels differ by instruction set (AVX-512 VNNI accumulates uint8 x int8 products exactly,
plain AVX2 may saturate them), so the published graph carries its own features on probe images as
computed where it was quantised, and ``int8_runner`` refuses to run on a CPU that computes others.
"""

from __future__ import annotations

import base64
import hashlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import nn

from ml.layout import quantized_backbone_key
from ml.storage import Storage
from ml.training.model import (
    SERVING_OUTPUTS,
    Backbone,
    FeatureRunner,
    backbone_onnx,
    eval_outputs,
    torch_runner,
)
from ml.training.preprocessing import Preprocessing, batch_arrays

QUANTIZATION = "int8-qdq-u8s7-per-channel-minmax-pink-noise-128-v2"  # part of every int8 cache key
CALIBRATION_IMAGES = 128
MIN_COSINE = 0.9  # when quantising: an int8 feature this far from FP32 means a broken quantisation
FINGERPRINT = "mlops.probe_features"  # the graph's own features on the probe images, as quantised
FINGERPRINT_MAX_DIFF = 1e-4  # elsewhere: integer kernels agree exactly or differ by far more


class QuantizationError(RuntimeError):
    """The quantised backbone cannot be made, or its features are not close to FP32 on this CPU."""


def calibration_images(count: int = CALIBRATION_IMAGES, side: int = 256, seed: int = 0) -> list[Image.Image]:
    """Deterministic RGB images with a natural image's 1/f amplitude spectrum and correlated channels."""
    rng = np.random.default_rng(seed)
    radius = np.hypot(np.fft.fftfreq(side)[:, None], np.fft.rfftfreq(side)[None, :])
    radius[0, 0] = 1.0
    images = []
    for _ in range(count):
        shape = (4, side, side // 2 + 1)
        spectrum = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
        fields = np.fft.irfft2(spectrum / radius ** rng.uniform(0.8, 1.2), s=(side, side))
        fields = (fields - fields.mean(axis=(1, 2), keepdims=True)) / fields.std(axis=(1, 2), keepdims=True)
        luminance, chroma = fields[0], fields[1:]
        means = rng.uniform(50, 200, 3)[:, None, None]
        pixels = means + rng.uniform(20, 70) * (luminance + rng.uniform(0.1, 0.5) * chroma)
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8).transpose(1, 2, 0)))
    return images


def precision_name(precision: str) -> str:
    """What a run records as its precision: ``fp32``, or ``int8/`` and the quantisation recipe (a new
    recipe gives other features, so it is a lineage change)."""
    return precision if precision == "fp32" else f"{precision}/{QUANTIZATION}"


def graph_name(backbone: Backbone, prep: Preprocessing) -> str:
    tag = hashlib.sha256(f"{QUANTIZATION}|{prep.version}".encode()).hexdigest()[:12]
    return f"{backbone.name}-{backbone.weights_id}-{prep.image_size}-int8-{tag}"


def published_backbone(storage: Storage, backbone: Backbone, prep: Preprocessing) -> bytes:
    """The store's quantised backbone graph (ONNX bytes): quantised here and published when the store
    has none yet. Every int8 feature of the store and every int8 model trained on it comes from it."""
    key = quantized_backbone_key(graph_name(backbone, prep))
    if not storage.exists(key):
        with tempfile.TemporaryDirectory(prefix="mlops-quantize-") as folder:
            path = Path(folder) / "int8.onnx"
            quantize_backbone(backbone, prep, path)
            if not storage.exists(key):  # a concurrent first run may have published meanwhile
                storage.upload(path, key)
    return storage.read_bytes(key)


def quantize_backbone(backbone: Backbone, prep: Preprocessing, path: Path) -> None:
    """Quantise the backbone's ONNX export into ``path``, with its probe features as a fingerprint;
    ``QuantizationError`` when it fails or its features are not close to FP32 on this CPU."""
    import onnx

    calibration = batch_arrays(calibration_images(), prep)
    try:
        quantize_onnx(backbone_onnx(backbone, prep.image_size), path, calibration)
    except Exception as exc:  # quantiser failures vary by graph and version
        raise QuantizationError(f"cannot quantise the {backbone.name} backbone: {exc}") from exc
    graph = onnx.load(str(path))
    probe = probe_arrays(prep)
    features = _session(graph.SerializeToString(), 1).run(["features"], {"image": probe})[0]
    cosine = _cosine(features, torch_runner(backbone)(probe))
    if cosine.min() < MIN_COSINE:
        raise QuantizationError(
            f"int8 features of {backbone.name} differ from FP32 on this CPU (cosine {cosine.min():.3f} "
            f"< {MIN_COSINE}); use model.precision fp32"
        )
    onnx.helper.set_model_props(
        graph, {FINGERPRINT: base64.b64encode(features.astype("<f4").tobytes()).decode()}
    )
    onnx.save(graph, str(path))


def quantize_onnx(
    source: Path,
    target: Path,
    calibration: np.ndarray,
    fmt: str = "QDQ",
    activations: str = "QUInt8",
) -> None:
    """ONNX Runtime's static quantisation of an FP32 graph, min/max calibrated on ``calibration``;
    int8 per-channel weights in 7 bits (the format and activation type are ONNX Runtime's enum names).

    7-bit weights (``reduce_range``): on an AVX2 CPU without VNNI, ONNX Runtime's u8 x s8 kernel adds
    pairs of products in 16 bits, which saturate with 8-bit weights: efficientnet_lite0's features
    came out at cosine 0.78 to FP32 on such a CPU, 0.98 with 7 bits."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    with tempfile.TemporaryDirectory(prefix="mlops-quantize-") as folder:
        prepared = Path(folder) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared))
        quantize_static(
            str(prepared),
            str(target),
            _Batches(calibration),
            quant_format=QuantFormat[fmt],
            activation_type=QuantType[activations],
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=True,
            calibrate_method=CalibrationMethod.MinMax,
        )


class _Batches:
    """ONNX Runtime's calibration reader protocol over preprocessed arrays."""

    def __init__(self, arrays: np.ndarray, size: int = 16) -> None:
        self._batches = iter([{"image": arrays[i : i + size]} for i in range(0, len(arrays), size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def probe_arrays(prep: Preprocessing) -> np.ndarray:
    return batch_arrays(calibration_images(8, seed=1), prep)


def _session(graph: bytes, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def int8_runner(storage: Storage, backbone: Backbone, prep: Preprocessing, threads: int = 1) -> FeatureRunner:
    """The store's quantised backbone through ONNX Runtime; refuses to run on a CPU whose int8
    kernels give other features than the CPU that quantised it (its fingerprint)."""
    import onnx

    graph = published_backbone(storage, backbone, prep)
    session = _session(graph, threads)

    def run(batch: np.ndarray) -> np.ndarray:
        (features,) = session.run(["features"], {"image": np.ascontiguousarray(batch, dtype=np.float32)})
        return features

    props = {prop.key: prop.value for prop in onnx.load_from_string(graph).metadata_props}
    if FINGERPRINT not in props:
        raise QuantizationError(f"{graph_name(backbone, prep)} carries no fingerprint: not made by this code")
    expected = np.frombuffer(base64.b64decode(props[FINGERPRINT]), dtype="<f4").reshape(-1, backbone.dim)
    gap = float(np.max(np.abs(run(probe_arrays(prep)) - expected)))
    if gap > FINGERPRINT_MAX_DIFF:
        raise QuantizationError(
            f"this CPU computes other int8 features than the one that quantised {graph_name(backbone, prep)} "
            f"(max difference {gap:.2e} > {FINGERPRINT_MAX_DIFF:.0e} on the probe images; int8 kernels "
            "differ by instruction set): run int8 features and serving on that CPU kind, or use fp32"
        )
    return run


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def int8_parity(path: Path, runner: FeatureRunner, head: nn.Module, batch: np.ndarray) -> float:
    """Max absolute difference between the served int8 graph and the feature runner + torch head:
    over its features and its logits."""
    import onnxruntime as ort

    inputs = np.ascontiguousarray(batch, dtype=np.float32)
    if not len(inputs):
        return 0.0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, features = session.run(list(SERVING_OUTPUTS), {"image": inputs})
    expected_features = runner(inputs)
    expected_logits = eval_outputs(head, expected_features)
    return float(max(np.max(np.abs(logits - expected_logits)), np.max(np.abs(features - expected_features))))
