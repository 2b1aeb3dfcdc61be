"""The one train preset and the one eval preset; the eval preset is what serving uses."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torchvision.transforms import v2

from .config import PreprocessConfig


def resize_size(config: PreprocessConfig) -> int:
    return int(round(config.image_size / config.crop_ratio))


def eval_transform(config: PreprocessConfig) -> Callable[[Image.Image], torch.Tensor]:
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(resize_size(config), antialias=True),
            v2.CenterCrop(config.image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(config.mean), std=list(config.std)),
        ]
    )


def train_transform(config: PreprocessConfig) -> Callable[[Image.Image], torch.Tensor]:
    steps: list[Callable] = [
        v2.PILToTensor(),
        # A mild crop scale: defects are small, and a tight crop could cut them out of the
        # image while the label still says they are there.
        v2.RandomResizedCrop(config.image_size, scale=(config.min_scale, 1.0), antialias=True),
    ]
    if config.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if config.vflip:
        steps.append(v2.RandomVerticalFlip())
    if config.color_jitter > 0:
        j = config.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j / 2))
    steps += [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(config.mean), std=list(config.std)),
    ]
    return v2.Compose(steps)
