"""Winograd convolutions, F(2x2, 3x3) and F(4x4, 3x3) (simclrv2.models.conv_winograd), equal the
convolution and its gradients, run where the rule says, and are counted honestly by the FLOP counter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from simclrv2.models import conv_winograd
from simclrv2.models.conv_matmul import (ENV_VAR, WINOGRAD_MAX_OUTPUT_AREA, WINOGRAD_MIN_CHANNELS,
                                         WINOGRAD_MIN_SIDE, ConvPlan, plan_conv)
from simclrv2.models.conv_winograd import output_tile, winograd_conv2d, winograd_input_grad, winograd_weight_grad
from simclrv2.models.layers import Conv2dFixedPadding
from test_conv_matmul import MATMUL_GRAD_FN, _fp32_grads


SHAPES = [
    (3, 5, 4, 4),     # the last stage at 32 px: one 2x2 grid of tiles
    (2, 3, 7, 7),     # 7x7 (224 px): odd, the extra output row and column are cropped
    (2, 3, 6, 9),     # rectangular, one side odd
    (2, 4, 1, 1),     # a single pixel: every tap but the centre reads padding
    (4, 2, 8, 2),
]


def _reference(x, weight, gen):
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    out = F.conv2d(x, weight, None, 1, 1)
    grad_out = torch.randn(*out.shape, generator=gen, dtype=out.dtype)
    grad_x, grad_w = torch.autograd.grad(out, (x, weight), grad_out)
    return out.detach(), grad_out, grad_x, grad_w


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("m", [2, 4])
def test_every_winograd_pass_equals_the_convolution_in_float64(monkeypatch, shape, chunked, m):
    """The transforms are exact linear maps: in float64 the three passes equal the convolution to
    rounding, whole or an image at a time, with either output tile (odd and small sizes cropped)."""
    if chunked:
        monkeypatch.setattr(conv_winograd, "_CHUNK_BYTES", 1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    weight = torch.randn(6, shape[1], 3, 3, generator=gen, dtype=torch.float64)
    out, grad_out, grad_x, grad_w = _reference(x, weight, gen)
    got = {"forward": winograd_conv2d(x, weight, m), "input grad": winograd_input_grad(grad_out, weight, m),
           "weight grad": winograd_weight_grad(x, grad_out, m)}
    want = {"forward": out, "input grad": grad_x, "weight grad": grad_w}
    for name, value in got.items():
        assert value.shape == want[name].shape, name
        torch.testing.assert_close(value, want[name], rtol=1e-11, atol=1e-11, msg=name)
        assert value.is_contiguous(memory_format=torch.channels_last), name


def test_the_output_tile_is_4_where_both_sides_allow_it():
    assert output_tile(4, 4) == output_tile(7, 7) == output_tile(28, 14) == 4
    assert output_tile(2, 8) == output_tile(1, 1) == 2


def test_a_batch_in_chunks_is_split_into_equal_chunks(monkeypatch):
    monkeypatch.setattr(conv_winograd, "_CHUNK_BYTES", 300)
    assert conv_winograd._chunk_images(7, 100) == 3      # at most 3 per chunk: 3 chunks of 3, 3, 1
    assert conv_winograd._chunk_images(8, 100) == 3      # 3 chunks: 3, 3, 2
    assert conv_winograd._chunk_images(6, 100) == 3
    assert conv_winograd._chunk_images(4, 10**9) == 1


@pytest.mark.parametrize("m, worst", [(2, 4.0), (4, 16.0)])
def test_fp32_winograd_is_about_as_accurate_as_onednn(m, worst):
    """In fp32 the transforms add rounding. Against float64, at the shape the rule picks (512 channels,
    4x4): F(2x2, 3x3) (matrices of 0, +-1 and 1/2) measured 0.5-2x oneDNN's error; F(4x4, 3x3) (1/6,
    1/12, 1/24 and 8 among them) 3.6x in the forward and input gradient and 10x in the weight gradient,
    all under 1e-5 relative (1.4e-6 at worst)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 512, 4, 4, generator=gen).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(512, 512, 3, 3, generator=gen) / 68).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(16, 512, 4, 4, generator=gen).contiguous(memory_format=torch.channels_last)
    exact = torch.ops.aten.convolution_backward(grad_out.double(), x.double(), weight.double(), None, [1, 1], [1, 1],
                                                [1, 1], False, [0, 0], 1, [True, True, False])
    onednn = torch.ops.aten.convolution_backward(grad_out, x, weight, None, [1, 1], [1, 1], [1, 1], False,
                                                 [0, 0], 1, [True, True, False])
    pairs = {"forward": (winograd_conv2d(x, weight, m), F.conv2d(x, weight, padding=1),
                         F.conv2d(x.double(), weight.double(), padding=1)),
             "input grad": (winograd_input_grad(grad_out, weight, m), onednn[0], exact[0]),
             "weight grad": (winograd_weight_grad(x, grad_out, m), onednn[1], exact[1])}
    for name, (ours, theirs, want) in pairs.items():
        err = ((ours.double() - want).norm() / want.norm()).item()
        err_onednn = ((theirs.double() - want).norm() / want.norm()).item()
        assert err < worst * err_onednn + 1e-7 and err < 1e-5, (name, err, err_onednn)


@pytest.fixture
def capability(monkeypatch):
    def set_to(value):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: value)
    return set_to


WINOGRAD = ConvPlan("winograd", "winograd", "winograd")


@pytest.mark.parametrize("channels, side, stride, isa, want_winograd", [
    (512, 4, 1, "AVX512", True),     # the last stage at 32 px
    (256, 8, 1, "AVX512", True),     # the third stage at 32 px
    (128, 16, 1, "AVX512", True),    # the second stage at 32 px
    (512, 7, 1, "AVX512", True),     # the last stage at 224 px
    (128, 28, 1, "AVX512", True),    # the second stage at 224 px
    (512, 4, 1, "AVX2", True),
    (512, 4, 1, "DEFAULT", False),   # not measured off x86 vector CPUs
    (128, 32, 1, "AVX512", False),   # 32x32: not measured
    (64, 16, 1, "AVX512", False),    # too few channels: the transforms cost more than they save
    (512, 2, 1, "AVX512", False),    # 2x2: too small for a 4x4 tile
    (512, 8, 2, "AVX512", False),    # strided
])
def test_the_rule_picks_winograd_where_it_was_measured_faster(capability, channels, side, stride, isa,
                                                              want_winograd):
    capability(isa)
    x = torch.zeros(2, channels, side, side)
    weight = torch.zeros(channels, channels, 3, 3, requires_grad=True)
    plan = plan_conv(x, weight, (stride, stride), (1, 1), (1, 1), 1)
    assert (plan == WINOGRAD) == want_winograd, plan
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 keeps its own rule
        assert plan_conv(x, weight, (stride, stride), (1, 1), (1, 1), 1) != WINOGRAD
    assert 28 * 28 <= WINOGRAD_MAX_OUTPUT_AREA < 32 * 32 and 64 < WINOGRAD_MIN_CHANNELS <= 128
    assert WINOGRAD_MIN_SIDE == 4


def test_a_layer4_conv_runs_by_winograd_and_matches_onednn(capability, monkeypatch):
    """The network's layer: fp32, 256 channels at 4x4, all three passes by Winograd (the autograd node
    says which path ran), each within fp32 rounding of oneDNN's (F(4x4, 3x3): a few 1e-6)."""
    capability("AVX512")
    torch.manual_seed(0)
    conv = Conv2dFixedPadding(256, 256, 3, 1).to(memory_format=torch.channels_last)
    x = torch.randn(8, 256, 4, 4).to(memory_format=torch.channels_last)
    grad_out = torch.randn(8, 256, 4, 4)
    assert plan_conv(x, conv.weight, conv.stride, conv.padding, conv.dilation, conv.groups) == WINOGRAD
    y_fast, gx_fast, gw_fast = _fp32_grads(conv, x, grad_out)
    assert type(y_fast.grad_fn).__name__ == MATMUL_GRAD_FN
    monkeypatch.setenv(ENV_VAR, "native")
    y_ref, gx_ref, gw_ref = _fp32_grads(conv, x, grad_out)
    assert type(y_ref.grad_fn).__name__ != MATMUL_GRAD_FN
    for name, fast, ref in (("forward", y_fast, y_ref), ("input", gx_fast, gx_ref), ("weight", gw_fast, gw_ref)):
        rel = ((fast - ref).norm() / ref.norm()).item()
        assert 0 < rel < 1e-5, (name, rel)   # not 0: the Winograd sums ran, in another order


def test_the_flop_counter_sees_the_winograd_products_and_transforms(capability, monkeypatch):
    """What benchmarks/throughput.py relies on to report model and executed FLOPs: with the rule on,
    the counter sees F(4x4, 3x3)'s 36 products per 4x4 outputs (a quarter of the convolution's) and
    the transforms' products; with ``native`` it sees the convolution's own count."""
    from torch.utils.flop_counter import FlopCounterMode

    capability("AVX512")
    conv = Conv2dFixedPadding(256, 256, 3, 1)
    counts = {}
    for setting in ("auto", "native"):
        monkeypatch.setenv(ENV_VAR, setting)
        x = torch.randn(4, 256, 4, 4, requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            conv(x).sum().backward()
        counts[setting] = counter.get_total_flops()
    conv_flops = 3 * 2 * 4 * 16 * 256 * 256 * 9               # forward, input and weight gradient
    filter_flops = 3 * 2 * 36 * 9 * 256 * 256                 # U = (G x G) g twice, and its adjoint once
    tiles = 4                                                  # 4 images of one 4x4 tile
    tile_flops = 3 * 2 * (36 * 36 + 36 * 16) * tiles * 256     # per pass: (B^T x B^T) in, (A^T x A^T) out or adjoint
    assert counts["native"] == conv_flops
    assert counts["auto"] == conv_flops // 4 + filter_flops + tile_flops


def test_inference_takes_the_winograd_forward_too(capability, monkeypatch):
    """Evaluation, prediction, the kNN monitor and the distillation teacher run without gradients:
    the same rule gives them the Winograd forward (no autograd node is recorded), within fp32
    rounding of oneDNN's; with ``native`` they get oneDNN's."""
    capability("AVX512")
    torch.manual_seed(0)
    conv = Conv2dFixedPadding(128, 128, 3, 1).to(memory_format=torch.channels_last).eval()
    x = torch.randn(4, 128, 8, 8).to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert plan_conv(x, conv.weight, conv.stride, conv.padding, conv.dilation, conv.groups) == WINOGRAD
        fast = conv(x)
        monkeypatch.setenv(ENV_VAR, "native")
        assert plan_conv(x, conv.weight, conv.stride, conv.padding, conv.dilation, conv.groups) is None
        ref = conv(x)
    assert fast.grad_fn is None and fast.is_contiguous(memory_format=torch.channels_last)
    rel = ((fast - ref).norm() / ref.norm()).item()
    assert 0 < rel < 1e-5, rel
