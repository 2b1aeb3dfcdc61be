"""The torch Dataset of labelled images, and the collate that drops unreadable ones."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from labelloop.ml.images import ImageError, decode_image

logger = logging.getLogger(__name__)


class ImageDataset(Dataset):
    """Images (files, or downloaded bytes) with multi-hot targets. Unreadable items yield None
    and are dropped by the collate."""

    def __init__(
        self,
        paths: Sequence[Path | bytes],
        targets: np.ndarray | None,
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        min_side: int | None = None,
    ) -> None:
        if targets is not None and len(targets) != len(paths):
            raise ValueError(f"{len(paths)} paths but {len(targets)} target rows")
        self.min_side = min_side  # see decode_image
        self.paths = list(paths)
        self.targets = None if targets is None else torch.as_tensor(targets, dtype=torch.float32)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        try:
            image = self.transform(decode_image(self.paths[index], min_side=self.min_side))
        except (ImageError, OSError, ValueError) as exc:
            item = self.paths[index]
            logger.warning(
                "Skipping unreadable image %s: %s",
                item if isinstance(item, Path) else f"#{index}",
                exc,
            )
            return None
        target = self.targets[index] if self.targets is not None else torch.empty(0)
        return image, target, index


def collate_skip_none(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor, int] | None],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    items = [b for b in batch if b is not None]
    if not items:
        return None
    images, targets, indices = zip(*items, strict=True)
    return torch.stack(images), torch.stack(targets), torch.tensor(indices)
