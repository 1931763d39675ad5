"""Scoring preprocessed images with an exported model through ONNX Runtime (no torch needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def onnx_predict_proba(
    onnx_path: Path, images: np.ndarray, batch_size: int = 32, temperature: float | None = None
) -> np.ndarray:
    """Softmax probabilities from an exported model on preprocessed (N, 3, H, W) images; with a
    ``temperature`` (model validation's calibration) the logits are divided by it first."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    outputs = []
    for start in range(0, len(images), batch_size):
        (logits,) = session.run(["logits"], {"image": images[start : start + batch_size]})
        outputs.append(softmax(logits / np.float32(temperature) if temperature else logits))
    return np.concatenate(outputs)
