"""NT-Xent (SPEC §3) and distillation (paper Eq. 2/3) against explicit formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from simclrv2.losses import (
    ContrastiveOutput,
    contrastive_loss,
    distillation_loss,
    mixed_distillation_loss,
    nt_xent,
)


def _cos(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u * v).sum() / (u.norm() * v.norm())


def loop_nt_xent(z_a, z_b, tau, queue=None):
    """Direct per-pair formula: for each image i and each direction,
    -log( exp(s(x_i, y_i)/τ) / [Σ_k exp(s(x_i, y_k)/τ) + Σ_{k≠i} exp(s(x_i, x_k)/τ)
    + Σ_q exp(s(x_i, q)/τ)] ), summed over the two directions and averaged over i."""
    n = z_a.shape[0]
    total = 0.0
    for x, y in ((z_a, z_b), (z_b, z_a)):
        for i in range(n):
            num = torch.exp(_cos(x[i], y[i]) / tau)
            den = sum(torch.exp(_cos(x[i], y[k]) / tau) for k in range(n))
            den = den + sum(torch.exp(_cos(x[i], x[k]) / tau) for k in range(n) if k != i)
            if queue is not None:
                # queue rows are already unit norm: plain dot product
                den = den + sum(torch.exp((x[i] / x[i].norm()) @ q / tau) for q in queue)
            total = total - torch.log(num / den)
    return total / n


@pytest.mark.parametrize("n,d,tau", [(2, 3, 0.5), (4, 5, 0.1), (7, 8, 0.2)])
def test_nt_xent_matches_loop_formula(n, d, tau):
    g = torch.Generator().manual_seed(n * 100 + d)
    z_a = torch.randn(n, d, generator=g, dtype=torch.float64)
    z_b = torch.randn(n, d, generator=g, dtype=torch.float64)
    got = nt_xent(z_a, z_b, tau)
    want = loop_nt_xent(z_a, z_b, tau)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # fp32 path agrees too
    got32 = nt_xent(z_a.float(), z_b.float(), tau)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-5)


def test_nt_xent_with_queue_matches_loop_formula():
    g = torch.Generator().manual_seed(3)
    n, d, k, tau = 5, 6, 4, 0.2
    z_a = torch.randn(n, d, generator=g, dtype=torch.float64)
    z_b = torch.randn(n, d, generator=g, dtype=torch.float64)
    queue = F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
    got = nt_xent(z_a, z_b, tau, queue=queue)
    want = loop_nt_xent(z_a, z_b, tau, queue=queue)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(got, nt_xent(z_a, z_b, tau))


def test_gradient_matches_loop_formula():
    g = torch.Generator().manual_seed(11)
    n, d, tau = 4, 3, 0.3
    z_a = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    z_b = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    queue = F.normalize(torch.randn(3, d, generator=g, dtype=torch.float64), dim=1)
    ga, gb = torch.autograd.grad(nt_xent(z_a, z_b, tau, queue=queue), (z_a, z_b))
    ra, rb = torch.autograd.grad(loop_nt_xent(z_a, z_b, tau, queue=queue), (z_a, z_b))
    torch.testing.assert_close(ga, ra, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gb, rb, rtol=1e-9, atol=1e-10)
    assert ga.abs().sum() > 0


def test_gradcheck():
    g = torch.Generator().manual_seed(5)
    z_a = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    z_b = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: nt_xent(a, b, 0.5), (z_a, z_b))


def test_bf16_large_norms_small_temperature_do_not_overflow():
    g = torch.Generator().manual_seed(0)
    n, d, tau = 8, 16, 0.01
    z_a = (torch.randn(n, d, generator=g) * 1e4).bfloat16()
    z_b = (z_a.float() + 3e3 * torch.randn(n, d, generator=g)).bfloat16()
    out = contrastive_loss(z_a, z_b, tau)
    assert out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss)
    # reference in float64 on the same (bf16-rounded) values, via log-sum-exp
    want = _lse_reference(z_a.double(), z_b.double(), tau)
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-4, atol=1e-4)
    # fp16 too (its max is 65504, so squared norms of 1e4-scale rows would overflow)
    out16 = contrastive_loss(z_a.half(), z_b.half(), tau)
    assert torch.isfinite(out16.loss)


def test_autocast_does_not_lower_logit_precision():
    g = torch.Generator().manual_seed(6)
    z_a = torch.randn(8, 32, generator=g)
    z_b = z_a + torch.randn(8, 32, generator=g)
    want = nt_xent(z_a, z_b, 0.5)
    assert want > 1.0  # a loss of order 1, so bf16 logits would show
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nt_xent(z_a, z_b, 0.5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _lse_reference(z_a, z_b, tau):
    h_a, h_b = F.normalize(z_a, dim=1), F.normalize(z_b, dim=1)
    n = h_a.shape[0]
    total = 0.0
    for x, y in ((h_a, h_b), (h_b, h_a)):
        for i in range(n):
            cands = [x[i] @ y[k] / tau for k in range(n)]
            cands += [x[i] @ x[k] / tau for k in range(n) if k != i]
            total = total - (x[i] @ y[i] / tau - torch.logsumexp(torch.stack(cands), 0))
    return total / n


def test_accuracy_and_entropy_match_direct_computation():
    g = torch.Generator().manual_seed(21)
    n, d, tau = 16, 4, 0.1
    z_a = torch.randn(n, d, generator=g)
    z_b = z_a + 0.8 * torch.randn(n, d, generator=g)  # some right, some wrong
    out = contrastive_loss(z_a, z_b, tau)
    assert isinstance(out, ContrastiveOutput)
    h_a, h_b = F.normalize(z_a, dim=1), F.normalize(z_b, dim=1)
    correct = 0
    entropy = 0.0
    for i in range(n):
        sims = [float(h_a[i] @ h_b[k]) / tau for k in range(n)]
        correct += int(max(range(n), key=lambda k: sims[k]) == i)
        z = sum(math.exp(s) for s in sims)
        p = [math.exp(s) / z for s in sims]
        entropy += -sum(pk * math.log(pk + 1e-8) for pk in p)
    assert 0 < correct < n, "test inputs should give a non-trivial accuracy"
    assert out.accuracy.item() == pytest.approx(correct / n)
    assert out.entropy.item() == pytest.approx(entropy / n, rel=1e-5)
    assert torch.equal(out.labels, torch.arange(n))
    assert out.logits_ab.shape == (n, n)
    assert not out.accuracy.requires_grad and not out.entropy.requires_grad


def test_queue_entry_equal_to_positive_enters_loss_but_not_accuracy():
    g = torch.Generator().manual_seed(8)
    n, d, tau = 4, 8, 0.1
    z_a = torch.randn(n, d, generator=g, dtype=torch.float64)
    z_b = z_a + 0.01 * torch.randn(n, d, generator=g, dtype=torch.float64)
    base = contrastive_loss(z_a, z_b, tau)
    assert base.accuracy.item() == 1.0
    queue = F.normalize(z_b[:1], dim=1)  # a memory entry identical to image 0's view-b
    withq = contrastive_loss(z_a, z_b, tau, queue=queue)
    # exact effect on the loss: each anchor's denominator gains exp(h·q/τ)
    torch.testing.assert_close(withq.loss, loop_nt_xent(z_a, z_b, tau, queue=queue))
    # both anchors of image 0 now face a negative as similar as their positive: each of
    # their CE terms grows by about log 2, and the loss averages over n images
    assert withq.loss - base.loss > 0.9 * 2 * math.log(2) / n
    # contrast_acc, as in the reference, only ranks the cross-view candidates
    assert withq.accuracy.item() == base.accuracy.item()
    # an empty queue is the same as none
    torch.testing.assert_close(nt_xent(z_a, z_b, tau, queue=queue[:0]), base.loss)


def test_hidden_norm_false_uses_raw_dot_products():
    g = torch.Generator().manual_seed(2)
    z_a = torch.randn(3, 4, generator=g, dtype=torch.float64)
    z_b = torch.randn(3, 4, generator=g, dtype=torch.float64)
    tau = 0.7
    got = nt_xent(z_a, z_b, tau, hidden_norm=False)
    total = 0.0
    for x, y in ((z_a, z_b), (z_b, z_a)):
        for i in range(3):
            cands = [x[i] @ y[k] / tau for k in range(3)] + [x[i] @ x[k] / tau for k in range(3) if k != i]
            total = total - (x[i] @ y[i] / tau - torch.logsumexp(torch.stack(cands), 0))
    torch.testing.assert_close(got, total / 3)
    assert not torch.allclose(got, nt_xent(z_a, z_b, tau))


# ----------------------------------------------------------------- distillation


def _soft_ce(student, teacher, tau):
    rows = []
    for s, t in zip(student.tolist(), teacher.tolist()):
        zt = sum(math.exp(v / tau) for v in t)
        zs = sum(math.exp(v / tau) for v in s)
        rows.append(-sum(math.exp(tv / tau) / zt * math.log(math.exp(sv / tau) / zs) for sv, tv in zip(s, t)))
    return sum(rows) / len(rows)


@pytest.mark.parametrize("tau", [0.1, 1.0, 2.0])
def test_distillation_loss_matches_formula(tau):
    g = torch.Generator().manual_seed(int(tau * 10))
    student = torch.randn(5, 7, generator=g, dtype=torch.float64)
    teacher = torch.randn(5, 7, generator=g, dtype=torch.float64)
    got = distillation_loss(student, teacher, tau)
    assert got.item() == pytest.approx(_soft_ce(student, teacher, tau), rel=1e-9)
    scaled = distillation_loss(student, teacher, tau, scale_by_temperature_squared=True)
    assert scaled.item() == pytest.approx(tau**2 * _soft_ce(student, teacher, tau), rel=1e-9)


def test_distillation_teacher_is_detached_and_bf16_computed_in_fp32():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(4, 6, generator=g, requires_grad=True)
    teacher = torch.randn(4, 6, generator=g, requires_grad=True)
    distillation_loss(student, teacher, 0.5).backward()
    assert teacher.grad is None and student.grad is not None
    # gradient of soft CE w.r.t. student logits: (softmax(s/τ) − softmax(t/τ)) / (τ·B)
    want = (F.softmax(student / 0.5, 1) - F.softmax(teacher / 0.5, 1)) / (0.5 * 4)
    torch.testing.assert_close(student.grad, want.detach())
    out = distillation_loss(student.detach().bfloat16() * 100, teacher.detach().bfloat16() * 100, 0.1)
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_mixed_distillation_loss_matches_eq3():
    g = torch.Generator().manual_seed(4)
    student = torch.randn(6, 5, generator=g, dtype=torch.float64)
    teacher = torch.randn(6, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([2, -1, 0, -1, 4, -1])
    tau, alpha = 0.5, 0.3
    ce = [-math.log(math.exp(student[i, y]) / sum(math.exp(v) for v in student[i].tolist()))
          for i, y in enumerate(labels.tolist()) if y >= 0]
    # Eq. 3 sums both terms over the same batch; both are divided by the batch size (6).
    want = (1 - alpha) * sum(ce) / 6 + alpha * _soft_ce(student, teacher, tau)
    got = mixed_distillation_loss(student, teacher, labels, tau, alpha)
    assert got.item() == pytest.approx(want, rel=1e-9)


def test_mixed_distillation_weighs_a_labelled_row_like_one_distilled_row():
    """At 1% labels a batch holds few labelled rows; their CE must not be averaged over them alone
    (that weighs the label term ~100x and drowns the distillation term). Per-row gradients w.r.t. the
    logits: labelled (1-α)(p - onehot)/B, distillation α(p_τ(s) - p_τ(t))/(τB)."""
    g = torch.Generator().manual_seed(11)
    batch, classes, tau, alpha = 64, 10, 0.5, 0.5
    student = torch.randn(batch, classes, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(batch, classes, generator=g, dtype=torch.float64)
    labels = torch.full((batch,), -1)
    labels[:2] = torch.tensor([3, 7])
    mixed_distillation_loss(student, teacher, labels, tau, alpha).backward()
    p = F.softmax(student.detach(), 1)
    onehot = F.one_hot(labels.clamp(min=0), classes).double() * (labels >= 0).double().unsqueeze(1)
    want = ((1 - alpha) * (p - onehot) * (labels >= 0).double().unsqueeze(1)
            + alpha * (F.softmax(student.detach() / tau, 1) - F.softmax(teacher / tau, 1)) / tau) / batch
    torch.testing.assert_close(student.grad, want)


def test_mixed_distillation_without_labels_is_alpha_times_distillation():
    g = torch.Generator().manual_seed(9)
    student = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 4, generator=g, dtype=torch.float64)
    labels = torch.full((3,), -1)
    got = mixed_distillation_loss(student, teacher, labels, 1.0, 0.25)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(0.25 * _soft_ce(student.detach(), teacher, 1.0), rel=1e-9)
    got.backward()
    assert torch.isfinite(student.grad).all()
