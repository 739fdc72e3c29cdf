"""End to end through the command line on tiny data: every stage trains, writes its run directory
and results, resumes exactly, and hands its weights to the next stage.

All runs use the embedded digits (``--max-per-class 4``: 40 training images, 297 test images) at
16 px with r18_1x_sk0, fp32 on the CPU, and a few optimiser steps. One intra-op thread: the
machine's cores are shared, and a single thread also fixes the summation order.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from simclrv2.cli.main import main
from simclrv2.models import create_model
from simclrv2.errors import CheckpointError
from simclrv2.training.model_io import load_state_into
from simclrv2.training.rundir import read_metrics
from simclrv2.utils.checkpoint import CheckpointManager, load_weights

REPO = Path(__file__).resolve().parents[1]
EVAL_COMMON = ["--data", "digits", "--image-size", "16", "--max-per-class", "4", "--no-progress", "--device",
               "cpu", "--precision", "fp32"]
COMMON = [*EVAL_COMMON, "--log-every", "1"]


def for_evaluate(args: list) -> list:
    """``args`` without --max-per-class, which limits training images and is refused by evaluate."""
    i = args.index("--max-per-class")
    return [*args[:i], *args[i + 2:]]
PRETRAIN = ["pretrain", *COMMON, "--batch-size", "8", "--epochs", "1", "--schedule-steps", "4",
            "--checkpoint-every", "2", "--seed", "0"]
"""40 images, 5 steps per epoch; the schedule is fixed at 4 steps whatever --max-steps says."""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cli(*args) -> None:
    argv = [str(a) for a in args]
    code = main(argv)
    assert code == 0, f"simclrv2 {' '.join(argv)} exited with {code}"


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def model_keys(run: Path) -> set[str]:
    return set(load_file(run / "model.safetensors"))


def head_layers(keys: set[str]) -> set[int]:
    return {int(m.group(1)) for k in keys if (m := re.match(r"head\.layers\.(\d+)\.", k))}


def assert_accuracy(res: dict) -> None:
    for key in ("top1", "top5"):
        assert 0.0 <= res[key] <= 1.0, res
    assert res["top5"] >= res["top1"]


@pytest.fixture(scope="module")
def pre(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pre") / "run"
    cli(*PRETRAIN, "--max-steps", "4", "--out", out)
    return out


@pytest.fixture(scope="module")
def ft(pre, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ft") / "run"
    cli("finetune", *COMMON, "--checkpoint", pre, "--label-fraction", "0.25", "--max-steps", "2", "--out", out)
    return out


@pytest.fixture(scope="module")
def dist(ft, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "run"
    cli("distill", *COMMON, "--teacher", ft, "--batch-size", "8", "--max-steps", "2", "--out", out)
    return out


# ----------------------------------------------------------------------------------------------- pretrain
def test_pretrain_writes_the_run_directory(pre):
    cfg = yaml.safe_load((pre / "config.yaml").read_text())
    assert cfg["stage"] == "pretrain" and cfg["batch_size"] == 8 and cfg["image_size"] == 16
    train = [r for r in read_metrics(pre) if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for record in train:
        for key in ("train/loss", "train/contrast_acc", "train/images_per_s", "train/lr"):
            assert key in record and record[key] == record[key], key  # present and not NaN
        assert 0.0 <= record["train/contrast_acc"] <= 1.0
        assert record["train/images_per_s"] > 0
    events = list((pre / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    manager = CheckpointManager(pre)
    assert (pre / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    assert sorted(p.name for p in (pre / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000004"]
    assert manager.load()["state"]["step"] == 4
    tensors, meta = load_weights(pre / "model.safetensors")
    assert meta["arch"] == "r18_1x_sk0" and meta["image_size"] == 16 and meta["num_proj_layers"] == 3
    assert head_layers(set(tensors)) == {0, 1, 2}
    assert any(k.startswith("encoder.") for k in tensors)
    res = results(pre)
    assert res["stage"] == "pretrain" and res["steps"] == 4
    assert res["final"]["loss"] == pytest.approx(train[-1]["train/loss"])
    assert 0.0 <= res["knn_top1"] <= 1.0


def test_resume_continues_the_step_count_and_equals_the_uninterrupted_run(pre, tmp_path, capsys):
    out = tmp_path / "run"
    cli(*PRETRAIN, "--max-steps", "2", "--out", out)                # "interrupted" after 2 of 4 steps
    assert results(out)["steps"] == 2
    first = load_file(out / "model.safetensors")
    capsys.readouterr()
    cli(*PRETRAIN, "--max-steps", "4", "--out", out, "--resume")
    assert "continuing from step 2" in capsys.readouterr().out
    train = [r for r in read_metrics(out) if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]               # no step repeated or skipped
    assert results(out)["steps"] == 4
    reference = [r for r in read_metrics(pre) if "train/loss" in r]
    assert [r["train/loss"] for r in train] == pytest.approx([r["train/loss"] for r in reference], rel=1e-6)
    resumed, uninterrupted = load_file(out / "model.safetensors"), load_file(pre / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)
    # the resumed steps really changed the weights
    assert any(not torch.equal(first[k], resumed[k]) for k in resumed if resumed[k].is_floating_point())


def test_pretrain_with_memory_checkpoints_queue_and_ema(tmp_path):
    out = tmp_path / "run"
    cli(*PRETRAIN, "--max-steps", "2", "--checkpoint-every", "1", "--memory-size", "64", "--memory-keys-fraction",
        "0.5", "--out", out)
    ckpt = CheckpointManager(out).load()
    assert ckpt["state"]["step"] == 2
    queue = ckpt["state"]["queue"]
    assert queue["embeddings"].shape == (64, 128)
    filled = int(queue["filled"])
    assert filled == 2 * 4                                  # 2 steps x 4 keys (half of the 8 images' second views)
    rows = queue["embeddings"][:filled]
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(filled))  # L2-normalised projections
    assert not queue["embeddings"][filled:].abs().any()
    model, ema = ckpt["weights"]["model"], ckpt["weights"]["ema"]
    assert model.keys() == ema.keys()
    moved = [k for k in model if model[k].is_floating_point() and not torch.equal(model[k], ema[k])]
    assert moved, "the EMA copy is identical to the online network"
    assert (out / "ema_model.safetensors").is_file()
    assert results(out)["final"]["loss"] == results(out)["final"]["loss"]


# ----------------------------------------------------------------------------------------------- fine-tune
def test_finetune_from_the_pretraining_run(ft, pre):
    res = results(ft)
    assert_accuracy(res)
    assert res["stage"] == "finetune" and res["steps"] == 2
    # recipe auto: the head input and a probe classifier (reference: head layer 1, zero classifier)
    assert res["ft_proj_selector"] == 0 and res["classifier_init"] == "probe"
    assert res["num_labeled"] == 10                                   # 25% of 40, class-balanced
    keys = model_keys(ft)
    assert head_layers(keys) == set()
    tensors, meta = load_weights(ft / "model.safetensors")
    assert meta["num_classes"] == 10 and meta["head_layers_kept"] == 0
    assert tensors["classifier.weight"].shape[0] == 10
    assert yaml.safe_load((ft / "config.yaml").read_text())["learning_rate"] == 0.00125   # 0.005 / 4 (recipe auto)


@pytest.mark.parametrize("k", [0, 2])
def test_ft_proj_selector_keeps_exactly_the_first_k_head_layers(pre, tmp_path, k):
    out = tmp_path / "run"
    cli("finetune", *COMMON, "--checkpoint", pre, "--label-fraction", "0.25", "--max-steps", "1",
        "--ft-proj-selector", k, "--out", out)
    assert head_layers(model_keys(out)) == set(range(k))
    assert results(out)["ft_proj_selector"] == k
    pre_tensors = load_file(pre / "model.safetensors")
    ft_tensors = load_file(out / "model.safetensors")
    # the classifier reads the selected activation: head input (512) or a head layer's output
    expected_in = pre_tensors["head.layers.0.linear.weight"].shape[1] if k == 0 else \
        pre_tensors[f"head.layers.{k - 1}.linear.weight"].shape[0]
    assert ft_tensors["classifier.weight"].shape == (10, expected_in)


# ----------------------------------------------------------------------------------------------- other stages
def test_supervised_baseline(tmp_path):
    out = tmp_path / "run"
    cli("supervised", *COMMON, "--label-fraction", "0.25", "--max-steps", "2", "--out", out)
    res = results(out)
    assert_accuracy(res)
    assert res["stage"] == "supervised" and res["num_labeled"] == 10 and res["steps"] == 2
    keys = model_keys(out)
    assert not head_layers(keys) and "classifier.weight" in keys


def test_linear_eval(pre, tmp_path):
    out = tmp_path / "run"
    cli("linear-eval", *EVAL_COMMON, "--checkpoint", pre, "--label-fraction", "0.25", "--epochs", "3", "--out", out)
    res = results(out)
    assert_accuracy(res)
    assert res["stage"] == "linear-eval" and res["num_labeled"] == 10
    tensors = load_file(out / "model.safetensors")
    assert not head_layers(set(tensors))
    # frozen encoder: identical to the pretrained one
    pre_tensors = load_file(pre / "model.safetensors")
    for key, value in tensors.items():
        if key.startswith("encoder."):
            torch.testing.assert_close(value, pre_tensors[key], rtol=0, atol=0)


def test_self_distillation(dist, ft):
    res = results(dist)
    assert_accuracy(res)
    assert res["stage"] == "distill" and res["steps"] == 2
    assert res["arch"] == res["teacher_arch"] == "r18_1x_sk0"
    assert res["temperature"] == 0.1                                  # self-distillation default
    keys = model_keys(dist)
    assert not head_layers(keys) and "classifier.weight" in keys      # students have no head


def test_distillation_into_another_architecture(ft, tmp_path):
    out = tmp_path / "run"
    cli("distill", *COMMON, "--teacher", ft, "--arch", "r18_1x_sk1", "--batch-size", "8", "--max-steps", "2",
        "--out", out)
    res = results(out)
    assert_accuracy(res)
    assert res["arch"] == "r18_1x_sk1" and res["teacher_arch"] == "r18_1x_sk0"
    assert res["temperature"] == 1.0                                  # big-to-small default
    _, meta = load_weights(out / "model.safetensors")
    assert meta["arch"] == "r18_1x_sk1"


@pytest.mark.parametrize("stage", ["ft", "dist"])
def test_evaluate_reproduces_the_stage_accuracy(stage, request, tmp_path):
    run = request.getfixturevalue(stage)
    out = tmp_path / "eval"
    cli("evaluate", *for_evaluate(EVAL_COMMON), "--checkpoint", run, "--out", out)
    res = results(out)
    assert_accuracy(res)
    assert res["num_images"] == 297
    assert res["top1"] == pytest.approx(results(run)["top1"], abs=1e-9)
    assert res["top5"] == pytest.approx(results(run)["top5"], abs=1e-9)


# ----------------------------------------------------------------------------------------------- wrong networks
def test_loading_weights_into_a_wrong_architecture_names_both(pre):
    state = load_file(pre / "model.safetensors")
    for arch in ("r34_1x_sk0", "r50_1x_sk0"):
        target = create_model(arch, image_size=16)
        with pytest.raises(CheckpointError) as info:
            load_state_into(target, state, source=str(pre), expected_arch=arch, source_arch="r18_1x_sk0")
        assert "r18_1x_sk0" in str(info.value) and arch in str(info.value)


def test_student_initialised_from_another_architecture_fails_naming_both(pre, ft, tmp_path, capsys):
    code = main(["distill", *COMMON, "--teacher", str(ft), "--arch", "r18_1x_sk1", "--init-student", str(pre),
                 "--max-steps", "1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert "r18_1x_sk0" in err and "r18_1x_sk1" in err


# The pipeline's tests are in tests/test_pipeline.py.


# ----------------------------------------------------------------------------------------------- real data
CIFAR10 = Path(os.environ.get("SIMCLRV2_CIFAR10_DIR", REPO.parent / "shared" / "datasets" / "cifar10"))


@pytest.fixture(scope="module")
def cifar_subsample(tmp_path_factory) -> Path:
    """10 training and 20 test images per class of the real CIFAR-10 JPEG folder (symlinks)."""
    if not (CIFAR10 / "train").is_dir() or not (CIFAR10 / "test").is_dir():
        pytest.skip(f"CIFAR-10 image folder not found at {CIFAR10} (set SIMCLRV2_CIFAR10_DIR)")
    root = tmp_path_factory.mktemp("cifar10")
    for split, count in (("train", 10), ("test", 20)):
        for class_dir in sorted(p for p in (CIFAR10 / split).iterdir() if p.is_dir()):
            dst = root / split / class_dir.name
            dst.mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:count]:
                (dst / image.name).symlink_to(image)
    return root


def test_cifar10_subsample_pretrain_finetune_distill_evaluate(cifar_subsample, tmp_path):
    common = ["--data", cifar_subsample, "--max-per-class", "10", "--image-size", "16", "--no-progress",
              "--device", "cpu", "--precision", "fp32", "--num-workers", "0"]
    pre, ft, dist, ev = (tmp_path / name for name in ("pre", "ft", "dist", "eval"))
    cli("pretrain", *common, "--batch-size", "16", "--max-steps", "2", "--epochs", "1", "--out", pre)
    cli("finetune", *common, "--checkpoint", pre, "--label-fraction", "0.2", "--max-steps", "2", "--out", ft)
    cli("distill", *common, "--teacher", ft, "--batch-size", "16", "--max-steps", "2", "--out", dist)
    cli("evaluate", *for_evaluate(common), "--checkpoint", dist, "--out", ev)
    assert results(pre)["steps"] == 2
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert load_weights(ft / "model.safetensors")[1]["classes"] == classes
    for run in (ft, dist, ev):
        res = results(run)
        assert_accuracy(res)
        assert res.get("num_images", 200) == 200
    assert results(ev)["top1"] == pytest.approx(results(dist)["top1"], abs=1e-9)
