"""3x3 convolutions by Winograd's minimal filtering, F(4x4, 3x3) and F(2x2, 3x3), on the CPU in fp32 (issue #17).

Why: in fp32 on a 2-core Intel Xeon with AVX-512 (host kind ``intel-avx512``) every pass of a 3x3
convolution already runs near the machine's matrix-product rate (about 300 GFLOP/s, see
:mod:`.conv_matmul`), so the only way to make the ResNet stages faster is to do fewer
multiplications. Winograd's F(m x m, 3 x 3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural
Networks", 2016) computes each m x m block of outputs from an (m + 2)-square block of inputs with
``(m + 2)^2`` products per channel pair instead of ``9 m^2``: 2.25x fewer for m = 2, 4x for m = 4. Per
input tile ``d`` and filter ``g``::

    Y = A^T [ (G g G^T) (.) (B^T d B) ] A                         (Lavin & Gray, eq. 8)

and the elementwise product summed over input channels is ``(m + 2)^2`` matrix products, one per
position ``(a, b)`` of the transformed tile: ``M[a, b] = V[a, b] @ U[a, b]`` with ``V`` the transformed
input tiles (tiles x C_in) and ``U`` the transformed filter (C_in x C_out).

The gradients are the adjoint maps:

* input: the convolution of ``grad_out`` with the flipped, transposed filter (3x3, stride 1, padding 1
  is its own transpose), so the same forward;
* weight: ``grad_U[a, b] = V[a, b]^T @ grad_M[a, b]`` with ``grad_M = A grad_Y A^T`` per tile, then
  ``grad_g = G^T grad_U G``.

Every transform is one product with a Kronecker matrix (``(B^T (x) B^T)`` on the entries of each
gathered input tile, ``(A^T (x) A^T)`` on the products, ``(G (x) G)`` on the 9 filter taps): one pass
over memory each. F(2x2, 3x3)'s matrices hold 0, +-1 and 1/2, exact in binary; F(4x4, 3x3)'s (points
0, +-1, +-2) hold 1/6, 1/12, 1/24 and powers of 2 up to 8, so it rounds more. Measured against
float64 in fp32 at 512 channels, 4x4 (``tests/test_conv_winograd.py``): F(2x2) 0.5-2x oneDNN's error,
F(4x4) 3.6x in the forward and input gradient and 10x in the weight gradient, 1.4e-6 relative at
worst (fp32 rounds at 6e-8; bf16 autocast, which the bf16 hosts train in, at 4e-3). The network uses
F(4x4) wherever both output sides are at least 4 (:func:`output_tile`): it was the faster at every
shape measured. The transforms read and write 2.25x (m = 4) or 4x (m = 2) the input, memory-bound,
which is why this wins only where channels are many: measured timings and the rule are in
:mod:`.conv_matmul`. FlopCounterMode counts the transforms' products with the rest.

Batches go a chunk of images at a time (at most ``_CHUNK_BYTES`` of transformed tiles), so the
transient buffers stay small next to the activations and the transforms stay in cache longer.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

__all__ = ["output_tile", "winograd_conv2d", "winograd_input_grad", "winograd_weight_grad"]

#: Transformed tiles per chunk, in bytes (of the larger of the input and output tiles). Our step at batch
#: 256 (intel-avx512) grew by 2754 MB with 32-MB chunks and 2657 MB with 8-MB chunks, no slower (5.9-6.5 s
#: a step either way); 4-MB chunks were no smaller.
_CHUNK_BYTES = 8 << 20

#: The transform matrices ``(B^T, G, A^T)`` of F(m x m, 3 x 3) by output tile size ``m`` (Lavin & Gray
#: 2016, sections 4.1 and 4.2): input tiles of ``m + 2``, interpolation points 0, 1, -1 (and 2, -2
#: for m = 4) and infinity.
_MATRICES: dict[int, tuple[tuple[tuple[float, ...], ...], ...]] = {
    2: (((1.0, 0.0, -1.0, 0.0), (0.0, 1.0, 1.0, 0.0), (0.0, -1.0, 1.0, 0.0), (0.0, 1.0, 0.0, -1.0)),
        ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0)),
        ((1.0, 1.0, 1.0, 0.0), (0.0, 1.0, -1.0, -1.0))),
    4: (((4.0, 0.0, -5.0, 0.0, 1.0, 0.0), (0.0, -4.0, -4.0, 1.0, 1.0, 0.0), (0.0, 4.0, -4.0, -1.0, 1.0, 0.0),
         (0.0, -2.0, -1.0, 2.0, 1.0, 0.0), (0.0, 2.0, -1.0, -2.0, 1.0, 0.0), (0.0, 4.0, 0.0, -5.0, 0.0, 1.0)),
        ((1 / 4, 0.0, 0.0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
         (1 / 24, -1 / 12, 1 / 6), (0.0, 0.0, 1.0)),
        ((1.0, 1.0, 1.0, 1.0, 1.0, 0.0), (0.0, 1.0, -1.0, 2.0, -2.0, 0.0), (0.0, 1.0, 1.0, 4.0, 4.0, 0.0),
         (0.0, 1.0, -1.0, 8.0, -8.0, 1.0))),
}


def output_tile(h: int, w: int) -> int:
    """The output tile ``m`` for an ``h x w`` output: 4 where both sides are at least 4 (F(4x4, 3x3) was
    faster than F(2x2, 3x3) at every such shape measured, 7x7 and 14x14 included, where it computes
    outputs that are cropped), else 2."""
    return 4 if min(h, w) >= 4 else 2


def _tiles(h: int, w: int, m: int) -> tuple[int, int]:
    """Output tiles (m x m each) per column and row: other sizes round up and the extra output is cropped."""
    return -(-h // m), -(-w // m)


def _chunk_images(n: int, bytes_per_image: int) -> int:
    """Images per chunk within ``_CHUNK_BYTES``, the chunks of equal size."""
    most = max(1, min(n, _CHUNK_BYTES // max(1, bytes_per_image)))
    chunks = -(-n // most)
    return -(-n // chunks)


def _kron(m: int, which: int, like: torch.Tensor) -> torch.Tensor:
    """``M (x) M`` for ``M`` the ``which``-th matrix of F(m x m, 3 x 3) (0: B^T, 1: G, 2: A^T): row
    ``r*a + b``, column ``c*k + l`` is ``M[a, k] * M[b, l]``, so that the 2-D transform ``M X M^T`` of
    every tile is one product with the tile's entries in rows (row-major)."""
    matrix = torch.tensor(_MATRICES[m][which], dtype=like.dtype, device=like.device)
    return torch.kron(matrix, matrix)


def _transform_input(x_pad: torch.Tensor, th: int, tw: int, m: int) -> torch.Tensor:
    """``V = B^T d B`` for every ``(m + 2)``-square input tile ``d`` (tiles overlap by 2): ``x_pad`` (b,
    m*th + 2, m*tw + 2, C), zero-padded NHWC; returns ((m + 2)^2, b*th*tw, C), tile position first.
    The tiles are gathered by one strided copy, then transformed by one product (fewer passes over
    memory than the additions spelled out: measured 6.4 vs 7.5 ms at 256 images of 4x4x512, m = 2)."""
    b, _, _, c = x_pad.shape
    a = m + 2
    sb, sh, sw, sc = x_pad.stride()
    tiles = x_pad.as_strided((a, a, b, th, tw, c), (sh, sw, sb, m * sh, m * sw, sc), x_pad.storage_offset())
    return (_kron(m, 0, x_pad) @ tiles.reshape(a * a, -1)).view(a * a, b * th * tw, c)


def _transform_output(prods: torch.Tensor, b: int, th: int, tw: int, m: int,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """``Y = A^T M A`` for every tile: ``prods`` ((m + 2)^2, b*th*tw, C_out); returns (b, m*th, m*tw,
    C_out), written into ``out`` (a contiguous tensor of that shape) when given."""
    c = prods.shape[-1]
    y = _kron(m, 2, prods) @ prods.reshape((m + 2) ** 2, -1)                   # (m*m: m*i + j, b*th*tw*C)
    if out is None:
        out = torch.empty(b, m * th, m * tw, c, dtype=prods.dtype, device=prods.device)
    out.view(b, th, m, tw, m, c).copy_(y.view(m, m, b, th, tw, c).permute(2, 3, 0, 4, 1, 5))
    return out


def _transform_output_grad(grad_y: torch.Tensor, th: int, tw: int, m: int) -> torch.Tensor:
    """``grad_M = A grad_Y A^T`` per tile (the adjoint of :func:`_transform_output`): ``grad_y`` (b,
    m*th, m*tw, C_out) NHWC; returns ((m + 2)^2, b*th*tw, C_out)."""
    b, _, _, c = grad_y.shape
    tiles = grad_y.reshape(b, th, m, tw, m, c).permute(2, 4, 0, 1, 3, 5).reshape(m * m, -1)
    return (_kron(m, 2, grad_y).t() @ tiles).view((m + 2) ** 2, b * th * tw, c)


def _transform_weight(weight: torch.Tensor, m: int) -> torch.Tensor:
    """``U = G g G^T`` per (C_out, C_in) pair: (C_out, C_in, 3, 3) -> ((m + 2)^2, C_in, C_out), one product."""
    c_out, c_in = weight.shape[:2]
    taps = weight.permute(2, 3, 1, 0).reshape(9, c_in * c_out)
    return (_kron(m, 1, weight) @ taps).view((m + 2) ** 2, c_in, c_out)


def _untransform_weight_grad(grad_u: torch.Tensor, m: int) -> torch.Tensor:
    """``G^T grad_U G`` (the adjoint of :func:`_transform_weight`): ((m + 2)^2, C_in, C_out) ->
    (C_out, C_in, 3, 3) in channels_last strides."""
    _, c_in, c_out = grad_u.shape
    taps = _kron(m, 1, grad_u).t() @ grad_u.reshape(-1, c_in * c_out)       # (9, C_in*C_out)
    return taps.view(3, 3, c_in, c_out).permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)


def _padded_input(x_nhwc: torch.Tensor, th: int, tw: int, m: int) -> torch.Tensor:
    """Padding 1 on every side, plus what the last tile needs at the bottom and right beyond the image."""
    h, w = x_nhwc.shape[1:3]
    return F.pad(x_nhwc, (0, 0, 1, 1 + m * tw - w, 1, 1 + m * th - h))


def _input_tile_chunks(x: torch.Tensor, th: int, tw: int, m: int,
                       channels: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """:func:`_transform_input` a batch chunk at a time: ``(start, images, V)`` for ``x`` (NCHW), the
    chunks sized by ``_CHUNK_BYTES`` of transformed tiles of ``channels`` (the larger side) each."""
    n = x.shape[0]
    x_nhwc = x.permute(0, 2, 3, 1)
    chunk = _chunk_images(n, (m + 2) ** 2 * th * tw * channels * x.element_size())
    for start in range(0, n, chunk):
        b = min(n - start, chunk)
        yield start, b, _transform_input(_padded_input(x_nhwc[start:start + b], th, tw, m), th, tw, m)


def winograd_conv2d(x: torch.Tensor, weight: torch.Tensor, m: int | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, None, stride=1, padding=1)`` for a 3x3 ``weight``, by F(m x m, 3 x 3)
    (``m`` 2 or 4; default :func:`output_tile`). Returns NCHW in channels_last strides, in ``x``'s dtype."""
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    m = m or output_tile(h, w)
    th, tw = _tiles(h, w, m)
    u = _transform_weight(weight.to(x.dtype), m)
    out = torch.empty(n, h, w, c_out, dtype=x.dtype, device=x.device)
    for start, b, v in _input_tile_chunks(x, th, tw, m, max(c_in, c_out)):
        prods = torch.bmm(v, u)
        if (m * th, m * tw) == (h, w):
            _transform_output(prods, b, th, tw, m, out=out[start:start + b])
        else:
            out[start:start + b] = _transform_output(prods, b, th, tw, m)[:, :h, :w]
    return out.permute(0, 3, 1, 2)


def winograd_input_grad(grad_out: torch.Tensor, weight: torch.Tensor, m: int | None = None) -> torch.Tensor:
    """The gradient of :func:`winograd_conv2d` with respect to ``x``: the same convolution of
    ``grad_out`` with the filter flipped and its channels swapped (3x3, stride 1, padding 1)."""
    return winograd_conv2d(grad_out, weight.flip(2, 3).transpose(0, 1), m)


def winograd_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, m: int | None = None) -> torch.Tensor:
    """The gradient of :func:`winograd_conv2d` with respect to the 3x3 weight:
    ``G^T (sum over tiles of V^T grad_M) G`` (module docstring), accumulated over batch chunks. The
    input tiles are transformed again rather than kept from the forward (2.25-4x the input's memory).
    Returns ``(C_out, C_in, 3, 3)`` in channels_last strides, in ``grad_out``'s dtype."""
    n, c_in, h, w = x.shape
    c_out = grad_out.shape[1]
    m = m or output_tile(h, w)
    th, tw = _tiles(h, w, m)
    g_nhwc = grad_out.permute(0, 2, 3, 1)
    grad_u = torch.zeros((m + 2) ** 2, c_in, c_out, dtype=grad_out.dtype, device=grad_out.device)
    for start, b, v in _input_tile_chunks(x.to(grad_out.dtype), th, tw, m, max(c_in, c_out)):
        g = g_nhwc[start:start + b]
        if (m * th, m * tw) != (h, w):
            g = F.pad(g, (0, 0, 0, m * tw - w, 0, m * th - h))  # the cropped outputs had no gradient
        gm = _transform_output_grad(g, th, tw, m)
        # ``baddbmm(out=)``: FlopCounterMode (the benchmark's roofline) counts it, as it does ``bmm``
        torch.baddbmm(grad_u, v.transpose(1, 2), gm, out=grad_u)
    return _untransform_weight_grad(grad_u, m)
