"""Decode one image file into a fixed-size uint8 RGB canvas.

The training loop augments whole batches on the device, so every image of a batch must
share one tensor shape. Instead of cropping or squashing here (which would change what
the random crop can see), each image is *letterboxed*: resized so that it fits the
canvas with its aspect ratio kept, placed in the top-left corner, and the rest is
zero-filled. The returned ``(h, w)`` tells the augmentation code where the real pixels
are, so the random crop is sampled inside that region and its semantics are those of
the original image up to one resampling (none at all when the image already has the
canvas size, e.g. CIFAR at 32x32).

Mode handling (why: folders in the wild contain every PIL mode, and the model wants RGB):

* ``1``/``L``/``P``/``CMYK``/``YCbCr``... are converted to RGB by PIL.
* Images with transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a transparency entry)
  are alpha-composited on **white**: fully transparent pixels often hold arbitrary
  (commonly black) RGB values, and white matches how such images are displayed.
* 16/32-bit integer grayscale (``I;16*``, ``I``) is treated as 16-bit data and scaled to
  8 bits by ``round(v / 257)`` (so 65535 -> 255), clipped to [0, 65535] first; PIL's own
  conversion would saturate everything above 255.
* ``F`` (float) images go through PIL's ``L`` conversion (values clipped to [0, 255]).

EXIF orientation is deliberately *not* applied, matching the reference pipeline
(``tf.image.decode_jpeg``) and torchvision's ``ImageFolder``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from simclrv2.errors import DataError

__all__ = ["to_rgb", "fit_size", "letterbox", "decode_image"]

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def to_rgb(img: Image.Image) -> Image.Image:
    """Return ``img`` as an 8-bit RGB image (see module docstring for the rules)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "I" or mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.int64)
        arr = np.clip(arr, 0, 65535)
        arr8 = ((arr * 2 + 257) // 514).astype(np.uint8)  # round(v / 257), integer maths
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "F":
        return img.convert("L").convert("RGB")
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def fit_size(height: int, width: int, canvas_size: tuple[int, int]) -> tuple[int, int]:
    """Size ``(h, w)`` of an image after scaling it to fit ``canvas_size`` (H, W).

    The scale makes the limiting side equal to the canvas side (for a square canvas:
    the longer side), keeps the aspect ratio, and never returns a zero side.
    """
    canvas_h, canvas_w = canvas_size
    scale = min(canvas_h / height, canvas_w / width)
    new_h = min(canvas_h, max(1, int(round(height * scale))))
    new_w = min(canvas_w, max(1, int(round(width * scale))))
    return new_h, new_w


def letterbox(img: Image.Image, canvas_size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize an RGB image (bicubic) into the top-left of a zero canvas.

    Returns the uint8 canvas ``[3, H, W]`` and the valid ``(h, w)`` region.
    """
    img = to_rgb(img)
    new_h, new_w = fit_size(img.height, img.width, canvas_size)
    if (new_h, new_w) != (img.height, img.width):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)
    canvas = torch.zeros((3, *canvas_size), dtype=torch.uint8)
    canvas[:, :new_h, :new_w] = pixels
    return canvas, (new_h, new_w)


def decode_image(path: str | Path, canvas_size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Open ``path`` with PIL and letterbox it; unreadable files raise ``DataError``."""
    try:
        with Image.open(path) as img:
            img.load()
            return letterbox(img, canvas_size)
    except (DataError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - broken files make PIL raise OSError, SyntaxError, struct.error ...
        raise DataError(f"cannot decode image {path}: {exc or type(exc).__name__}") from exc
