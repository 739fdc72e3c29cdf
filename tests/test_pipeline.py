"""The pipeline end to end on tiny data: seeds and their spread, settings recorded per stage, stale
results never kept (changed settings, --force, --no-resume), options honoured or refused, and a
report (markdown + HTML) that states each claim.

Digits with ``--max-per-class 4`` (40 training images) at 16 px, r18_0.25x_sk0 (a quarter-width
ResNet-18: what is tested is the pipeline's bookkeeping, not accuracy), fp32, one epoch per
stage, one intra-op thread (the machine's cores are shared)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simclrv2.cli.main import main
from simclrv2.config import build_config
from simclrv2.errors import ConfigError
from simclrv2.training.pipeline import decide, plan_pipeline, read_stage_record, settings_record, _stage_config
from simclrv2.training.rundir import read_metrics

BASE = ["pipeline", "--data", "digits", "--arch", "r18_0.25x_sk0", "--image-size", "16", "--max-per-class", "4", "--no-progress", "--device",
        "cpu", "--precision", "fp32", "--label-fractions", "0.1", "--pretrain-epochs", "1", "--finetune-epochs", "2",
        "--distill-epochs", "1", "--supervised-epochs", "1", "--seeds", "2", "--eval-every", "1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def results(path: Path) -> dict:
    return json.loads((path / "results.json").read_text())


@pytest.fixture(scope="module")
def piped(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "run"
    config = out.parent / "pipe.yaml"
    config.write_text("pretrain:\n  batch_size: 20\nlinear_eval:\n  epochs: 5\n")
    argv = [*BASE, "--config", str(config), "--out", str(out)]
    assert main(argv) == 0
    return out, argv, config


STAGES = ["pretrain", "finetune_0.1", "distill_0.1", "supervised_0.1", "linear_eval_0.1",
          "finetune_0.1_seed1", "distill_0.1_seed1", "supervised_0.1_seed1", "linear_eval_0.1_seed1"]


def test_seeds_every_stage_after_pretraining_mean_std_and_every_seed(piped):
    out, _, _ = piped
    for name in STAGES:
        assert (out / name / "results.json").is_file(), name
        assert read_stage_record(out, name)["complete"] is True
    assert not (out / "pretrain_seed1").exists()    # pretraining once by default
    table = results(out)
    assert set(table) == {"finetune", "distill", "supervised", "linear_eval"}
    for method, rows in table.items():
        cell = rows["0.1"]
        seeds = [cell["seeds"][s]["top1"] for s in ("0", "1")]
        assert cell["num_seeds"] == 2
        assert cell["top1"] == pytest.approx(sum(seeds) / 2)
        assert cell["top1_std"] == pytest.approx(abs(seeds[0] - seeds[1]) / 2 ** 0.5)
    assert table["finetune"]["0.1"]["seeds"]["1"]["top1"] == results(out / "finetune_0.1_seed1")["top1"]
    # the two seeds use different labelled subsets
    assert results(out / "finetune_0.1")["labeled_set"] != results(out / "finetune_0.1_seed1")["labeled_set"]


def test_every_stage_logs_its_final_and_periodic_evaluation(piped):
    out, _, _ = piped
    for name in ("finetune_0.1", "distill_0.1", "supervised_0.1", "linear_eval_0.1"):
        records = read_metrics(out / name)
        final = [r for r in records if r.get("eval/final") == 1.0]
        assert len(final) == 1, name
        assert final[0]["eval/top1"] == results(out / name)["top1"]
        per_class = [k for k in final[0] if k.startswith("eval/class_top1/")]
        assert len(per_class) == 10, name
        res = results(out / name)
        assert len(res["confusion"]) == 10 and sum(map(sum, res["confusion"])) == res["num_images"]
    periodic = [r for r in read_metrics(out / "finetune_0.1") if "eval/top1" in r and "eval/final" not in r]
    assert periodic and all(r["eval/epoch"] >= 1 for r in periodic)   # every epoch but the last (the final one)
    assert (out / "finetune_0.1" / "logs" / "tensorboard").is_dir()


def test_report_states_claims_with_spread_and_embeds_plots(piped):
    out, _, _ = piped
    report = (out / "report.md").read_text()
    assert "± " in report
    assert "Pretraining + fine-tuning" in report and "(2 seeds)" in report
    assert "Self-distillation" in report
    assert "chance is 10.0% top-1" in report and "297 test images" in report
    assert "fine-tuned from head layer 0 (r18_0.25x_sk0, classifier from a linear probe)" in report  # settings
    assert "## Time and hardware" in report and "logical CPUs" in report
    for png in ("accuracy_vs_label_fraction.png", "training_curves.png", "knn_monitor.png",
                "confusion_matrix.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png in report
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    assert "What this run shows" in html and ".png\"" not in html


def test_rerun_keeps_unchanged_stages_and_reruns_changed_or_forced_ones(piped, capsys):
    out, argv, config = piped
    mtimes = {n: (out / n / "results.json").stat().st_mtime_ns for n in STAGES}
    capsys.readouterr()
    # how fast it runs is not what it computes: --compile / --no-channels-last keep every finished stage
    assert main([*argv, "--no-compile", "--no-channels-last"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done already with the same settings, kept") == len(STAGES), printed
    assert {n: (out / n / "results.json").stat().st_mtime_ns for n in STAGES} == mtimes

    config.write_text("pretrain:\n  batch_size: 20\nlinear_eval:\n  epochs: 6\n")   # linear_eval changed
    assert main([*argv, "--force", "supervised"]) == 0
    printed = capsys.readouterr().out
    assert "linear-eval 0.1 -> " in printed and "its settings changed: epochs 5.0 -> 6.0" in printed
    assert "(running again: --force)" in printed
    rerun = {n for n in STAGES if (out / n / "results.json").stat().st_mtime_ns != mtimes[n]}
    assert rerun == {"supervised_0.1", "supervised_0.1_seed1", "linear_eval_0.1", "linear_eval_0.1_seed1"}


def test_no_resume_on_a_directory_with_results_is_an_error(piped, capsys):
    out, argv, _ = piped
    assert main([*argv, "--no-resume"]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--force" in err and str(out) in err


def test_changing_arch_reruns_pretraining_and_what_starts_from_it(piped):
    out, _, _ = piped
    pipe = build_config("pipeline", None, dict(data="digits", image_size=16, max_per_class=4, label_fractions=[0.1],
                                              pretrain_epochs=1, finetune_epochs=2, distill_epochs=1,
                                              supervised_epochs=1, seeds=2, arch="r18_1x_sk1", device="cpu",
                                              precision="fp32", out=str(out),
                                              stage_overrides={"pretrain": {"batch_size": 20}}))
    plan = plan_pipeline(pipe, out)[0]
    cfg = _stage_config(pipe, plan.command, plan.section, plan.overrides)
    action, why = decide(plan, settings_record(cfg, "pretrain", out), {}, forced=False)
    assert action == "fresh" and "arch 'r18_0.25x_sk0' -> 'r18_1x_sk1'" in why
    ft = plan_pipeline(pipe, out)[1]   # a re-run pretraining gets a new token: its finetune runs again
    ft_cfg = _stage_config(pipe, ft.command, ft.section, ft.overrides)
    action, why = decide(ft, settings_record(ft_cfg, "finetune", out), {"pretrain": "new-token"}, forced=False)
    assert action == "fresh" and "ran again" in why


@pytest.mark.parametrize("flags, option", [
    (["--label-fraction", "0.2", "--label-fractions", "0.1", "0.3"], "label_fraction"),
    (["--force", "finetun"], "force"),
    (["--seeds", "0"], "seeds"),
    (["--eval-every", "-1"], "eval_every"),
])
def test_bad_pipeline_options_exit_2_before_any_work(tmp_path, capsys, flags, option):
    out = tmp_path / "run"
    assert main([*BASE, *flags, "--out", str(out)]) == 2
    assert f"error: {option}" in capsys.readouterr().err
    assert not (out / "pretrain").exists()


def test_label_fraction_and_labeled_list_reach_every_stage(tmp_path):
    listing = tmp_path / "labels.txt"
    listing.write_text("x\n")
    pipe = build_config("pipeline", None, dict(data="digits", label_fraction=0.05))
    plans = plan_pipeline(pipe, tmp_path / "run")
    assert {p.config.label_fraction for p in plans} == {0.05}
    pipe = build_config("pipeline", None, dict(data="digits", labeled_list=str(listing)))
    plans = plan_pipeline(pipe, tmp_path / "run")
    assert {p.config.labeled_list for p in plans} == {str(listing)}
    assert {p.label_key for p in plans if p.method} == {"list"}


def test_a_bad_distill_section_fails_before_pretraining(tmp_path):
    pipe = build_config("pipeline", None, dict(data="digits", stage_overrides={"distill": {"alpha": 2.0}}))
    with pytest.raises(ConfigError, match="distill stage.*alpha"):
        plan_pipeline(pipe, tmp_path / "run")
