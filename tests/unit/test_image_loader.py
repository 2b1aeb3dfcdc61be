"""training.core.image_loader: no training batch of one image (BatchNorm refuses it)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from labelloop.config import PreprocessConfig
from labelloop.training.core import image_loader


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("n", "train", "sizes"),
    [
        (9, True, [4, 4]),  # the ninth image would be a batch of one: it sits the epoch out
        (10, True, [4, 4, 2]),
        (4, True, [4]),
        (1, True, [1]),  # nothing smaller to fall back on
        (9, False, [4, 4, 1]),  # evaluation sees every image
    ],
)
def test_batch_sizes(n: int, train: bool, sizes: list[int]) -> None:
    items = [png(i) for i in range(n)]
    loader = image_loader(
        items, np.zeros((n, 2)), PreprocessConfig(image_size=32), train=train, batch_size=4
    )
    assert [len(batch[0]) for batch in loader] == sizes
