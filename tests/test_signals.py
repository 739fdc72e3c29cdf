"""SIGTERM outside a training loop: a real signal to a real ``simclrv2`` process.

Schedulers send SIGTERM before pre-emption. Inside a training loop the step ends and a checkpoint
is saved (tests/test_faults.py); everywhere else (feature extraction and the linear classifier of
``linear-eval``, decoding a folder into memory, evaluation, the pipeline between stages) the command
must stop at once with exit 143 and ONE line on stderr, no traceback, and leave no file half-written
(no ``model.safetensors``, no ``results.json``, no temporary file). The phase is detected from the
process itself (its stdout line, or its decoding worker processes), never by sleeping blindly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import child_pids
import torch
from PIL import Image

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
CLI = [sys.executable, "-m", "simclrv2.cli.main"]


def _leftovers(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if ".tmp" in p.name) if run.exists() else []


def _stop(proc: subprocess.Popen) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _assert_one_clean_line(err: str, command: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"simclrv2 {command}: stopped: received SIGTERM outside a "
                                                   "training step"), err[-3000:]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    """A real network file (r18_0.25x at 16 px, untrained) for linear evaluation."""
    from simclrv2.training.model_io import build_from_meta, export_model, model_meta
    torch.manual_seed(0)
    meta = {**model_meta(arch="r18_0.25x_sk0", image_size=16, num_proj_layers=2, proj_out_dim=16,
                         stage="pretrain"), "data": "digits"}
    return export_model(build_from_meta(meta), tmp_path_factory.mktemp("encoder") / "model.safetensors", meta)


@pytest.mark.timeout(120)
def test_sigterm_during_linear_eval_feature_extraction_exits_143_with_one_line(encoder, tmp_path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen([*CLI, "linear-eval", "--checkpoint", str(encoder), "--data", "digits", "--image-size",
                             "16", "--epochs", "1", "--no-progress", "--device", "cpu", "--precision", "fp32",
                             "--out", str(out)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # printed right before the features of 1500 images are extracted (~2 s)
        assert line.startswith("linear-eval: 1500 labelled images"), (line, proc.communicate())
        proc.send_signal(signal.SIGTERM)
    finally:
        rest, err = _stop(proc)
    assert proc.returncode == 143, err[-3000:]
    _assert_one_clean_line(err, "linear-eval")
    assert "top-1" not in rest
    assert not (out / "model.safetensors").exists() and not (out / "results.json").exists()
    assert not _leftovers(out)
    # what the message advises: the same command with --resume and the same --out finishes
    again = subprocess.run([*CLI, "linear-eval", "--checkpoint", str(encoder), "--data", "digits", "--image-size",
                            "16", "--epochs", "1", "--no-progress", "--device", "cpu",
                            "--precision", "fp32", "--resume", "--out", str(out)], env=ENV, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and (out / "results.json").is_file()


@pytest.mark.timeout(120)
def test_sigterm_while_decoding_a_folder_into_memory_exits_143_and_stops_the_workers(tmp_path) -> None:
    """A folder that fits in memory is decoded by --num-workers processes BEFORE training; their
    existence is how the test knows the command is in that phase."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for c in range(2):
        (root / "train" / f"c{c}").mkdir(parents=True)
        for i in range(300):  # noisy 96 px JPEGs: slow enough to decode to catch the phase
            Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(
                root / "train" / f"c{c}" / f"{i}.jpg", quality=95)
    out = tmp_path / "run"
    proc = subprocess.Popen([*CLI, "pretrain", "--data", str(root), "--image-size", "96", "--arch", "r18_0.25x_sk0",
                             "--batch-size", "8", "--max-steps", "1", "--num-workers", "2", "--no-progress",
                             "--device", "cpu", "--precision", "fp32", "--out", str(out)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, workers = time.monotonic() + 60, []
        while len(workers) < 2:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no decoding workers within 60 s"
            workers = child_pids(proc.pid)
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
    finally:
        stdout, err = _stop(proc)
    assert proc.returncode == 143, err[-3000:]
    _assert_one_clean_line(err, "pretrain")
    assert "pretrain: " not in stdout  # training never started
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    assert not (out / "results.json").exists() and not _leftovers(out)
    time.sleep(0.5)
    alive = [w for w in workers if Path(f"/proc/{w}").exists()
             and Path(f"/proc/{w}/stat").read_text().split()[2] != "Z"]
    assert not alive, f"decoding workers {alive} outlived the command"


@pytest.mark.timeout(120)
def test_sigterm_in_a_pipeline_between_stages_exits_143_and_keeps_the_finished_stage(tmp_path) -> None:
    """Sent when the pipeline announces its second stage (which then loads the first stage's weights
    and its data): the finished pretraining stays intact and the new stage wrote no results."""
    out = tmp_path / "pipe"
    proc = subprocess.Popen([*CLI, "pipeline", "--data", "digits", "--image-size", "8", "--arch", "r18_0.25x_sk0",
                             "--max-per-class", "4", "--no-progress", "--device", "cpu", "--precision", "fp32",
                             "--label-fractions", "0.1", "--pretrain-epochs", "1", "--finetune-epochs", "2",
                             "--distill-epochs", "1", "--supervised-epochs", "1", "--seeds", "1", "--out", str(out)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("[pipeline] finetune"):
                proc.send_signal(signal.SIGTERM)
                break
    finally:
        _, err = _stop(proc)
    assert proc.returncode == 143, err[-3000:]
    _assert_one_clean_line(err, "pipeline")
    assert (out / "pretrain" / "results.json").is_file() and (out / "pretrain" / "model.safetensors").is_file()
    stage = out / "finetune_0.1"
    assert not (stage / "results.json").exists() and not (stage / "model.safetensors").exists()
    assert not _leftovers(out)


@pytest.mark.timeout(300)
def test_a_stage_stopped_mid_training_keeps_its_seconds_and_its_resumed_run_adds_to_them(tmp_path) -> None:
    """SIGTERM while fine-tuning trains (after its plan line): exit 143 with a checkpoint, and
    ``stage_seconds.json`` keeps the seconds the stage ran; the resumed pipeline skips pretraining and
    records the stage's total, not only its last invocation's."""
    import json
    out = tmp_path / "pipe"
    args = [*CLI, "pipeline", "--data", "digits", "--image-size", "8", "--arch", "r18_0.25x_sk0",
            "--max-per-class", "4", "--no-progress", "--device", "cpu", "--precision", "fp32",
            "--label-fractions", "0.1", "--pretrain-epochs", "1", "--distill-epochs", "1", "--supervised-epochs", "1",
            "--seeds", "1", "--out", str(out)]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("finetune: torch.compile"):   # printed as the trainer starts its loop
                time.sleep(1.0)
                proc.send_signal(signal.SIGTERM)
                break
    finally:
        _, err = _stop(proc)
    assert proc.returncode == 143, err[-3000:]
    partial = json.loads((out / "stage_seconds.json").read_text())
    assert partial["finetune 0.1"] >= 1.0 and partial["pretrain"] > 0
    assert list((out / "finetune_0.1" / "checkpoints").glob("step-*"))
    done = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[pipeline] pretrain: done already" in done.stdout and "resume: continuing from step" in done.stdout
    final = json.loads((out / "stage_seconds.json").read_text())
    assert final["pretrain"] == partial["pretrain"]
    assert final["finetune 0.1"] > partial["finetune 0.1"]
