"""The kNN monitor of ``pretrain`` keeps within its time budget by default (issue 17, item 5).

A real run on the embedded digits (40 training images, 297 test images, 8 px): each monitor embeds
several times more images than an epoch trains on, so the default monitor (``--knn-every 0``) must
not run at every epoch end; it runs once, for the result. ``--knn-every N`` still runs every N steps.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from simclrv2.cli.main import main
from simclrv2.training.pretrain import KNN_TIME_BUDGET, PretrainTrainer
from simclrv2.training.rundir import read_metrics

COMMON = ["pretrain", "--data", "digits", "--image-size", "8", "--max-per-class", "4", "--no-progress",
          "--device", "cpu", "--precision", "fp32", "--batch-size", "8", "--log-every", "1000",
          "--checkpoint-every", "1000", "--seed", "0"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def knn_records(run) -> list[dict]:
    return [r for r in read_metrics(run) if "monitor/knn_top1" in r]


def test_default_monitor_skips_epoch_ends_it_cannot_afford(tmp_path):
    out = tmp_path / "run"
    assert main([*COMMON, "--epochs", "2", "--out", str(out)]) == 0
    steps = json.loads((out / "results.json").read_text())["steps"]
    assert steps >= 2
    records = knn_records(out)
    # Before the budget, both epoch ends ran it, and the result once more (3 records).
    assert [r["step"] for r in records] == [steps]
    assert records[0]["monitor/knn_seconds"] > 0


def test_explicit_knn_every_still_runs_every_n_steps(tmp_path):
    out = tmp_path / "run"
    assert main([*COMMON, "--epochs", "1", "--knn-every", "2", "--out", str(out)]) == 0
    steps = json.loads((out / "results.json").read_text())["steps"]
    expected = list(range(2, steps + 1, 2)) + ([] if steps % 2 == 0 else [steps])
    assert [r["step"] for r in knn_records(out)] == expected  # the final one is not repeated


def test_budget_allows_a_monitor_that_is_cheap_next_to_the_training_time():
    started = time.perf_counter() - 100.0  # 100 s of training so far
    trainer = SimpleNamespace(_train_clock=started, knn_seconds=0.0, knn_last_cost=None, _steps_timed=100,
                              plan=SimpleNamespace(global_batch=500),
                              knn_sizes=lambda: (5000, 2000))
    # 50,000 training images in 100 s; 7,000 monitored images guessed at 1/3 of a training image each.
    assert PretrainTrainer.knn_fits_budget(trainer)
    trainer.knn_last_cost = KNN_TIME_BUDGET * 100.0 * 1.1  # measured: just over the budget
    assert not PretrainTrainer.knn_fits_budget(trainer)
    trainer.knn_last_cost = 2.0
    trainer.knn_seconds = 3.5  # two earlier monitors: 3.5 + 2.0 > 5% of 100 s
    assert not PretrainTrainer.knn_fits_budget(trainer)
