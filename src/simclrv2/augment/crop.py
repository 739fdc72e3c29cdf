"""Random and centre crop boxes, and batched crop-and-resize (SPEC §6 step 1, 'Eval preprocessing').

Boxes are integer tensors [B, 4] = (top, left, height, width) in pixels, inside each image's
valid region ``sizes[b] = (height, width)`` (the top-left corner of a letterboxed canvas).
All images' boxes are sampled at once on the generator's device: every image draws
``max_attempts`` candidates in one tensor and keeps the first acceptable one, so there is no
Python loop over images or attempts and no host-device synchronisation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .resize import RESIZE_MODES, resize_boxes, resize_boxes_grid_sample

CROP_METHODS = ("reference", "torchvision")

_TF_EPS = float(torch.tensor(1e-7, dtype=torch.float32))  # kEps, a C++ float promoted to double


def default_sizes(batch: int, height: int, width: int, device: torch.device | str) -> Tensor:
    """Sizes [B, 2] for a batch whose images all fill the ``height`` x ``width`` canvas."""
    h = torch.full((batch,), height, device=device, dtype=torch.int64)
    return torch.stack((h, torch.full_like(h, width)), dim=1)


def _first_valid(valid: Tensor, *candidates: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Per row, whether any column is valid and each candidate's value at the first valid one."""
    attempts = valid.shape[1]
    order = torch.arange(attempts, device=valid.device).expand_as(valid)
    first = torch.where(valid, order, attempts).amin(dim=1).clamp_max(attempts - 1)[:, None]
    return valid.any(dim=1), [c.gather(1, first).squeeze(1) for c in candidates]


def _uniform_int(u: Tensor, n: Tensor) -> Tensor:
    """Integer uniform in [0, n) from ``u`` ~ U[0, 1) (0 where n <= 0)."""
    return torch.minimum(torch.floor(u * n), n - 1).clamp_min(0)


def _sample_reference(
    sizes: Tensor,
    generator: torch.Generator,
    area_range: tuple[float, float],
    aspect_range: tuple[float, float],
    min_object_covered: float,
    max_attempts: int,
) -> Tensor:
    """TF ``sample_distorted_bounding_box`` with the whole image as the object box.

    Mirrors ``GenerateRandomCrop`` + ``SatisfiesOverlapConstraints`` (tensorflow
    ``core/kernels/image/sample_distorted_bounding_box_op.cc``), in float32 as there:
    aspect ratio ~ U(lo, hi) (linear); crop height an integer uniform between the heights
    implied by the min and max area (max shrunk so ``round(h * ar)`` fits the width);
    width = round(h * ar); one +/-1 height retry when rounding leaves the area range;
    reject if the area is out of range or the crop exceeds the image; offsets uniform in
    ``[0, H - h)`` (TF's ``Uniform(n)`` never returns n, so a crop narrower than the image
    never touches its right/bottom edge — kept); accept if ``area / (H*W) >=
    min_object_covered``.  Fallback after ``max_attempts``: the whole image.
    """
    device = sizes.device
    b = sizes.shape[0]
    shape = (b, max_attempts)
    img_h = sizes[:, 0:1].to(torch.float32)
    img_w = sizes[:, 1:2].to(torch.float32)
    lo, hi = aspect_range
    ar = torch.rand(shape, generator=generator, device=device) * (hi - lo) + lo
    min_area = area_range[0] * img_w * img_h
    max_area = area_range[1] * img_w * img_h

    height = torch.round(torch.sqrt(min_area / ar))  # lrintf: round half to even, as torch.round
    max_height = torch.round(torch.sqrt(max_area / ar))
    # Largest height whose rounded width still fits, computed in double as in TF.
    fit = torch.floor((img_w.double() + 0.5 - _TF_EPS) / ar.double()).to(torch.float32)
    fit = torch.where(torch.round(fit * ar) > img_w, fit - 1, fit)
    max_height = torch.where(torch.round(max_height * ar) > img_w, fit, max_height)
    max_height = torch.minimum(max_height, img_h)
    height = torch.minimum(height, max_height)
    u = torch.rand(shape, generator=generator, device=device)
    height = height + _uniform_int(u, max_height - height + 1)
    width = torch.round(height * ar)
    area = width * height
    too_small = area < min_area
    height = torch.where(too_small, height + 1, height)
    width = torch.round(height * ar)
    area = width * height
    too_big = area > max_area
    height = torch.where(too_big, height - 1, height)
    width = torch.round(height * ar)
    area = width * height
    ok = (area >= min_area) & (area <= max_area) & (width <= img_w) & (height <= img_h)
    ok &= (width > 0) & (height > 0)

    uy = torch.rand(shape, generator=generator, device=device)
    ux = torch.rand(shape, generator=generator, device=device)
    top = _uniform_int(uy, img_h - height)
    left = _uniform_int(ux, img_w - width)
    # Overlap with the whole-image object box = the crop itself (kMinArea = 1 pixel).
    covered = (area >= 1.0) & (area / (img_w * img_h) >= min_object_covered)

    found, (top, left, height, width) = _first_valid(ok & covered, top, left, height, width)
    boxes = torch.stack((top, left, height, width), dim=1).to(torch.int64)
    whole = torch.cat((torch.zeros_like(sizes), sizes), dim=1).to(torch.int64)
    return torch.where(found[:, None], boxes, whole)


def _sample_torchvision(
    sizes: Tensor,
    generator: torch.Generator,
    area_range: tuple[float, float],
    aspect_range: tuple[float, float],
    max_attempts: int,
) -> Tensor:
    """``torchvision.transforms.RandomResizedCrop.get_params`` semantics, vectorised.

    Area fraction ~ U(area_range), log aspect ratio ~ U(log range), w = round(sqrt(A*r)),
    h = round(sqrt(A/r)); first candidate that fits wins, offset uniform in [0, H - h];
    fallback: centre crop clamped to the ratio range.  Computed in float64 like Python.
    """
    device = sizes.device
    b = sizes.shape[0]
    shape = (b, max_attempts)
    img_h = sizes[:, 0:1].to(torch.float64)
    img_w = sizes[:, 1:2].to(torch.float64)
    area = img_h * img_w
    scale = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    target = area * (scale * (area_range[1] - area_range[0]) + area_range[0])
    log_lo, log_hi = math.log(aspect_range[0]), math.log(aspect_range[1])
    log_ratio = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    ratio = torch.exp(log_ratio * (log_hi - log_lo) + log_lo)
    width = torch.round(torch.sqrt(target * ratio))
    height = torch.round(torch.sqrt(target / ratio))
    ok = (width > 0) & (width <= img_w) & (height > 0) & (height <= img_h)
    uy = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    ux = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    top = _uniform_int(uy, img_h - height + 1)
    left = _uniform_int(ux, img_w - width + 1)
    found, (top, left, height, width) = _first_valid(ok, top, left, height, width)

    # Centre-crop fallback.
    h1, w1 = img_h[:, 0], img_w[:, 0]
    in_ratio = w1 / h1
    lo, hi = min(aspect_range), max(aspect_range)
    fb_w = torch.where(in_ratio > hi, torch.round(h1 * hi), w1)
    fb_h = torch.where(in_ratio < lo, torch.round(w1 / lo), h1)
    fb_top = torch.div(h1 - fb_h, 2, rounding_mode="floor")
    fb_left = torch.div(w1 - fb_w, 2, rounding_mode="floor")
    boxes = torch.stack((top, left, height, width), dim=1)
    fallback = torch.stack((fb_top, fb_left, fb_h, fb_w), dim=1)
    return torch.where(found[:, None], boxes, fallback).to(torch.int64)


def sample_crop_boxes(
    sizes: Tensor,
    generator: torch.Generator,
    area_range: tuple[float, float] = (0.08, 1.0),
    aspect_range: tuple[float, float] = (3 / 4, 4 / 3),
    min_object_covered: float = 0.1,
    max_attempts: int = 100,
    method: str = "reference",
) -> Tensor:
    """Random crop boxes, one per image (SPEC §6 step 1).

    Args:
        sizes: int [B, 2] valid (height, width) of each image.
        generator: source of randomness, on ``sizes``' device.
        area_range: crop area as a fraction of the image area.
        aspect_range: width / height range.  The reference multiplies (3/4, 4/3) by the
            output's W/H, i.e. leaves it unchanged for square outputs.
        min_object_covered: reference only; minimum crop area fraction actually accepted
            (makes the effective minimum area 0.10, not 0.08).
        max_attempts: candidates per image (reference 100; torchvision uses 10).
        method: ``"reference"`` (TF ``sample_distorted_bounding_box``, see
            :func:`_sample_reference`) or ``"torchvision"`` (``RandomResizedCrop``).

    Returns:
        int64 [B, 4] boxes (top, left, height, width).
    """
    if method == "reference":
        return _sample_reference(sizes, generator, area_range, aspect_range, min_object_covered, max_attempts)
    if method == "torchvision":
        return _sample_torchvision(sizes, generator, area_range, aspect_range, max_attempts)
    raise ValueError(f"method must be one of {CROP_METHODS}, got {method!r}")


def center_crop_boxes(sizes: Tensor, crop_proportion: float = 0.875, aspect_ratio: float = 1.0) -> Tensor:
    """Deterministic eval crop of the reference ``preprocess_for_eval`` (SPEC §6).

    Keeps ``crop_proportion`` of the image along the side that limits the requested
    ``aspect_ratio`` (= out height / out width; for square outputs the shorter side),
    crop dims rounded with rint (half to even), offset ``((H - h) + 1) // 2``.

    Returns:
        int64 [B, 4] boxes (top, left, height, width).
    """
    img_h = sizes[:, 0].to(torch.float32)
    img_w = sizes[:, 1].to(torch.float32)
    wider = aspect_ratio > img_w / img_h  # the requested shape is wider than the image
    crop_h = torch.where(
        wider, torch.round((crop_proportion / aspect_ratio) * img_w), torch.round(crop_proportion * img_h)
    )
    crop_w = torch.where(
        wider, torch.round(crop_proportion * img_w), torch.round((crop_proportion * aspect_ratio) * img_h)
    )
    crop_h = crop_h.to(torch.int64)
    crop_w = crop_w.to(torch.int64)
    sizes = sizes.to(torch.int64)
    top = torch.div(sizes[:, 0] - crop_h + 1, 2, rounding_mode="floor")
    left = torch.div(sizes[:, 1] - crop_w + 1, 2, rounding_mode="floor")
    return torch.stack((top, left, crop_h, crop_w), dim=1)


def crop_and_resize(
    images: Tensor,
    boxes: Tensor,
    out_size: int,
    mode: str = "bicubic",
    flip: Tensor | None = None,
    source_index: Tensor | None = None,
    backend: str = "separable",
) -> Tensor:
    """Cut ``boxes`` out of ``images`` and resize each to ``out_size`` x ``out_size`` (SPEC §6).

    Args:
        images: [B, C, H, W] uint8 (converted to [0, 1]) or float in [0, 1], any device.
        boxes: int [N, 4] (top, left, height, width); N = B unless ``source_index``.
        out_size: output side S.
        mode: ``"bicubic"`` (TF2 ``tf.image.resize`` BICUBIC: half-pixel centres, i.e. the
            ``align_corners=False`` convention, no antialias), ``"bilinear"`` (TF2
            half-pixel) or ``"bicubic_legacy"`` (TF1 ``resize_bicubic``); details in
            :mod:`simclrv2.augment.resize`.
        flip: optional bool [N]: mirror those rows horizontally (free: folded into the taps).
        source_index: optional int [N]: image each row is cut from (for several views).
        backend: ``"separable"`` (exact TF2 kernel, taps confined to the crop; default) or
            ``"grid_sample"`` (``affine_grid``-equivalent grid + ``F.grid_sample``;
            PyTorch's a=-0.75 bicubic reading neighbours outside the crop).

    Returns:
        float32 [N, C, S, S] clamped to [0, 1], on ``images``' device.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"mode must be one of {RESIZE_MODES}, got {mode!r}")
    if backend == "separable":
        out = resize_boxes(images, boxes, out_size, mode, flip, source_index)
    elif backend == "grid_sample":
        out = resize_boxes_grid_sample(images, boxes, out_size, mode, flip, source_index)
    else:
        raise ValueError(f"backend must be 'separable' or 'grid_sample', got {backend!r}")
    return out.clamp_(0.0, 1.0)
