"""Random Gaussian blur with per-image sigma (SPEC §6 step 5).

Reference (``batch_random_blur`` / ``gaussian_blur``): kernel size ``H // 10`` rounded to an
odd ``2r + 1`` with ``r = int((H // 10) / 2)`` (23 taps at 224 px, 3 at 32 px), weights
``exp(-x^2 / (2 sigma^2))`` normalised, separable depthwise convolution with 'SAME' **zero**
padding — so borders darken: a pixel within r of the edge loses the weight of the taps that
fall outside.  ``padding="reflect"`` avoids that (not the reference).  Each image keeps the
blurred version with p = 0.5; clip to [0, 1].

The reference draws ONE sigma ~ U[0.1, 2.0] per view and per-replica batch
(``per_image_sigma=False``); the default here draws one per image, the natural choice when
the batch is not tied to a replica.

Implementation: on CUDA a grouped convolution over ``[1, B*C, H, W]`` with one kernel per
image (``groups = B*C``); on CPU, where PyTorch's grouped convolution is several times
slower, a sum of shifted slices (same values).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ._rows import Workspace, apply_to_rows, bernoulli, empty, uniform

PADDINGS = ("zeros", "reflect")


def blur_radius(height: int, kernel_fraction: float = 0.1) -> int:
    """Kernel radius r of the reference: kernel_size = int(H * fraction), r = kernel_size // 2."""
    kernel_size = math.floor(height * kernel_fraction + 1e-9)  # H // 10 for the default fraction
    return kernel_size // 2


def gaussian_kernel1d(sigma: Tensor, radius: int) -> Tensor:
    """Normalised 1-D Gaussian kernels [B, 2r + 1] for per-image ``sigma`` [B] (float32)."""
    x = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    sigma = sigma.to(torch.float32)[:, None]
    k = torch.exp(-(x * x) / (2.0 * sigma * sigma))
    return k / k.sum(dim=1, keepdim=True)


def _blur_conv(x: Tensor, kernel: Tensor, radius: int, zero_pad: bool) -> Tensor:
    b, c, h, w = x.shape
    k = kernel.to(x.dtype).repeat_interleave(c, dim=0)  # [B*C, K]
    y = x.reshape(1, b * c, h, w)
    pad = radius if zero_pad else 0
    y = F.conv2d(y, k.view(b * c, 1, 1, -1), padding=(0, pad), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, -1, 1), padding=(pad, 0), groups=b * c)
    return y.view(b, c, y.shape[-2], y.shape[-1])


def _blur_shift(x: Tensor, kernel: Tensor, radius: int, zero_pad: bool, workspace: Workspace | None) -> Tensor:
    """Separable blur as a sum of shifted slices (``x`` is already padded unless zero_pad)."""
    k = kernel.to(x.dtype)
    taps = k.shape[1]
    b, c = x.shape[:2]
    if zero_pad:
        h, w = x.shape[-2:]
        padded = empty(workspace, "blur_pad", (b, c, h, w + 2 * radius), x.dtype, x.device)
        padded[..., :radius].zero_()
        padded[..., w + radius :].zero_()
        padded[..., radius : w + radius].copy_(x)
        x = padded
    else:
        h, w = x.shape[-2] - 2 * radius, x.shape[-1] - 2 * radius
    # Horizontal pass into the middle rows of a buffer whose top/bottom margins are the
    # vertical padding (zeros, or the already padded rows).
    rows = x.shape[-2]
    mid = empty(workspace, "blur_mid", (b, c, h + 2 * radius, w), x.dtype, x.device)
    acc = mid[:, :, radius : radius + h] if zero_pad else mid[:, :, : rows]
    if zero_pad:
        mid[:, :, :radius].zero_()
        mid[:, :, radius + h :].zero_()
    torch.mul(x[..., 0:w], k[:, 0, None, None, None], out=acc)
    for t in range(1, taps):
        acc.addcmul_(x[..., t : t + w], k[:, t, None, None, None])
    out = empty(workspace, "blur_out", (b, c, h, w), x.dtype, x.device)
    torch.mul(mid[:, :, 0:h], k[:, 0, None, None, None], out=out)
    for t in range(1, taps):
        out.addcmul_(mid[:, :, t : t + h], k[:, t, None, None, None])
    return out


def blur_with_kernel(
    x: Tensor,
    kernel: Tensor,
    padding: str = "zeros",
    method: str = "auto",
    workspace: Workspace | None = None,
) -> Tensor:
    """Blur each image of ``x`` [B, C, H, W] separably with its own 1-D ``kernel`` [B, 2r+1].

    ``padding`` 'zeros' (reference 'SAME') or 'reflect'.  ``method`` 'conv' (grouped
    conv2d), 'shift' (shifted sums) or 'auto' (conv on CUDA, shift elsewhere).  Not
    clipped.  With a ``workspace`` the result lives in its buffers (shift method).
    """
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    radius = (kernel.shape[1] - 1) // 2
    if radius == 0:
        return x * kernel.to(x.dtype).view(-1, 1, 1, 1)
    zero_pad = padding == "zeros"
    if not zero_pad:
        x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    if method == "auto":
        method = "conv" if x.device.type == "cuda" else "shift"
    if method == "conv":
        return _blur_conv(x, kernel, radius, zero_pad)
    if method == "shift":
        return _blur_shift(x, kernel, radius, zero_pad, workspace)
    raise ValueError(f"method must be 'auto', 'conv' or 'shift', got {method!r}")


def gaussian_blur(
    x: Tensor, sigma: Tensor | float, radius: int, padding: str = "zeros", method: str = "auto"
) -> Tensor:
    """Blur each image of ``x`` [B, C, H, W] with its own ``sigma`` ([B] or float) and a
    ``2 * radius + 1`` Gaussian kernel (see :func:`blur_with_kernel`).  Not clipped."""
    if not isinstance(sigma, Tensor):
        sigma = torch.full((x.shape[0],), float(sigma), device=x.device)
    return blur_with_kernel(x, gaussian_kernel1d(sigma.to(x.device), radius), padding, method)


@dataclass
class BlurParams:
    """Per-image blur parameters: ``sigma`` [B] and whether the image is blurred, ``apply`` [B]."""

    sigma: Tensor
    apply: Tensor


def sample_blur_params(
    batch: int,
    generator: torch.Generator,
    p: float = 0.5,
    sigma_range: tuple[float, float] = (0.1, 2.0),
    per_image_sigma: bool = True,
    sigma_groups: int = 1,
) -> BlurParams:
    """Draw blur parameters for ``batch`` images.

    With ``per_image_sigma=False`` the rows are split into ``sigma_groups`` equal
    contiguous groups (one per view) that each share one sigma, as the reference draws one
    sigma per view batch.
    """
    if per_image_sigma:
        sigma = uniform(batch, *sigma_range, generator)
    else:
        if batch % sigma_groups:
            raise ValueError("batch must be divisible by sigma_groups")
        sigma = uniform(sigma_groups, *sigma_range, generator).repeat_interleave(batch // sigma_groups)
    return BlurParams(sigma=sigma, apply=bernoulli(batch, p, generator))


def apply_blur_params(
    x: Tensor,
    params: BlurParams,
    radius: int,
    padding: str = "zeros",
    inplace: bool = False,
    workspace: Workspace | None = None,
) -> Tensor:
    """Blur the selected images of ``x`` and clip to [0, 1] (reference ``batch_random_blur``).

    ``inplace=True`` allows overwriting ``x``; ``workspace`` holds the temporaries.
    """
    kernel = gaussian_kernel1d(params.sigma.to(x.device), radius)
    out = apply_to_rows(
        lambda t, k: blur_with_kernel(t, k, padding, workspace=workspace),
        x,
        params.apply,
        kernel,
        inplace=inplace,
        workspace=workspace,
    )
    return out.clamp_(0.0, 1.0)  # out is x only when inplace=True


def random_gaussian_blur(
    x: Tensor,
    generator: torch.Generator,
    p: float = 0.5,
    sigma_range: tuple[float, float] = (0.1, 2.0),
    kernel_fraction: float = 0.1,
    per_image_sigma: bool = True,
    padding: str = "zeros",
    sigma_groups: int = 1,
) -> Tensor:
    """Blur each image of ``x`` [B, C, H, W] in [0, 1] with probability ``p`` (SPEC §6 step 5).

    Kernel radius from the image height (:func:`blur_radius`), sigma ~ U(sigma_range) per
    image (or one per ``sigma_groups`` block of rows with ``per_image_sigma=False``).
    """
    params = sample_blur_params(x.shape[0], generator, p, sigma_range, per_image_sigma, sigma_groups)
    return apply_blur_params(x, params, blur_radius(x.shape[-2], kernel_fraction), padding)

