"""Convolutions as matrix products where oneDNN is slow on the CPU: small outputs, strided weight gradients,
and by Winograd where channels are many and outputs small (issue #17).

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

On a 2-core Intel Xeon with AVX-512 but no native bf16 (host kind ``intel-avx512``, family 6
model 106; fp32 training), oneDNN's forward and input gradient are slow at small outputs as well,
and its weight gradient is slow on every strided convolution. There, one matrix product over
explicitly gathered patches (im2col: rows ``N*H_out*W_out``, columns ``kh*kw*C_in``, a batch chunk
at a time) beat it. fp32, channels_last, GFLOP/s, best of 4 (``torch.mm`` fp32 peaked at about
310); "fwd" the forward, "in" the input gradient (the product, then the patches added back:
col2im), "w" the weight gradient:

  ==========================================  ===============  ==============  ==============
  shape (N, C_in -> C_out, H_in, stride)      fwd oneDNN/ours  in oneDNN/ours  w oneDNN/ours
  ==========================================  ===============  ==============  ==============
  512, 512 -> 512, 4 px, 1                         207 / 241       181 / 254       172 / 259
  512, 256 -> 512, 8 px, 2                         179 / 238       161 / 252       109 / 253
  128, 512 -> 512, 7 px, 1                         188 / 238       182 / 225       138 / 236
  128, 256 -> 256, 14 px, 2                        211 / 168       167 / 191       110 / 181
  512, 128 -> 256, 16 px, 2                        257 / 192       244 / 178       112 / 166
  512, 64 -> 128, 32 px, 2                         262 / 146       225 / 164       131 / 145
  64, 128 -> 128, 28 px, 2                         207 / 104       151 / 111       107 / 112
  512, 256 -> 256, 8 px, 1                         279 / 196       275 / 200       235 / 203
  ==========================================  ===============  ==============  ==============

On AVX2 the forward and input gradient are left to oneDNN. With this host's oneDNN and MKL capped
at AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``, a stand-in: the ``amd-avx2``
host itself was not measured), oneDNN/ours at batch 512 were: forward 114/164 at 4x4x512 but
183/140 for 256 -> 512 at 8 px stride 2; input gradient 171/169 and 163/143; weight gradient
119/164, 91/142, and 89/146 for 128 -> 256 at 16 px stride 2 (``torch.mm`` about 186 there).

(The shifted products of the first table reached 233, 211, 189, 145, 154 and 103 GFLOP/s for the
weight gradients of the first six rows: gathering the patches once is faster in fp32.)

With those passes, every 3x3 convolution of the step ran at 250-300 GFLOP/s, near the best matrix
product, so the stages got faster only by doing fewer multiplications: Winograd's F(m x m, 3 x 3)
(:mod:`.conv_winograd`; m = 2: 16 products per 2x2 outputs instead of 36; m = 4: 36 per 4x4 instead of
144). Same host, fp32, channels_last, stride 1, "effective" GFLOP/s (the convolution's FLOPs over the
time), fastest of 4 interleaved rounds, oneDNN / F(2x2) / F(4x4):

  ===========================  =============  =============  =============
  shape (N, C -> C, H)         fwd            in             w
  ===========================  =============  =============  =============
  512, 512 -> 512, 4 px        222/459/668    219/462/665    175/412/594
  512, 256 -> 256, 8 px        290/357/534    292/363/520    252/334/494
  128, 256 -> 256, 16 px       277/349/516    279/354/510    280/317/457
  128, 512 -> 512, 7 px        253/356/501    252/352/500    225/315/438
  128, 256 -> 256, 14 px       325/372/404    324/364/405    278/333/354
  512, 128 -> 128, 16 px       299/257/360    307/255/357    284/244/333
  512, 128 -> 128, 8 px        264/256/351    262/253/349    249/236/316
  64, 128 -> 128, 28 px        302/253/378    301/260/370    307/252/338
  512, 64 -> 64, 32 px         299/161/203    292/150/200    270/137/188
  32, 64 -> 64, 56 px          302/156/214    287/154/230    285/136/176
  ===========================  =============  =============  =============

(7x7 and 14x14 compute 8x8 and 16x16 and crop.) With 64 channels the transforms, memory-bound, cost
more than the products save. An earlier run of the F(2x2) rows on a busier machine gave oneDNN
156/158/139 and F(2x2) 351/364/397 at 4x4x512. Under the AVX2 cap above (an earlier version of the
F(2x2) transforms), F(2x2) won by more: 260/303/277 against oneDNN's 162/164/115 at 4x4x512, and
218/237/217 against 190/190/142 at 8x8x256. On the whole step at batch 256, 4 interleaved rounds in one
process: 6.17 s with the Winograd rule, 7.54 s without (1.22x, paired median 1.26x).

So the rules (:func:`plan_conv`), on the CPU, for 3x3 or larger kernels, no groups or dilation, not
while compiling or tracing:

* **fp32, 3x3, stride 1, padding 1, at least 128 channels in and out, output from 4x4 to 28x28**
  (``WINOGRAD_MIN_CHANNELS``, ``WINOGRAD_MIN_SIDE``, ``WINOGRAD_MAX_OUTPUT_AREA``), on x86 CPUs with
  AVX2 or AVX-512 kernels: all three passes by Winograd's F(4x4, 3x3), in inference as well
  (evaluation, prediction, the kNN monitor, a distillation teacher: the forward alone);

and for training only (weight gradient wanted, grad mode on):

* **fp32**, otherwise: output at most 7x7 (``MATMUL_MAX_OUTPUT_AREA``): the weight gradient as an im2col
  product, and on CPUs where PyTorch runs AVX-512 kernels (``torch.backends.cpu.get_cpu_capability()``)
  the input gradient too, and the forward where the stride is 1 or the output at most 4x4 (oneDNN's
  strided forward to 7x7 was the faster one above); a strided convolution with an output of at most
  16x16 (``MATMUL_WGRAD_MAX_STRIDED_AREA``): the weight gradient only.
* **bf16** (autocast): output at most 7x7: the weight gradient as the shifted products (measured
  above on ``intel-amx``); forward and input gradient stay oneDNN's (im2col is unmeasured in bf16).

Everything else, and CUDA, fp64, inference other than Winograd's, ``torch.compile`` and export, is
oneDNN's plain convolution. The rules were measured on the hosts named above; on another host
``benchmarks/throughput.py --ablate-conv-matmul`` times the step with and without them
(``SIMCLRV2_CONV_MATMUL=native`` turns them off). The results are the same sums in another order:
they match the convolution to rounding (``tests/test_conv_matmul.py`` and ``tests/test_conv_winograd.py``
check float64 exactly, and the network's fp32 gradients against float64 as accurate as oneDNN's). ``torch.nn.functional.unfold`` gathers patches too, but
in NCHW order (columns ``C_in*kh*kw``, rows last), which would need a transposing copy before the
product in a channels_last network; the strided copies here write the product's layout directly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .conv_winograd import winograd_conv2d, winograd_input_grad, winograd_weight_grad

__all__ = ["ENV_VAR", "MATMUL_MAX_OUTPUT_AREA", "MATMUL_WGRAD_MAX_STRIDED_AREA", "WINOGRAD_MAX_OUTPUT_AREA",
           "WINOGRAD_MIN_CHANNELS", "WINOGRAD_MIN_SIDE", "ConvPlan", "conv2d_matmul",
           "im2col_conv2d", "im2col_input_grad", "im2col_weight_grad", "matmul_enabled_by_env", "plan_conv",
           "shifted_weight_grad"]

#: Largest output ``H_out * W_out`` whose convolution runs as matrix products (7x7, the last stage
#: of a ResNet at 224 px; 4x4 at 32 px with the CIFAR stem). At 8x8 oneDNN was as fast or faster.
MATMUL_MAX_OUTPUT_AREA = 49

#: Largest output of a strided (fp32) convolution whose weight gradient is an im2col product (16x16:
#: the first strided 3x3 convolution at 32 px, measured 145 vs 131 GFLOP/s; at 14x14 with 128 channels
#: the two were equal; larger outputs were not measured, so they stay oneDNN's).
MATMUL_WGRAD_MAX_STRIDED_AREA = 256

#: Largest output of a strided fp32 convolution whose forward is a product (4x4 measured faster, 7x7 slower).
_STRIDED_FORWARD_MAX_OUTPUT_AREA = 16

#: Largest output, and fewest channels (in and out), of an fp32 3x3 stride-1 convolution that runs by
#: Winograd (F(4x4, 3x3) where both output sides are at least 4, ``WINOGRAD_MIN_SIDE``): measured faster
#: than oneDNN from 4x4 to 28x28 with 128 to 512 channels (the module docstring's last table); with 64
#: channels the transforms (memory-bound) cost more than they save, and larger outputs were not measured.
WINOGRAD_MAX_OUTPUT_AREA = 28 * 28
WINOGRAD_MIN_CHANNELS = 128
WINOGRAD_MIN_SIDE = 4

#: ``native`` (or ``0``) keeps oneDNN's convolution everywhere; unset or ``auto`` applies the rules.
ENV_VAR = "SIMCLRV2_CONV_MATMUL"

#: The variable's name before the forward and input gradient joined it; setting it is an error that
#: names the new one, so an old setting is never silently ignored.
_RENAMED_ENV_VAR = "SIMCLRV2_CONV_WEIGHT_GRAD"

#: Gathered patches per chunk: at most this many rows, and at most this many bytes, so the
#: transient buffer stays small next to the activations (151 MB for a whole batch of 512 at 4x4x512).
_CHUNK_ROWS = 8192
_CHUNK_BYTES = 64 << 20


def matmul_enabled_by_env() -> bool:
    """Whether ``SIMCLRV2_CONV_MATMUL`` allows the matrix-product convolutions; a ConfigError naming
    the variable for any other value (``setup_runtime`` calls it before training starts)."""
    if _RENAMED_ENV_VAR in os.environ:
        raise ConfigError(f"{_RENAMED_ENV_VAR} was renamed {ENV_VAR} (it now covers the forward and input "
                          f"gradient too): set {ENV_VAR}=native or auto instead")
    value = os.environ.get(ENV_VAR, "auto").strip().lower()
    if value in ("auto", "", "1", "matmul"):
        return True
    if value in ("native", "0", "off", "onednn"):
        return False
    raise ConfigError(f"{ENV_VAR}={value!r} is not understood: use 'auto' (the default: matrix products "
                      "where they are faster than oneDNN) or 'native' (oneDNN's convolution everywhere)")


class ConvPlan(NamedTuple):
    """How each pass of one convolution runs (module docstring): ``"onednn"``, ``"im2col"`` (a product
    over gathered patches), ``"shifted"`` (one product per tap, weight gradient only) or ``"winograd"``
    (F(4x4, 3x3), :mod:`.conv_winograd`)."""

    forward: str
    input_grad: str
    weight_grad: str


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the convolution runs in: autocast's when it is on for ``x``'s device, else ``x``'s."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _output_hw(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
               padding: tuple[int, int]) -> tuple[int, int]:
    return ((x.shape[-2] + 2 * padding[0] - kernel[0]) // stride[0] + 1,
            (x.shape[-1] + 2 * padding[1] - kernel[1]) // stride[1] + 1)


def plan_conv(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int],
              dilation: tuple[int, int], groups: int) -> ConvPlan | None:
    """The passes of ``F.conv2d(x, weight, ...)`` that :func:`conv2d_matmul` should run as matrix
    products, or None for oneDNN's plain convolution (the rules of the module docstring)."""
    if x.device.type != "cpu" or x.dim() != 4:
        return None
    if groups != 1 or tuple(dilation) != (1, 1) or min(weight.shape[-2:]) < 3:
        return None
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return None  # export and compilation see the plain convolution (a traced autograd.Function is opaque)
    dtype = _compute_dtype(x)
    if dtype not in (torch.bfloat16, torch.float32):
        return None
    h_out, w_out = _output_hw(x, tuple(weight.shape[-2:]), stride, padding)
    small = h_out * w_out <= MATMUL_MAX_OUTPUT_AREA
    training = weight.requires_grad and torch.is_grad_enabled()
    if dtype == torch.float32 and _winograd_shape(weight, stride, padding, (h_out, w_out)):
        plan = ConvPlan("winograd", "winograd", "winograd")  # in inference too: the forward was faster
    elif not training:
        plan = None
    elif dtype == torch.bfloat16:
        plan = ConvPlan("onednn", "onednn", "shifted") if small else None
    elif small:
        avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
        # the forward only at stride 1 or 4x4: oneDNN's strided forward to 7x7 was faster (211 vs 168)
        forward = avx512 and (max(stride) == 1 or h_out * w_out <= _STRIDED_FORWARD_MAX_OUTPUT_AREA)
        plan = ConvPlan("im2col" if forward else "onednn", "im2col" if avx512 else "onednn", "im2col")
    elif max(stride) > 1 and h_out * w_out <= MATMUL_WGRAD_MAX_STRIDED_AREA:
        plan = ConvPlan("onednn", "onednn", "im2col")
    else:
        plan = None
    return plan if plan is not None and matmul_enabled_by_env() else None


def _winograd_shape(weight: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int],
                    out_hw: tuple[int, int]) -> bool:
    """Whether an fp32 convolution runs by Winograd: 3x3, stride 1, padding 1, an output of at most 28x28
    (``WINOGRAD_MAX_OUTPUT_AREA``) and at least 4 on a side, at least ``WINOGRAD_MIN_CHANNELS`` channels
    in and out, on x86 CPUs with AVX2 or AVX-512 kernels (where it was measured)."""
    return (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and tuple(weight.shape[-2:]) == (3, 3)
            and tuple(stride) == (1, 1) and tuple(padding) == (1, 1) and min(out_hw) >= WINOGRAD_MIN_SIDE
            and out_hw[0] * out_hw[1] <= WINOGRAD_MAX_OUTPUT_AREA and min(weight.shape[:2]) >= WINOGRAD_MIN_CHANNELS)


def _padded_nhwc(x: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
    """``x`` as (N, H + 2p, W + 2p, C), zero-padded (one copy; a view of a channels_last ``x`` without padding)."""
    nhwc = x.permute(0, 2, 3, 1)
    if padding == (0, 0):
        return nhwc
    return F.pad(nhwc, (0, 0, padding[1], padding[1], padding[0], padding[0]))


def _chunk_images(n: int, rows_per_image: int, cols: int, itemsize: int) -> int:
    """Images per chunk: within ``_CHUNK_ROWS`` rows and ``_CHUNK_BYTES`` of patches, and the chunks
    of equal size (512 images at 4x4x512 go as 3 x 171, not 227 + 227 + 58)."""
    rows = min(_CHUNK_ROWS, max(rows_per_image, _CHUNK_BYTES // (cols * itemsize)))
    most = max(1, min(n, rows // rows_per_image))
    chunks = -(-n // most)
    return -(-n // chunks)


def _tap(x_pad: torch.Tensor, i: int, j: int, stride: tuple[int, int], out_hw: tuple[int, int]) -> torch.Tensor:
    """The inputs kernel tap ``(i, j)`` meets: ``x_pad[:, y*s + i, x*s + j, :]`` for every output ``(y, x)`` (a view)."""
    (sh, sw), (ho, wo) = stride, out_hw
    return x_pad[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]


def _patch_chunks(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                  out_hw: tuple[int, int]) -> Iterator[tuple[int, int, torch.Tensor]]:
    """im2col a batch chunk at a time: ``(start, images, patches)`` with ``patches`` the chunk's
    ``(images*H_out*W_out, kh*kw*C_in)`` rows, ``[n, y, x, i, j, c] = x_pad[n, y*s + i, x*s + j, c]``,
    gathered by one strided copy per kernel tap into one buffer reused by every chunk."""
    n, c_in = x.shape[:2]
    (kh, kw), (ho, wo) = kernel, out_hw
    x_pad = _padded_nhwc(x, padding)
    chunk = _chunk_images(n, ho * wo, kh * kw * c_in, x.element_size())
    cols = torch.empty(chunk, ho, wo, kh, kw, c_in, dtype=x.dtype, device=x.device)
    for start in range(0, n, chunk):
        b = min(n - start, chunk)
        for i in range(kh):
            for j in range(kw):
                cols[:b, :, :, i, j, :].copy_(_tap(x_pad[start:start + b], i, j, stride, out_hw))
        yield start, b, cols[:b].view(b * ho * wo, -1)


def _weight_rows(weight: torch.Tensor) -> torch.Tensor:
    """The weight as (C_out, kh*kw*C_in), in the patches' column order."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def im2col_conv2d(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int],
                  padding: tuple[int, int]) -> torch.Tensor:
    """``F.conv2d(x, weight, None, stride, padding)`` as one product per batch chunk of gathered
    patches. Returns NCHW in channels_last strides, in ``x``'s dtype."""
    c_out, _, kh, kw = weight.shape
    ho, wo = _output_hw(x, (kh, kw), stride, padding)
    w_rows_t = _weight_rows(weight).t()
    out = torch.empty(x.shape[0], ho, wo, c_out, dtype=x.dtype, device=x.device)
    for start, b, patches in _patch_chunks(x, (kh, kw), stride, padding, (ho, wo)):
        torch.mm(patches, w_rows_t, out=out[start:start + b].view(b * ho * wo, c_out))
    return out.permute(0, 3, 1, 2)


def _tap_range(size_in: int, size_out: int, tap: int, stride: int, pad: int) -> tuple[int, int, int]:
    """For one kernel tap along one axis: the first output index whose input ``o*stride + tap - pad``
    lies inside the image, the number of such outputs, and the first such input index."""
    first = max(0, -((tap - pad) // stride))          # ceil((pad - tap) / stride), at least 0
    last = min(size_out - 1, (size_in - 1 + pad - tap) // stride)
    count = max(0, last - first + 1)
    return first, count, first * stride + tap - pad


def im2col_input_grad(grad_out: torch.Tensor, weight: torch.Tensor, input_shape: torch.Size,
                      stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """The gradient of ``F.conv2d(x, weight, None, stride, padding)`` with respect to ``x``: the
    patches' gradient as one product per batch chunk, then each tap added back where it was
    gathered from (col2im). Returns NCHW in channels_last strides, in ``grad_out``'s dtype."""
    n, c_in, h, w = input_shape
    c_out, _, kh, kw = weight.shape
    ho, wo = grad_out.shape[-2:]
    g_rows = grad_out.permute(0, 2, 3, 1)
    w_rows = _weight_rows(weight.to(grad_out.dtype))
    grad_x = torch.zeros(n, h, w, c_in, dtype=grad_out.dtype, device=grad_out.device)
    chunk = _chunk_images(n, ho * wo, kh * kw * c_in, grad_out.element_size())
    cols = torch.empty(chunk * ho * wo, kh * kw * c_in, dtype=grad_out.dtype, device=grad_out.device)
    taps = [(i, j, _tap_range(h, ho, i, stride[0], padding[0]), _tap_range(w, wo, j, stride[1], padding[1]))
            for i in range(kh) for j in range(kw)]
    for start in range(0, n, chunk):
        b = min(n - start, chunk)
        torch.mm(g_rows[start:start + b].reshape(b * ho * wo, c_out), w_rows, out=cols[:b * ho * wo])
        patches = cols[:b * ho * wo].view(b, ho, wo, kh, kw, c_in)
        for i, j, (oy, ny, iy), (ox, nx, ix) in taps:
            if ny and nx:
                grad_x[start:start + b, iy:iy + stride[0] * (ny - 1) + 1:stride[0],
                       ix:ix + stride[1] * (nx - 1) + 1:stride[1], :] += patches[:, oy:oy + ny, ox:ox + nx, i, j, :]
    return grad_x.permute(0, 3, 1, 2)


def im2col_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, kernel_size: tuple[int, int],
                       stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """The gradient of ``F.conv2d(x, w, stride=stride, padding=padding)`` with respect to ``w``:
    ``grad_out^T @ patches``, accumulated over batch chunks. Returns ``(C_out, C_in, kh, kw)`` in
    channels_last strides, in ``grad_out``'s dtype."""
    c_in = x.shape[1]
    c_out, ho, wo = grad_out.shape[1:]
    kh, kw = kernel_size
    g_rows = grad_out.permute(0, 2, 3, 1)
    grad_w = torch.zeros(c_out, kh * kw * c_in, dtype=grad_out.dtype, device=grad_out.device)
    for start, b, patches in _patch_chunks(x, kernel_size, stride, padding, (ho, wo)):
        # ``addmm(out=)`` rather than ``addmm_``: the same kernel, and FlopCounterMode (benchmarks/throughput.py's
        # roofline) counts it; it does not count ``addmm_``
        torch.addmm(grad_w, g_rows[start:start + b].reshape(b * ho * wo, c_out).t(), patches, out=grad_w)
    return grad_w.view(c_out, kh, kw, c_in).permute(0, 3, 1, 2)


def shifted_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, kernel_size: tuple[int, int],
                        stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """The gradient of ``F.conv2d(x, w, stride=stride, padding=padding)`` with respect to ``w``,
    as ``kh * kw`` matrix products, one per tap, without gathering patches (the bf16 rule, module
    docstring). Returns ``(C_out, C_in, kh, kw)`` in channels_last strides, in ``grad_out``'s dtype."""
    n, c_in = x.shape[:2]
    c_out, h_out, w_out = grad_out.shape[1:]
    kh, kw = kernel_size
    x_pad = _padded_nhwc(x, padding)
    grad_rows_t = grad_out.permute(0, 2, 3, 1).reshape(n * h_out * w_out, c_out).t()
    grad_w = torch.empty(c_out, kh, kw, c_in, dtype=grad_out.dtype, device=grad_out.device)
    for i in range(kh):
        for j in range(kw):
            taps = _tap(x_pad, i, j, stride, (h_out, w_out))
            torch.mm(grad_rows_t, taps.reshape(n * h_out * w_out, c_in), out=grad_w[:, i, j, :])
    return grad_w.permute(0, 3, 1, 2)


def _onednn_input_grad(grad_out: torch.Tensor, weight: torch.Tensor, x: torch.Tensor,
                       stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    return torch.ops.aten.convolution_backward(grad_out, x, weight, None, list(stride), list(padding), [1, 1],
                                               False, [0, 0], 1, [True, False, False])[0]


# Each pass by plan name; the Winograd ones hold for 3x3, stride 1, padding 1 only (_winograd_shape).
_FORWARDS = {"onednn": lambda x, w, stride, padding: F.conv2d(x, w, None, stride, padding),
             "im2col": im2col_conv2d,
             "winograd": lambda x, w, stride, padding: winograd_conv2d(x, w)}
_INPUT_GRADS = {"onednn": _onednn_input_grad,
                "im2col": lambda grad_out, w, x, stride, padding: im2col_input_grad(grad_out, w, x.shape, stride, padding),
                "winograd": lambda grad_out, w, x, stride, padding: winograd_input_grad(grad_out, w)}
_WEIGHT_GRADS = {"im2col": im2col_weight_grad, "shifted": shifted_weight_grad,
                 "winograd": lambda x, grad_out, kernel_size, stride, padding: winograd_weight_grad(x, grad_out)}


class _Conv2dMatmul(torch.autograd.Function):
    """Bias-free ``F.conv2d`` whose passes run as the :class:`ConvPlan` says: matrix products or oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, plan):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.plan = stride, padding, plan
        with torch.autocast(x.device.type, enabled=False):
            return _FORWARDS[plan.forward](x, weight, stride, padding)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        plan, stride, padding = ctx.plan, ctx.stride, ctx.padding
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _INPUT_GRADS[plan.input_grad](grad_out, weight, x, stride, padding)
        if ctx.needs_input_grad[1]:
            grad_w = _WEIGHT_GRADS[plan.weight_grad](x, grad_out, tuple(weight.shape[-2:]), stride, padding)
        return grad_x, grad_w, None, None, None


def conv2d_matmul(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int],
                  plan: ConvPlan) -> torch.Tensor:
    """``F.conv2d(x, weight, None, stride, padding)`` with the passes of ``plan`` as matrix products, in
    the compute dtype (bf16 under autocast: ``x`` and ``weight`` are cast as autocast would, and the
    gradient reaches the fp32 weight through the cast; fp32 otherwise)."""
    dtype = _compute_dtype(x)
    return _Conv2dMatmul.apply(x.to(dtype), weight.to(dtype), tuple(stride), tuple(padding), plan)
