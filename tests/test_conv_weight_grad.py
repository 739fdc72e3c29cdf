"""The shifted weight gradient (simclrv2.models.conv_weight_grad) equals the convolution's gradient,
and the network takes it only where the rule says (bf16 on CPU, training, output <= 7x7)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from simclrv2.cli.main import main
from simclrv2.models import create_model
from simclrv2.models.conv_weight_grad import ENV_VAR, SHIFTED_MAX_OUTPUT_AREA, shifted_weight_grad
from simclrv2.models.layers import Conv2dFixedPadding


def _autograd_weight_grad(x, weight, grad_out, stride, padding):
    weight = weight.detach().requires_grad_()
    F.conv2d(x, weight, None, stride, padding).backward(grad_out)
    return weight.grad


@pytest.mark.parametrize("shape, kernel, stride, padding", [
    ((3, 5, 4, 4), 3, 1, 1),      # the last stage at 32 px
    ((2, 4, 8, 8), 3, 2, 1),      # the strided entry to it
    ((2, 3, 7, 5), 3, 1, 1),      # rectangular
    ((2, 3, 9, 9), 5, 2, 2),      # a larger kernel
    ((2, 3, 6, 6), 2, 1, 0),      # an even kernel after an explicit pad
])
def test_shifted_weight_grad_equals_the_convolution_gradient_in_float64(shape, kernel, stride, padding):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    weight = torch.randn(6, shape[1], kernel, kernel, generator=gen, dtype=torch.float64)
    out_shape = F.conv2d(x, weight, None, stride, padding).shape
    grad_out = torch.randn(*out_shape, generator=gen, dtype=torch.float64)
    expected = _autograd_weight_grad(x, weight, grad_out, stride, padding)
    got = shifted_weight_grad(x, grad_out, (kernel, kernel), (stride, stride), (padding, padding))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def _conv_grads(conv, x, grad_out):
    conv.zero_grad()
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    y.backward(grad_out)
    return y, x.grad, conv.weight.grad.clone()


def test_a_small_bf16_conv_takes_the_shifted_path_and_matches_onednn(monkeypatch):
    torch.manual_seed(0)
    conv = Conv2dFixedPadding(32, 48, 3, 1).to(memory_format=torch.channels_last)
    x = torch.randn(16, 32, 4, 4).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probe = conv(x.requires_grad_())
    assert type(probe.grad_fn).__name__ == "_Conv2dShiftedWeightGradBackward"
    grad_out = torch.randn(probe.shape)
    y_fast, gx_fast, gw_fast = _conv_grads(conv, x.detach(), grad_out)
    monkeypatch.setenv(ENV_VAR, "native")
    y_ref, gx_ref, gw_ref = _conv_grads(conv, x.detach(), grad_out)
    assert type(y_ref.grad_fn).__name__ != "_Conv2dShiftedWeightGradBackward"
    assert y_fast.dtype == y_ref.dtype == torch.bfloat16 and gw_fast.dtype == torch.float32
    torch.testing.assert_close(y_fast, y_ref, rtol=0, atol=0)           # the same oneDNN forward
    torch.testing.assert_close(gx_fast, gx_ref, rtol=0, atol=0)         # the same oneDNN input gradient
    rel = (gw_fast - gw_ref).norm() / gw_ref.norm()
    assert rel < 1e-2, rel                                              # bf16 rounding, another order


def test_a_small_fp32_conv_takes_the_shifted_path_and_matches_onednn(monkeypatch):
    """fp32 (``--precision auto`` on CPUs without native bf16): the same path, no autocast."""
    torch.manual_seed(0)
    conv = Conv2dFixedPadding(32, 48, 3, 1).to(memory_format=torch.channels_last)
    x = torch.randn(16, 32, 4, 4).to(memory_format=torch.channels_last)
    grad_out = torch.randn(16, 48, 4, 4)

    def grads():
        conv.zero_grad()
        leaf = x.clone().requires_grad_()
        y = conv(leaf)
        y.backward(grad_out)
        return y, leaf.grad, conv.weight.grad.clone()

    y_fast, gx_fast, gw_fast = grads()
    assert type(y_fast.grad_fn).__name__ == "_Conv2dShiftedWeightGradBackward"
    monkeypatch.setenv(ENV_VAR, "native")
    y_ref, gx_ref, gw_ref = grads()
    assert type(y_ref.grad_fn).__name__ != "_Conv2dShiftedWeightGradBackward"
    assert y_fast.dtype == gw_fast.dtype == torch.float32
    torch.testing.assert_close(y_fast, y_ref, rtol=0, atol=0)           # the same oneDNN forward
    torch.testing.assert_close(gx_fast, gx_ref, rtol=0, atol=0)         # the same oneDNN input gradient
    # fp32 rounding in another summation order: against the exact (float64) gradient, the shifted sum
    # is as accurate as oneDNN's (a fixed 1e-5 tolerance between the two failed on an AVX-512 host at
    # one element of 13,824, |diff| 1.5e-5 on sums of 256 products of size ~1)
    gw_exact = torch.nn.grad.conv2d_weight(x.double(), conv.weight.shape, grad_out.double(), stride=1,
                                           padding=1)
    err_fast = (gw_fast.double() - gw_exact).abs().max().item()
    err_ref = (gw_ref.double() - gw_exact).abs().max().item()
    assert err_fast <= 4 * err_ref + 1e-6, (err_fast, err_ref)
    torch.testing.assert_close(gw_fast, gw_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["fp64", "large output", "no grad", "1x1 kernel"])
def test_the_shifted_path_is_left_out_where_the_rule_says(case):
    torch.manual_seed(0)
    conv = Conv2dFixedPadding(8, 8, 1 if case == "1x1 kernel" else 3, 1)
    side = 8 if case == "large output" else 4
    assert side * side > SHIFTED_MAX_OUTPUT_AREA or case != "large output"
    x = torch.randn(2, 8, side, side, requires_grad=True)
    if case == "fp64":
        conv, x = conv.double(), x.detach().double().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case != "fp64"), \
            torch.set_grad_enabled(case != "no grad"):
        y = conv(x)
    name = type(y.grad_fn).__name__ if y.grad_fn is not None else None
    assert name != "_Conv2dShiftedWeightGradBackward"


def test_a_network_step_with_the_shifted_gradient_matches_the_native_one(monkeypatch):
    """r18 with the CIFAR stem at 32 px: layer4 runs at 4x4, so four 3x3 convs take the shifted
    path; the loss and every gradient agree with oneDNN's to bf16 accuracy."""
    torch.manual_seed(0)
    net = create_model("r18_1x_sk0", image_size=32, num_proj_layers=3, proj_out_dim=32).to(
        memory_format=torch.channels_last)
    with torch.no_grad():  # the residual BNs start at gamma 0 (SPEC §1.6): no conv gradient would reach layer4
        for module in net.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5)
    x = torch.randn(8, 3, 32, 32).to(memory_format=torch.channels_last)
    target = torch.randn(8, 32)

    def grads():
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
        # a loss with a gradient everywhere: the projection head's output (the last head BN has no
        # beta) against a fixed random target
        (out["projection"].float() * target).sum().backward()
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    fast = grads()
    layer4_convs = [n for n in fast if "block_group4" in n and "conv" in n]
    assert len(layer4_convs) == 5 and all(fast[n].norm() > 0 for n in layer4_convs)
    monkeypatch.setenv(ENV_VAR, "native")
    ref = grads()
    assert fast.keys() == ref.keys()
    worst = max(((fast[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-12)).item() for n in ref)
    assert 0 < worst < 0.05, worst  # not 0: the shifted path ran (another summation order)


def test_a_bad_setting_of_the_variable_stops_a_run_before_training(monkeypatch, capsys, image_folder, tmp_path):
    monkeypatch.setenv(ENV_VAR, "fastest")
    code = main(["pretrain", "--data", str(image_folder), "--out", str(tmp_path / "run"), "--epochs", "1",
                 "--batch-size", "4", "--image-size", "16", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert ENV_VAR in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
