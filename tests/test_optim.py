"""LARS (SPEC §4) and the learning-rate schedule (SPEC §5) against hand computations."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from simclrv2.optim import (
    LARS,
    WarmupCosineSchedule,
    l2_penalty,
    lars_param_groups,
    scale_learning_rate,
    steps_for,
    warmup_steps_for,
)

# ---------------------------------------------------------------------------- LARS


def _norm(v):
    return math.sqrt(sum(x * x for x in v))


def _lars_reference_step(w, g, v, lr, m, wd, eeta=0.001, nesterov=False):
    """Plain-Python classic-momentum LARS on a flat list (SPEC §4)."""
    g = [gi + wd * wi for gi, wi in zip(g, w)]
    wn, gn = _norm(w), _norm(g)
    trust = eeta * wn / gn if wn > 0 and gn > 0 else 1.0
    v = [m * vi + lr * trust * gi for vi, gi in zip(v, g)]
    upd = [m * vi + lr * trust * gi for vi, gi in zip(v, g)] if nesterov else v
    return [wi - ui for wi, ui in zip(w, upd)], v


def test_one_step_hand_computed():
    w = torch.tensor([3.0, 4.0], dtype=torch.float64, requires_grad=True)
    opt = LARS([w], lr=1.0, momentum=0.9, weight_decay=0.1)
    w.grad = torch.tensor([0.0, 0.5], dtype=torch.float64)
    opt.step()
    # g' = g + 0.1 w = [0.3, 0.9]; trust = 1e-3 * 5 / sqrt(0.9); v = trust * g'
    trust = 0.005 / math.sqrt(0.9)
    assert trust == pytest.approx(0.005270462766947299)
    expected = [3.0 - trust * 0.3, 4.0 - trust * 0.9]
    assert w.tolist() == pytest.approx(expected, rel=1e-12)
    assert w.tolist() == pytest.approx([2.998418861169916, 3.995256583509747], rel=1e-12)
    buf = opt.state[w]["momentum_buffer"]
    assert buf.tolist() == pytest.approx([trust * 0.3, trust * 0.9], rel=1e-12)
    # the user's gradient is not modified by the weight-decay term
    assert w.grad.tolist() == [0.0, 0.5]


@pytest.mark.parametrize("nesterov", [False, True])
def test_two_steps_per_layer_trust_ratios(nesterov):
    # two tensors in one group: each must use its OWN norms
    w0 = [[1.0, -2.0], [0.5, 3.0]]
    b0 = [0.2, -0.1, 0.4]
    grads = [([[0.3, 0.1], [-0.2, 0.05]], [1.0, 2.0, -1.0]), ([[-0.1, 0.4], [0.2, 0.2]], [0.0, 0.5, 0.5])]
    W = torch.tensor(w0, dtype=torch.float64, requires_grad=True)
    B = torch.tensor(b0, dtype=torch.float64, requires_grad=True)
    lr, m, wd = 0.7, 0.9, 0.01
    opt = LARS([W, B], lr=lr, momentum=m, weight_decay=wd, nesterov=nesterov)

    ref_w, ref_vw = sum(w0, []), [0.0] * 4
    ref_b, ref_vb = list(b0), [0.0] * 3
    for gw, gb in grads:
        W.grad = torch.tensor(gw, dtype=torch.float64)
        B.grad = torch.tensor(gb, dtype=torch.float64)
        opt.step()
        ref_w, ref_vw = _lars_reference_step(ref_w, sum(gw, []), ref_vw, lr, m, wd, nesterov=nesterov)
        ref_b, ref_vb = _lars_reference_step(ref_b, gb, ref_vb, lr, m, wd, nesterov=nesterov)
        assert W.flatten().tolist() == pytest.approx(ref_w, rel=1e-12)
        assert B.tolist() == pytest.approx(ref_b, rel=1e-12)


def test_excluded_group_is_momentum_sgd_and_ignores_weight_decay():
    g = torch.Generator().manual_seed(0)
    p1 = torch.randn(4, 3, generator=g, requires_grad=True)
    p2 = p1.detach().clone().requires_grad_(True)
    start = p1.detach().clone()
    lars = LARS([{"params": [p1], "exclude": True, "weight_decay": 0.5}], lr=0.05, momentum=0.9)
    sgd = torch.optim.SGD([p2], lr=0.05, momentum=0.9)
    for _ in range(4):
        grad = torch.randn(4, 3, generator=g)
        p1.grad, p2.grad = grad.clone(), grad.clone()
        lars.step()
        sgd.step()
    torch.testing.assert_close(p1, p2)
    assert not torch.allclose(p1, start)  # it did move (the weight decay was ignored)


def test_zero_weight_and_zero_grad_give_trust_one_without_nan():
    w = torch.zeros(3, requires_grad=True)
    opt = LARS([w], lr=0.1, momentum=0.9, weight_decay=0.1)
    w.grad = torch.tensor([1.0, 2.0, 3.0])
    opt.step()  # ||w|| = 0 -> trust 1 -> w = -lr * g
    assert w.tolist() == pytest.approx([-0.1, -0.2, -0.3])
    v1 = opt.state[w]["momentum_buffer"].clone()
    w2 = torch.ones(2, requires_grad=True)
    opt2 = LARS([w2], lr=0.1, momentum=0.9, weight_decay=0.0)
    w2.grad = torch.tensor([0.0, 0.0])
    opt2.step()  # ||g|| = 0 -> trust 1 (eeta*||w||/0 would be inf, times 0 = nan)
    assert torch.isfinite(w2).all() and w2.tolist() == [1.0, 1.0]
    # zero grad after a real step: momentum keeps moving the weight
    w.grad = torch.zeros(3)
    opt.param_groups[0]["weight_decay"] = 0.0
    before = w.detach().clone()
    opt.step()
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], 0.9 * v1)
    torch.testing.assert_close(w.detach(), before - 0.9 * v1)


def test_state_dict_roundtrip():
    g = torch.Generator().manual_seed(1)
    model = nn.Linear(3, 2)
    opt = LARS(lars_param_groups(model, weight_decay=1e-2), lr=0.3)
    grads = [[torch.randn(p.shape, generator=g) for p in model.parameters()] for _ in range(3)]
    for gs in grads[:2]:
        for p, gr in zip(model.parameters(), gs):
            p.grad = gr.clone()
        opt.step()
    clone = copy.deepcopy(model)
    opt2 = LARS(lars_param_groups(clone, weight_decay=1e-2), lr=0.3)
    buffer = io.BytesIO()  # through serialisation, as a checkpoint would
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    opt2.load_state_dict(torch.load(buffer))
    assert all("momentum_buffer" in s for s in opt.state_dict()["state"].values())
    for m_, o_ in ((model, opt), (clone, opt2)):
        for p, gr in zip(m_.parameters(), grads[2]):
            p.grad = gr.clone()
        o_.step()
    for a, b in zip(model.parameters(), clone.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_step_makes_no_host_device_sync(monkeypatch):
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    opt = LARS(lars_param_groups(model, weight_decay=1e-4, exclude_names=("2.",)), lr=0.1, nesterov=True)
    model(torch.randn(5, 4)).sum().backward()

    def forbidden(*args, **kwargs):
        raise AssertionError("host-device sync inside LARS.step")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    opt.step()
    monkeypatch.undo()
    assert len(opt.state) == len(list(model.parameters()))


def test_lars_param_groups_and_l2_penalty():
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(3, 4, 3, bias=False))
    model.add_module("bn", nn.BatchNorm2d(4))
    model.add_module("proj", nn.Linear(4, 4, bias=True))
    model.add_module("classifier", nn.Linear(4, 10))
    model.add_module("frozen", nn.Linear(2, 2))
    model.frozen.requires_grad_(False)
    groups = lars_param_groups(model, weight_decay=1e-4)
    adapted, excluded = groups
    assert adapted["exclude"] is False and adapted["weight_decay"] == 1e-4
    assert excluded["exclude"] is True and excluded["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(adapted["params"]) == ids([model.conv.weight, model.proj.weight])
    assert ids(excluded["params"]) == ids(
        [model.bn.weight, model.bn.bias, model.proj.bias, model.classifier.weight, model.classifier.bias]
    )
    wd = 0.3
    head = model.classifier
    want = wd * head.weight.detach().pow(2).sum() / 2
    torch.testing.assert_close(l2_penalty(head, wd), want)
    l2_penalty(head, wd).backward()
    torch.testing.assert_close(head.weight.grad, wd * head.weight.detach())
    assert head.bias.grad is None


# ------------------------------------------------------------------------ schedule


def test_scale_learning_rate():
    assert scale_learning_rate(0.1, 4096, "sqrt") == pytest.approx(6.4)
    assert scale_learning_rate(0.3, 4096, "linear") == pytest.approx(4.8)
    assert scale_learning_rate(0.075, 4096, "sqrt") == pytest.approx(4.8)
    assert scale_learning_rate(0.005, 1024, "sqrt") == pytest.approx(0.16)
    assert scale_learning_rate(0.1, 256) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        scale_learning_rate(0.1, 256, "log")


def test_step_counts():
    n = 1_281_167
    assert warmup_steps_for(40, n, 4096) == 12_511
    assert warmup_steps_for(0, n, 4096) == 0
    assert warmup_steps_for(0.5, 1000, 100) == 5
    assert warmup_steps_for(2.5, 1000, 300) == 8  # 2500 // 300 = 8.0
    assert steps_for(n, 800, 4096) == 250_228  # released pretrained checkpoint step
    assert steps_for(n, 30, 1024) == 37_535  # finetuned_100pct
    assert steps_for(128_116, 30, 1024) == 3_754  # finetuned_10pct
    assert steps_for(12_811, 60, 1024) == 751  # finetuned_1pct
    assert steps_for(1000, 1.5, 100) == 16


def test_warmup_cosine_values():
    s = WarmupCosineSchedule(peak_lr=2.0, warmup_steps=4, total_steps=12)
    assert [s.lr_at(i) for i in range(5)] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])
    # cosine over 8 steps: step 6 -> half way, step 8 -> 1 - cos(pi/4)...
    assert s.lr_at(6) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 2 / 8)))
    assert s.lr_at(8) == pytest.approx(1.0)
    assert s.lr_at(12) == 0.0 and s.lr_at(50) == 0.0
    assert s(11) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    no_warm = WarmupCosineSchedule(1.0, 0, 10)
    assert no_warm.lr_at(0) == 1.0 and no_warm.lr_at(5) == pytest.approx(0.5)


def test_schedule_apply_respects_lr_scale():
    p, q = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = LARS([{"params": [p]}, {"params": [q], "lr_scale": 0.1}], lr=123.0)
    s = WarmupCosineSchedule(peak_lr=4.0, warmup_steps=2, total_steps=6)
    assert s.apply(opt, 1) == pytest.approx(2.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.2)
