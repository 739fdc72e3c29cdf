"""Decode image files: into a fixed-size uint8 RGB canvas (training), or at full resolution (evaluation).

Training (:func:`decode_image`, :func:`letterbox`): the training loop augments whole batches on the device, so every image of a batch must
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

Evaluation (:func:`decode_full`, :func:`eval_input`): the reference's ``preprocess_for_eval``
(SPEC §6) centre-crops 0.875 of the *full-resolution* decoded image and resizes that crop once,
so above 32 px an evaluation image is never letterboxed: :func:`eval_input` decodes it at its own
size and hands it to the evaluation transform (:class:`simclrv2.augment.EvalTransform`), which
computes the crop from the full ``(H, W)``. Images of at most 32 px (CIFAR sizes, where the
reference takes the raw image) are letterboxed into the ``S x S`` canvas as in training, so
a cached CIFAR-size folder and a file decoded on its own give the same network input.

EXIF orientation is deliberately *not* applied, matching the reference pipeline
(``tf.image.decode_jpeg``) and torchvision's ``ImageFolder``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol, TypeVar

import numpy as np
import torch
from PIL import Image

from simclrv2.errors import DataError

__all__ = ["to_rgb", "fit_size", "letterbox", "decode_image", "decode_full", "eval_input"]

T = TypeVar("T")

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


def _decoded(path: str | Path, finish: Callable[[Image.Image], T]) -> T:
    """``finish(image)`` of the file at ``path``; unreadable files raise ``DataError`` naming it."""
    try:
        with Image.open(path) as img:
            img.load()
            return finish(img)
    except (DataError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - broken files make PIL raise OSError, SyntaxError, struct.error ...
        raise DataError(f"cannot decode image {path}: {exc or type(exc).__name__}") from exc


def decode_image(path: str | Path, canvas_size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Open ``path`` with PIL and letterbox it; unreadable files raise ``DataError``."""
    return _decoded(path, lambda img: letterbox(img, canvas_size))


def full_pixels(img: Image.Image) -> torch.Tensor:
    """An image at its own resolution as uint8 RGB ``[3, H, W]`` (mode rules as :func:`to_rgb`)."""
    return torch.from_numpy(np.array(to_rgb(img), dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def decode_full(image: str | Path | Image.Image) -> torch.Tensor:
    """A file (or PIL image) decoded at full resolution: uint8 RGB ``[3, H, W]``, no resampling."""
    if isinstance(image, Image.Image):
        return full_pixels(image)
    return _decoded(image, full_pixels)


class EvalTransformLike(Protocol):
    """What :func:`eval_input` needs of :class:`simclrv2.augment.EvalTransform` (the data layer
    does not import the augmentation layer; the caller hands the transform in)."""

    image_size: int
    center_crop: bool

    def __call__(self, images: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor: ...


def eval_input(image: str | Path | Image.Image, transform: EvalTransformLike) -> torch.Tensor:
    """The network input of one image for evaluation: float32 ``[3, S, S]`` in [0, 1] (SPEC §6).

    The one evaluation preprocessing of ``evaluate``, ``predict``, ``embed`` and
    :meth:`InferenceModel.preprocess`: with a centre crop (S > 32) the image is decoded at full
    resolution and ``transform`` crops 0.875 of it and resizes the crop to S (one resampling, as
    the reference); without (S <= 32) it is letterboxed into the ``S x S`` canvas exactly as a
    cached folder is, and ``transform`` resizes the valid region only when it is not S x S.
    Unreadable files raise :class:`DataError`.
    """
    if transform.center_crop:
        pixels = decode_full(image)
        return transform(pixels.unsqueeze(0))[0]
    s = int(transform.image_size)
    if isinstance(image, Image.Image):
        canvas, (h, w) = letterbox(image, (s, s))
    else:
        canvas, (h, w) = decode_image(image, (s, s))
    return transform(canvas.unsqueeze(0), sizes=torch.tensor([[h, w]], dtype=torch.long))[0]
