"""Fine-tuning: the backbone learns too (``model.freeze_backbone: false``).

The frozen path trains a head on cached features. Here the whole classifier trains on images, each
epoch a fresh augmentation of every training image (the kinds ``preprocessing.augmentation`` names:
rotation, flip and crop by default, colour jitter too when listed; seeded by seed, epoch and row: the
same on every machine), the backbone at ``backbone_lr_factor`` x
the head's learning rate, its BatchNorm statistics kept (small batches would wreck them). Lightning's
Trainer runs it, so ``training.devices``/``strategy``/``accelerator`` take it to DDP or a GPU.

The result is a new backbone (its own ``weights_id``) and every row's clean-view features under it,
so the steps after training (evaluation, validation, calibration, the drift reference's predictions)
see the fine-tuned model exactly as they see a frozen one.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ml.config import Settings
from ml.storage import Storage
from ml.training.evaluate import evaluate
from ml.training.features import extract
from ml.training.model import Backbone, Classifier, Head, backbone_from_settings, onnx_runner, predict_proba
from ml.training.preprocessing import Preprocessing, augmented_array, decode_rgb, to_array
from ml.training.train import (
    SPLITS,
    FitResult,
    HeadModule,
    Hyperparameters,
    SplitData,
    TrainResult,
    fit_module,
    rank_batch_size,
)

log = logging.getLogger(__name__)


class ImageRows(Dataset):
    """Decoded images and labels; with ``kinds``, each item is a seeded augmentation for ``epoch``."""

    def __init__(
        self,
        images: Sequence[Image.Image],
        labels: np.ndarray,
        prep: Preprocessing,
        kinds: Sequence[str] = (),
        seed: int = 0,
        epoch: int = 0,
    ) -> None:
        self.images, self.labels, self.prep = images, labels, prep
        self.kinds, self.seed, self.epoch = tuple(kinds), seed, epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.kinds:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            array = augmented_array(image, rng, self.kinds, self.prep)
        else:
            array = to_array(image, self.prep)
        return torch.from_numpy(array), int(self.labels[index])


class ImageData(L.LightningDataModule):
    """Training images augmented anew each epoch; validation images clean."""

    def __init__(
        self,
        train: tuple[list[Image.Image], np.ndarray],
        val: tuple[list[Image.Image], np.ndarray],
        prep: Preprocessing,
        kinds: Sequence[str],
        hparams: Hyperparameters,
    ) -> None:
        super().__init__()
        self.train, self.val, self.prep, self.kinds, self.hp = train, val, prep, kinds, hparams

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch if self.trainer else 0
        images, labels = self.train
        dataset = ImageRows(images, labels, self.prep, self.kinds, self.hp.seed, epoch)
        generator = torch.Generator().manual_seed(self.hp.seed + epoch)
        return DataLoader(dataset, batch_size=rank_batch_size(self), shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        images, labels = self.val
        return DataLoader(ImageRows(images, labels, self.prep), batch_size=max(self.hp.batch_size, 64))


class FineTuneModule(HeadModule):
    """The whole classifier learns: the backbone at a lower rate, its BatchNorm statistics frozen."""

    def __init__(self, model: Classifier, hparams: Hyperparameters, backbone_lr_factor: float) -> None:
        super().__init__(model, hparams)
        self.backbone_lr_factor = backbone_lr_factor

    def parameter_groups(self) -> list[dict[str, Any]]:
        return [
            {
                "params": list(self.head.backbone.parameters()),
                "lr": self.hp.learning_rate * self.backbone_lr_factor,
            },
            {"params": list(self.head.head.parameters()), "lr": self.hp.learning_rate},
        ]

    def train(self, mode: bool = True) -> FineTuneModule:
        super().train(mode)
        for layer in self.head.backbone.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.eval()
        return self


def fine_tune(
    settings: Settings,
    images: dict[str, list[Image.Image]],
    labels: dict[str, np.ndarray],
    hparams: Hyperparameters,
    sink: Callable[[dict[str, float], int], None] | None = None,
) -> tuple[Backbone, Head, FitResult]:
    """Fine-tune the configured backbone and a new head on the train split, early-stopped on val."""
    prep = Preprocessing.from_settings(settings.preprocessing)
    pretrained = backbone_from_settings(settings)
    pretrained.module.requires_grad_(True)
    head = Head(pretrained.dim, len(settings.classes), hparams.dropout)
    module = FineTuneModule(
        Classifier(pretrained.module, head), hparams, settings.training.backbone_lr_factor
    )
    data = ImageData(
        (images["train"], labels["train"]),
        (images["val"], labels["val"]),
        prep,
        settings.preprocessing.augmentation,
        hparams,
    )
    fit = fit_module(module, data, hparams, sink)
    model: Classifier = module.head
    model.eval().requires_grad_(False)
    tuned = Backbone(pretrained.name, model.backbone, pretrained.dim, weights_id_of_module(model.backbone))
    return tuned, model.head, replace(fit, head=model.head)  # the head alone, as a frozen fit's


def weights_id_of_module(module: nn.Module) -> str:
    """A fine-tuned backbone's weights_id: ``ft-`` and the hash of its state dict."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, buffer)
    return "ft-" + hashlib.sha256(buffer.getvalue()).hexdigest()[:16]


def fine_tune_fn(settings: Settings, storage: Storage, rows: pd.DataFrame) -> Callable[..., TrainResult]:
    """A ``TrainFn`` for ``train_and_register``: fine-tunes on ``rows``' images (split as ``split_data``
    splits them) and returns the new backbone and every row's features under it with the head."""
    prep = Preprocessing.from_settings(settings.preprocessing)

    def run(
        data: dict[str, SplitData],
        classes: list[str],
        hparams: Hyperparameters,
        sink: Callable[[dict[str, float], int], None] | None = None,
    ) -> TrainResult:
        log.info("fine-tuning %s on %d images", settings.model.architecture, len(rows))
        decoded = [decode_rgb(storage.read_bytes(key), prep) for key in rows["curated_key"]]
        masks = {split: (rows["split"] == split).to_numpy() for split in SPLITS}
        images = {
            split: [image for image, keep in zip(decoded, mask, strict=True) if keep]
            for split, mask in masks.items()
        }
        labels = {split: data[split].labels for split in SPLITS}
        backbone, head, fit = fine_tune(settings, images, labels, hparams, sink)
        runner = onnx_runner(backbone, prep.image_size, settings.model.feature_threads)
        features = extract(backbone, decoded, prep, settings.model.feature_batch, runner)[:, None, :]
        test = features[masks["test"], 0]
        proba = predict_proba(head, test)
        evaluation = evaluate(data["test"].labels, proba, classes, seed=hparams.seed)
        return TrainResult(head, fit, evaluation, proba, backbone=backbone, features=features)

    return run
