"""Helpers every test folder imports (tests/ is on sys.path: tests/conftest.py lives there)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from labelloop.config import TrainConfig
from labelloop.dev.demo import LABEL_GROUPS

T = TypeVar("T")

__all__ = ["tiny_config", "wait_until"]


def wait_until(
    predicate: Callable[[], T], *, timeout_s: float, what: str, interval_s: float = 0.2
) -> T:
    """Poll `predicate` until it returns something truthy (returned), or fail after timeout_s.

    The synchronisation primitive of the suite: wait for a condition, never for a duration."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def tiny_config(**optim: object) -> TrainConfig:
    """ResNet18 at 32 px, random init: seconds per epoch on two CPU cores."""
    return TrainConfig().with_overrides(
        {
            "data": {"classes": {g: list(c) for g, c in LABEL_GROUPS.items()}},
            "preprocess": {"image_size": 32},
            "model": {"weights": "none"},
            "optim": {"epochs": 2, "batch_size": 16, "lr": 2e-3, **optim},
        }
    )


def result_for(labels: dict[str, list[str]]) -> list[dict]:
    """An annotation's result: one Choices item per control with labels (the demo config's
    controls point at the image named "image")."""
    return [
        {"from_name": control, "to_name": "image", "type": "choices", "value": {"choices": names}}
        for control, names in labels.items()
        if names
    ]
