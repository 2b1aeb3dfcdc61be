"""Reading checkpoints (weights_only, wrapper keys, `module.` prefixes) and loading them into a
model strictly, by compatible tensors, or backbone only, with a report of what was skipped."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from labelloop.config import LoadMode
from labelloop.errors import CheckpointError

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")


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


def head_name(model: nn.Module) -> str:
    """Name of the final Linear layer: the classification head of every supported backbone."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no Linear layer to use as a head")
    return linears[-1]
