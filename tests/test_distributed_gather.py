"""Cross-rank NT-Xent (SPEC §3) with 2 Gloo processes equals the single-process loss.

Each rank holds half of a batch, gathers both views with ``gather_with_grad`` and computes
the loss of its local anchors against global candidates. With DDP's gradient averaging,
the objective is the mean of the rank losses, so: mean(rank losses) == full-batch loss,
and grad_r / world_size == the rank's slice of the full-batch gradient.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from simclrv2.losses import contrastive_loss
from simclrv2.utils import distributed as du

WORLD = 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, z_a, z_b, queue, tau: float, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
    )
    got_rank, got_world, local_rank = du.setup_distributed("gloo", timeout=60)
    try:
        n = z_a.shape[0] // WORLD
        rows = slice(rank * n, (rank + 1) * n)
        result = {
            "ids": (got_rank, got_world, local_rank, du.get_rank(), du.get_world_size(), du.is_distributed()),
            "gathered": du.gather_with_grad(z_a[rows].contiguous()),
            "mean_rank": du.all_reduce_mean(torch.tensor(float(rank))),
        }
        for key, q in (("plain", None), ("queue", queue)):
            a = z_a[rows].clone().requires_grad_(True)
            b = z_b[rows].clone().requires_grad_(True)
            out = contrastive_loss(a, b, tau, queue=q)
            out.loss.backward()
            result[key] = {
                "loss": out.loss.detach(),
                "grad_a": a.grad,
                "grad_b": b.grad,
                "labels": out.labels,
                "logits_ab": out.logits_ab,
                "accuracy": out.accuracy,
            }
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        du.cleanup_distributed()


@pytest.mark.timeout(90)
def test_two_process_loss_and_gradients_match_single_process(tmp_path):
    g = torch.Generator().manual_seed(0)
    n_global, d, tau = 6, 5, 0.2
    z_a = torch.randn(n_global, d, generator=g, dtype=torch.float64)
    z_b = z_a + 0.7 * torch.randn(n_global, d, generator=g, dtype=torch.float64)
    queue = F.normalize(torch.randn(4, d, generator=g, dtype=torch.float64), dim=1)

    mp.spawn(_worker, args=(_free_port(), z_a, z_b, queue, tau, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    n = n_global // WORLD

    for r, res in enumerate(ranks):
        assert res["ids"] == (r, WORLD, r, r, WORLD, True)
        torch.testing.assert_close(res["gathered"], z_a, rtol=0, atol=0)
        assert res["mean_rank"].item() == pytest.approx(0.5)

    for key, q in (("plain", None), ("queue", queue)):
        a = z_a.clone().requires_grad_(True)
        b = z_b.clone().requires_grad_(True)
        full = contrastive_loss(a, b, tau, queue=q)
        full.loss.backward()
        mean_loss = sum(res[key]["loss"] for res in ranks) / WORLD
        torch.testing.assert_close(mean_loss, full.loss.detach(), rtol=1e-12, atol=1e-12)
        for r, res in enumerate(ranks):
            rows = slice(r * n, (r + 1) * n)
            # labels point at the positive's GLOBAL column
            assert res[key]["labels"].tolist() == list(range(r * n, (r + 1) * n))
            torch.testing.assert_close(res[key]["logits_ab"], full.logits_ab[rows])
            torch.testing.assert_close(res[key]["grad_a"] / WORLD, a.grad[rows], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(res[key]["grad_b"] / WORLD, b.grad[rows], rtol=1e-10, atol=1e-12)
        mean_acc = sum(res[key]["accuracy"] for res in ranks) / WORLD
        torch.testing.assert_close(mean_acc, full.accuracy)
    # the queue changed the result, so the comparison above is not vacuous
    assert not torch.allclose(ranks[0]["plain"]["loss"], ranks[0]["queue"]["loss"])


def test_not_distributed_helpers_are_identities(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert du.setup_distributed() == (0, 1, 0)
    assert not du.is_distributed() and du.get_rank() == 0 and du.get_world_size() == 1
    x = torch.randn(3, 2, requires_grad=True)
    assert du.gather_with_grad(x) is x
    t = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(du.all_reduce_mean(t), t)
    du.cleanup_distributed()  # no-op
