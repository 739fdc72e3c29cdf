"""Run directories are owned: marker + lock, refusals with choices, --overwrite moves aside, honest
resume checks, no writes through symlinks, tolerant metrics log, real full disk (tmpfs)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from simclrv2.config import build_config
from simclrv2.errors import CheckpointError, ConfigError, DataError, TrainingError
from simclrv2.training.rundir import MARKER, RunDirectory, default_run_dir, read_metrics
from simclrv2.utils.checkpoint import CheckpointManager, save_weights


def _cfg(out: Path, **values):
    return build_config("pretrain", None, {"data": "digits", "out": str(out), **values})


def _claim(out: Path, **values) -> RunDirectory:
    return RunDirectory.create(_cfg(out, **values), "pretrain")


def test_foreign_folder_is_refused_untouched_and_overwrite_moves_it_aside(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").write_text("my own notes")
    (out / "results.json").write_text("{}")
    (out / "model.safetensors").write_text("precious")
    with pytest.raises(ConfigError, match="not a simclrv2 run.*--overwrite"):
        _claim(out)
    assert (out / "config.yaml").read_text() == "my own notes" and not (out / MARKER).exists()
    run = _claim(out, overwrite=True)
    run.close()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("mine.old-")]
    assert len(aside) == 1 and (aside[0] / "model.safetensors").read_text() == "precious"
    assert (out / MARKER).is_file() and "my own notes" not in (out / "config.yaml").read_text()


def test_existing_run_without_resume_is_refused_with_the_choices(tmp_path):
    out = tmp_path / "run"
    _claim(out).close()
    (out / "results.json").write_text("{}")
    before = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="finished pretrain run.*--resume.*new --out.*--overwrite"):
        _claim(out, batch_size=4)
    assert (out / "config.yaml").read_text() == before
    with pytest.raises(ConfigError, match="holds a pretrain run, not a evaluate run|not a evaluate"):
        RunDirectory.create(build_config("evaluate", None, {"data": "digits", "out": str(out),
                                                            "checkpoint": str(out)}, check_paths=False), "evaluate")


def test_resume_with_changed_settings_is_refused_then_recorded_with_resume_changed(tmp_path):
    out = tmp_path / "run"
    _claim(out, batch_size=8, learning_rate=0.1).close()
    before = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError) as info:
        _claim(out, batch_size=16, learning_rate=0.1, seed=3, resume=True)
    assert "--batch-size 8 -> 16" in str(info.value) and "--seed 0 -> 3" in str(info.value)
    assert (out / "config.yaml").read_text() == before  # written only after the checks pass
    # settings that do not change the training are free
    _claim(out, batch_size=8, learning_rate=0.1, resume=True, num_workers=0, log_every=3).close()
    _claim(out, batch_size=16, learning_rate=0.1, resume=True, resume_changed=True).close()
    history = json.loads((out / MARKER).read_text())["history"]
    assert [h["action"] for h in history] == ["start", "resume", "resume"]
    assert history[-1]["changed"]["batch_size"] == {"was": 8, "now": 16}


_HOLD = ("import sys, time; from simclrv2.config import build_config; from simclrv2.training.rundir import "
         "RunDirectory; RunDirectory.create(build_config('pretrain', None, {'data': 'digits', 'out': sys.argv[1]}), "
         "'pretrain'); print('locked', flush=True); time.sleep(60)")


def test_a_second_writer_is_refused_and_a_killed_holders_lock_is_stale(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"in use by process {holder.pid}"):
            _claim(out, resume=True)
        from simclrv2.cli.main import main
        assert main(["pretrain", "--data", "digits", "--out", str(out), "--resume", "--no-progress"]) == 2
        assert f"in use by process {holder.pid}" in capsys.readouterr().err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    _claim(out, resume=True).close()  # the kernel dropped the dead process's lock


def test_default_run_names_are_unique_within_one_second(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-000000")
    first, second = default_run_dir("evaluate"), default_run_dir("evaluate")
    assert first != second and first.is_dir() and second.is_dir()


@pytest.mark.parametrize("link", ["config.yaml", "logs/metrics.jsonl", "checkpoints", MARKER])
def test_symlinks_inside_a_run_are_refused_and_their_targets_untouched(tmp_path, link):
    out = tmp_path / "run"
    _claim(out).close()
    victim = tmp_path / "victim"
    victim.mkdir() if link == "checkpoints" else victim.write_text("do not touch")
    target = out / link
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink(missing_ok=True)
    target.parent.mkdir(exist_ok=True)
    target.symlink_to(victim)
    with pytest.raises(ConfigError, match="symlink"):
        _claim(out, resume=True)
    assert victim.is_dir() if link == "checkpoints" else victim.read_text() == "do not touch"


def test_symlinked_checkpoints_found_at_write_time_is_refused(tmp_path):
    victim = tmp_path / "victim" / "step-00000001"
    victim.mkdir(parents=True)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").symlink_to(tmp_path / "victim")
    with pytest.raises(CheckpointError, match="symlink"):
        CheckpointManager(tmp_path / "run").save(2, weights={"model": {"w": torch.zeros(1)}}, state={"step": 2},
                                                 meta={})
    assert victim.is_dir()


def test_partial_last_metrics_line_is_skipped_and_the_next_record_starts_a_new_line(tmp_path):
    out = tmp_path / "run"
    run = _claim(out)
    run.log(1, {"loss": 1.0})
    run.close()
    with open(out / "logs" / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 2, "train/lo')  # a kill in the middle of a line
    assert [r["step"] for r in read_metrics(out)] == [1]
    run = _claim(out, resume=True)
    run.log(3, {"loss": 0.5})
    run.close()
    assert [r["step"] for r in read_metrics(out)] == [1, 3]


def test_temporaries_of_a_killed_writer_are_removed_on_the_next_start(tmp_path):
    out = tmp_path / "run"
    _claim(out).close()
    leftovers = [out / ".model.safetensors.tmp-999999-abcdef12", out / "checkpoints" / ".latest.tmp-999999-00ff00ff"]
    (out / "checkpoints").mkdir(exist_ok=True)
    for p in leftovers:
        p.write_bytes(b"x" * 100)
    (out / "checkpoints" / ".tmp-step-00000003-999999-deadbeef").mkdir()
    _claim(out, resume=True).close()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_a_single_labelled_image_is_a_data_error():
    from simclrv2.training.trainer import plan_steps
    with pytest.raises(DataError, match="at least 2 images"):
        plan_steps(build_config("finetune", None, {"data": "digits", "checkpoint": "x"}, check_paths=False), 1, 256)


def test_nan_weights_are_never_exported(tmp_path):
    from simclrv2.training.model_io import export_model
    net = torch.nn.Linear(2, 2)
    with torch.no_grad():
        net.weight[0, 0] = float("nan")
    with pytest.raises(TrainingError, match="NaN or Inf"):
        export_model(net, tmp_path / "model.safetensors", {"arch": "x"})
    assert not list(tmp_path.iterdir())


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 2 MiB tmpfs (needs root and mount); skipped with the reason otherwise."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.strip() or 'mount failed'})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_real_full_disk_in_safetensors_and_torch_save_is_an_os_error(tiny_fs):
    """safetensors and torch.save raise non-OSError exceptions on ENOSPC; both come out as OSError ENOSPC
    (the trainer's one handler then explains it) and leave no partial file."""
    big = {"w": torch.zeros(1024, 1024)}  # 4 MiB > 2 MiB
    with pytest.raises(OSError) as info:
        save_weights(big, tiny_fs / "model.safetensors", {"arch": "x"})
    assert info.value.errno == errno.ENOSPC
    manager = CheckpointManager(tiny_fs / "run")
    with pytest.raises(OSError) as info:
        manager.save(1, weights={"model": {"w": torch.zeros(8)}}, state={"step": 1, "big": big["w"]}, meta={})
    assert info.value.errno == errno.ENOSPC
    assert not [p for p in tiny_fs.rglob("*") if ".tmp" in p.name] and manager.latest() is None


def test_folder_walk_survives_symlink_loops_skips_fifos_and_reports_duplicates(tmp_path):
    """Two symlink loops and a link to a sibling once listed images many times (or never ended); a FIFO
    blocked start-up. Each directory is now entered once, the FIFO is ignored, duplicates are reported."""
    from PIL import Image
    from simclrv2.data.folders import list_images
    root = tmp_path / "train" / "a"
    root.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(root / f"{i}.png")
    (root / "loop").symlink_to(root)
    (root / "up").symlink_to(tmp_path / "train")
    (root / "again.png").symlink_to(root / "0.png")
    os.mkfifo(root / "pipe.png")
    ignored, duplicates = [], []
    images = list_images(tmp_path / "train", ignored, duplicates)
    assert sorted(p.name for p in images) == ["0.png", "1.png", "2.png"]
    assert [p.name for p in duplicates] == ["again.png"] and [p.name for p in ignored] == ["pipe.png"]


def test_a_memory_request_beyond_the_machine_is_refused_before_allocating():
    from simclrv2.training.runtime import available_memory, check_allocation
    free = available_memory(torch.device("cpu"))
    if free is None:
        pytest.skip("no /proc/meminfo here")
    check_allocation(1 << 20, "a small buffer", torch.device("cpu"))
    with pytest.raises(ConfigError, match="memory_size.*more than"):
        check_allocation(free * 4, "memory_size: huge", torch.device("cpu"))
