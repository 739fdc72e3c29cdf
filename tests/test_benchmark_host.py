"""benchmarks/throughput.py's busy verdict measures what other processes use right before a run."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _throughput():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("throughput_under_test", REPO / "benchmarks" / "throughput.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="needs Linux /proc/stat")
def test_processes_spinning_on_the_cpus_make_a_run_busy():
    tp = _throughput()
    cpus = os.cpu_count() or 1
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(min(cpus, 8))]
    try:
        time.sleep(0.5)
        used = tp.other_cpu_use(1.0)
        busy, fraction, rule = tp.machine_busy_before([float(cpus)] * 3)
    finally:
        for proc in spinners:
            proc.kill()
            proc.wait()
    assert used is not None and used > 0.5 * len(spinners) / cpus, used
    assert busy and fraction > tp.BUSY_CPU_FRACTION and "3 s before the run" in rule


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="needs Linux /proc/stat")
def test_the_steal_fraction_is_read_from_proc_stat_over_a_phase():
    """``cpu_steal`` in the JSON: the hypervisor's share of the CPU time between two readings (the
    8th field of /proc/stat's cpu line); a phase with no time elapsed has none."""
    tp = _throughput()
    start = tp.cpu_steal_ticks()
    assert start is not None and 0 <= start[0] <= start[1]
    time.sleep(0.2)
    fraction = tp.steal_fraction(start, tp.cpu_steal_ticks())
    assert fraction is not None and 0.0 <= fraction <= 1.0
    assert tp.steal_fraction((10, 1000), (40, 1300)) == 0.1
    assert tp.steal_fraction(start, start) is None and tp.steal_fraction(None, start) is None
