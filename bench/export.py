"""Benchmark: what a retrain spends writing its served ONNX model, the plain way and the way it does.

In one run, on the configured backbone (EfficientNet-Lite0, 224 px) and a fresh head:

- the plain way: ``torch.onnx.export`` of the whole classifier (``ServingGraph``: logits and features);
- the retrain's way: the backbone's own export (made once per weights and kept on local disk, as
  feature extraction already made it) with the head appended (``compose_serving_graph``), timed
  with the backbone export cold (made here) and warm (found);
- both graphs' outputs on 8 images against each other and against torch, and their ONNX Runtime
  latency (one thread, batch 1: the service's model call);
- logging the ONNX model to MLflow with its pip requirements inferred (MLflow imports the model in
  a subprocess) and named (what the retrain does).

Usage: python bench/export.py
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from ml.config import load_settings
from ml.training.model import (
    SERVING_OUTPUTS,
    Classifier,
    Head,
    ServingGraph,
    backbone_from_settings,
    backbone_onnx,
    compose_serving_graph,
    eval_outputs,
    export_onnx,
)
from ml.training.pipeline import ONNX_MODEL_PACKAGES, pinned

SIZE = 224


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def latency_ms(path: Path, image: np.ndarray) -> float:
    """Median of 5 rounds of 50 single-image runs, one ONNX Runtime thread."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(20):
        session.run(None, {"image": image})
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(50):
            session.run(None, {"image": image})
        rounds.append((time.perf_counter() - started) / 50 * 1000)
    return sorted(rounds)[2]


def main() -> None:
    settings = load_settings()
    backbone = backbone_from_settings(settings)
    torch.manual_seed(0)
    model = Classifier(backbone.module, Head(backbone.dim, len(settings.classes))).eval()
    folder = Path(tempfile.mkdtemp(prefix="bench-export-"))
    whole, composed = folder / "whole.onnx", folder / "composed.onnx"
    cached = backbone_onnx(backbone, SIZE)
    cached.unlink(missing_ok=True)  # the cold row makes it

    def compose() -> None:
        compose_serving_graph(backbone_onnx(backbone, SIZE).read_bytes(), model.head, backbone.dim, composed)

    rows = [
        (
            "whole classifier (torch.onnx.export)",
            timed(lambda: export_onnx(ServingGraph(model), whole, SIZE, SERVING_OUTPUTS)),
        ),
        ("backbone export, then head appended", timed(compose)),
        ("head appended to the kept backbone", timed(compose)),
    ]
    print(f"{'served ONNX written by':42s} {'seconds':>8s}")
    for label, seconds in rows:
        print(f"{label:42s} {seconds:8.2f}")

    images = np.random.default_rng(1).standard_normal((8, 3, SIZE, SIZE)).astype(np.float32)
    outputs = {
        p.name: ort.InferenceSession(str(p)).run(list(SERVING_OUTPUTS), {"image": images})
        for p in (whole, composed)
    }
    torch_logits = eval_outputs(model, images)
    print()
    for name, (logits, _) in outputs.items():
        gap = np.abs(logits - torch_logits).max()
        print(
            f"{name}: max |logits - torch| {gap:.2e}, batch 1 {latency_ms(folder / name, images[:1]):.2f} ms"
        )
    same = all(
        np.array_equal(a, b) for a, b in zip(outputs["whole.onnx"], outputs["composed.onnx"], strict=True)
    )
    print(f"whole and composed outputs equal to the bit: {same}")

    import mlflow
    import mlflow.onnx

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    graph = onnx.load(str(composed))
    named = pinned(ONNX_MODEL_PACKAGES)
    with mlflow.start_run():
        mlflow.onnx.log_model(graph, name="warm-up", save_as_external_data=False, pip_requirements=named)
        inferred = timed(lambda: mlflow.onnx.log_model(graph, name="inferred", save_as_external_data=False))
        given = timed(
            lambda: mlflow.onnx.log_model(
                graph, name="named", save_as_external_data=False, pip_requirements=named
            )
        )
    print(f"\nmlflow.onnx.log_model: requirements inferred {inferred:.2f} s, named {given:.2f} s")


if __name__ == "__main__":
    main()
