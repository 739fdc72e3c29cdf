"""``--compile``: the auto rule, the refusal without a C++ compiler, and a real compiled pretraining run.

The rule is a pure function of the stage's size and the machine (``runtime.choose_compile``); the
compiled run goes through the command line as a user's does, on the embedded digits, and its weights
must load into a plain network and reproduce the eager run's loss closely (inductor fuses kernels, so
sums are reordered: close, not bit-identical).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from simclrv2.cli.main import main
from simclrv2.errors import ConfigError
from simclrv2.training.rundir import read_metrics
from simclrv2.models.conv_matmul import ENV_VAR as CONV_MATMUL_ENV
from simclrv2.training.runtime import COMPILE_MIN_IMAGES, COMPILE_MIN_STEPS, choose_compile, cpp_compiler

CPU = torch.device("cpu")


def test_auto_stays_eager_while_the_matmul_and_winograd_convolutions_are_on(monkeypatch):
    """A compiled network runs oneDNN's plain convolutions (measured 0.72x our eager step in fp32 on an
    AVX-512 Xeon), so auto compiles nothing however long the stage, unless they are turned off."""
    monkeypatch.delenv(CONV_MATMUL_ENV, raising=False)
    steps = COMPILE_MIN_STEPS * 10
    choice = choose_compile(None, CPU, steps, COMPILE_MIN_IMAGES)
    assert not choice.enabled and CONV_MATMUL_ENV in choice.reason and "Winograd" in choice.reason
    assert choose_compile(True, CPU, steps, COMPILE_MIN_IMAGES).enabled or cpp_compiler() is None


def test_auto_compiles_only_cpu_stages_long_enough_to_repay_the_warm_up(monkeypatch):
    if cpp_compiler() is None:
        pytest.skip("no C++ compiler on this machine: auto never compiles here (covered below)")
    monkeypatch.setenv(CONV_MATMUL_ENV, "native")   # the rule for oneDNN's convolutions everywhere
    steps = COMPILE_MIN_STEPS * 10
    long_stage = choose_compile(None, CPU, steps, COMPILE_MIN_IMAGES // steps)
    assert long_stage.enabled and "auto" in long_stage.reason
    # the demo's pretraining: 59 steps x 256 images x 2 views
    assert not choose_compile(None, CPU, 59, 512).enabled
    # many images but few steps (warm-up is per process, not per image)
    assert not choose_compile(None, CPU, COMPILE_MIN_STEPS - 1, COMPILE_MIN_IMAGES).enabled
    assert not choose_compile(None, CPU, steps, COMPILE_MIN_IMAGES // steps - 1).enabled
    assert not choose_compile(False, CPU, steps, COMPILE_MIN_IMAGES).enabled
    assert choose_compile(True, CPU, 1, 1).enabled
    assert not choose_compile(None, torch.device("cuda"), steps, COMPILE_MIN_IMAGES).enabled
    # bf16 autocast: no compiled gain was measured, so auto stays eager however long the stage
    in_bf16 = choose_compile(None, CPU, steps, COMPILE_MIN_IMAGES // steps, "bf16")
    assert not in_bf16.enabled and "bf16" in in_bf16.reason
    assert choose_compile(True, CPU, steps, COMPILE_MIN_IMAGES // steps, "bf16").enabled


def test_without_a_cpp_compiler_auto_stays_eager_and_asking_for_it_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(CONV_MATMUL_ENV, "native")
    monkeypatch.setenv("PATH", str(tmp_path))   # a machine with no compiler on its PATH
    monkeypatch.delenv("CXX", raising=False)
    assert cpp_compiler() is None
    choice = choose_compile(None, CPU, COMPILE_MIN_STEPS * 10, COMPILE_MIN_IMAGES)
    assert not choice.enabled and "no C++ compiler" in choice.reason
    with pytest.raises(ConfigError, match="compile: torch.compile on a CPU needs a C\\+\\+ compiler"):
        choose_compile(True, CPU, 1, 1)


PRETRAIN = ["pretrain", "--data", "digits", "--image-size", "16", "--max-per-class", "4", "--no-progress",
            "--device", "cpu", "--precision", "fp32", "--arch", "r18_0.5x_sk0", "--batch-size", "8",
            "--epochs", "1", "--schedule-steps", "3", "--log-every", "1", "--seed", "0", "--knn-every", "0"]


@pytest.mark.skipif(cpp_compiler() is None, reason="torch.compile on a CPU needs a C++ compiler (g++/clang++)")
def test_a_compiled_pretraining_run_matches_the_eager_one_and_saves_plain_weights(tmp_path, capsys):
    torch.set_num_threads(1)
    assert main([*PRETRAIN, "--out", str(tmp_path / "eager")]) == 0
    assert main([*PRETRAIN, "--compile", "--out", str(tmp_path / "compiled")]) == 0
    out = capsys.readouterr().out
    assert "pretrain: torch.compile off (auto:" in out and "pretrain: torch.compile on (--compile)" in out
    results = {name: json.loads((tmp_path / name / "results.json").read_text()) for name in ("eager", "compiled")}
    assert results["eager"]["compiled"] is False and results["compiled"]["compiled"] is True
    losses = {name: [r["train/loss"] for r in read_metrics(tmp_path / name) if "train/loss" in r]
              for name in results}
    assert len(losses["compiled"]) == 3
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=2e-3)
    # the compiled run's model.safetensors is a plain network's (no _orig_mod. prefix): finetune reads it
    assert main(["finetune", "--data", "digits", "--max-per-class", "4", "--no-progress", "--device", "cpu",
                 "--precision", "fp32", "--checkpoint", str(tmp_path / "compiled"), "--max-steps", "1",
                 "--batch-size", "8", "--out", str(tmp_path / "ft")]) == 0
    assert Path(tmp_path / "ft" / "model.safetensors").is_file()
