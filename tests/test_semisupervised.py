"""Semi-supervised data as users have it (issue 15): unlabelled pools next to a small labelled set,
labelled sets that never leak from teacher to student, the right checkpoint for each job, data
defaults recorded in checkpoints, and the image size judged from a sample.

Every run is a real ``simclrv2`` command (in-process, CPU, r18 at 8 px, one or two steps) on tiny
generated folders, so the module stays within a few tens of seconds on two cores.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import write_image
from simclrv2.cli.main import main

FAST = ["--image-size", "8", "--batch-size", "8", "--max-steps", "1", "--no-progress", "--device", "cpu",
        "--precision", "fp32", "--num-workers", "0"]
EVAL = ["--no-progress", "--device", "cpu", "--precision", "fp32", "--num-workers", "0"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A flat unlabelled pool (24 images, no class folders), a labelled folder of 2 classes (10 train +
    3 test images each), a pretraining run on the pool alone, and a fine-tuned 20% teacher."""
    root = tmp_path_factory.mktemp("semi")
    rng = random.Random(0)
    for i in range(24):
        write_image(root / "pool" / f"img{i:02d}.png", (12, 12), tuple(rng.randrange(256) for _ in range(3)))
    for split, n in (("train", 10), ("test", 3)):
        for cls, colour in (("cat", (200, 40, 40)), ("dog", (40, 40, 200))):
            for i in range(n):
                jitter = tuple(max(0, min(255, c + rng.randrange(-30, 30))) for c in colour)
                write_image(root / "lab" / split / cls / f"{cls}{i}.png", (12, 12), jitter)
    runs = root / "runs"
    assert main(["pretrain", "--unlabeled", str(root / "pool"), "--epochs", "1", *FAST,
                 "--out", str(runs / "pre")]) == 0
    assert main(["finetune", "--checkpoint", str(runs / "pre"), "--data", str(root / "lab"), "--label-fraction",
                 "0.2", *FAST, "--out", str(runs / "ft20")]) == 0
    nested = root / "nested"
    for i, sub in enumerate(("a/x", "b", "c/d/e")):  # class-like and deep folders: names ignored
        write_image(nested / sub / f"n{i}.jpg", (12, 12), (i * 50, 10, 10))
    assert main(["pretrain", "--data", str(root / "lab"), "--unlabeled", str(root / "pool"), "--unlabeled",
                 str(nested), "--epochs", "1", *FAST, "--out", str(runs / "union")]) == 0
    return {"root": root, "pool": root / "pool", "lab": root / "lab", "pre": runs / "pre", "ft20": runs / "ft20",
            "union": runs / "union", "runs": runs}


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def test_pretrain_on_a_flat_unlabeled_folder_then_finetune_on_two_labelled_classes(world):
    pre = results(world["pre"])
    assert pre["train_images"] == 24 and pre["labeled_set"]["kind"] == "none"
    ft = results(world["ft20"])  # refused before: "the checkpoint's classes differ from this data set's classes"
    assert ft["stage"] == "finetune" and 0.0 <= ft["top1"] <= 1.0
    assert ft["num_labeled"] == 4 and ft["labeled_set"]["fraction"] == 0.2  # 20% of 2 x 10, class-balanced


def test_pretraining_uses_the_union_and_ignores_pool_folder_names(world):
    res = results(world["union"])
    assert res["train_images"] == 20 + 24 + 3
    assert res["labeled_set"]["num_labeled"] == 20   # the probe and kNN use the labels that exist
    assert "knn_top1" in res
    plan = (world["union"] / "config.yaml").read_text()
    assert "unlabeled:" in plan


def test_distill_inherits_the_teachers_20_percent(world, tmp_path, capsys):
    out = tmp_path / "dist"
    # no --data, no --label-fraction: the teacher's data and labelled set (before: all 20 labels)
    assert main(["distill", "--teacher", str(world["ft20"]), "--alpha", "0.5", "--epochs", "1", *FAST,
                 "--out", str(out)]) == 0
    plan = capsys.readouterr().out
    assert "labelled: 4 of 20 images (label fraction 0.2 (seed 0), 20%, inherited from the teacher)" in plan
    res, teacher = results(out), results(world["ft20"])
    assert res["num_labeled"] == 4 and res["label_fraction"] == 0.2
    assert res["labeled_set"]["indices_sha256"] == teacher["labeled_set"]["indices_sha256"]
    assert "warnings" not in res
    from simclrv2.utils.checkpoint import load_weights
    _, meta = load_weights(out / "model.safetensors")
    assert meta["labeled_set"]["num_labeled"] == 4   # recorded for a student of this student


def test_more_labels_than_the_teacher_needs_a_flag_and_warns(world, tmp_path, capsys):
    args = ["distill", "--teacher", str(world["ft20"]), "--alpha", "0.5", "--label-fraction", "0.5", *FAST]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    assert "teacher was not fine-tuned on" in capsys.readouterr().err
    assert main([*args, "--more-labels-than-teacher", "--out", str(tmp_path / "allowed")]) == 0
    res = results(tmp_path / "allowed")
    assert res["num_labeled"] == 10 and "not fine-tuned on" in res["warnings"][0]


def test_pretraining_checkpoints_are_refused_where_a_classifier_is_needed(world, tmp_path, capsys):
    probe_run = world["union"]  # pretrained with labels: it has an online probe
    assert main(["evaluate", "--checkpoint", str(probe_run), *EVAL, "--out", str(tmp_path / "e1")]) == 2
    assert "--use-probe" in capsys.readouterr().err  # before: a top-1 from the online probe
    assert main(["evaluate", "--checkpoint", str(probe_run), "--use-probe", *EVAL, "--out", str(tmp_path / "e2")]) == 0
    assert results(tmp_path / "e2")["classifier"].startswith("online probe")
    assert main(["distill", "--teacher", str(probe_run), *FAST, "--out", str(tmp_path / "d")]) == 2
    assert "pretraining checkpoint" in capsys.readouterr().err


def test_evaluate_defaults_to_the_checkpoints_data_and_scores_a_test_only_folder(world, tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(world["ft20"]), *EVAL, "--out", str(tmp_path / "e")]) == 0
    res = results(tmp_path / "e")
    assert res["num_images"] == 6 and res["data"] == str(world["lab"].resolve())   # before: digits
    only_test = tmp_path / "only_test"
    for cls in ("cat", "dog"):
        for f in (world["lab"] / "test" / cls).iterdir():
            (only_test / "test" / cls).mkdir(parents=True, exist_ok=True)
            (only_test / "test" / cls / f.name).write_bytes(f.read_bytes())
    assert main(["evaluate", "--checkpoint", str(world["ft20"]), "--data", str(only_test), *EVAL,
                 "--out", str(tmp_path / "e2")]) == 0   # before: "has no 'train' folder"
    assert results(tmp_path / "e2")["num_images"] == 6


def test_finetune_without_recorded_data_asks_for_data(world, tmp_path, capsys):
    assert main(["finetune", "--checkpoint", str(world["pre"]), *FAST, "--out", str(tmp_path / "f")]) == 2
    assert "needs --data" in capsys.readouterr().err   # before: silently fine-tuned on digits


def test_labels_from_a_csv(world, tmp_path, capsys):
    rows = ["path,label"] + [f"{p.relative_to(world['lab']).as_posix()},{p.parent.name}"
                             for p in sorted((world["lab"] / "train").rglob("*.png"))]
    csv_file = world["lab"] / "labels.csv"
    csv_file.write_text("\n".join(rows) + "\n")
    out = tmp_path / "sup"
    assert main(["supervised", "--labels", str(csv_file), "--epochs", "1", *FAST, "--out", str(out)]) == 0
    assert results(out)["num_labeled"] == 20
    # a student of a CSV-labelled teacher finds the CSV through the teacher's record
    assert main(["distill", "--teacher", str(out), *FAST, "--out", str(tmp_path / "dist")]) == 0
    assert results(tmp_path / "dist")["labeled_set"]["num_with_labels"] == 20
    bad = tmp_path / "bad.csv"
    bad.write_text("secret-token-123,cat\n")
    assert main(["supervised", "--labels", str(bad), *FAST, "--out", str(tmp_path / "x")]) == 2
    assert "secret-token" not in capsys.readouterr().err   # errors name lines, never the file's contents


def test_effective_config_yaml_passes_back_with_config(world, tmp_path):
    text = (world["pre"] / "config.yaml").read_text()
    assert "stage: pretrain" in text and "image_size: 8" in text and "use_blur: false" in text
    assert "image_size: null" not in text and "use_blur: null" not in text and "\nout:" not in text
    again = tmp_path / "again"  # before: "unknown option 'stage'"
    assert main(["pretrain", "--config", str(world["pre"] / "config.yaml"), "--out", str(again)]) == 0
    assert (again / "config.yaml").read_text().split("\n", 2)[2:] != []
    strip = lambda t: [line for line in t.splitlines() if not line.startswith("#")]  # noqa: E731
    assert strip((again / "config.yaml").read_text()) == strip(text)
