"""The one train preset and the one eval preset; the eval preset is what serving uses."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from labelloop.config import PreprocessConfig


def resize_size(config: PreprocessConfig) -> int:
    return int(round(config.image_size / config.crop_ratio))


class ToNormalizedTensor:
    """uint8 RGB (PIL image, or CHW tensor) -> float32 CHW tensor, scaled to [0, 1] and
    normalised: the numbers of `ToDtype(scale=True)` + `Normalize` (to ~1e-6), computed in numpy.

    Why not torch: these ops are tiny, and torch runs them through its intra-op thread pool,
    whose parallel regions stall whenever another thread holds a core (the training step, the
    fetch workers, Label Studio on the same machine): on two busy cores that cost ~50 ms per
    image against ~2 ms here.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        std_ = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
        mean_ = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self._scale = (1.0 / (255.0 * std_)).astype(np.float32)
        self._shift = (-mean_ / std_).astype(np.float32)

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(image, Image.Image):
            chw = np.asarray(image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)
        else:
            chw = image.numpy()
        out = np.empty(chw.shape, dtype=np.float32)
        np.multiply(chw, self._scale, out=out)
        out += self._shift
        return torch.from_numpy(out)


def eval_transform(config: PreprocessConfig) -> Callable[[Image.Image], torch.Tensor]:
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(resize_size(config), antialias=True),
            v2.CenterCrop(config.image_size),
            ToNormalizedTensor(config.mean, config.std),
        ]
    )


def train_decode_side(config: PreprocessConfig) -> int:
    """The shorter side a training image needs so that even the smallest random crop (area
    `min_scale`, aspect 3:4) still spans `image_size` pixels: decoding finer is waste."""
    return math.ceil(config.image_size / math.sqrt(config.min_scale * 3 / 4))


def train_transform(config: PreprocessConfig) -> Callable[[Image.Image], torch.Tensor]:
    # Augmentation runs on the PIL image, before the tensor conversion: Pillow's crop-resize
    # and colour ops take a fraction of the time of the same ops on uint8 tensors, and without
    # DataLoader workers (two cores) the training step waits for every millisecond of it.
    steps: list[Callable] = [
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
    steps.append(ToNormalizedTensor(config.mean, config.std))
    return v2.Compose(steps)
