"""Two CPU processes (Gloo, global BN, DDP, LARS) train exactly like one process on the full batch.

SimCLR's claim (SPEC §3, §1.6): with global BatchNorm and negatives gathered from every
replica, data-parallel pretraining is the same computation as one big batch. Rank r holds
views [a of its N images; b of its N images]; one process holds [all a; all b]. After a few
``PretrainStep`` updates the logged (all-reduced) loss and every parameter and BN buffer must
agree, up to fp32 summation-order noise (stated tolerances below).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from simclrv2.config import build_config
from simclrv2.models import create_model
from simclrv2.training.pretrain import PretrainStep
from simclrv2.training.runtime import Runtime
from simclrv2.training.trainer import build_optimizer

WORLD = 2
N_LOCAL = 4          # images per rank; the global batch is WORLD * N_LOCAL images = 16 views
SIZE = 16
STEPS = 2            # the second step exercises the LARS momentum buffers and updated BN stats
PEAK_LR = 0.3
TEMPERATURE = 0.2
ARCH = "r18_1x_sk0"

# fp32 tolerances: the two computations differ by summation order only (in float64 the updates
# agree to 1e-9). The parameter UPDATE of every tensor (after - init) must agree within 1e-3 of
# its own norm (plus a tiny absolute floor); the observed fp32 worst case is ~6e-5.
UPDATE_RTOL = 1e-3
UPDATE_ATOL = 1e-7
LOSS_RTOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config():
    return build_config("pretrain", None, {"weight_decay": 1e-4, "momentum": 0.9})


def _build():
    """Same seed -> same initial weights in every process."""
    torch.manual_seed(1234)
    net = create_model(ARCH, image_size=SIZE, num_proj_layers=3, proj_out_dim=32)
    return net


def _fixed_views() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    n = WORLD * N_LOCAL
    view_a = torch.rand(n, 3, SIZE, SIZE, generator=g)
    view_b = (view_a + 0.3 * torch.rand(n, 3, SIZE, SIZE, generator=g)).clamp(0, 1)
    return view_a, view_b


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    from simclrv2.training.global_bn import convert_global_bn
    from simclrv2.utils import distributed as du

    got = du.setup_distributed("gloo", timeout=60)
    try:
        assert got == (rank, WORLD, rank)
        net = convert_global_bn(_build())
        model = torch.nn.parallel.DistributedDataParallel(net)
        rt = Runtime(device=torch.device("cpu"), precision="fp32", channels_last=False, rank=rank,
                     world_size=WORLD, local_rank=rank)
        cfg = _config()
        optimizer = build_optimizer(cfg, net, PEAK_LR)
        step = PretrainStep(model, optimizer, rt, temperature=TEMPERATURE, weight_decay=cfg.weight_decay)
        view_a, view_b = _fixed_views()
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        views = torch.cat([view_a[rows], view_b[rows]])        # [a of my N; b of my N]
        labels = torch.full((N_LOCAL,), -1, dtype=torch.long)
        losses = []
        for _ in range(STEPS):
            metrics = step(views, labels)
            losses.append(du.all_reduce_mean(metrics["loss"]).item())
        torch.save({"losses": losses, "state": {k: v.detach().clone() for k, v in net.state_dict().items()}},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        du.cleanup_distributed()


@pytest.mark.timeout(120)
def test_two_process_pretrain_step_equals_one_process_full_batch(tmp_path):
    init = {k: v.clone() for k, v in _build().state_dict().items()}
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)

    # reference: one process, plain BatchNorm, the full batch laid out [all a; all b]
    net = _build()
    rt = Runtime(device=torch.device("cpu"), precision="fp32", channels_last=False)
    cfg = _config()
    step = PretrainStep(net, build_optimizer(cfg, net, PEAK_LR), rt, temperature=TEMPERATURE,
                        weight_decay=cfg.weight_decay)
    view_a, view_b = _fixed_views()
    views = torch.cat([view_a, view_b])
    labels = torch.full((WORLD * N_LOCAL,), -1, dtype=torch.long)
    single_losses = [step(views, labels)["loss"].item() for _ in range(STEPS)]
    single = net.state_dict()

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for res in ranks:
        assert res["losses"] == pytest.approx(single_losses, rel=LOSS_RTOL)
    # both ranks hold identical replicas (DDP + global BN keep them in lockstep)
    for key in single:
        torch.testing.assert_close(ranks[0]["state"][key], ranks[1]["state"][key], rtol=0, atol=0)

    dist_state = ranks[0]["state"]
    assert set(dist_state) == set(single)
    biggest_update = 0.0
    for key, value in single.items():
        if key.endswith("num_batches_tracked"):
            assert int(dist_state[key]) == int(value) == STEPS
            continue
        ref_update = (value - init[key]).double()
        got_update = (dist_state[key] - init[key]).double()
        err = (got_update - ref_update).norm().item()
        assert err <= UPDATE_RTOL * ref_update.norm().item() + UPDATE_ATOL * ref_update.numel() ** 0.5, \
            f"{key}: update differs by {err:.3g} (update norm {ref_update.norm().item():.3g})"
        biggest_update = max(biggest_update, ref_update.abs().max().item())
    assert biggest_update > 1e-3  # the steps really moved the weights: the comparison is not vacuous


def test_global_bn_conversion_keeps_weights_and_is_plain_bn_in_one_process():
    """Outside a process group the converted network computes exactly what the plain one does."""
    from simclrv2.training.global_bn import convert_global_bn

    torch.manual_seed(0)
    plain = _build()
    converted = convert_global_bn(_build())
    assert not any(type(m).__name__.startswith("BatchNorm") for m in converted.modules())
    assert converted.state_dict().keys() == plain.state_dict().keys()
    x = torch.rand(6, 3, SIZE, SIZE)
    torch.testing.assert_close(converted(x)["projection"], plain(x)["projection"], rtol=0, atol=0)


def _torchrun() -> str | None:
    exe = shutil.which("torchrun")
    if exe:
        return exe
    candidate = Path(sys.executable).with_name("torchrun")
    return str(candidate) if candidate.is_file() else None


@pytest.mark.timeout(180)
def test_torchrun_two_process_pretrain_command_runs_end_to_end(tmp_path):
    torchrun = _torchrun()
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "simclrv2.cli.main", "pretrain", "--data", "digits", "--image-size", "16",
           "--max-per-class", "2", "--batch-size", "8", "--max-steps", "2", "--epochs", "1",
           "--device", "cpu", "--precision", "fp32", "--no-progress", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 2
    assert (out / "model.safetensors").is_file()
    # one writer: rank 0 alone logged and checkpointed
    assert "2 processes" in proc.stdout
