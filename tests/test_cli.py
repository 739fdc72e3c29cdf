"""The ``simclrv2`` command line: help texts, exit codes, errors before work, the model table."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from conftest import console_script
from simclrv2.cli.main import main
from simclrv2.config import fields_for_stage

SUBCOMMANDS = ("pretrain", "finetune", "distill", "linear-eval", "supervised", "evaluate", "pipeline", "demo")

# Table 1 of the paper (SPEC §0): architecture -> parameters in millions (trunk, SPEC §11 rule).
TABLE1 = {"r50_1x_sk0": 24, "r50_1x_sk1": 35, "r50_2x_sk0": 94, "r50_2x_sk1": 140, "r101_1x_sk0": 43,
          "r101_1x_sk1": 65, "r101_2x_sk0": 170, "r101_2x_sk1": 257, "r152_1x_sk0": 58, "r152_1x_sk1": 89,
          "r152_2x_sk0": 233, "r152_2x_sk1": 354, "r152_3x_sk1": 795}


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out, _ = capsys.readouterr()
    return out


def test_top_level_help_lists_every_command(capsys):
    out = _help(["--help"], capsys)
    for command in (*SUBCOMMANDS, "models"):
        assert re.search(rf"^\s+{re.escape(command)}\s", out, re.M), f"{command} missing from --help"
    assert "pretrain" in out and "finetune" in out and "distill" in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_version(capsys):
    out = _help(["--version"], capsys)
    assert out.startswith("simclrv2 ")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_help_mentions_each_of_its_options(command, capsys):
    out = _help([command, "--help"], capsys)
    options = fields_for_stage(command)
    assert options, command
    for f in options:
        flag = "--" + f.name.replace("_", "-")
        assert re.search(rf"(^|[\s,]){re.escape(flag)}([\s,=]|$)", out, re.M), f"{flag} missing from {command} --help"
    assert "--config" in out
    # options of other stages are not offered
    if command != "pipeline":
        assert "--student-arch" not in out


def test_models_help(capsys):
    out = _help(["models", "--help"], capsys)
    for flag in ("--json", "--image-size", "--all"):
        assert flag in out


def test_models_json_has_table1_rows(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {row["name"]: row for row in rows}
    assert [row["name"] for row in rows[:13]] == list(TABLE1)
    for name, millions in TABLE1.items():
        assert round(by_name[name]["params"] / 1e6) == millions, name
        assert by_name[name]["feature_dim"] == 2048 * int(name.split("_")[1][0])


def test_models_table_output(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "r152_3x_sk1" in out and "params" in out


def _run(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    _, err = capsys.readouterr()
    return code, err


@pytest.mark.parametrize("argv, field", [
    (["pretrain", "--learning-rate", "0"], "learning_rate"),
    (["pretrain", "--batch-size", "0"], "batch_size"),
    (["pretrain", "--temperature", "-0.1"], "temperature"),
    (["pretrain", "--label-fraction", "1.5"], "label_fraction"),
    (["supervised", "--label-fraction", "0"], "label_fraction"),
    (["pretrain", "--ft-proj-selector", "4"], "ft_proj_selector"),
    (["pretrain", "--arch", "r51_1x_sk0"], "arch"),
    (["pretrain", "--data", "/nonexistent/images"], "data"),
    (["finetune"], "checkpoint"),
    (["finetune", "--checkpoint", "/nonexistent/run"], "checkpoint"),
    (["evaluate", "--checkpoint", "/nonexistent/model.safetensors"], "checkpoint"),
    (["distill"], "teacher"),
    (["distill", "--teacher", "/nonexistent/run"], "teacher"),
    (["pipeline", "--label-fractions", "0.1", "1.2"], "label_fractions"),
])
def test_invalid_settings_exit_2_naming_the_field_before_any_work(argv, field, tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, err = _run([*argv, "--out", str(out_dir), "--no-progress"], capsys)
    assert code == 2
    assert f"error: {field}:" in err, err
    assert "Traceback" not in err
    assert not out_dir.exists(), "a run directory was created before the settings were checked"


def test_invalid_yaml_exits_2(tmp_path, capsys):
    yaml_file = tmp_path / "cfg.yaml"
    yaml_file.write_text("batch_size: 16\nlearning_rat: 0.1\n")
    out_dir = tmp_path / "run"
    code, err = _run(["pretrain", "--config", str(yaml_file), "--out", str(out_dir)], capsys)
    assert code == 2 and "learning_rat" in err
    assert not out_dir.exists()


def test_malformed_flag_values_exit_2(capsys):
    for argv in (["pretrain", "--batch-size", "many"], ["pretrain", "--optimizer", "adamw"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        assert "error" in capsys.readouterr().err
    assert main(["pretrain", "--no-such-flag"]) == 2
    assert "--no-such-flag: unknown option" in capsys.readouterr().err


def test_console_script_models_json():
    proc = subprocess.run([console_script(), "models", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert {row["name"]: round(row["params"] / 1e6) for row in rows[:13]} == TABLE1


def test_console_script_invalid_setting_exit_code(tmp_path):
    out_dir = tmp_path / "run"
    proc = subprocess.run([console_script(), "pretrain", "--temperature", "0", "--out", str(out_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "temperature" in proc.stderr
    assert not out_dir.exists()


def test_a_reader_that_goes_away_ends_the_command_quietly_with_exit_141():
    """``simclrv2 models | head -0``: a real pipe whose reading end is closed before the command writes."""
    from simclrv2.errors import EXIT_BROKEN_PIPE

    proc = subprocess.Popen([console_script(), "models", "--all"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == EXIT_BROKEN_PIPE == 141
    assert "Traceback" not in err and "BrokenPipe" not in err, err
