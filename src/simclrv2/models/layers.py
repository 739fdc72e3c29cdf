"""TensorFlow-compatible padding, pooling and initialisation helpers (SPEC §1.6, §1.7).

The released SimCLRv2 checkpoints were trained with TensorFlow, whose padding rules differ
from PyTorch's in two places that matter for a faithful port (SPEC §1.7):

* Strided convolutions use "fixed padding" (pad ``k - 1`` split as ``(k-1)//2`` before and
  the rest after, independent of the input size) followed by a VALID convolution.  For
  odd kernels this is exactly PyTorch's symmetric ``padding=(k-1)//2``;
  :class:`Conv2dFixedPadding` also handles even kernels.
* Pooling uses TF ``'SAME'`` padding, which depends on the input size and puts the extra
  pixel at the *end* (right/bottom): ``pad_total = max((ceil(n/s)-1)*s + k - n, 0)``.
  :class:`MaxPool2dSame` pads with ``-inf``; :class:`AvgPool2dSame` divides by the number
  of *valid* cells, like TF.

``reference_padding=False`` in the factories below gives the usual PyTorch-port
behaviour (symmetric ``MaxPool2d(3, 2, padding=1)``, zero-padded stride-1 average pool
that counts the padded zeros, as in Separius/SimCLRv2-Pytorch, SPEC §8.3), which is
useful to reproduce that port's numbers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .conv_matmul import conv2d_matmul, plan_conv

__all__ = [
    "TRUNC_NORMAL_STD_CORRECTION",
    "variance_scaling_",
    "same_padding_amounts",
    "fixed_padding_amounts",
    "Conv2dFixedPadding",
    "MaxPool2dSame",
    "AvgPool2dSame",
    "make_stem_max_pool",
    "make_resnet_d_avg_pool",
]

#: Std of a unit normal truncated to [-2, 2]; TF's ``VarianceScaling`` divides by it so
#: that the truncated distribution has the requested variance (SPEC §1.6).
TRUNC_NORMAL_STD_CORRECTION = 0.87962566103423978


def variance_scaling_(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """In-place TF ``VarianceScaling(scale, mode='fan_in', distribution='truncated_normal')``.

    ``std = sqrt(scale / fan_in) / 0.8796...``, truncated at two standard deviations
    (SPEC §1.6: variance 1/fan_in, not Kaiming's 2/fan_in).  ``fan_in`` is
    ``in_channels * kh * kw`` for conv kernels and ``in_features`` for dense kernels.
    Meta tensors are left untouched (nothing to initialise).
    """
    if weight.is_meta:
        return weight
    fan_in = weight.shape[1] * math.prod(weight.shape[2:]) if weight.dim() > 1 else weight.shape[0]
    std = math.sqrt(scale / max(1, fan_in)) / TRUNC_NORMAL_STD_CORRECTION
    with torch.no_grad():
        nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)
    return weight


def same_padding_amounts(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """TF ``'SAME'`` padding ``(before, after)`` for one spatial dim of length ``size``.

    ``pad_total = max((ceil(size/stride) - 1) * stride + kernel_size - size, 0)``; the
    extra pixel of an odd total goes to the end (SPEC §1.7).
    """
    # ceil division without negative operands: when tracing (ONNX export) ``size`` is a traced int
    # and the exporter's integer division truncates, so ``-(-size // stride)`` would floor instead.
    out = (size + stride - 1) // stride
    total = max((out - 1) * stride + kernel_size - size, 0)
    return total // 2, total - total // 2


def fixed_padding_amounts(kernel_size: int) -> tuple[int, int]:
    """TF "fixed padding" ``(before, after)``: ``k - 1`` total, ``(k-1)//2`` before (SPEC §1.7)."""
    total = kernel_size - 1
    return total // 2, total - total // 2


class Conv2dFixedPadding(nn.Conv2d):
    """Bias-free conv with TF ``conv2d_fixed_padding`` semantics (SPEC §1.7).

    TF pads strided convs explicitly by ``fixed_padding_amounts(k)`` and runs a VALID
    conv; stride-1 convs use 'SAME', which for stride 1 is the same split.  For odd
    ``k`` this is PyTorch's symmetric ``padding=(k-1)//2`` (used directly, so the module
    is a plain ``nn.Conv2d`` as far as state dicts, counting and conversion go); for even
    ``k`` the asymmetric pad is applied in :meth:`forward`.  Weights get the TF
    truncated-normal fan-in init (SPEC §1.6).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        beg, end = fixed_padding_amounts(kernel_size)
        symmetric = beg == end
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=beg if symmetric else 0,
            bias=False,
        )
        self._explicit_pad: tuple[int, int, int, int] | None = None if symmetric else (beg, end, beg, end)

    def reset_parameters(self) -> None:
        """TF ``VarianceScaling()`` init (replaces PyTorch's Kaiming-uniform default)."""
        variance_scaling_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._explicit_pad is not None:
            x = F.pad(x, self._explicit_pad)
        if torch.jit.is_scripting():
            # ``_conv_forward`` is what ``nn.Conv2d.forward`` runs; called directly (not through
            # ``super().forward``) so that ``torch.jit.script`` compiles this module.
            return self._conv_forward(x, self.weight, self.bias)
        return self._eager_forward(x)

    @torch.jit.unused
    def _eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution outside TorchScript: on the CPU, where oneDNN is slow (small outputs, strided
        weight gradients) some training passes as matrix products, and in fp32 with many channels every
        pass by Winograd, in inference too (:mod:`simclrv2.models.conv_matmul`, measured up to 4x faster
        per pass); otherwise ``nn.Conv2d``'s."""
        plan = plan_conv(x, self.weight, self.stride, self.padding, self.dilation, self.groups)
        if plan is not None:
            return conv2d_matmul(x, self.weight, self.stride, self.padding, plan)
        return self._conv_forward(x, self.weight, self.bias)


class MaxPool2dSame(nn.Module):
    """Max-pool with TF ``'SAME'`` padding (SPEC §1.7, issue #26).

    For the 3x3/s2 stem pool on an even input (e.g. 112) TF pads 0 before and 1 after;
    ``nn.MaxPool2d(3, 2, padding=1)`` pads 1 on both sides, shifting every window by one
    pixel.  Padding is ``-inf`` so it never wins the max, whatever the input sign.
    """

    def __init__(self, kernel_size: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph = same_padding_amounts(x.shape[-2], self.kernel_size, self.stride)
        pw = same_padding_amounts(x.shape[-1], self.kernel_size, self.stride)
        if any(ph) or any(pw):
            x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]), value=float("-inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding=TF-SAME"


class AvgPool2dSame(nn.Module):
    """Average pool with TF ``'SAME'`` padding: padded cells are excluded from the mean.

    Used for the stride-1 2x2 ResNet-D shortcut pool of block_group1 (SPEC §1.3, §1.7):
    TF pads right/bottom by one and divides each window by its number of valid cells.
    For ``kernel_size=2, stride=1`` this equals replicate-pad ``(0,1,0,1)`` followed by
    ``nn.AvgPool2d(2, 1)``; the implementation here (zero-pad, sum, divide by the valid
    count) is exact for any kernel/stride.
    """

    def __init__(self, kernel_size: int = 2, stride: int = 1) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size, self.stride
        ph = same_padding_amounts(x.shape[-2], k, s)
        pw = same_padding_amounts(x.shape[-1], k, s)
        if not (any(ph) or any(pw)):
            return F.avg_pool2d(x, k, s)
        pad = (pw[0], pw[1], ph[0], ph[1])
        summed = F.avg_pool2d(F.pad(x, pad), k, s, divisor_override=1)
        ones = torch.ones((1, 1, x.shape[-2], x.shape[-1]), dtype=x.dtype, device=x.device)
        counts = F.avg_pool2d(F.pad(ones, pad), k, s, divisor_override=1)
        return summed / counts

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding=TF-SAME"


def make_stem_max_pool(reference_padding: bool = True) -> nn.Module:
    """3x3/s2 stem max-pool: TF 'SAME' (default) or PyTorch symmetric ``padding=1``."""
    if reference_padding:
        return MaxPool2dSame(3, 2)
    return nn.MaxPool2d(3, 2, padding=1)


def make_resnet_d_avg_pool(stride: int, reference_padding: bool = True) -> nn.Module:
    """2x2 average pool of the ResNet-D projection shortcut (SPEC §1.3, §1.7).

    * ``stride > 1``: TF zero-pads ``(0,1,0,1)`` ("fixed padding", k=2) then pools VALID,
      so padded zeros *are* averaged in (they only enter windows for odd sizes).  Both
      padding modes do this.
    * ``stride == 1`` (first block of block_group1): TF 'SAME' excludes padded cells
      (:class:`AvgPool2dSame`); with ``reference_padding=False`` the zeros are counted,
      reproducing Separius/SimCLRv2-Pytorch (wrong last row/column, SPEC §8.3).
    """
    if stride == 1 and reference_padding:
        return AvgPool2dSame(2, 1)
    return nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.AvgPool2d(2, stride))
