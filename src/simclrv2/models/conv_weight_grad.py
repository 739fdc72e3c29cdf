"""A faster weight gradient for 3x3 convolutions with small outputs, in bf16 and fp32 on CPU (issue #17).

Why: on CPU the convolution backward is done by oneDNN. Its weight-gradient kernel
(``brgconv_bwd_w``) reduces over ``N * H_out * W_out`` and is slow when the output is small.
That is the case for the last stage of a ResNet: 4x4 at 32 px with the CIFAR stem, 7x7 at
224 px. On a 2-core Intel Xeon with AMX (oneDNN ``avx10_1_512_amx``), batch 512, 512 -> 512
channels at 4x4, bf16, it ran at 263 GFLOP/s: 147 ms. The forward of the same conv ran at
about 1,900 GFLOP/s. In our SimCLRv2 step at 32 px, the weight gradients took 1.06 s of a
2.8 s step, and 0.56 s of that went to the four 3x3 convolutions of the last stage.

The weight gradient of a ``k x k`` convolution is a sum of ``k*k`` matrix products, one per
kernel tap ``(i, j)``::

    grad_w[:, :, i, j] = grad_out^T  @  x_pad[:, i::stride, j::stride]      (channels_last)
                        (C_out x N*H_out*W_out)  (N*H_out*W_out x C_in)

:func:`shifted_weight_grad` computes it that way. ``torch.mm`` in bf16 runs near the
machine's matmul peak. Timings, in ms, on the same host (``benchmarks/throughput.py`` has
the end-to-end figure):

  ======================================  ======  =======  =====
  shape (N, C_in -> C_out, H_in, stride)  oneDNN  shifted  ratio
  ======================================  ======  =======  =====
  512, 512 -> 512, 4 px, 1                 148.9     33.9  4.4x
  512, 256 -> 512, 8 px, 2                  80.1     20.0  4.0x
  256, 512 -> 512, 7 px, 1                  94.0     52.8  1.8x
  256, 256 -> 256, 8 px, 1                  24.6     22.7  1.1x
  512, 256 -> 256, 8 px, 1                  48.9     70.2  0.7x
  512, 128 -> 128, 16 px, 1                 27.9    163.0  0.2x
  fp32: 512, 512 -> 512, 4 px, 1           160.4    152.3  1.05x
  ======================================  ======  =======  =====

In fp32 oneDNN's weight gradient is slow at small outputs too. On a 2-core AMD EPYC with AVX2
only (host kind ``amd-avx2``, no native bf16, so ``--precision auto`` trains in fp32; oneDNN
``brg_conv`` avx2), fp32, channels_last, GFLOP/s (``torch.mm`` fp32 ran at 130 there):

  ======================================  ======  =======  =====
  shape (N, C_in -> C_out, H_in, stride)  oneDNN  shifted  ratio
  ======================================  ======  =======  =====
  512, 512 -> 512, 4 px, 1                    84      122  1.45x
  512, 256 -> 512, 8 px, 2                    51       77  1.51x
  128, 512 -> 512, 7 px, 1                    74      125  1.69x
  128, 256 -> 512, 14 px, 2                   75      109  1.45x
  512, 256 -> 256, 8 px, 1                   136       85  0.63x
  512, 64 -> 64, 32 px, 1                     80       42  0.52x
  ======================================  ======  =======  =====

So the rule (:func:`wants_shifted_weight_grad`): CPU, bf16 or fp32 compute (autocast or the
tensors' dtype), kernel at least 3x3, no groups or dilation, and an output of at most 7x7
(``SHIFTED_MAX_OUTPUT_AREA``). Nothing changes on CUDA, in fp64, in inference, or under
``torch.compile``. The forward and the input gradient are oneDNN's, unchanged. The weight
gradient is the same sum in a different order: it matches oneDNN's to rounding (relative error
about 5e-5 in bf16, 4e-6 in fp32, see ``tests/test_conv_weight_grad.py``). ``SIMCLRV2_CONV_WEIGHT_GRAD=native``
turns the rule off. ``benchmarks/throughput.py --ablate-conv-grad`` measures the step both
ways on the machine at hand.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..errors import ConfigError

__all__ = ["SHIFTED_MAX_OUTPUT_AREA", "ENV_VAR", "shifted_enabled_by_env", "shifted_weight_grad", "wants_shifted_weight_grad",
           "conv2d_shifted_weight_grad"]

#: Largest output ``H_out * W_out`` that takes the shifted weight gradient (7x7, the last stage
#: of a ResNet at 224 px). At 8x8 the two were about equal on the measured host, so 8x8 stays
#: with oneDNN.
SHIFTED_MAX_OUTPUT_AREA = 49

#: ``native`` (or ``0``) keeps oneDNN's weight gradient everywhere; unset or ``auto`` applies the rule.
ENV_VAR = "SIMCLRV2_CONV_WEIGHT_GRAD"


def shifted_enabled_by_env() -> bool:
    """Whether ``SIMCLRV2_CONV_WEIGHT_GRAD`` allows the shifted weight gradient; a ConfigError
    naming the variable for any other value (``setup_runtime`` calls it before training starts)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower()
    if value in ("auto", "", "1", "shifted"):
        return True
    if value in ("native", "0", "off", "onednn"):
        return False
    raise ConfigError(f"{ENV_VAR}={value!r} is not understood: use 'auto' (the default: the shifted "
                      "weight gradient where it is faster) or 'native' (oneDNN's everywhere)")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the convolution runs in: autocast's when it is on for ``x``'s device, else ``x``'s."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def wants_shifted_weight_grad(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int],
                              padding: tuple[int, int], dilation: tuple[int, int], groups: int) -> bool:
    """True when :func:`conv2d_shifted_weight_grad` should replace ``F.conv2d`` (see the module docstring)."""
    if x.device.type != "cpu" or x.dim() != 4 or not weight.requires_grad or not torch.is_grad_enabled():
        return False
    if groups != 1 or tuple(dilation) != (1, 1) or min(weight.shape[-2:]) < 3:
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False  # export and compilation see the plain convolution (a traced autograd.Function is opaque)
    if _compute_dtype(x) not in (torch.bfloat16, torch.float32):
        return False
    h_out = (x.shape[-2] + 2 * padding[0] - weight.shape[-2]) // stride[0] + 1
    w_out = (x.shape[-1] + 2 * padding[1] - weight.shape[-1]) // stride[1] + 1
    return h_out * w_out <= SHIFTED_MAX_OUTPUT_AREA and shifted_enabled_by_env()


def shifted_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, kernel_size: tuple[int, int],
                        stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """The gradient of ``F.conv2d(x, w, stride=stride, padding=padding)`` with respect to ``w``,
    as ``kh * kw`` matrix products (module docstring). Returns ``(C_out, C_in, kh, kw)`` in
    channels_last strides, in ``grad_out``'s dtype."""
    n, c_in = x.shape[:2]
    c_out, h_out, w_out = grad_out.shape[1:]
    kh, kw = kernel_size
    x_pad = F.pad(x.permute(0, 2, 3, 1), (0, 0, padding[1], padding[1], padding[0], padding[0]))
    grad_rows_t = grad_out.permute(0, 2, 3, 1).reshape(n * h_out * w_out, c_out).t()
    grad_w = torch.empty(c_out, kh, kw, c_in, dtype=grad_out.dtype, device=grad_out.device)
    for i in range(kh):
        for j in range(kw):
            taps = x_pad[:, i:i + stride[0] * (h_out - 1) + 1:stride[0], j:j + stride[1] * (w_out - 1) + 1:stride[1], :]
            torch.mm(grad_rows_t, taps.reshape(n * h_out * w_out, c_in), out=grad_w[:, i, j, :])
    return grad_w.permute(0, 3, 1, 2)


class _Conv2dShiftedWeightGrad(torch.autograd.Function):
    """``F.conv2d`` (bias-free) whose backward takes the input gradient from oneDNN and the weight
    gradient from :func:`shifted_weight_grad`."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        with torch.autocast(x.device.type, enabled=False):
            return F.conv2d(x, weight, None, stride, padding)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, list(ctx.stride), list(ctx.padding), [1, 1], False, [0, 0], 1,
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = shifted_weight_grad(x, grad_out, tuple(weight.shape[-2:]), ctx.stride, ctx.padding)
        return grad_x, grad_w, None, None


def conv2d_shifted_weight_grad(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int],
                               padding: tuple[int, int]) -> torch.Tensor:
    """``F.conv2d(x, weight, None, stride, padding)`` with the shifted weight gradient, in the compute
    dtype (bf16 under autocast: ``x`` and ``weight`` are cast as autocast would, and the gradient
    reaches the fp32 weight through the cast; fp32 otherwise)."""
    dtype = _compute_dtype(x)
    return _Conv2dShiftedWeightGrad.apply(x.to(dtype), weight.to(dtype), tuple(stride), tuple(padding))
