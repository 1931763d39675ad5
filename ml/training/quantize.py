"""INT8 frozen backbone (``model.precision: int8``): one quantised graph for features and serving.

The backbone's ONNX export is statically quantised by ONNX Runtime (QDQ, uint8 activations, int8
per-channel weights, min/max calibration). The feature cache embeds with it, and the served ONNX is
that same quantised graph with the trained head appended, so a head is served the features it was
trained on: in ``bench/int8.py`` an INT8-trained head scored on FP32 features lost 2.5 points on
MNIST, while trained and served in INT8 it was within 0.1 point of FP32.

Calibration uses a built-in, deterministic set of 1/f-noise images (the spectrum of natural
images, nothing downloaded), so the quantised backbone, and with it the feature cache key, depends
only on the backbone, its weights and the preprocessing; quantising again gives the same graph.

Integer kernels differ by instruction set: with AVX-512 VNNI (this machine) uint8 x int8 products
accumulate exactly; plain AVX2 may saturate them. Features computed on one CPU kind may therefore
differ slightly from those served on another; ``int8_runner`` refuses a quantised backbone whose
features stray far from FP32 on this CPU.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ml.training.model import (
    ONNX_BACKBONE_DIR,
    ONNX_OPSET,
    SERVING_OUTPUTS,
    Backbone,
    FeatureRunner,
    backbone_onnx,
    torch_runner,
)
from ml.training.preprocessing import Preprocessing, batch_arrays

QUANTIZATION = "int8-qdq-u8s8-per-channel-minmax-pink-noise-128-v1"  # part of every int8 cache key
CALIBRATION_IMAGES = 128
MIN_COSINE = 0.9  # an int8 feature this far from its FP32 feature means the CPU's int8 kernels misbehave


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


def quantized_backbone(backbone: Backbone, prep: Preprocessing) -> Path:
    """The backbone's quantised ONNX export, made once per (backbone, weights, preprocessing) and
    kept on local disk."""
    tag = hashlib.sha256(f"{QUANTIZATION}|{prep.version}".encode()).hexdigest()[:12]
    path = ONNX_BACKBONE_DIR / f"{backbone.name}-{backbone.weights_id}-{prep.image_size}-int8-{tag}.onnx"
    if path.exists():
        return path
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    fp32 = backbone_onnx(backbone, prep.image_size)
    calibration = batch_arrays(calibration_images(), prep)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=path.parent) as folder:
        prepared, quantized = Path(folder) / "prepared.onnx", Path(folder) / "int8.onnx"
        try:
            quant_pre_process(str(fp32), str(prepared))
            quantize_static(
                str(prepared),
                str(quantized),
                _Batches(calibration),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                calibrate_method=CalibrationMethod.MinMax,
            )
        except Exception as exc:  # quantiser failures vary by graph and version
            raise QuantizationError(f"cannot quantise the {backbone.name} backbone: {exc}") from exc
        os.replace(quantized, path)
    return path


class _Batches:
    """ONNX Runtime's calibration reader protocol over preprocessed arrays."""

    def __init__(self, arrays: np.ndarray, size: int = 16) -> None:
        self._batches = iter([{"image": arrays[i : i + size]} for i in range(0, len(arrays), size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def int8_runner(backbone: Backbone, prep: Preprocessing, threads: int = 1) -> FeatureRunner:
    """The quantised backbone through ONNX Runtime; refuses one whose features stray far from FP32."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        str(quantized_backbone(backbone, prep)), options, providers=["CPUExecutionProvider"]
    )

    def run(batch: np.ndarray) -> np.ndarray:
        (features,) = session.run(["features"], {"image": np.ascontiguousarray(batch, dtype=np.float32)})
        return features

    probe = batch_arrays(calibration_images(8, seed=1), prep)
    cosine = _cosine(run(probe), torch_runner(backbone)(probe))
    if cosine.min() < MIN_COSINE:
        raise QuantizationError(
            f"int8 features of {backbone.name} differ from FP32 on this CPU (cosine {cosine.min():.3f} "
            f"< {MIN_COSINE}); use model.precision fp32"
        )
    return run


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def export_int8_serving_graph(backbone: Backbone, head: nn.Module, prep: Preprocessing, path: Path) -> None:
    """The served ONNX for int8: the quantised backbone, then ``head`` (FP32) on its features; outputs
    ``logits`` and ``features`` like the FP32 serving graph."""
    import onnx
    from onnx import compose

    quantized = onnx.load(str(quantized_backbone(backbone, prep)))
    head_graph = compose.add_prefix(_head_onnx(head, backbone.dim), "head/")
    head_graph.ir_version = quantized.ir_version
    merged = compose.merge_models(
        quantized, head_graph, io_map=[("features", "head/features")], outputs=["head/logits", "features"]
    )
    for node in merged.graph.node:
        node.output[:] = ["logits" if name == "head/logits" else name for name in node.output]
    for output in merged.graph.output:
        output.name = "logits" if output.name == "head/logits" else output.name
    outputs = {output.name: output for output in merged.graph.output}
    ordered = [type(outputs["logits"])() for _ in SERVING_OUTPUTS]
    for copy, name in zip(ordered, SERVING_OUTPUTS, strict=True):
        copy.CopyFrom(outputs[name])
    del merged.graph.output[:]
    merged.graph.output.extend(ordered)
    onnx.checker.check_model(merged)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(merged, str(path))


def _head_onnx(head: nn.Module, dim: int) -> object:
    import onnx

    was_training = head.training
    head.eval()
    buffer = io.BytesIO()
    try:
        torch.onnx.export(
            head,
            (torch.zeros(2, dim),),
            buffer,
            input_names=["features"],
            output_names=["logits"],
            dynamic_axes={"features": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    finally:
        head.train(was_training)
    return onnx.load_from_string(buffer.getvalue())


def int8_parity(path: Path, runner: FeatureRunner, head: nn.Module, batch: np.ndarray) -> float:
    """Max absolute difference between the served int8 graph and the feature runner + torch head:
    over its features and its logits."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = np.ascontiguousarray(batch, dtype=np.float32)
    logits, features = session.run(list(SERVING_OUTPUTS), {"image": inputs})
    expected_features = runner(inputs)
    was_training = head.training
    head.eval()
    try:
        with torch.inference_mode():
            expected_logits = head(torch.from_numpy(expected_features)).numpy()
    finally:
        head.train(was_training)
    if not len(inputs):
        return 0.0
    return float(max(np.max(np.abs(logits - expected_logits)), np.max(np.abs(features - expected_features))))
