"""The matrix-product convolution passes (simclrv2.models.conv_matmul) equal the convolution and its
gradients, and the network takes each only where the rules say."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from simclrv2.cli.main import main
from simclrv2.models import conv_matmul, create_model
from simclrv2.models.conv_matmul import (ENV_VAR, MATMUL_MAX_OUTPUT_AREA, MATMUL_WGRAD_MAX_STRIDED_AREA, ConvPlan,
                                         im2col_conv2d, im2col_input_grad, im2col_weight_grad, plan_conv,
                                         shifted_weight_grad)
from simclrv2.models.layers import Conv2dFixedPadding

MATMUL_GRAD_FN = "_Conv2dMatmulBackward"

SHAPES = [
    ((3, 5, 4, 4), 3, 1, 1),      # the last stage at 32 px
    ((2, 4, 8, 8), 3, 2, 1),      # the strided entry to it
    ((2, 3, 7, 5), 3, 1, 1),      # rectangular
    ((2, 3, 9, 9), 5, 2, 2),      # a larger kernel
    ((2, 3, 6, 6), 2, 1, 0),      # an even kernel after an explicit pad
    ((2, 3, 5, 7), 3, 3, 2),      # stride 3: some taps reach no input at all
]


def _reference(x, weight, stride, padding, gen):
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    out = F.conv2d(x, weight, None, stride, padding)
    grad_out = torch.randn(*out.shape, generator=gen, dtype=out.dtype)
    grad_x, grad_w = torch.autograd.grad(out, (x, weight), grad_out)
    return out.detach(), grad_out, grad_x, grad_w


@pytest.mark.parametrize("shape, kernel, stride, padding", SHAPES)
def test_every_matmul_pass_equals_the_convolution_in_float64(shape, kernel, stride, padding):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    weight = torch.randn(6, shape[1], kernel, kernel, generator=gen, dtype=torch.float64)
    out, grad_out, grad_x, grad_w = _reference(x, weight, stride, padding, gen)
    k, s, p = (kernel, kernel), (stride, stride), (padding, padding)
    got = {"forward": im2col_conv2d(x, weight, s, p), "input grad": im2col_input_grad(grad_out, weight, x.shape, s, p),
           "im2col weight grad": im2col_weight_grad(x, grad_out, k, s, p),
           "shifted weight grad": shifted_weight_grad(x, grad_out, k, s, p)}
    want = {"forward": out, "input grad": grad_x, "im2col weight grad": grad_w, "shifted weight grad": grad_w}
    for name, value in got.items():
        assert value.shape == want[name].shape, name
        torch.testing.assert_close(value, want[name], rtol=1e-12, atol=1e-12, msg=name)
    assert got["forward"].is_contiguous(memory_format=torch.channels_last)


def test_batches_larger_than_one_chunk_are_gathered_in_chunks(monkeypatch):
    """Seven images in chunks of three (the last one short): the same values as in one chunk."""
    monkeypatch.setattr(conv_matmul, "_CHUNK_ROWS", 3 * 16)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 4, 4, 4, generator=gen, dtype=torch.float64)
    weight = torch.randn(5, 4, 3, 3, generator=gen, dtype=torch.float64)
    assert conv_matmul._chunk_images(7, 16, 36, 8) == 3
    out, grad_out, grad_x, grad_w = _reference(x, weight, 1, 1, gen)
    torch.testing.assert_close(im2col_conv2d(x, weight, (1, 1), (1, 1)), out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(im2col_input_grad(grad_out, weight, x.shape, (1, 1), (1, 1)), grad_x,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(im2col_weight_grad(x, grad_out, (3, 3), (1, 1), (1, 1)), grad_w,
                               rtol=1e-12, atol=1e-12)


@pytest.fixture
def avx512(monkeypatch):
    """The AVX-512 rules on any host (the rules read the capability PyTorch dispatches to)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")


@pytest.mark.parametrize("capability", ["AVX2", "DEFAULT"])
def test_without_avx512_an_fp32_small_conv_keeps_onednn_forward_and_input_gradient(monkeypatch, capability):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    weight = torch.zeros(8, 8, 3, 3, requires_grad=True)
    plan = plan_conv(torch.zeros(2, 8, 4, 4), weight, (1, 1), (1, 1), (1, 1), 1)
    assert plan == ConvPlan("onednn", "onednn", "im2col")


@pytest.mark.parametrize("dtype, side, stride, want", [
    (torch.float32, 4, 1, ConvPlan("im2col", "im2col", "im2col")),
    (torch.float32, 8, 2, ConvPlan("im2col", "im2col", "im2col")),        # 4x4 output, strided
    (torch.float32, 7, 1, ConvPlan("im2col", "im2col", "im2col")),        # 7x7 output
    (torch.float32, 14, 2, ConvPlan("onednn", "im2col", "im2col")),      # 7x7 output, strided: oneDNN's forward
    (torch.float32, 16, 2, ConvPlan("onednn", "onednn", "im2col")),     # 8x8 output, strided
    (torch.float32, 32, 2, ConvPlan("onednn", "onednn", "im2col")),     # 16x16 output, strided
    (torch.float32, 8, 1, None),                                  # 8x8 output, stride 1
    (torch.float32, 34, 2, None),                                 # 17x17 output, strided
    (torch.bfloat16, 4, 1, ConvPlan("onednn", "onednn", "shifted")),
    (torch.bfloat16, 16, 2, None),
    (torch.float64, 4, 1, None),
])
def test_the_rules_pick_the_passes_measured_faster(avx512, dtype, side, stride, want):
    x = torch.zeros(2, 8, side, side)
    weight = torch.zeros(8, 8, 3, 3, requires_grad=True)
    if dtype == torch.float64:
        x, weight = x.double(), weight.detach().double().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        assert plan_conv(x, weight, (stride, stride), (1, 1), (1, 1), 1) == want
    assert 7 * 7 <= MATMUL_MAX_OUTPUT_AREA < 8 * 8 and 16 * 16 <= MATMUL_WGRAD_MAX_STRIDED_AREA < 17 * 17


def _conv_grads(conv, x, grad_out):
    conv.zero_grad()
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    y.backward(grad_out)
    return y, x.grad, conv.weight.grad.clone()


def test_a_small_bf16_conv_takes_the_shifted_weight_gradient_and_matches_onednn(monkeypatch):
    """bf16: only the weight gradient is a product (the shifted one); forward and input gradient are oneDNN's."""
    torch.manual_seed(0)
    conv = Conv2dFixedPadding(32, 48, 3, 1).to(memory_format=torch.channels_last)
    x = torch.randn(16, 32, 4, 4).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probe = conv(x.requires_grad_())
    assert type(probe.grad_fn).__name__ == MATMUL_GRAD_FN
    grad_out = torch.randn(probe.shape)
    y_fast, gx_fast, gw_fast = _conv_grads(conv, x.detach(), grad_out)
    monkeypatch.setenv(ENV_VAR, "native")
    y_ref, gx_ref, gw_ref = _conv_grads(conv, x.detach(), grad_out)
    assert type(y_ref.grad_fn).__name__ != MATMUL_GRAD_FN
    assert y_fast.dtype == y_ref.dtype == torch.bfloat16 and gw_fast.dtype == torch.float32
    torch.testing.assert_close(y_fast, y_ref, rtol=0, atol=0)           # the same oneDNN forward
    torch.testing.assert_close(gx_fast, gx_ref, rtol=0, atol=0)         # the same oneDNN input gradient
    rel = (gw_fast - gw_ref).norm() / gw_ref.norm()
    assert rel < 1e-2, rel                                              # bf16 rounding, another order


def _fp32_grads(conv, x, grad_out):
    conv.zero_grad()
    leaf = x.clone().requires_grad_()
    y = conv(leaf)
    y.backward(grad_out)
    return y, leaf.grad, conv.weight.grad.clone()


def _assert_as_accurate_as_onednn(fast, ref, exact, name):
    """fp32 rounding in another summation order: against the exact (float64) value, the product's
    sum is as accurate as oneDNN's (a fixed 1e-5 tolerance between the two failed on an AVX-512
    host at one element of 13,824, |diff| 1.5e-5 on sums of 256 products of size ~1)."""
    err_fast = (fast.double() - exact).abs().max().item()
    err_ref = (ref.double() - exact).abs().max().item()
    assert err_fast <= 4 * err_ref + 1e-6, (name, err_fast, err_ref)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("side, stride", [(4, 1), (8, 2)])
def test_a_small_fp32_conv_runs_every_pass_as_products_and_matches_onednn(avx512, monkeypatch, side, stride):
    """fp32 (``--precision auto`` on CPUs without native bf16), a 4x4 output: forward, input and
    weight gradient all as matrix products, each as accurate as oneDNN's."""
    torch.manual_seed(0)
    conv = Conv2dFixedPadding(32, 48, 3, stride).to(memory_format=torch.channels_last)
    x = torch.randn(16, 32, side, side).to(memory_format=torch.channels_last)
    grad_out = torch.randn(16, 48, 4, 4)
    y_fast, gx_fast, gw_fast = _fp32_grads(conv, x, grad_out)
    assert type(y_fast.grad_fn).__name__ == MATMUL_GRAD_FN
    monkeypatch.setenv(ENV_VAR, "native")
    y_ref, gx_ref, gw_ref = _fp32_grads(conv, x, grad_out)
    assert type(y_ref.grad_fn).__name__ != MATMUL_GRAD_FN
    assert y_fast.dtype == gx_fast.dtype == gw_fast.dtype == torch.float32
    assert y_fast.is_contiguous(memory_format=torch.channels_last)
    conv64 = copy.deepcopy(conv).double()  # fp64: oneDNN's plain convolution, the exact reference
    x64 = x.double().requires_grad_()
    y64 = conv64(x64)
    gx64, gw64 = torch.autograd.grad(y64, (x64, conv64.weight), grad_out.double())
    _assert_as_accurate_as_onednn(y_fast, y_ref, y64.detach(), "forward")
    _assert_as_accurate_as_onednn(gx_fast, gx_ref, gx64, "input gradient")
    _assert_as_accurate_as_onednn(gw_fast, gw_ref, gw64, "weight gradient")


def test_a_strided_fp32_conv_with_an_8x8_output_takes_only_the_weight_gradient(monkeypatch):
    torch.manual_seed(0)
    conv = Conv2dFixedPadding(16, 24, 3, 2).to(memory_format=torch.channels_last)
    x = torch.randn(8, 16, 16, 16).to(memory_format=torch.channels_last)
    grad_out = torch.randn(8, 24, 8, 8)
    y_fast, gx_fast, gw_fast = _fp32_grads(conv, x, grad_out)
    assert type(y_fast.grad_fn).__name__ == MATMUL_GRAD_FN
    monkeypatch.setenv(ENV_VAR, "native")
    y_ref, gx_ref, gw_ref = _fp32_grads(conv, x, grad_out)
    torch.testing.assert_close(y_fast, y_ref, rtol=0, atol=0)           # the same oneDNN forward
    torch.testing.assert_close(gx_fast, gx_ref, rtol=0, atol=0)         # the same oneDNN input gradient
    torch.testing.assert_close(gw_fast, gw_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["fp64", "bf16 large output", "fp32 large output", "no grad", "1x1 kernel",
                                  "bf16 strided 8x8 output"])
def test_the_matmul_passes_are_left_out_where_the_rules_say(case):
    torch.manual_seed(0)
    stride = 2 if "strided" in case else 1
    conv = Conv2dFixedPadding(8, 8, 1 if case == "1x1 kernel" else 3, stride)
    side = {"bf16 large output": 8, "fp32 large output": 8, "bf16 strided 8x8 output": 16}.get(case, 4)
    x = torch.randn(2, 8, side, side, requires_grad=True)
    if case == "fp64":
        conv, x = conv.double(), x.detach().double().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.startswith("bf16") or case == "1x1 kernel"), \
            torch.set_grad_enabled(case != "no grad"):
        y = conv(x)
    name = type(y.grad_fn).__name__ if y.grad_fn is not None else None
    assert name != MATMUL_GRAD_FN


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_a_network_step_with_the_matmul_passes_matches_the_native_one(avx512, monkeypatch, precision):
    """r18 with the CIFAR stem at 32 px: layer4 runs at 4x4, so its four 3x3 convs take the matmul
    path (in fp32 the strided convs of layers 2 and 3 too); every gradient agrees with oneDNN's to
    bf16 accuracy, and in fp32 to fp32 accuracy."""
    torch.manual_seed(0)
    net = create_model("r18_1x_sk0", image_size=32, num_proj_layers=3, proj_out_dim=32).to(
        memory_format=torch.channels_last)
    with torch.no_grad():  # the residual BNs start at gamma 0 (SPEC §1.6): no conv gradient would reach layer4
        for module in net.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5)
    x = torch.randn(8, 3, 32, 32).to(memory_format=torch.channels_last)
    target = torch.randn(8, 32)

    def grads(dtype=torch.float32):
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = net(x.to(dtype))
        # a loss with a gradient everywhere: the projection head's output (the last head BN has no
        # beta) against a fixed random target
        (out["projection"].to(dtype) * target.to(dtype)).sum().backward()
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    fast = grads()
    layer4_convs = [n for n in fast if "block_group4" in n and "conv" in n]
    assert len(layer4_convs) == 5 and all(fast[n].norm() > 0 for n in layer4_convs)
    monkeypatch.setenv(ENV_VAR, "native")
    ref = grads()
    assert fast.keys() == ref.keys()

    def worst(a, b):
        return max(((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-12)).item() for n in b)

    assert worst(fast, ref) > 0                     # not 0: the products ran (another order)
    if precision == "bf16":
        assert worst(fast, ref) < 0.05
    else:
        # against float64 (oneDNN's plain convolution, the exact reference): as accurate as oneDNN's
        # fp32 step. On an AVX-512 host oneDNN's own error reached 0.56% on one BN bias gradient of the
        # last stage, Winograd's 4e-5, so the two are compared with the exact values, not each other.
        net.double()
        exact = grads(torch.float64)
        net.float()
        fast64 = {n: g.double() for n, g in fast.items()}
        ref64 = {n: g.double() for n, g in ref.items()}
        assert worst(fast64, exact) <= 4 * worst(ref64, exact) + 1e-4, (worst(fast64, exact), worst(ref64, exact))


def test_a_bad_setting_of_the_variable_stops_a_run_before_training(monkeypatch, capsys, image_folder, tmp_path):
    monkeypatch.setenv(ENV_VAR, "fastest")
    code = main(["pretrain", "--data", str(image_folder), "--out", str(tmp_path / "run"), "--epochs", "1",
                 "--batch-size", "4", "--image-size", "16", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert ENV_VAR in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_the_old_variable_name_is_an_error_naming_the_new_one(monkeypatch, capsys, image_folder, tmp_path):
    """``SIMCLRV2_CONV_WEIGHT_GRAD`` (the name before the forward and input gradient joined) is
    refused, not ignored: a user who set it to native would otherwise get the matmul passes."""
    monkeypatch.setenv("SIMCLRV2_CONV_WEIGHT_GRAD", "native")
    code = main(["pretrain", "--data", str(image_folder), "--out", str(tmp_path / "run"), "--epochs", "1",
                 "--batch-size", "4", "--image-size", "16", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "SIMCLRV2_CONV_WEIGHT_GRAD" in err and ENV_VAR in err and "Traceback" not in err


@pytest.mark.parametrize("side, stride", [(4, 1), (8, 2), (16, 2)])
def test_the_flop_counter_sees_the_same_flops_as_for_onednn(avx512, monkeypatch, side, stride):
    """benchmarks/throughput.py's roofline divides FlopCounterMode's count by the step time: every
    product of the matmul passes must be counted (``addmm_`` would not be)."""
    from torch.utils.flop_counter import FlopCounterMode

    conv = Conv2dFixedPadding(16, 24, 3, stride)
    counts = {}
    for setting in ("auto", "native"):
        monkeypatch.setenv(ENV_VAR, setting)
        x = torch.randn(4, 16, side, side, requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            y = conv(x)
            y.sum().backward()
        counts[setting] = (counter.get_total_flops(), type(y.grad_fn).__name__)
    assert counts["auto"][1] == MATMUL_GRAD_FN and counts["native"][1] != MATMUL_GRAD_FN
    assert counts["auto"][0] == counts["native"][0] > 0
