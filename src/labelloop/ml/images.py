"""The one image decoder for training, evaluation and serving: bytes or a file -> RGB.

EXIF orientation applied (phones rotate through EXIF), 16-bit greyscale scaled rather than clipped,
alpha dropped, and JPEGs decoded at a reduced DCT scale when the caller only needs a small image.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def to_rgb(image: Image.Image) -> Image.Image:
    """The one colour conversion for training and serving alike."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # convert() would clip 16-bit values at 255, turning most of the image white.
        eight_bit = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
        image = Image.fromarray(eight_bit)
    # Alpha is dropped, not composited: the model sees the same pixels in training and serving.
    return image.convert("RGB")


class ImageError(ValueError):
    """An image could not be read; ``reason`` says why, for logs and for the task it belongs to."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode_image(
    data: bytes | Path,
    *,
    max_pixels: int | None = Image.MAX_IMAGE_PIXELS,
    min_side: int | None = None,
) -> Image.Image:
    """Decode image bytes to RGB, applying the EXIF orientation (phones rotate via EXIF).

    ``min_side``: the caller will shrink the image until its shorter side is this long, so a
    JPEG may be decoded at 1/2, 1/4 or 1/8 scale (DCT scaling, several times faster) as long as
    both sides stay at least ``min_side``.

    Raises ImageError for empty, corrupt, truncated or non-image data, and for images
    with more than ``max_pixels`` pixels (``None``, as Pillow's own MAX_IMAGE_PIXELS may be:
    no limit). Pillow's own limit (twice Image.MAX_IMAGE_PIXELS) still applies when
    ``max_pixels`` is larger.
    """
    if isinstance(data, Path):
        path = data
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not data:
        raise ImageError("empty image file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageError(
                    f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels "
                    "(possible decompression bomb)"
                )
            if min_side is not None and image.format == "JPEG":
                image.draft("RGB", (min_side, min_side))
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large to decode safely: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageError("not an image (format not recognised)") from exc
    except Exception as exc:  # decoders raise many types on bad input: OSError, SyntaxError, ...
        raise ImageError(f"corrupt or truncated image ({type(exc).__name__}: {exc})") from exc
