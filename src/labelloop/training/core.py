"""The one training core: class weights -> fit -> thresholds -> publish.

`labelloop train` (training.offline) and the background trainer's updates (loop.updates) both
build a candidate with these functions, so a knob means the same thing everywhere: class weights
and thresholds follow the model's own TrainConfig (the one saved in its manifest), never a
hard-coded copy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from labelloop.config import OptimConfig, PreprocessConfig, ThresholdConfig, TrainConfig
from labelloop.labels import LabelSpace
from labelloop.ml.dataset import ImageDataset, collate_skip_none
from labelloop.ml.splits import compute_pos_weight
from labelloop.ml.thresholds import ThresholdResult, tune_thresholds
from labelloop.ml.train import DistInfo, FitResult, fit
from labelloop.ml.transforms import eval_transform, resize_size, train_decode_side, train_transform
from labelloop.store import ArtifactStore, ModelBundle, manifest_for, write_model_files

logger = logging.getLogger(__name__)

# Manifest keys the trainer adds to a parent's training config; not part of TrainConfig.
_LINEAGE_KEYS = ("incremental",)


def config_of(bundle: ModelBundle) -> TrainConfig:
    """The TrainConfig a model was made with (defaults for models that recorded none)."""
    raw = {
        k: v for k, v in (bundle.manifest.training_config or {}).items() if k not in _LINEAGE_KEYS
    }
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        logger.warning(
            "Model %s records a training config this release cannot read (%s); using defaults",
            bundle.version,
            exc.errors()[0].get("msg", exc),
        )
        return TrainConfig()


def class_weights(targets: np.ndarray, optim: OptimConfig, classes: Sequence[str]) -> torch.Tensor:
    """BCE pos_weight per class from the training targets, clipped as the config says."""
    pos_weight, empty = compute_pos_weight(
        targets, min_weight=optim.pos_weight_min, max_weight=optim.pos_weight_max
    )
    if empty:
        logger.warning(
            "No positive training example for %s: the model can only learn to keep them off. "
            "Label more images with them.",
            ", ".join(classes[i] for i in empty),
        )
    return pos_weight


def fine_tune(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    *,
    train_targets: np.ndarray,
    classes: Sequence[str],
    optim: OptimConfig,
    device: torch.device,
    work_dir: Path,
    resume: bool = False,
    dist_info: DistInfo | None = None,
    show_progress: bool = True,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> FitResult:
    """Train the whole network with class weights from `train_targets` and early stopping."""
    return fit(
        model,
        train_loader,
        val_loader,
        pos_weight=class_weights(train_targets, optim, classes),
        config=optim,
        device=device,
        work_dir=work_dir,
        resume=resume,
        dist_info=dist_info or DistInfo(),
        show_progress=show_progress,
        on_epoch=on_epoch,
    )


@dataclass(frozen=True)
class Thresholds:
    values: list[float]
    detail: ThresholdResult


def tune(
    y_true: np.ndarray,
    probs: np.ndarray,
    config: ThresholdConfig,
    classes: Sequence[str],
    *,
    carried: Sequence[float] | None = None,
) -> Thresholds:
    """Per-class thresholds on validation predictions.

    A class with too few validation positives to tune keeps `carried` (its threshold in the
    parent model) when given, else the config's default; the log names those classes.
    """
    detail = tune_thresholds(
        y_true,
        probs,
        beta=config.beta,
        default=config.default,
        min_positives=config.min_positives,
        min_threshold=config.min_threshold,
        max_threshold=config.max_threshold,
        classes=classes,
        fallback=carried,
    )
    return Thresholds([float(t) for t in detail.thresholds], detail)


def carried_thresholds(space: LabelSpace, parent: ModelBundle, default: float) -> list[float]:
    """The parent's threshold for each class of `space`; `default` for classes it lacks."""
    previous = dict(zip(parent.label_space.classes, parent.thresholds, strict=True))
    return [previous.get(name, default) for name in space.classes]


@dataclass(frozen=True)
class Published:
    version: str
    path: Path


def publish(
    store: ArtifactStore,
    *,
    model: nn.Module,
    label_space: LabelSpace,
    thresholds: Sequence[float],
    backbone: str,
    dropout: float,
    preprocess: PreprocessConfig,
    parent_version: str | None,
    training_config: Mapping[str, Any],
    metrics: Mapping[str, Any] | Callable[[Path, str], Mapping[str, Any]],
    data: Mapping[str, Any],
    make_current: bool = True,
) -> Published:
    """Write a candidate as a new version; `current` moves to it only if `make_current`.

    `metrics` may be a callable `(staging_dir, version) -> metrics` that writes extra files
    (an evaluation report, splits) into the version before it is published.
    """
    version = store.next_version_name()
    with store.staging() as staged:
        write_model_files(staged, model, label_space, thresholds)
        recorded = metrics(staged, version) if callable(metrics) else metrics
        manifest = manifest_for(
            version=version,
            backbone=backbone,
            dropout=dropout,
            label_space=label_space,
            preprocess=preprocess,
            parent_version=parent_version,
            training_config=training_config,
            metrics=recorded,
            data=data,
        )
        path = store.publish(staged, manifest, make_current=make_current)
    return Published(version, path)


def image_loader(
    items: Sequence[Path | bytes],
    targets: np.ndarray | None,
    preprocess: PreprocessConfig,
    *,
    train: bool,
    batch_size: int,
    num_workers: int = 0,
    sampler: DistributedSampler | None = None,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """Images (files or downloaded bytes) through the one train or eval preset.

    Large JPEGs decode at the smallest DCT scale that still covers what the transform needs,
    as serving does: annotated photos are usually far larger than the model input.
    """
    if train:
        transform, side = train_transform(preprocess), train_decode_side(preprocess)
    else:
        transform, side = eval_transform(preprocess), resize_size(preprocess)
    # A training batch of one image fails in BatchNorm ("Expected more than 1 value per
    # channel"): when the shuffled epoch would end with one, that one image sits the epoch out.
    n = len(sampler) if sampler is not None else len(items)
    return DataLoader(
        ImageDataset(items, targets, transform, min_side=side),
        batch_size=batch_size,
        shuffle=train and sampler is None,
        drop_last=train and n > 1 and n % batch_size == 1,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_skip_none,
        generator=generator,
        persistent_workers=num_workers > 0,
    )
