"""benchmarks/throughput.py leaves out workers that would not fit in memory, and names a worker
the kernel killed, instead of dying with a traceback (six fp32 workers at batch 256 needed ~30 GB
on a 24 GB host: the out-of-memory killer ended one mid-run)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from test_benchmark_host import _throughput


def test_optional_variants_are_left_out_last_first_until_the_rest_fit():
    tp = _throughput()
    others = ["ours_compiled", "ours_native_conv", "ours_memory", "lightly", "lightly_best"]
    base = {name: 700.0 for name in others}
    # 4,000 MB per step: five workers need 1.15 * 4000 * 5 + reserve = 23,768 MB
    kept, left, needed, free = tp.plan_memory(4000.0, others, 21000.0, base)
    assert left == ["ours_native_conv"]
    assert kept == ["ours_compiled", "ours_memory", "lightly", "lightly_best"]
    assert needed == pytest.approx(1.15 * 4000 * 4 + tp.RESERVE_MB)
    assert free == pytest.approx(21700.0)
    assert needed <= free


def test_required_variants_are_never_left_out_and_the_shortfall_is_visible():
    tp = _throughput()
    others = ["ours_compiled", "ours_memory", "lightly", "lightly_best"]
    kept, left, needed, free = tp.plan_memory(8000.0, others, 20000.0, {n: 500.0 for n in others})
    assert left == ["ours_compiled"]
    assert kept == ["ours_memory", "lightly", "lightly_best"]
    assert needed > free  # run() refuses with a ConfigError naming --batch-size


def test_everything_is_kept_when_it_fits():
    tp = _throughput()
    others = ["ours_compiled", "ours_memory", "lightly", "lightly_best"]
    kept, left, needed, free = tp.plan_memory(100.0, others, 20000.0, {})
    assert (kept, left, free) == (others, [], 20000.0)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_a_worker_killed_by_sigkill_is_named_with_the_likely_cause():
    tp = _throughput()
    worker = tp.Worker("ours", batch=2, threads=1)
    try:
        worker.ready()
        assert worker.rss_mb()["VmRSS"] > 0
        os.kill(worker.proc.pid, signal.SIGKILL)
        with pytest.raises(tp.WorkerDied, match=r"'ours' killed by signal 9 \(SIGKILL: .*out-of-memory.*--batch-size"):
            worker.step()
    finally:
        if worker.proc.poll() is None:
            worker.proc.kill()
        worker.proc.wait()
