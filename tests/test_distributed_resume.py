"""Two real processes (Gloo, CPU): resume points that differ between ranks, and a slow checkpoint write.

* Without a shared file system each node has its own copy of the run directory. The test gives each
  rank its own working directory (its "node") and a relative ``--out run``, so the two ranks open the
  same path and see different folders, as two machines with local disks do. Rank 0 decides the resume
  point and every rank must verify it (trainer.maybe_resume): a rank that lacks it, or holds another
  checkpoint under the same name, stops both ranks with exit 2 before any step is trained.
* A checkpoint write slower than ``--dist-timeout`` must not kill a healthy run: rank 1 waits for rank 0's
  write over the I/O group, whose timeout is sized for disks (utils.distributed.io_timeout). The slow
  disk is real I/O of a real process: an audit hook in rank 0 sleeps when the checkpoint's temporary
  folder gets its first file.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simclrv2.cli.main import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARGS = ["pretrain", "--data", "digits", "--arch", "r18_0.25x_sk0", "--image-size", "8", "--max-per-class", "2",
        "--batch-size", "8", "--schedule-steps", "8", "--knn-every", "1000000", "--no-progress", "--no-global-bn",
        "--num-workers", "0", "--device", "cpu", "--precision", "fp32", "--log-every", "1"]

RANK_SCRIPT = r'''
import os, sys, time
slow = float(sys.argv[1])
if slow and os.environ["RANK"] == "0":
    state = {"slept": False}
    def hook(event, args):  # the first file opened for writing in a checkpoint's temporary folder
        if (event == "open" and not state["slept"] and isinstance(args[0], str) and "/.tmp-step-" in args[0]
                and (args[2] or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
            state["slept"] = True
            print(f"slow write: {args[0]}", flush=True)
            time.sleep(slow)
    sys.addaudithook(hook)
import torch
torch.set_num_threads(1)
import simclrv2.training.pretrain as P
P.PretrainTrainer.monitor_knn = lambda self, step: None
from simclrv2.cli.main import main
sys.exit(main(sys.argv[2:]))
'''


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(nodes: list[Path], args: list[str], slow: float = 0.0, timeout: float = 120) -> list[tuple[int, str, str]]:
    """Run ``simclrv2 ARGS`` as ranks 0 and 1, rank r in the working directory ``nodes[r]``."""
    script = nodes[0].parent / "rank.py"
    script.write_text(RANK_SCRIPT)
    port = _free_port()
    procs = []
    for rank, node in enumerate(nodes):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(script), str(slow), *args], cwd=node, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results, deadline = [], time.monotonic() + timeout
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> dict[str, Path]:
    """Two single-process runs of 4 steps with checkpoints at steps 2 and 4, seeds 0 and 1."""
    import simclrv2.training.pretrain as P
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(P.PretrainTrainer, "monitor_knn", lambda self, step: None)
        for seed in (0, 1):
            out = root / f"seed{seed}"
            assert main([*ARGS, "--max-steps", "4", "--checkpoint-every", "2", "--seed", str(seed),
                         "--out", str(out)]) == 0
            runs[f"seed{seed}"] = out
    return runs


def _node(tmp_path: Path, name: str, run: Path) -> Path:
    node = tmp_path / name
    node.mkdir()
    shutil.copytree(run, node / "run", symlinks=True)
    return node


@pytest.mark.slow  # two fresh interpreters + Gloo: 16-28 s on the shared 2-core machine
@pytest.mark.timeout(150)
@pytest.mark.parametrize("rank1_view", ["missing", "different"])
def test_ranks_that_see_different_resume_points_stop_before_training(rank1_view, two_runs, tmp_path) -> None:
    node0 = _node(tmp_path, "node0", two_runs["seed0"])
    if rank1_view == "missing":  # rank 1's disk lacks the newest checkpoint (it only has step 2)
        node1 = _node(tmp_path, "node1", two_runs["seed0"])
        shutil.rmtree(node1 / "run" / "checkpoints" / "step-00000004")
        expected = "cannot see a complete"
    else:  # rank 1's disk holds another run's step 4 (seed 1) under the same name
        node1 = _node(tmp_path, "node1", two_runs["seed1"])
        expected = "found different checkpoints named step-00000004"
    before = sorted(p.name for p in (node0 / "run" / "checkpoints").iterdir())
    results = _two_ranks([node0, node1], [*ARGS, "--seed", "0", "--max-steps", "6", "--checkpoint-every", "2",
                                          "--resume", "--dist-timeout", "30", "--out", "run"])
    for rank, (code, out, err) in enumerate(results):
        assert code == 2, f"rank {rank} exited {code}: {err[-3000:]}"
        assert expected in err and "Traceback" not in err, f"rank {rank}: {err[-3000:]}"
        assert "continuing from step" not in out
    # nothing was trained or written on rank 0's disk
    assert sorted(p.name for p in (node0 / "run" / "checkpoints").iterdir()) == before
    assert json.loads((node0 / "run" / "results.json").read_text())["steps"] == 4


@pytest.mark.slow  # sleeps 10 s inside the write on purpose
@pytest.mark.timeout(150)
def test_a_checkpoint_write_slower_than_dist_timeout_does_not_kill_a_healthy_run(tmp_path) -> None:
    nodes = [tmp_path / "shared", tmp_path / "shared"]  # one shared folder, as on a cluster file system
    nodes[0].mkdir()
    timeout, slow = 4, 10.0
    start = time.monotonic()
    results = _two_ranks(nodes, [*ARGS, "--max-steps", "3", "--checkpoint-every", "1", "--dist-timeout",
                                 str(timeout), "--out", "run"], slow=slow)
    elapsed = time.monotonic() - start
    (code0, out0, err0), (code1, _, err1) = results
    assert "slow write:" in out0, out0  # the sleep really happened inside rank 0's checkpoint write
    assert code0 == 0 and code1 == 0, f"rank 0: {err0[-2000:]}\nrank 1: {err1[-2000:]}"
    assert elapsed > slow
    run = nodes[0] / "run"
    assert json.loads((run / "results.json").read_text())["steps"] == 3
    assert (run / "model.safetensors").is_file()
