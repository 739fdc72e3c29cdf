"""3x3 convolutions by Winograd's minimal filtering, F(2x2, 3x3), on the CPU in fp32 (issue #17).

Why: in fp32 on a 2-core Intel Xeon with AVX-512 (host kind ``intel-avx512``) every pass of a 3x3
convolution already runs near the machine's matrix-product rate (about 300 GFLOP/s, see
:mod:`.conv_matmul`), so the only way to make the last ResNet stages faster is to do fewer
multiplications. Winograd's F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural
Networks", 2016) computes each 2x2 block of outputs from a 4x4 block of inputs with 16 products per
channel pair instead of 36: 2.25x fewer. Per 4x4 input tile ``d`` and filter ``g``::

    Y = A^T [ (G g G^T) (.) (B^T d B) ] A                         (Lavin & Gray, eq. 8)

and the elementwise product summed over input channels is 16 matrix products, one per position
``(a, b)`` of the 4x4 transformed tile: ``M[a, b] = V[a, b] @ U[a, b]`` with ``V`` the transformed
input tiles (tiles x C_in) and ``U`` the transformed filter (C_in x C_out).

The gradients are the adjoint maps:

* input: the convolution of ``grad_out`` with the flipped, transposed filter (3x3, stride 1, padding 1
  is its own transpose), so the same forward;
* weight: ``grad_U[a, b] = V[a, b]^T @ grad_M[a, b]`` with ``grad_M = A grad_Y A^T`` per tile, then
  ``grad_g = G^T grad_U G``.

Every transform is one product with a Kronecker matrix of 0, +-1 and 1/2 entries (``(B^T (x) B^T)``
on the 16 entries of each gathered input tile, ``(A^T (x) A^T)`` on the 16 products, ``(G (x) G)`` on
the 9 filter taps): one pass over memory each, and exact in binary, so the results are the
convolution's sums in another order. The measured error against float64 is a few 1e-7 relative in
fp32, the order of oneDNN's own (``tests/test_conv_winograd.py``). The transforms read and write 4x
the input (memory-bound), which is why this wins only where channels are many and outputs small:
measured timings and the rule are in :mod:`.conv_matmul`. They add about 1/16 to the products' FLOPs
at 256 channels (FlopCounterMode counts them).

Batches go a chunk of images at a time (at most ``_CHUNK_BYTES`` of transformed tiles), so the
transient buffers stay small next to the activations and the transforms stay in cache longer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["winograd_conv2d", "winograd_input_grad", "winograd_weight_grad"]

#: Transformed tiles per chunk, in bytes (of the larger of the input and output tiles).
_CHUNK_BYTES = 32 << 20

# F(2x2, 3x3) (Lavin & Gray 2016, section 4.1).
_BT = ((1.0, 0.0, -1.0, 0.0), (0.0, 1.0, 1.0, 0.0), (0.0, -1.0, 1.0, 0.0), (0.0, 1.0, 0.0, -1.0))   # 4 x 4
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))                         # 4 x 3
_AT = ((1.0, 1.0, 1.0, 0.0), (0.0, 1.0, -1.0, -1.0))                                               # 2 x 4


def _tiles(h: int, w: int) -> tuple[int, int]:
    """Output tiles (2x2 each) per column and row: odd sizes round up and the extra output is cropped."""
    return (h + 1) // 2, (w + 1) // 2


def _chunk_images(n: int, bytes_per_image: int) -> int:
    """Images per chunk within ``_CHUNK_BYTES``, the chunks of equal size."""
    most = max(1, min(n, _CHUNK_BYTES // max(1, bytes_per_image)))
    chunks = -(-n // most)
    return -(-n // chunks)


def _kron(matrix: tuple[tuple[float, ...], ...], like: torch.Tensor) -> torch.Tensor:
    """``M (x) M``: row ``r*a + b``, column ``c*k + l`` is ``M[a, k] * M[b, l]``, so that the 2-D
    transform ``M X M^T`` of every tile is one product with the tile's entries in rows (row-major)."""
    m = torch.tensor(matrix, dtype=like.dtype, device=like.device)
    return torch.kron(m, m)


def _transform_input(x_pad: torch.Tensor, th: int, tw: int) -> torch.Tensor:
    """``V = B^T d B`` for every 4x4 input tile ``d`` (tiles overlap by 2): ``x_pad`` (b, 2*th + 2,
    2*tw + 2, C), zero-padded NHWC; returns (16, b*th*tw, C), tile position ``4*a + b`` first. The tiles
    are gathered by one strided copy, then transformed by one product (fewer passes over memory than
    the additions spelled out: measured 6.4 vs 7.5 ms at 256 images of 4x4x512)."""
    b, _, _, c = x_pad.shape
    sb, sh, sw, sc = x_pad.stride()
    tiles = x_pad.as_strided((4, 4, b, th, tw, c), (sh, sw, sb, 2 * sh, 2 * sw, sc), x_pad.storage_offset())
    return (_kron(_BT, x_pad) @ tiles.reshape(16, -1)).view(16, b * th * tw, c)


def _transform_output(m: torch.Tensor, b: int, th: int, tw: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``Y = A^T M A`` for every tile: ``m`` (16, b*th*tw, C_out); returns (b, 2*th, 2*tw, C_out),
    written into ``out`` (a contiguous tensor of that shape) when given."""
    c = m.shape[-1]
    y = _kron(_AT, m) @ m.reshape(16, -1)                                       # (4: 2*i + j, b*th*tw*C)
    if out is None:
        out = torch.empty(b, 2 * th, 2 * tw, c, dtype=m.dtype, device=m.device)
    out.view(b, th, 2, tw, 2, c).copy_(y.view(2, 2, b, th, tw, c).permute(2, 3, 0, 4, 1, 5))
    return out


def _transform_output_grad(grad_y: torch.Tensor, th: int, tw: int) -> torch.Tensor:
    """``grad_M = A grad_Y A^T`` per tile (the adjoint of :func:`_transform_output`): ``grad_y`` (b,
    2*th, 2*tw, C_out) NHWC; returns (16, b*th*tw, C_out)."""
    b, _, _, c = grad_y.shape
    tiles = grad_y.reshape(b, th, 2, tw, 2, c).permute(2, 4, 0, 1, 3, 5).reshape(4, -1)
    return (_kron(_AT, grad_y).t() @ tiles).view(16, b * th * tw, c)


def _transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """``U = G g G^T`` per (C_out, C_in) pair: (C_out, C_in, 3, 3) -> (16, C_in, C_out), one product."""
    c_out, c_in = weight.shape[:2]
    taps = weight.permute(2, 3, 1, 0).reshape(9, c_in * c_out)
    return (_kron(_G, weight) @ taps).view(16, c_in, c_out)


def _untransform_weight_grad(grad_u: torch.Tensor) -> torch.Tensor:
    """``G^T grad_U G`` (the adjoint of :func:`_transform_weight`): (16, C_in, C_out) -> (C_out, C_in, 3, 3)
    in channels_last strides."""
    _, c_in, c_out = grad_u.shape
    taps = _kron(_G, grad_u).t() @ grad_u.view(16, c_in * c_out)             # (9, C_in*C_out)
    return taps.view(3, 3, c_in, c_out).permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)


def _padded_input(x_nhwc: torch.Tensor, th: int, tw: int) -> torch.Tensor:
    """Padding 1 on every side, plus 1 at the bottom or right where the size is odd (a tile's worth)."""
    h, w = x_nhwc.shape[1:3]
    return F.pad(x_nhwc, (0, 0, 1, 1 + 2 * tw - w, 1, 1 + 2 * th - h))


def winograd_conv2d(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.conv2d(x, weight, None, stride=1, padding=1)`` for a 3x3 ``weight``, by F(2x2, 3x3). Returns
    NCHW in channels_last strides, in ``x``'s dtype."""
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    th, tw = _tiles(h, w)
    u = _transform_weight(weight.to(x.dtype))
    out = torch.empty(n, h, w, c_out, dtype=x.dtype, device=x.device)
    x_nhwc = x.permute(0, 2, 3, 1)
    chunk = _chunk_images(n, 16 * th * tw * max(c_in, c_out) * x.element_size())
    for start in range(0, n, chunk):
        b = min(n - start, chunk)
        v = _transform_input(_padded_input(x_nhwc[start:start + b], th, tw), th, tw)
        m = torch.bmm(v, u)
        if (2 * th, 2 * tw) == (h, w):
            _transform_output(m, b, th, tw, out=out[start:start + b])
        else:
            out[start:start + b] = _transform_output(m, b, th, tw)[:, :h, :w]
    return out.permute(0, 3, 1, 2)


def winograd_input_grad(grad_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`winograd_conv2d` with respect to ``x``: the same convolution of
    ``grad_out`` with the filter flipped and its channels swapped (3x3, stride 1, padding 1)."""
    return winograd_conv2d(grad_out, weight.flip(2, 3).transpose(0, 1))


def winograd_weight_grad(x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`winograd_conv2d` with respect to the 3x3 weight:
    ``G^T (sum over tiles of V^T grad_M) G`` (module docstring), accumulated over batch chunks. The
    input tiles are transformed again rather than kept from the forward (4x the input's memory).
    Returns ``(C_out, C_in, 3, 3)`` in channels_last strides, in ``grad_out``'s dtype."""
    n, c_in, h, w = x.shape
    c_out = grad_out.shape[1]
    th, tw = _tiles(h, w)
    x_nhwc = x.to(grad_out.dtype).permute(0, 2, 3, 1)
    g_nhwc = grad_out.permute(0, 2, 3, 1)
    grad_u = torch.zeros(16, c_in, c_out, dtype=grad_out.dtype, device=grad_out.device)
    chunk = _chunk_images(n, 16 * th * tw * max(c_in, c_out) * grad_out.element_size())
    for start in range(0, n, chunk):
        b = min(n - start, chunk)
        v = _transform_input(_padded_input(x_nhwc[start:start + b], th, tw), th, tw)
        g = g_nhwc[start:start + b]
        if (2 * th, 2 * tw) != (h, w):
            g = F.pad(g, (0, 0, 0, 2 * tw - w, 0, 2 * th - h))  # the cropped outputs had no gradient
        gm = _transform_output_grad(g, th, tw)
        # ``baddbmm(out=)``: FlopCounterMode (the benchmark's roofline) counts it, as it does ``bmm``
        torch.baddbmm(grad_u, v.transpose(1, 2), gm, out=grad_u)
    return _untransform_weight_grad(grad_u)
