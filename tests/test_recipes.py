"""Recipe auto vs reference (simclrv2/recipes.py, issue #19): the rule, where it reaches a stage, and
a short-budget student that really starts as a copy of its teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from simclrv2 import recipes
from simclrv2.cli.main import main
from simclrv2.config import build_config
from simclrv2.errors import ConfigError
from simclrv2.recipes import stage_schedule

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COMMON = ["--data", "digits", "--image-size", "16", "--max-per-class", "4", "--no-progress", "--device", "cpu",
          "--precision", "fp32", "--log-every", "1"]


def cli(*args) -> None:
    argv = [str(a) for a in args]
    assert main(argv) == 0, f"simclrv2 {' '.join(argv)} failed"


# ------------------------------------------------------------------------------------------------ the rule
@pytest.mark.parametrize("stage, fraction, images", [("finetune", 0.01, 12_811), ("finetune", 0.1, 128_116),
                                                     ("distill", None, 1_281_167)])
def test_auto_equals_the_reference_on_imagenet_scale_splits(stage, fraction, images):
    auto = stage_schedule(stage, "auto", images, batch_size=None, epochs=None, label_fraction=fraction)
    ref = stage_schedule(stage, "reference", images, batch_size=None, epochs=None, label_fraction=fraction)
    assert (auto.batch_size, auto.epochs) == (ref.batch_size, ref.epochs) == (
        recipes.REFERENCE_BATCH[stage], recipes.reference_epochs(stage, fraction))
    assert auto.notes == [] and ref.notes == []


def test_auto_gives_a_small_labelled_set_several_steps_per_epoch_and_enough_steps():
    # The failing case: ~950 labelled images, where batch 1024 for 30 epochs was 31 steps.
    ref = stage_schedule("finetune", "reference", 950, batch_size=None, epochs=None, label_fraction=0.1)
    assert (ref.batch_size, ref.epochs) == (1024, 30)
    auto = stage_schedule("finetune", "auto", 950, batch_size=None, epochs=None, label_fraction=0.1)
    per_epoch = 950 // auto.batch_size
    assert auto.batch_size == 95 and per_epoch == recipes.MIN_STEPS_PER_EPOCH
    assert per_epoch * auto.epochs >= recipes.MIN_STEPS and auto.epochs == 30   # 10 x 30 = 300 steps
    assert "batch 95" in auto.notes[0] and "reference 1024" in auto.notes[0]
    tiny = stage_schedule("finetune", "auto", 100, batch_size=None, epochs=None, label_fraction=0.01)
    assert tiny.batch_size == recipes.MIN_BATCH and tiny.epochs == 100          # 3 steps per epoch -> 300
    assert any("reference 60" in note for note in tiny.notes)


def test_values_the_user_set_are_never_changed():
    s = stage_schedule("finetune", "auto", 100, batch_size=64, epochs=3, label_fraction=0.01)
    assert (s.batch_size, s.epochs, s.notes) == (64, 3, [])


def test_the_supervised_baseline_trains_at_least_as_long_as_fine_tuning():
    for images in (20, 200, 5_000):
        ft = stage_schedule("finetune", "auto", images, batch_size=None, epochs=None, label_fraction=0.1)
        sup = stage_schedule("supervised", "auto", images, batch_size=None, epochs=None, label_fraction=0.1)
        assert sup.epochs >= ft.epochs
        assert (images // sup.batch_size) * sup.epochs >= recipes.MIN_STEPS


# ------------------------------------------------------------------------------------------ the config
def test_reference_recipe_writes_spec_values_and_auto_leaves_them_to_the_plan():
    ref = build_config("supervised", None, {"recipe": "reference", "label_fraction": 0.1})
    assert (ref.batch_size, ref.epochs) == (256, 90)
    auto = build_config("supervised", None, {"label_fraction": 0.1})
    assert (auto.recipe, auto.batch_size, auto.epochs) == ("auto", None, None)


@pytest.mark.parametrize("values, init, lr, wd", [
    ({"epochs": 4}, "teacher", 0.00125, 0.0),                        # short budget: copy of the teacher, at
    ({"epochs": 4, "arch": "r18_1x_sk1"}, "teacher", 0.0005, 0.0),   # auto's fine-tuning rate (planned: teacher
                                                                       # arch taken as the student's)
    ({}, None, 0.1, 1e-4),                                            # 400 epochs: the paper's from scratch
    ({"epochs": 4, "recipe": "reference"}, None, 0.1, 1e-4),
    ({"epochs": 4, "init_student": "scratch"}, "scratch", 0.1, 1e-4),
    ({"epochs": 4, "learning_rate": 0.3}, "teacher", 0.3, 0.0),       # the user's learning rate is kept
])
def test_distillation_student_start_and_its_learning_rate(values, init, lr, wd):
    cfg = build_config("distill", None, {"teacher": "/not/yet", **values}, check_paths=False)
    assert (cfg.init_student, cfg.learning_rate, cfg.weight_decay) == (init, lr, wd)
    if init == "teacher":
        assert cfg.warmup_epochs == 0.0


def test_a_smaller_student_starts_from_scratch():
    assert recipes.distill_student_init("auto", None, 4, "r18_0.5x_sk0", "r50_1x_sk0") is None
    assert recipes.distill_student_init("auto", None, 4, "r50_1x_sk0", "r50_1x_sk0") == "teacher"
    assert recipes.distill_student_init("auto", None, 100, "r50_1x_sk0", "r50_1x_sk0") is None


# ------------------------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recipe")
    cli("pretrain", *COMMON, "--batch-size", "8", "--epochs", "1", "--max-steps", "2", "--out", root / "pre")
    # head layer 1: a teacher with a head layer, so that the student's copy of it is checked below
    cli("finetune", *COMMON, "--checkpoint", root / "pre", "--label-fraction", "0.5", "--max-steps", "2",
        "--ft-proj-selector", "1", "--out", root / "ft")
    return root / "ft"


def test_finetune_plan_line_and_results_state_what_the_recipe_chose(teacher, capsys):
    res = json.loads((teacher / "results.json").read_text())
    # 20 labelled images: batch 20 (not 1024), 1 step per epoch, so 300 epochs instead of 30
    assert (res["recipe"], res["batch_size"], res["epochs"]) == ("auto", 20, 300)
    assert any("reference 30" in note for note in res["recipe_notes"])
    assert yaml.safe_load((teacher / "config.yaml").read_text())["batch_size"] is None


def test_short_budget_student_is_a_copy_of_its_teacher(teacher, tmp_path, capsys):
    out = tmp_path / "dist"
    # A learning rate of 1e-30 leaves every weight where it started: the student's weights must then be
    # the teacher's, head layers and classifier included (a from-scratch student has neither).
    cli("distill", *COMMON, "--teacher", teacher, "--epochs", "2", "--max-steps", "2", "--learning-rate", "1e-30",
        "--out", out)
    printed = capsys.readouterr().out
    assert "starts as a copy of its teacher" in printed
    student, teacher_state = load_file(out / "model.safetensors"), load_file(teacher / "model.safetensors")
    assert set(student) == set(teacher_state)
    trained = [k for k in student if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert any(k.startswith("head.") for k in trained) and "classifier.weight" in trained
    for key in trained:   # within 1e-12 (a weight at exactly 0 may move by 1e-30 x its gradient)
        assert (student[key] - teacher_state[key]).abs().max() <= 1e-12, key
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["init_student"] == "teacher" and cfg["weight_decay"] == 0.0


def test_scratch_student_and_reference_recipe_keep_the_papers_start(teacher, tmp_path, capsys):
    out = tmp_path / "dist"
    cli("distill", *COMMON, "--teacher", teacher, "--epochs", "2", "--max-steps", "1", "--recipe", "reference",
        "--out", out)
    assert "from scratch" in capsys.readouterr().out
    keys = set(load_file(out / "model.safetensors"))
    assert not any(k.startswith("head.") for k in keys)
    res = json.loads((out / "results.json").read_text())
    assert res["batch_size"] == 40 and res["recipe"] == "reference"      # 512 capped at the 40 images


def test_the_report_lists_what_the_recipe_changed(teacher):
    from simclrv2.training.report import recipe_lines
    lines = "\n".join(recipe_lines(teacher.parent, [{"name": "finetune 0.5", "dir": teacher.name}]))
    assert "## Recipe" in lines and "Recipe auto" in lines
    assert "| finetune 0.5 | 20 | 300 | 2 |" in lines and "reference 30" in lines   # --max-steps 2 of 301


# ------------------------------------------------------------------ fine-tuning from a linear probe (LP-FT)
@pytest.mark.parametrize("fraction", [0.1, None])
def test_auto_fine_tunes_from_the_head_input_and_a_probe_the_reference_from_layer_1_and_zero(fraction):
    def config(**values):
        return build_config("finetune", None, {"checkpoint": "/x", "label_fraction": fraction, **values},
                            check_paths=False)
    assert (config().classifier_init, config().ft_proj_selector) == ("probe", 0)
    ref = config(recipe="reference")
    assert (ref.classifier_init, ref.ft_proj_selector) == ("zero", 1 if fraction else 0)   # SPEC §2.1, §2.2
    own = config(classifier_init="zero", ft_proj_selector=2)
    assert (own.classifier_init, own.ft_proj_selector) == ("zero", 2)


@pytest.mark.parametrize("init", ["probe", "zero"])
def test_fine_tuning_starts_from_the_linear_evaluation_classifier(teacher, tmp_path, capsys, init):
    # At ft_proj_selector 0 the probe reads what linear evaluation reads (head input, centre crops, the same
    # labelled images), so with a learning rate of 1e-30 the fine-tuned classifier must BE linear
    # evaluation's classifier; with --classifier-init zero it stays at zero (SPEC §2.2).
    pre = teacher.parent / "pre"
    cli("linear-eval", *COMMON[:-2], "--checkpoint", pre, "--label-fraction", "0.5", "--out", tmp_path / "le")
    cli("finetune", *COMMON, "--checkpoint", pre, "--label-fraction", "0.5", "--ft-proj-selector", "0",
        "--classifier-init", init, "--learning-rate", "1e-30", "--max-steps", "1", "--out", tmp_path / "ft")
    printed = capsys.readouterr().out
    linear, tuned = load_file(tmp_path / "le" / "model.safetensors"), load_file(tmp_path / "ft" / "model.safetensors")
    res = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert res["classifier_init"] == init
    if init == "probe":
        assert "starts as a linear probe" in printed
        assert linear["classifier.weight"].abs().max() > 0.01
        for key in ("classifier.weight", "classifier.bias"):
            assert (tuned[key] - linear[key]).abs().max() <= 1e-5, key
        assert 0.0 < res["probe_train_top1"] <= 1.0
    else:
        assert tuned["classifier.weight"].abs().max() <= 1e-12 and "linear probe" not in printed


def test_batchnorm_statistics_follow_the_recipe_and_the_student_start():
    def config(stage, **values):
        source = {"finetune": "checkpoint", "distill": "teacher"}[stage]
        return build_config(stage, None, {source: "/x", **values}, check_paths=False)
    assert config("finetune").bn_stats == "frozen" and config("finetune", recipe="reference").bn_stats == "train"
    assert config("distill", epochs=4).bn_stats == "frozen"                    # a copy of its teacher
    assert config("distill").bn_stats == "train"                               # 400 epochs from scratch
    with pytest.raises(ConfigError, match="bn_stats: frozen"):
        config("distill", bn_stats="frozen", init_student="scratch")


@pytest.mark.parametrize("bn_stats", ["frozen", "train"])
def test_frozen_batchnorm_statistics_stay_the_pretrained_ones(teacher, tmp_path, bn_stats):
    # 2 real fine-tuning steps: frozen statistics are bit-equal to the checkpoint's, re-estimated ones move.
    pre = teacher.parent / "pre"
    cli("finetune", *COMMON, "--checkpoint", pre, "--label-fraction", "0.5", "--bn-stats", bn_stats,
        "--max-steps", "2", "--out", tmp_path / "ft")
    start, tuned = load_file(pre / "model.safetensors"), load_file(tmp_path / "ft" / "model.safetensors")
    stats = [k for k in tuned if k.endswith(("running_mean", "running_var"))]
    assert len(stats) > 10
    moved = [k for k in stats if not torch.equal(start[k], tuned[k])]
    assert (moved == []) if bn_stats == "frozen" else (len(moved) == len(stats))
    gammas = [k for k in tuned if k.startswith("encoder.") and k.replace(".weight", ".running_mean") in stats]
    assert any(not torch.equal(start[k], tuned[k]) for k in gammas)            # gamma still trains
