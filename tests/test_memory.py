"""Momentum memory (paper §2, SPEC §0): EMA encoder and the FIFO negative queue."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from simclrv2.losses import NegativeQueue, nt_xent
from simclrv2.training.pretrain import PretrainStep
from simclrv2.utils.ema import ModelEMA


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def test_ema_update_matches_formula_and_copies_buffers():
    model = _net()
    ema = ModelEMA(model, decay=0.9)
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert ema.module is not model
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    # one optimiser step and one train-mode forward (updates BN running stats)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.randn(8, 3)).pow(2).sum().backward()
    opt.step()
    ema.update(model)
    online = dict(model.named_parameters())
    for name, p in ema.module.named_parameters():
        want = 0.9 * before[name] + 0.1 * online[name].detach()
        torch.testing.assert_close(p, want)
    # really averaged, not copied (Linear-before-BN bias gets no gradient, so not "all")
    assert any(not torch.allclose(p, online[n]) for n, p in ema.module.named_parameters())
    for name, b in ema.module.named_buffers():
        torch.testing.assert_close(b, dict(model.named_buffers())[name], rtol=0, atol=0)
    assert int(ema.module[1].num_batches_tracked) == 1
    assert not torch.equal(ema.module[1].running_mean, before["1.running_mean"])


def test_ema_unwraps_wrapper_and_roundtrips_state_dict():
    model = _net()
    wrapped = nn.DataParallel(model)  # same `.module` unwrapping path as DDP
    ema = ModelEMA(wrapped, decay=0.5)
    assert set(ema.state_dict()) == set(model.state_dict())  # no "module." prefix
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(wrapped)
    torch.testing.assert_close(ema.module[0].bias, model[0].bias.detach() - 0.5)
    other = ModelEMA(_net(), decay=0.5)
    other.load_state_dict(ema.state_dict())
    for a, b in zip(other.module.state_dict().values(), ema.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _rows(*values: int) -> torch.Tensor:
    return torch.tensor([[float(v)] for v in values])


def test_queue_fifo_order_and_overwrites():
    q = NegativeQueue(size=5, dim=1)
    assert q.negatives() is None and len(q) == 0
    q.enqueue(_rows(0, 1))
    assert q.negatives().flatten().tolist() == [0, 1]
    q.enqueue(_rows(2, 3))
    q.enqueue(_rows(4, 5, 6))  # wraps: 5 and 6 overwrite the oldest, 0 and 1
    assert q.embeddings.flatten().tolist() == [5, 6, 2, 3, 4]
    assert int(q.pointer) == 2 and int(q.filled) == 5 and len(q) == 5
    # a batch larger than the queue: as if pushed row by row from position 2
    q.enqueue(_rows(*range(7, 14)))
    assert q.embeddings.flatten().tolist() == [10, 11, 12, 13, 9]
    assert int(q.pointer) == 4
    q.enqueue(_rows(14))
    assert q.embeddings.flatten().tolist() == [10, 11, 12, 13, 14]
    assert int(q.pointer) == 0


def test_queue_state_dict_roundtrip_restores_pointer():
    q = NegativeQueue(size=4, dim=2)
    q.enqueue(torch.arange(6.0).view(3, 2))
    restored = NegativeQueue(size=4, dim=2)
    restored.load_state_dict(q.state_dict())
    assert set(q.state_dict()) == {"embeddings", "pointer", "filled"}
    torch.testing.assert_close(restored.negatives(), q.negatives())
    assert len(restored) == 3
    batch = torch.tensor([[10.0, 11.0], [12.0, 13.0]])
    q.enqueue(batch)
    restored.enqueue(batch)
    torch.testing.assert_close(restored.embeddings, q.embeddings, rtol=0, atol=0)
    assert restored.embeddings[0].tolist() == [12.0, 13.0]  # wrapped to the start


def test_queue_size_zero_and_detaches_inputs():
    empty = NegativeQueue(size=0, dim=3)
    empty.enqueue(torch.randn(2, 3))
    assert empty.negatives() is None
    q = NegativeQueue(size=3, dim=3)
    z = torch.randn(2, 3, requires_grad=True)
    q.enqueue(z)
    assert not q.negatives().requires_grad


def test_queue_negatives_raise_the_loss():
    g = torch.Generator().manual_seed(0)
    n, d, tau = 8, 16, 0.1
    z_a = torch.randn(n, d, generator=g)
    z_b = z_a + 0.3 * torch.randn(n, d, generator=g)
    q = NegativeQueue(size=32, dim=d)
    # momentum-encoder-like negatives: close to the anchors but not identical
    q.enqueue(F.normalize(z_a + 0.5 * torch.randn(n, d, generator=g), dim=1))
    without = nt_xent(z_a, z_b, tau)
    with_queue = nt_xent(z_a, z_b, tau, queue=q.negatives())
    assert with_queue > without + 0.1


class _Projector(nn.Module):
    """The piece of SimCLRNet's output the memory reads: ``{"projection": ...}``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"projection": self.linear(x.flatten(1))}


@pytest.mark.parametrize("fraction, keys", [(0.25, 2), (0.5, 4), (1.0, 8), (0.01, 2)])
def test_update_memory_queues_momentum_projections_of_the_key_views(fraction, keys):
    torch.manual_seed(0)
    net = _Projector()
    ema = ModelEMA(net, decay=0.5)
    queue = NegativeQueue(size=32, dim=4)
    rt = SimpleNamespace(autocast=contextlib.nullcontext, grad_scaler=lambda: None)
    step = PretrainStep(net, None, rt, temperature=0.1, ema=ema, queue=queue, memory_keys_fraction=fraction)
    views = torch.randn(16, 3, 2, 2)  # 8 images: all first views, then all second views
    with torch.no_grad():
        net.linear.weight.add_(1.0)  # the online network moved: the EMA update must come first
    step.update_memory(views)
    with torch.no_grad():
        expected_weight = 0.5 * (net.linear.weight - 1.0) + 0.5 * net.linear.weight
        torch.testing.assert_close(ema.module.linear.weight, expected_weight)
        expected = F.normalize(ema.module(views[8:8 + keys])["projection"], dim=1)
    assert len(queue) == keys
    torch.testing.assert_close(queue.negatives(), expected)
