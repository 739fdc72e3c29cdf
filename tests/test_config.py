"""Run configuration: stage defaults of the paper's recipes, precedence, YAML files, validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from simclrv2.cli.main import build_parser, config_from_args
from simclrv2.recipes import stage_schedule
from simclrv2.config import ConfigError, build_config, load_yaml
from simclrv2.utils.checkpoint import save_weights


def _weights_file(tmp_path: Path, arch: str) -> Path:
    """A tiny .safetensors file carrying a model description (enough for config resolution)."""
    path = tmp_path / f"{arch}.safetensors"
    save_weights({"w": torch.zeros(1)}, path, {"arch": arch, "image_size": 16, "num_proj_layers": 3,
                                            "data": "digits"})
    return path


def _cli_config(argv: list[str]):
    args = build_parser().parse_args(argv)
    return config_from_args(args.command, args)


# ------------------------------------------------------------------------------------------- stage defaults
@pytest.mark.parametrize("arch, lr", [("r50_1x_sk0", 0.005), ("r18_1x_sk0", 0.005), ("r50_2x_sk0", 0.002),
                                      ("r50_1x_sk1", 0.002), ("r152_3x_sk1", 0.002)])
def test_finetune_learning_rate_follows_the_architecture(tmp_path, arch, lr):
    # the fine-tuned network is the checkpoint's: its recorded architecture decides (SPEC §0, §5)
    cfg = build_config("finetune", None, {"checkpoint": str(_weights_file(tmp_path, arch)), "recipe": "reference"})
    assert cfg.learning_rate == lr
    # recipe auto fine-tunes from a probe classifier at a quarter of the rate (recipes.py)
    auto = build_config("finetune", None, {"checkpoint": str(_weights_file(tmp_path, arch))})
    assert auto.classifier_init == "probe" and auto.learning_rate == pytest.approx(lr / 4)
    assert cfg.learning_rate_scaling == "sqrt" and cfg.optimizer == "lars"
    assert cfg.weight_decay == 0.0 and cfg.warmup_epochs == 0.0


def test_finetune_learning_rate_from_a_run_directory(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    save_weights({"w": torch.zeros(1)}, run / "model.safetensors", {"arch": "r101_2x_sk1", "data": "digits"})
    assert build_config("finetune", None, {"checkpoint": str(run), "recipe": "reference"}).learning_rate == 0.002
    # an explicit learning rate always wins
    assert build_config("finetune", None, {"checkpoint": str(run), "learning_rate": 0.01}).learning_rate == 0.01


@pytest.mark.parametrize("fraction, epochs, selector", [(0.01, 60, 1), (0.005, 60, 1), (0.1, 30, 1),
                                                        (0.5, 30, 1), (1.0, 30, 0), (None, 30, 0)])
def test_finetune_epochs_and_head_selector_follow_the_label_fraction(tmp_path, fraction, epochs, selector):
    values = {"checkpoint": str(_weights_file(tmp_path, "r50_1x_sk0"))}
    if fraction is not None:
        values["label_fraction"] = fraction
    cfg = build_config("finetune", None, {**values, "recipe": "reference"})
    assert (cfg.epochs, cfg.batch_size) == (epochs, 1024)   # SPEC §5, written into config.yaml
    assert cfg.ft_proj_selector == selector
    # recipe auto (the default) leaves them to recipes.stage_schedule, which starts from the same epochs,
    # and fine-tunes from the head input (what linear evaluation reads; recipes.py)
    cfg = build_config("finetune", None, values)
    assert (cfg.epochs, cfg.batch_size, cfg.ft_proj_selector) == (None, None, 0)
    assert stage_schedule("finetune", "auto", 100_000, batch_size=None, epochs=None,
                          label_fraction=fraction).epochs == epochs
    # explicit values are kept
    cfg = build_config("finetune", None, {**values, "epochs": 7, "ft_proj_selector": 2})
    assert (cfg.epochs, cfg.ft_proj_selector) == (7, 2)


@pytest.mark.parametrize("stage, epochs", [("pretrain", 100), ("distill", 400)])
def test_warmup_is_five_percent_of_epochs_for_pretrain_and_distill(tmp_path, stage, epochs):
    values = {"teacher": str(_weights_file(tmp_path, "r18_1x_sk0"))} if stage == "distill" else {}
    cfg = build_config(stage, None, values)
    assert cfg.epochs == epochs
    assert cfg.warmup_epochs == pytest.approx(0.05 * epochs)
    # 40 distillation epochs are a short budget: recipe auto starts the student as a copy of its teacher,
    # without warmup (recipes.py); the reference recipe keeps the 5% warmup of a from-scratch student.
    ref = {"recipe": "reference"} if stage == "distill" else {}
    cfg = build_config(stage, None, {**values, **ref, "epochs": 40})
    assert cfg.warmup_epochs == pytest.approx(2.0)
    if stage == "distill":
        assert build_config(stage, None, {**values, "epochs": 40}).warmup_epochs == 0.0
    cfg = build_config(stage, None, {**values, "epochs": 40, "warmup_epochs": 0})
    assert cfg.warmup_epochs == 0


def test_other_stage_defaults():
    pre = build_config("pretrain")
    assert (pre.optimizer, pre.learning_rate, pre.learning_rate_scaling, pre.weight_decay, pre.temperature,
            pre.batch_size, pre.num_proj_layers) == ("lars", 0.1, "sqrt", 1e-4, 0.1, 512, 3)
    sup = build_config("supervised")
    assert (sup.optimizer, sup.learning_rate, sup.learning_rate_scaling, sup.warmup_epochs) == \
        ("momentum", 0.1, "linear", 0.0)


# ------------------------------------------------------------------------------------------- precedence
def test_precedence_defaults_then_yaml_then_flags(tmp_path):
    yaml_file = tmp_path / "cfg.yaml"
    yaml_file.write_text("batch_size: 32\ntemperature: 0.5\nseed: 3\n")
    cfg = _cli_config(["pretrain", "--config", str(yaml_file), "--batch-size", "64"])
    assert cfg.batch_size == 64          # flag beats YAML
    assert cfg.temperature == 0.5        # YAML beats the stage default (0.1)
    assert cfg.seed == 3
    assert cfg.learning_rate == 0.1      # untouched stage default
    # flags given before --config win as well (order on the command line does not matter)
    cfg = _cli_config(["pretrain", "--temperature", "0.2", "--config", str(yaml_file)])
    assert cfg.temperature == 0.2 and cfg.batch_size == 32


def test_yaml_keys_with_dashes_or_underscores(tmp_path):
    yaml_file = tmp_path / "cfg.yaml"
    yaml_file.write_text("batch-size: 48\nlearning_rate: 0.3\nlearning-rate-scaling: linear\nmax_per_class: 5\n")
    assert load_yaml(yaml_file) == {"batch_size": 48, "learning_rate": 0.3, "learning_rate_scaling": "linear",
                                    "max_per_class": 5}
    cfg = _cli_config(["pretrain", "--config", str(yaml_file)])
    assert (cfg.batch_size, cfg.learning_rate, cfg.learning_rate_scaling, cfg.max_per_class) == \
        (48, 0.3, "linear", 5)


def test_unknown_yaml_key_is_an_error_naming_it(tmp_path):
    yaml_file = tmp_path / "cfg.yaml"
    yaml_file.write_text("batch_size: 32\nbatchsize: 64\n")
    with pytest.raises(ConfigError, match="batchsize"):
        load_yaml(yaml_file)
    yaml_file.write_text("pretrain:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match="epochz"):
        load_yaml(yaml_file)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="config"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_size: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(bad)


def test_pipeline_yaml_stage_sections_reach_each_stage(tmp_path):
    from simclrv2.training.pipeline import _stage_config

    yaml_file = tmp_path / "pipe.yaml"
    yaml_file.write_text("data: digits\nimage-size: 16\nlabel_fractions: [0.05, 0.2]\n"
                         "pretrain:\n  epochs: 3\n  batch-size: 16\n"
                         "finetune:\n  epochs: 2\n"
                         "linear_eval:\n  epochs: 5\n")
    pipe = _cli_config(["pipeline", "--config", str(yaml_file), "--seed", "9"])
    assert pipe.stage_overrides == {"pretrain": {"epochs": 3, "batch_size": 16}, "finetune": {"epochs": 2},
                                    "linear_eval": {"epochs": 5}}
    assert pipe.label_fractions == [0.05, 0.2]
    pre = _stage_config(pipe, "pretrain", "pretrain", {"epochs": 100, "batch_size": 512})
    assert (pre.epochs, pre.batch_size, pre.image_size, pre.seed) == (3, 16, 16, 9)
    assert pre.warmup_epochs == pytest.approx(0.15)
    sup = _stage_config(pipe, "supervised", "supervised", {})
    assert sup.epochs is None  # no section: the stage default (recipe auto sizes it at plan time)
    assert sup.recipe == "auto"
    lin = _stage_config(pipe, "linear-eval", "linear_eval", {"checkpoint": str(_weights_file(tmp_path, "r18_1x_sk0"))})
    assert lin.epochs == 5


# ------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("stage, values, field", [
    ("pretrain", {"learning_rate": 0}, "learning_rate"),
    ("pretrain", {"learning_rate": -0.1}, "learning_rate"),
    ("pretrain", {"learning_rate": float("nan")}, "learning_rate"),
    ("pretrain", {"batch_size": 0}, "batch_size"),
    ("supervised", {"batch_size": -8}, "batch_size"),
    ("pretrain", {"batch_size": 2.5}, "batch_size"),
    ("pretrain", {"memory_keys_fraction": 0}, "memory_keys_fraction"),
    ("pretrain", {"memory_keys_fraction": 1.5}, "memory_keys_fraction"),
    ("pretrain", {"temperature": 0}, "temperature"),
    ("pretrain", {"temperature": -0.5}, "temperature"),
    ("pretrain", {"label_fraction": 0}, "label_fraction"),
    ("pretrain", {"label_fraction": 1.5}, "label_fraction"),
    ("supervised", {"label_fraction": -0.1}, "label_fraction"),
    ("pipeline", {"label_fractions": [0.1, 2.0]}, "label_fractions"),
    ("pretrain", {"ft_proj_selector": 4}, "ft_proj_selector"),
    ("pretrain", {"num_proj_layers": 2, "ft_proj_selector": 3}, "ft_proj_selector"),
    ("pretrain", {"arch": "r51_1x_sk0"}, "arch"),
    ("supervised", {"arch": "resnet50"}, "arch"),
    ("pipeline", {"student_arch": "r50_5x_sk0"}, "student_arch"),
    ("pretrain", {"data": "/nonexistent/folder"}, "data"),
    ("finetune", {}, "checkpoint"),
    ("finetune", {"checkpoint": "/nonexistent/run"}, "checkpoint"),
    ("evaluate", {"checkpoint": "/nonexistent/model.safetensors"}, "checkpoint"),
    ("linear-eval", {"checkpoint": "/nonexistent/run"}, "checkpoint"),
    ("distill", {}, "teacher"),
    ("distill", {"teacher": "/nonexistent/teacher"}, "teacher"),
    ("pretrain", {"epochs": 0}, "epochs"),
    ("pretrain", {"max_steps": -1}, "max_steps"),
    ("pretrain", {"momentum": 1.0}, "momentum"),
    ("pretrain", {"optimizer": "adamw"}, "optimizer"),
])
def test_each_invalid_setting_is_rejected_naming_the_field(stage, values, field):
    with pytest.raises(ConfigError) as info:
        build_config(stage, None, values)
    assert str(info.value).startswith(f"{field}:"), str(info.value)


def test_valid_edge_values_are_accepted(tmp_path):
    assert build_config("pretrain", None, {"label_fraction": 1.0}).label_fraction == 1.0
    assert build_config("pretrain", None, {"ft_proj_selector": 3}).ft_proj_selector == 3
    assert build_config("pretrain", None, {"ft_proj_selector": -1}).ft_proj_selector == -1
    assert build_config("pretrain", None, {"data": str(tmp_path)}).data == str(tmp_path)


def test_unknown_field_from_code_is_an_error():
    with pytest.raises(ConfigError, match="no_such_option"):
        build_config("pretrain", None, {"no_such_option": 1})


# ------------------------------------------------------------------------ typed YAML (issue 15 item 7, 16)
def _yaml(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize("spelling, value", [("1e-4", 1e-4), ("1.0e-4", 1e-4), (".5", 0.5), ("5.", 5.0),
                                             ("1E-3", 1e-3), ('"1e-4"', 1e-4), ("3", 3.0)])
def test_numbers_in_any_yaml_spelling(tmp_path, spelling, value):
    cfg = _cli_config(["pretrain", "--config", str(_yaml(tmp_path, f"weight_decay: {spelling}\n"
                                                                    f"learning_rate: {spelling}\n"))])
    assert cfg.weight_decay == value and cfg.learning_rate == value   # before: traceback / "not positive"
    assert isinstance(cfg.weight_decay, float)


@pytest.mark.parametrize("word, value", [("true", True), ("no", False), ("on", True), ("off", False),
                                         ('"false"', False), ("Yes", True)])
def test_booleans_only_as_words_of_truth(tmp_path, word, value):
    cfg = _cli_config(["pretrain", "--config", str(_yaml(tmp_path, f"use_blur: {word}\nflip: {word}\n"))])
    assert cfg.use_blur is value and cfg.flip is value   # before: "false" turned blur on


@pytest.mark.parametrize("text, option, allowed", [
    ("flip: maybe\n", "flip", "true or false"),
    ("use_blur: 1\n", "use_blur", "true or false"),
    ("batch_size: 1.5\n", "batch_size", "whole number"),
    ("batch_size: many\n", "batch_size", "whole number"),
    ("data: [a, b]\n", "data", "text"),
    ("momentum: 1.5\n", "momentum", r"\[0, 1\)"),
    ("temperature: .nan\n", "temperature", "number"),
    ("optimizer: adamw\n", "optimizer", "lars, momentum"),
    ("labeled_list: [a.txt]\n", "labeled_list", "text"),
])
def test_wrong_types_and_ranges_name_the_option_and_what_is_allowed(tmp_path, text, option, allowed):
    with pytest.raises(ConfigError, match=rf"{option}: .*{allowed}"):
        _cli_config(["pretrain", "--config", str(_yaml(tmp_path, text))])


def test_pipeline_values_and_sections_are_typed_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="pretrain_epochs: must be a number"):
        load_yaml(_yaml(tmp_path, "pretrain_epochs: one\n"), "pipeline")
    assert load_yaml(_yaml(tmp_path, "label_fractions: 0.1\n"), "pipeline") == {"label_fractions": [0.1]}
    with pytest.raises(ConfigError, match="distill.alpha: must be a number"):
        load_yaml(_yaml(tmp_path, "distill:\n  alpha: half\n"), "pipeline")
    with pytest.raises(ConfigError, match="knn_k: does not apply to `simclrv2 distill` in section 'distill'"):
        load_yaml(_yaml(tmp_path, "distill:\n  knn_k: 3\n"), "pipeline")
    with pytest.raises(ConfigError, match="section 'finetune'.*only to `simclrv2 pipeline`"):
        load_yaml(_yaml(tmp_path, "finetune:\n  epochs: 3\n"), "pretrain")


def test_hostile_yaml_is_refused_quickly(tmp_path):
    import time
    bomb = ('a: &a ["x","x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n'
            'c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n')
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases"):
        load_yaml(_yaml(tmp_path, bomb), "pretrain")
    with pytest.raises(ConfigError, match="nested deeper"):
        load_yaml(_yaml(tmp_path, "seed: " + "[" * 5000 + "]" * 5000 + "\n"), "pretrain")
    with pytest.raises(ConfigError, match="at most 256 KiB"):
        load_yaml(_yaml(tmp_path, "# " + "x" * 300_000 + "\n"), "pretrain")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_yaml(_yaml(tmp_path, b"seed: \xff\xfe\n"), "pretrain")
    with pytest.raises(ConfigError, match="option names must be words"):
        load_yaml(_yaml(tmp_path, "1: 2\n"), "pretrain")
    assert time.perf_counter() - start < 2.0


def test_options_that_do_not_apply_are_errors_with_did_you_mean(tmp_path):
    with pytest.raises(ConfigError, match="alpha: does not apply to `simclrv2 pretrain`.*distill"):
        load_yaml(_yaml(tmp_path, "alpha: 0.5\n"), "pretrain")
    with pytest.raises(ConfigError, match="teacher: does not apply"):
        load_yaml(_yaml(tmp_path, "teacher: x\n"), "pretrain")
    with pytest.raises(ConfigError, match="lerning_rate: unknown option.*did you mean learning_rate"):
        load_yaml(_yaml(tmp_path, "lerning_rate: 0.1\n"), "pretrain")
    # the demo fixes its own settings: anything but out/seed/device/precision/progress is refused
    with pytest.raises(ConfigError, match="pretrain_epochs: does not apply to `simclrv2 demo`"):
        load_yaml(_yaml(tmp_path, "pretrain_epochs: 1\n"), "demo")
    with pytest.raises(ConfigError, match="optimizer: does not apply to `simclrv2 linear-eval`"):
        load_yaml(_yaml(tmp_path, "optimizer: lars\n"), "linear-eval")
    with pytest.raises(ConfigError, match="configuration of a 'finetune' run"):
        load_yaml(_yaml(tmp_path, "stage: finetune\n"), "pretrain")


@pytest.mark.parametrize("stage, values", [("pretrain", {}), ("supervised", {"label_fraction": 0.5}),
                                           ("pipeline", {"label_fractions": [0.1]}),
                                           ("demo", {"seed": 3})])
def test_saved_config_is_effective_and_loads_back(tmp_path, stage, values):
    from simclrv2.config import config_to_yaml, fields_for_stage
    cfg = build_config(stage, None, {**values, "out": str(tmp_path / "run")})
    text = config_to_yaml(cfg, stage)
    if stage in ("pretrain", "pipeline"):
        assert "image_size: 32" in text and "use_blur: false" in text and "color_jitter_strength: 0.5" in text
    again = build_config(stage, load_yaml(_yaml(tmp_path, text), stage))
    for f in fields_for_stage(stage):
        if f.name != "out":
            assert getattr(again, f.name) == getattr(cfg, f.name), f.name


def test_pipeline_root_config_states_the_pipeline_epochs(tmp_path):
    from simclrv2.config import config_to_yaml
    text = config_to_yaml(build_config("pipeline", None, {"pretrain_epochs": 10}), "pipeline")
    assert "pretrain_epochs: 10" in text and "\nepochs:" not in text   # before: "epochs: 100" for 10


def test_stage_configs_validate_without_the_checkpoints_they_will_read():
    cfg = build_config("finetune", None, {"checkpoint": "/not/yet/pretrain", "data": "digits",
                                          "recipe": "reference"}, check_paths=False)
    assert cfg.epochs == 30
    with pytest.raises(ConfigError, match="alpha"):
        build_config("distill", None, {"teacher": "/not/yet", "alpha": 2.0}, check_paths=False)


def test_image_size_is_the_median_of_a_sample(tmp_path, make_image):
    from simclrv2.data.imagesize import native_image_size
    big = tmp_path / "big"
    for i in range(9):
        make_image(big / "train" / "a" / f"{i}.png", (160, 120), (1, 2, 3))
    make_image(big / "train" / "a" / "0000_small.png", (16, 16), (1, 2, 3))  # the first file: small
    est = native_image_size(str(big))
    assert est.size == 224 and est.median == 160 and "mixed sizes" in est.note  # before: 16 (CIFAR stem)
    small = tmp_path / "small"
    for i in range(5):
        make_image(small / f"{i}.png", (24, 24), (1, 2, 3))
    assert native_image_size(None, unlabeled=[str(small)]).size == 24
    assert native_image_size("stl10").size == 96


def test_flag_values_are_typed_and_checked(capsys):
    from simclrv2.cli.main import main
    assert main(["pretrain", "--learning-rate", "nan"]) == 2
    assert "learning_rate" in capsys.readouterr().err
    assert main(["pretrain", "--lerning-rate", "0.1"]) == 2
    assert "did you mean --learning-rate" in capsys.readouterr().err
    assert main(["pretrain", "--alpha", "0.5"]) == 2
    assert "--alpha: does not apply to `simclrv2 pretrain`" in capsys.readouterr().err
    assert main(["demo", "--batch-size", "8"]) == 2
