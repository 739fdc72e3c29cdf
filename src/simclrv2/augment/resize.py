"""Resample per-image boxes of a batch to a fixed size (SPEC §6 step 1, 'Eval preprocessing').

The reference crops each image (``tf.image.crop_to_bounding_box``) and resizes the crop
alone.  This module does both in one batched step, separably (rows, then columns), with
per-image interpolation taps computed on device:

``mode="bicubic"`` (default)
    TF2 ``tf.image.resize(..., BICUBIC)`` = ``resize_bicubic(half_pixel_centers=True)``:
    source coordinate ``(i + 0.5) * len / S - 0.5`` (half-pixel centres, the
    ``align_corners=False`` convention), Keys cubic kernel with ``a = -0.5``, taps falling
    outside the *crop* get weight 0 and the remaining weights are renormalised.  The
    fractional offset is rounded to 1/1024 as TF's coefficient table does.  No antialias.
``mode="bicubic_legacy"``
    TF1 ``tf.image.resize_bicubic`` (used for the released checkpoints): source coordinate
    ``i * len / S`` (neither corner- nor centre-aligned), ``a = -0.75``, out-of-crop taps
    clamped to the crop edge.
``mode="bilinear"``
    TF2 bilinear, half-pixel centres, taps clamped to the crop edge.

Because taps never leave the crop, pixels outside the box (other image content, or the
zero letterbox of a folder dataset's canvas) never leak into the output.

Implementation: the canvas is laid out ``[C, H, B, W]``; the vertical taps are gathered
as whole rows, then the B intermediate images are side by side along the last axis so one
``index_select`` per tap gathers every image's horizontal taps.  This avoids float
transposes and 2-D gathers (``grid_sample`` evaluates 16 taps per pixel and is about 2x
slower on CPU); see :func:`resize_boxes_grid_sample` for that alternative.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ._rows import Workspace, empty

RESIZE_MODES = ("bicubic", "bicubic_legacy", "bilinear")

_TABLE_SIZE = 1024  # TF resize_bicubic coefficient-table resolution


def _keys_cubic(x: Tensor, a: float) -> Tensor:
    """Keys cubic convolution kernel at distance ``x`` (any sign), parameter ``a``."""
    x = x.abs()
    inner = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    outer = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return torch.where(x <= 1.0, inner, torch.where(x < 2.0, outer, torch.zeros_like(x)))


def resample_taps(start: Tensor, length: Tensor, out_size: int, mode: str = "bicubic") -> tuple[Tensor, Tensor]:
    """Source indices and weights resampling ``[start, start + length)`` to ``out_size``.

    Args:
        start, length: integer tensors [N]: the box along one axis, in pixels.
        out_size: number of output samples S.
        mode: one of :data:`RESIZE_MODES` (see module docstring).

    Returns:
        ``(index, weight)``, both [N, S, T] (T = 4 taps for cubic, 2 for bilinear):
        absolute source indices (int64, always inside the box) and float32 weights
        summing to 1 over T.  ``out[i] = sum_t weight[i, t] * src[index[i, t]]``.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"mode must be one of {RESIZE_MODES}, got {mode!r}")
    device = start.device
    length_f = length.to(torch.float32)[:, None]
    scale = length_f / float(out_size)
    pos = torch.arange(out_size, device=device, dtype=torch.float32)[None, :]
    if mode == "bicubic_legacy":
        loc = pos * scale
    else:
        loc = (pos + 0.5) * scale - 0.5
    base = torch.floor(loc)
    delta = loc - base
    if mode == "bilinear":
        first, weights = 0, [1.0 - delta, delta]
    else:
        a = -0.75 if mode == "bicubic_legacy" else -0.5
        delta = torch.round(delta * _TABLE_SIZE) / _TABLE_SIZE
        first, weights = -1, [_keys_cubic(delta - o, a) for o in (-1.0, 0.0, 1.0, 2.0)]
    weight = torch.stack(weights, dim=-1)  # [N, S, T]
    # arange, not torch.tensor(list): no blocking host-to-device copy on CUDA.
    offsets = torch.arange(len(weights), device=device, dtype=torch.float32) + first
    tap = base[..., None] + offsets
    inside = (tap >= 0) & (tap <= length_f[..., None] - 1)
    if mode == "bicubic":
        weight = torch.where(inside, weight, torch.zeros_like(weight))
        total = weight.sum(-1, keepdim=True)
        weight = torch.where(total.abs() > 1e-30, weight / total, weight)
    tap = torch.minimum(tap.clamp_min(0), length_f[..., None] - 1)
    index = tap.to(torch.int64) + start.to(torch.int64)[:, None, None]
    return index, weight


def _source_scale(images: Tensor) -> float:
    """uint8 images are scaled to [0, 1]; float images are taken as already in [0, 1]."""
    return 1.0 / 255.0 if images.dtype == torch.uint8 else 1.0


@dataclass
class ResizePlan:
    """Interpolation taps of N output rows, tap-major so each tap's slice is contiguous.

    ``row_index``/``row_weight``: [N, T, S] source row of output row i (vertical taps);
    ``col_index``/``col_weight``: the same for columns (horizontal taps, flip folded in).
    """

    row_index: Tensor
    row_weight: Tensor
    col_index: Tensor
    col_weight: Tensor


def plan_resize(boxes: Tensor, out_size: int, mode: str = "bicubic", flip: Tensor | None = None) -> ResizePlan:
    """Taps resampling each box (top, left, height, width) [N, 4] to ``out_size`` squared;
    rows with ``flip`` [N] true are mirrored horizontally."""
    boxes = boxes.to(torch.int64)
    row_idx, row_w = resample_taps(boxes[:, 0], boxes[:, 2], out_size, mode)
    col_idx, col_w = resample_taps(boxes[:, 1], boxes[:, 3], out_size, mode)
    if flip is not None:
        flip = flip.to(boxes.device).view(-1, 1, 1)
        col_idx = torch.where(flip, col_idx.flip(1), col_idx)
        col_w = torch.where(flip, col_w.flip(1), col_w)
    return ResizePlan(
        row_index=row_idx.transpose(1, 2).contiguous(),
        row_weight=row_w.transpose(1, 2).contiguous(),
        col_index=col_idx.transpose(1, 2).contiguous(),
        col_weight=col_w.transpose(1, 2).contiguous(),
    )


def apply_resize(
    images: Tensor,
    plan: ResizePlan,
    source_index: Tensor | None = None,
    workspace: Workspace | None = None,
) -> Tensor:
    """Resample ``images`` [B, C, H, W] with ``plan`` (N rows) -> float32 [N, C, S, S].

    Row r is cut from ``images[source_index[r]]`` (default: image r).  Not clamped.  With
    a ``workspace`` the temporaries and the result live in its buffers (the result is
    only valid until the next call with the same workspace).
    """
    b, c, h, w = images.shape
    n, taps, s = plan.row_index.shape
    device = images.device
    if source_index is None:
        if n != b:
            raise ValueError("the plan must have one row per image when source_index is None")
        source_index = torch.arange(b, device=device)
    source_index = source_index.to(device=device, dtype=torch.int64)
    f32 = torch.float32

    # Canvas as [C, H, B, W]: rows (c, y, image) of W pixels.
    canvas = empty(workspace, "resize_canvas", (c, h, b, w), f32, device)
    canvas.copy_(images.permute(1, 2, 0, 3))
    canvas = canvas.view(c * h * b, w)
    # Pass 1 (vertical): gather whole rows -> acc [C, S, N, W].
    chan = (torch.arange(c, device=device) * (h * b)).view(c, 1, 1)
    row_index = (plan.row_index * b).add_(source_index.view(n, 1, 1)).permute(1, 2, 0)  # [T, S, N]
    row_weight = plan.row_weight.permute(1, 2, 0)
    acc = empty(workspace, "resize_rows", (c, s, n, w), f32, device)
    gathered = empty(workspace, "resize_gather", (c * s * n * max(w, s),), f32, device)
    for t in range(taps):
        rows = (chan + row_index[t].unsqueeze(0)).reshape(-1)
        if t == 0:
            torch.index_select(canvas, 0, rows, out=acc.view(c * s * n, w))
            acc.mul_(row_weight[t].reshape(1, s, n, 1))
        else:
            g = torch.index_select(canvas, 0, rows, out=gathered[: c * s * n * w].view(c * s * n, w))
            acc.addcmul_(g.view(c, s, n, w), row_weight[t].reshape(1, s, n, 1))
    # Pass 2 (horizontal): the N images side by side, [C*S, N*W]; one index_select along
    # the last axis per tap gathers every image's column taps -> [C, S, N, S], written
    # straight into the [N, C, S, S] output.
    acc = acc.view(c * s, n * w)
    col_index = plan.col_index + (torch.arange(n, device=device) * w).view(n, 1, 1)
    col_weight = plan.col_weight * _source_scale(images)
    out = empty(workspace, "resize_out", (n, c, s, s), f32, device)
    for t in range(taps):
        g = gathered[: c * s * n * s].view(c * s, n * s)
        g = torch.index_select(acc, 1, col_index[:, t, :].reshape(-1), out=g)
        g = g.view(c, s, n, s).permute(2, 0, 1, 3)
        wt = col_weight[:, t, :].view(n, 1, 1, s)
        if t == 0:
            torch.mul(g, wt, out=out)
        else:
            out.addcmul_(g, wt)
    return out


def resize_boxes(
    images: Tensor,
    boxes: Tensor,
    out_size: int,
    mode: str = "bicubic",
    flip: Tensor | None = None,
    source_index: Tensor | None = None,
) -> Tensor:
    """Crop ``boxes`` out of ``images`` and resample each to ``out_size`` x ``out_size``.

    Args:
        images: [B, C, H, W] uint8 (scaled by 1/255) or float.
        boxes: [N, 4] integer (top, left, height, width) per output row.
        out_size: output side S.
        mode: see module docstring.
        flip: optional bool [N]; flipped rows are mirrored horizontally (folded into the
            column taps, so flipping is free).
        source_index: optional int [N]: which image each output row is cut from (several
            views of one image share its pixels); default ``arange(B)``.

    Returns:
        float32 [N, C, S, S], not clamped (cubic kernels overshoot slightly).
    """
    plan = plan_resize(boxes.to(images.device), out_size, mode, flip)
    return apply_resize(images, plan, source_index)


def resize_boxes_grid_sample(
    images: Tensor,
    boxes: Tensor,
    out_size: int,
    mode: str = "bicubic",
    flip: Tensor | None = None,
    source_index: Tensor | None = None,
) -> Tensor:
    """Same contract as :func:`resize_boxes`, via ``torch.nn.functional.grid_sample``.

    The sampling grid equals ``affine_grid(theta, align_corners=False)`` with the diagonal
    ``theta`` mapping the output square onto the box (half-pixel centres, as TF2), built
    separably.  Differences from :func:`resize_boxes`: PyTorch's bicubic uses ``a = -0.75``
    and taps near the box edge read the neighbouring canvas pixels (clamped at the canvas
    border) instead of being renormalised inside the crop, so with letterboxed canvases
    crops touching the valid edge can pick up a little padding.  ``bicubic_legacy`` is not
    available here.
    """
    if mode not in ("bicubic", "bilinear"):
        raise ValueError("grid_sample backend supports mode 'bicubic' or 'bilinear'")
    b, c, h, w = images.shape
    n = boxes.shape[0]
    device = images.device
    if source_index is not None:
        images = images.index_select(0, source_index.to(device=device, dtype=torch.int64))
    elif n != b:
        raise ValueError("boxes must have one row per image when source_index is None")
    x = images.to(torch.float32) * _source_scale(images)
    boxes = boxes.to(device=device, dtype=torch.float32)
    top, left, bh, bw = boxes.unbind(1)
    pos = (torch.arange(out_size, device=device, dtype=torch.float32) + 0.5) / out_size  # (0, 1)
    gy = (2.0 * (top[:, None] + pos[None] * bh[:, None])) / h - 1.0
    gx = (2.0 * (left[:, None] + pos[None] * bw[:, None])) / w - 1.0
    if flip is not None:
        gx = torch.where(flip.to(device)[:, None], gx.flip(1), gx)
    grid = torch.stack(
        (gx[:, None, :].expand(n, out_size, out_size), gy[:, :, None].expand(n, out_size, out_size)), dim=-1
    )
    return F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)
