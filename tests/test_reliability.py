"""Reliability: crashes, unsafe checkpoints, bad data, bad settings, NaNs, full disks, dead peers.

One section per item of the reliability issue. Every test drives the real command line
(``simclrv2.cli.main.main`` in-process, or ``python -m simclrv2.cli.main`` in a subprocess where
a process must be killed) on tiny inputs: 16 px images, r18_1x_sk0, batches of at most 16.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import simclrv2.training.pretrain as pretrain_mod
from simclrv2.cli.main import main
from simclrv2.data import BatchIterator, DataError, FolderImageSource, load_dataset, scan_image_folder
from simclrv2.data.scan import UNREADABLE_KINDS
from simclrv2.utils import checkpoint as ckpt_mod
from simclrv2.utils.checkpoint import CheckpointManager

FAST = ["--data", "digits", "--image-size", "16", "--max-per-class", "2", "--batch-size", "8", "--no-progress",
        "--device", "cpu", "--precision", "fp32", "--knn-every", "1000000", "--log-every", "1"]
"""20 digit images at 16 px, batches of 8 (2 steps per epoch), no periodic kNN monitor."""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def no_knn(monkeypatch):
    """Skip the kNN monitor of pretraining (seconds per call on 2 shared cores; not under test)."""
    monkeypatch.setattr(pretrain_mod.PretrainTrainer, "monitor_knn", lambda self, step: None)


def run_cli(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def step_of(folder: Path | None) -> int | None:
    return None if folder is None else int(json.loads((folder / "meta.json").read_text())["step"])


def all_finite(folder: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(folder / "model.safetensors").values()
               if t.is_floating_point())


def leftovers(run: Path) -> list[str]:
    """Temporary files or folders a crash or a failed write could leave behind."""
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if ".tmp" in p.name)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A 2-step pretraining run with a checkpoint after each step (copied by the tests that modify it)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pretrain_mod.PretrainTrainer, "monitor_knn", lambda self, step: None)
        assert main(["pretrain", *FAST, "--max-steps", "2", "--checkpoint-every", "1", "--out", str(out)]) == 0
    assert step_of(CheckpointManager(out).latest()) == 2
    return out


def copy_run(trained_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst)
    return dst


# =============================================================================== 1. crash-safe checkpoints
# `python -m simclrv2.cli.main` with the final kNN monitor switched off (it only costs time here).
_NO_KNN_CLI = ("import sys, simclrv2.training.pretrain as P; P.PretrainTrainer.monitor_knn = lambda self, step: None; "
               "from simclrv2.cli.main import main; sys.exit(main(sys.argv[1:]))")


def _cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-c", _NO_KNN_CLI, "pretrain", "--data", "digits", "--image-size", "16",
            "--max-per-class", "4", "--batch-size", "8", "--schedule-steps", "7", "--checkpoint-every", "1",
            "--knn-every", "1000000", "--no-progress", "--device", "cpu", "--precision", "fp32", "--out", str(out),
            *extra]


def _env() -> dict[str, str]:
    # One thread in every process: same reduction order in the killed, resumed and reference runs.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_weights(tmp_path: Path) -> None:
    """SIGKILL a training process once it has written its 2nd checkpoint (possibly mid-write of the
    3rd); --resume must finish with exactly the weights of an uninterrupted run (CPU, fp32, 1 thread:
    bit-exact)."""
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    reference = subprocess.Popen(_cli(ref_dir), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    victim = subprocess.Popen(_cli(run_dir), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    pointer, deadline = run_dir / "checkpoints" / "latest", time.monotonic() + 120
    try:
        while True:
            assert victim.poll() is None, "the run finished before it could be killed"
            assert time.monotonic() < deadline, "no second checkpoint within 120 s"
            text = pointer.read_text().strip() if pointer.is_file() else ""
            if text.startswith("step-") and int(text.split("-")[1]) >= 2:
                break
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL
    killed_at = step_of(CheckpointManager(run_dir).latest())
    assert killed_at is not None and killed_at >= 2
    CheckpointManager(run_dir).load()  # the last complete checkpoint is loadable as it is
    assert not (run_dir / "model.safetensors").exists()

    resumed = subprocess.run(_cli(run_dir, "--resume"), env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resume: continuing from step {killed_at}" in resumed.stdout
    assert reference.wait(300) == 0, reference.stdout.read().decode()
    want, got = load_file(ref_dir / "model.safetensors"), load_file(run_dir / "model.safetensors")
    assert want.keys() == got.keys()
    different = [k for k in want if not torch.equal(want[k], got[k])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"
    assert leftovers(run_dir) == []


def _tiny_state(value: float) -> dict:
    return {"weights": {"model": {"w": torch.full((4,), value)}}, "state": {"step": int(value)},
            "meta": {"arch": "r18_1x_sk0"}}


def test_crash_during_checkpoint_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """A process dying half-way through writing a checkpoint (here: after the weights file, while
    writing the state) leaves `latest` on the previous complete one and no partial folder."""
    manager = CheckpointManager(tmp_path)
    manager.save(1, **_tiny_state(1.0))

    def dies(state, path):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt  # stands in for the kill

    monkeypatch.setattr(ckpt_mod, "save_state", dies)
    with pytest.raises(KeyboardInterrupt):
        manager.save(2, **_tiny_state(2.0))
    assert manager.latest() == tmp_path / "checkpoints" / "step-00000001"
    assert manager.load()["weights"]["model"]["w"].tolist() == [1.0] * 4
    assert leftovers(tmp_path) == []


# The same-step re-save and every other write point: tests/test_faults.py kills a real process at each.


# =============================================================================== 2. safe loading
class _Payload:
    """Unpickling this runs a shell command (the classic malicious-pickle pattern)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_crafted_pickle_in_checkpoint_is_refused(trained_run, tmp_path, capsys, no_knn, container) -> None:
    run = copy_run(trained_run, tmp_path)
    marker = tmp_path / "payload-ran"
    latest = CheckpointManager(run).latest()
    evil = {"step": _Payload(marker), "optimizer": {}, "scaler": {}, "rng": {}}
    if container == "torch.save":
        torch.save(evil, latest / "state.pt")
    else:
        (latest / "state.pt").write_bytes(pickle.dumps(evil, protocol=2))
    code, out, err = run_cli(["pretrain", *FAST, "--max-steps", "4", "--checkpoint-every", "1", "--resume",
                              "--out", run], capsys)
    assert not marker.exists(), "the pickle's payload was executed"
    assert code == 2, err
    assert "refused to load" in err and "state.pt" in err and "could run code" in err
    assert "Traceback" not in err
    assert step_of(CheckpointManager(run).latest()) == 2  # nothing trained


def test_weights_are_safetensors_and_state_loads_weights_only(trained_run) -> None:
    latest = CheckpointManager(trained_run).latest()
    assert {p.name for p in latest.iterdir()} == {"model.safetensors", "state.pt", "meta.json"}
    load_file(latest / "model.safetensors")
    state = torch.load(latest / "state.pt", weights_only=True)  # plain tensors and containers only
    assert state["step"] == 2


# =============================================================================== 3. bad data
def _rgb(side: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8))


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _write_problem(kind: str, folder: Path) -> None:
    """One file (or folder) of ``kind`` in ``folder`` = ROOT/train/a."""
    big = _rgb(40, 7)
    if kind == "zero_byte":
        (folder / "zero.jpg").write_bytes(b"")
    elif kind == "not_an_image":
        (folder / "page.jpg").write_text("<html><body>404 Not Found</body></html>")
    elif kind == "truncated":
        data = _encoded(big, "JPEG")
        (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    elif kind == "corrupt":
        data = _encoded(big, "PNG")
        half = len(data) // 2
        (folder / "garbled.png").write_bytes(data[:half] + bytes(b ^ 0xFF for b in data[half:]))
    elif kind == "empty_class":  # a class without training images (its test folder is empty as well)
        (folder.parent / "z_empty").mkdir()
        (folder.parent.parent / "test" / "z_empty").mkdir()
    elif kind == "non_image_file":
        (folder / "labels.csv").write_text("a,b\n")
    elif kind == "small":
        _rgb(3, 1).save(folder / "tiny.png")
    elif kind == "16bit":
        Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)).save(folder / "deep.png")
    elif kind == "palette":
        Image.new("P", (20, 20), 3).save(folder / "palette.png")
    elif kind == "cmyk":
        Image.new("CMYK", (20, 20), (10, 200, 30, 0)).save(folder / "print.jpg")
    elif kind == "alpha":
        Image.new("RGBA", (20, 20), (255, 0, 0, 60)).save(folder / "glass.png")
    else:  # pragma: no cover
        raise ValueError(kind)


def _clean_folder(root: Path, per_class: int = 4, eval_per_class: int = 2) -> Path:
    for split, n in (("train", per_class), ("test", eval_per_class)):
        for c, cls in enumerate(("a", "b")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                _rgb(20, 100 * c + i + (0 if split == "train" else 50)).save(root / split / cls / f"{cls}{i}.png")
    return root


ALL_KINDS = ["zero_byte", "not_an_image", "truncated", "corrupt", "empty_class", "non_image_file", "small",
             "16bit", "palette", "cmyk", "alpha"]


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_each_bad_file_kind_is_found_and_handled(tmp_path: Path, kind: str) -> None:
    root = _clean_folder(tmp_path / "data")
    _write_problem(kind, root / "train" / "a")
    source = load_dataset(root, split="train", image_size=16, num_workers=0)
    report = source.scan_report
    assert report.count(kind) == 1, report.summary()
    assert set(report.counts()) == {kind}
    unreadable = kind in UNREADABLE_KINDS
    usable = 8 if unreadable or kind in ("empty_class", "non_image_file") else 9
    assert len(source) == usable  # unreadable ones are left out, converted ones kept
    batch = source.get_batch(range(len(source)))
    assert batch.images.dtype == torch.uint8 and batch.images.shape[1:] == (3, 16, 16)
    if unreadable:
        with pytest.raises(DataError, match="--strict"):
            load_dataset(root, split="train", image_size=16, num_workers=0, strict=True)
    elif kind == "empty_class":
        with pytest.raises(DataError, match="without images.*z_empty"):
            load_dataset(root, split="train", image_size=16, num_workers=0, strict=True)
    else:
        assert len(load_dataset(root, split="train", image_size=16, num_workers=0, strict=True)) == usable


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    """Every problem kind at once in a 2-class folder."""
    root = _clean_folder(tmp_path / "messy", per_class=6)
    for kind in ALL_KINDS:
        _write_problem(kind, root / "train" / "a")
    return root


def test_training_on_a_messy_folder_reports_skips_and_trains(messy_folder, tmp_path, capsys, caplog,
                                                            no_knn) -> None:
    out = tmp_path / "run"
    with caplog.at_level("WARNING"):
        code, stdout, err = run_cli(["pretrain", "--data", messy_folder, "--image-size", "16", "--batch-size", "8",
                                     "--max-steps", "2", "--num-workers", "0", "--no-progress", "--device",
                                     "cpu", "--precision", "fp32", "--out", out], capsys)
    assert code == 0, err
    scan_line = next(line for line in stdout.splitlines() if line.startswith(f"data scan of {messy_folder}/train"))
    for words in ("1 zero-byte file", "1 not an image", "1 truncated image", "1 corrupt image",
                  "1 empty class folder", "1 non-image file ignored", "1 smaller than the crop",
                  "1 16-bit", "1 palette", "1 CMYK", "1 transparency"):
        assert words in scan_line, scan_line
    assert stdout.index("data scan of") < stdout.index("pretrain: ")  # reported before training
    for name in ("zero.jpg", "page.jpg", "cut.jpg", "garbled.png"):
        assert f"a/{name}" in caplog.text  # the warning lists the skipped files ...
        assert f"a/{name}" in stdout  # ... and so does the printed report
    assert json.loads((out / "results.json").read_text())["steps"] == 2


def test_strict_stops_before_training_on_unreadable_files(messy_folder, tmp_path, capsys) -> None:
    for split in ("train", "test"):  # so that the unreadable files are what stops it
        (messy_folder / split / "z_empty").rmdir()
    out = tmp_path / "run"
    code, stdout, err = run_cli(["pretrain", "--data", messy_folder, "--image-size", "16", "--batch-size", "8",
                                 "--max-steps", "2", "--num-workers", "0", "--no-progress", "--device", "cpu",
                                 "--strict", "--out", out], capsys)
    assert code == 2
    assert "--strict" in err and all(n in err for n in ("zero.jpg", "page.jpg", "cut.jpg", "garbled.png"))
    assert "pretrain: " not in stdout and not (out / "checkpoints").exists()


def test_disk_backed_folder_survives_a_file_going_bad_while_training(tmp_path, capfd, monkeypatch, no_knn) -> None:
    """Too large for the memory cache -> decoded by worker processes during training. A file that is
    fine at the scan but unreadable later is replaced by another image with a warning."""
    root = _clean_folder(tmp_path / "disk", per_class=8)
    victim = root / "train" / "a" / "a3.png"
    monkeypatch.setattr("simclrv2.data.datasets.fits_in_memory", lambda *args, **kwargs: False)
    real_fit = pretrain_mod.PretrainTrainer.fit

    def fit_after_damage(self):
        assert isinstance(self.source, FolderImageSource)  # really read from disk
        victim.write_bytes(victim.read_bytes()[:40])  # truncated after the scan said it was fine
        return real_fit(self)

    monkeypatch.setattr(pretrain_mod.PretrainTrainer, "fit", fit_after_damage)
    out = tmp_path / "run"
    code = main(["pretrain", "--data", str(root), "--image-size", "16", "--batch-size", "8", "--max-steps", "4",
                 "--num-workers", "1", "--no-progress", "--device", "cpu", "--precision", "fp32", "--out", str(out)])
    _, err = capfd.readouterr()
    assert code == 0, err
    assert "a3.png" in err and "became unreadable" in err
    assert json.loads((out / "results.json").read_text())["steps"] == 4


def test_replacement_keeps_batches_whole_and_labels_consistent(tmp_path: Path) -> None:
    root = _clean_folder(tmp_path / "disk", per_class=5)
    scan = scan_image_folder(root)
    source = FolderImageSource(scan["train"], scan["classes"], 16, root=root / "train", skip_unreadable=True)
    batches = BatchIterator(source, 4, shuffle=True, drop_last=True, seed=0, num_workers=1)
    for path in (root / "train" / "a" / "a1.png", root / "train" / "b" / "b2.png"):
        path.write_bytes(b"")
    seen = []
    for batch in batches:  # decoded in a worker process
        assert batch.images.shape == (4, 3, 16, 16)
        assert torch.equal(batch.labels, source.labels[batch.indices])
        seen += batch.indices.tolist()
    batches.close()
    assert len(seen) == 8 and not {source.paths.index("a/a1.png"), source.paths.index("b/b2.png")} & set(seen)
    source.skip_unreadable = False
    with pytest.raises(DataError, match="a1.png"):
        source.get_batch([source.paths.index("a/a1.png")])


# =============================================================================== 4. bad configuration
BAD_SETTINGS = [
    (["--learning-rate", "0"], "learning_rate: must be a positive number"),
    (["--learning-rate", "-0.5"], "learning_rate: must be a positive number"),
    (["--batch-size", "0"], "batch_size: must be a positive number"),
    (["--batch-size", "-4"], "batch_size: must be a positive number"),
    (["--temperature", "0"], "temperature: must be a positive number"),
    (["--temperature", "-1"], "temperature: must be a positive number"),
    (["--label-fraction", "0"], "label_fraction: must be in (0, 1]"),
    (["--label-fraction", "1.5"], "label_fraction: must be in (0, 1]"),
    (["--ft-proj-selector", "4"], "ft_proj_selector: must be -1 or between 0 and num_proj_layers=3"),
    (["--arch", "r19_1x_sk0"], "arch:"),
    (["--arch", "resnet50"], "arch:"),
    (["--data", "/no/such/folder"], "data: '/no/such/folder' is neither a dataset name"),
    (["--dist-timeout", "0"], "dist_timeout: must be a positive number"),
]


@pytest.mark.parametrize("extra,message", BAD_SETTINGS, ids=[" ".join(a) for a, _ in BAD_SETTINGS])
def test_bad_setting_exits_2_before_any_work(extra, message, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    code, stdout, err = run_cli(["pretrain", *FAST, "--max-steps", "1", *extra, "--out", out], capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert stdout == "" and not out.exists()  # nothing started, nothing written


def _head_checkpoint(path: Path, *, layers: int, arch_in_meta: str = "r18_1x_sk0",
                     arch_of_weights: str = "r18_1x_sk0") -> Path:
    from simclrv2.models import create_model
    from simclrv2.training.model_io import export_model, model_meta

    net = create_model(arch_of_weights, image_size=16, num_proj_layers=layers, num_classes=0)
    meta = model_meta(arch=arch_in_meta, image_size=16, num_proj_layers=layers, stage="pretrain")
    return export_model(net, path, meta)


def test_ft_proj_selector_larger_than_the_checkpoint_head(tmp_path, capsys) -> None:
    ckpt = _head_checkpoint(tmp_path / "head2.safetensors", layers=2)
    out = tmp_path / "run"
    code, stdout, err = run_cli(["finetune", "--checkpoint", ckpt, "--data", "digits", "--ft-proj-selector", "3",
                                 "--device", "cpu", "--no-progress", "--out", out], capsys)
    assert code == 2 and "ft_proj_selector: 3 is larger than the 2-layer projection head" in err
    assert not out.exists()


def test_checkpoint_of_another_architecture_on_resume(trained_run, tmp_path, capsys) -> None:
    run = copy_run(trained_run, tmp_path)
    code, stdout, err = run_cli(["pretrain", *FAST, "--arch", "r34_1x_sk0", "--max-steps", "4", "--resume",
                                 "--out", run], capsys)
    assert code == 2
    assert "does not match" in err and "arch 'r18_1x_sk0' in the checkpoint, 'r34_1x_sk0' now" in err
    assert stdout == "" and step_of(CheckpointManager(run).latest()) == 2
    assert (run / "config.yaml").read_text() == (trained_run / "config.yaml").read_text()  # untouched


def test_weights_that_do_not_fit_their_architecture(tmp_path, capsys) -> None:
    ckpt = _head_checkpoint(tmp_path / "mislabelled.safetensors", layers=2, arch_in_meta="r34_1x_sk0")
    code, _, err = run_cli(["evaluate", "--checkpoint", ckpt, "--data", "digits", "--device", "cpu",
                            "--no-progress", "--out", tmp_path / "run"], capsys)
    assert code == 2 and "holds a r34_1x_sk0 network, which does not fit" in err
    pickled = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, pickled)
    code, _, err = run_cli(["finetune", "--checkpoint", pickled, "--data", "digits", "--device", "cpu",
                            "--out", tmp_path / "run2"], capsys)
    assert code == 2 and "is not a .safetensors file" in err


def test_train_and_test_class_lists_differ(tmp_path, capsys) -> None:
    root = _clean_folder(tmp_path / "data")
    (root / "test" / "b").rename(root / "test" / "c")
    out = tmp_path / "run"
    code, stdout, err = run_cli(["pretrain", "--data", root, "--image-size", "16", "--batch-size", "4",
                                 "--max-steps", "1", "--device", "cpu", "--no-progress", "--out", out], capsys)
    assert code == 2 and "class folders of" in err and "differ" in err and "c" in err
    assert "pretrain: " not in stdout and not (out / "checkpoints").exists()


# =============================================================================== 5. numerical faults
def test_nan_loss_stops_run_and_keeps_last_good_checkpoint(tmp_path, capsys, monkeypatch, no_knn) -> None:
    real_loss, calls = pretrain_mod.contrastive_loss, {"n": 0}

    def loss_goes_nan_at_step_3(*args, **kwargs):
        calls["n"] += 1
        out = real_loss(*args, **kwargs)
        return out._replace(loss=out.loss * float("nan")) if calls["n"] >= 3 else out

    monkeypatch.setattr(pretrain_mod, "contrastive_loss", loss_goes_nan_at_step_3)
    out = tmp_path / "run"
    code, _, err = run_cli(["pretrain", *FAST, "--max-steps", "5", "--log-every", "100", "--checkpoint-every", "1",
                            "--out", out], capsys)
    assert code == 1
    assert "the loss became NaN or Inf at or before step 3" in err and "last good checkpoint was kept" in err
    latest = CheckpointManager(out).latest()
    assert step_of(latest) == 2 and all_finite(latest)
    assert not (out / "model.safetensors").exists() and not (out / "results.json").exists()


def test_weights_broken_by_an_update_are_never_checkpointed(tmp_path, capsys, monkeypatch, no_knn) -> None:
    """The update of step 3 makes a weight infinite while that step's loss was still finite."""
    real_update, calls = pretrain_mod.PretrainStep.update_memory, {"n": 0}

    def update_breaks_weights(self, views):
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                next(p for p in self.model.parameters() if p.ndim == 1)[0] = float("inf")
        return real_update(self, views)

    monkeypatch.setattr(pretrain_mod.PretrainStep, "update_memory", update_breaks_weights)
    out = tmp_path / "run"
    code, _, err = run_cli(["pretrain", *FAST, "--max-steps", "5", "--log-every", "100", "--checkpoint-every", "1",
                            "--out", out], capsys)
    assert code == 1 and "the weights became NaN or Inf at or before step 3" in err
    latest = CheckpointManager(out).latest()
    assert step_of(latest) == 2 and all_finite(latest)


def test_huge_learning_rate_stops_cleanly(tmp_path, capsys, no_knn) -> None:
    out = tmp_path / "run"
    code, _, err = run_cli(["pretrain", *FAST, "--learning-rate", "1e30", "--max-steps", "4",
                            "--checkpoint-every", "1", "--out", out], capsys)
    assert code == 1 and "NaN or Inf" in err and "Traceback" not in err
    latest = CheckpointManager(out).latest()
    assert latest is None or all_finite(latest)


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    """A real network file (r18_0.25x at 8 px, untrained) for linear evaluation to start from."""
    from simclrv2.training.model_io import build_from_meta, export_model, model_meta
    path = tmp_path_factory.mktemp("encoder") / "model.safetensors"
    torch.manual_seed(0)
    meta = {**model_meta(arch="r18_0.25x_sk0", image_size=8, num_proj_layers=2, proj_out_dim=16,
                         stage="pretrain"), "data": "digits"}
    return export_model(build_from_meta(meta), path, meta)


LINEAR_EVAL = ["linear-eval", "--data", "digits", "--image-size", "8", "--max-per-class", "4", "--batch-size", "8",
               "--epochs", "5", "--no-progress", "--device", "cpu", "--precision", "fp32"]


@pytest.mark.parametrize("learning_rate, why", [("1e30", "NaN or Inf at step 3"),  # the loss overflows
                                                ("1e6", "its loss on its own training images is")])  # finite
def test_linear_eval_with_a_diverging_learning_rate_stops_without_weights_or_accuracy(
        learning_rate, why, tiny_encoder, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    code, stdout, err = run_cli([*LINEAR_EVAL, "--checkpoint", tiny_encoder, "--learning-rate", learning_rate,
                                 "--out", out], capsys)
    assert code == 1, err
    assert "linear classifier diverged" in err and why in err and "--learning-rate" in err
    assert "Traceback" not in err and "top-1" not in stdout
    assert not (out / "model.safetensors").exists() and not (out / "results.json").exists()
    logged = (out / "logs" / "metrics.jsonl").read_text() if (out / "logs" / "metrics.jsonl").exists() else ""
    assert "top1" not in logged and "NaN" not in logged
    # the same run with the default learning rate finishes: the guard does not fire on a healthy run
    code, stdout, err = run_cli([*LINEAR_EVAL, "--checkpoint", tiny_encoder, "--out", tmp_path / "ok"], capsys)
    assert code == 0, err
    assert "top-1" in stdout and (tmp_path / "ok" / "model.safetensors").is_file()


# =============================================================================== 6. disk full / unwritable
def test_unwritable_out_exits_2_before_work(tmp_path, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, stdout, err = run_cli(["pretrain", *FAST, "--max-steps", "1", "--out", blocker / "run"], capsys)
    assert code == 2 and "out: cannot write to run directory" in err and stdout == ""
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code, stdout, err = run_cli(["pretrain", *FAST, "--max-steps", "1", "--out", locked / "run"], capsys)
        assert code == 2 and "cannot write" in err and stdout == ""


@pytest.mark.parametrize("failing", ["safetensors save_file", "torch.save"])
def test_disk_full_during_checkpoint(failing, tmp_path, capsys, monkeypatch, no_knn) -> None:
    """ENOSPC while writing the 2nd checkpoint: a clear error, `latest` on the 1st, no partial files."""
    calls = {"n": 0}
    real = ckpt_mod.save_file if failing == "safetensors save_file" else torch.save

    def full_disk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            target = args[1]
            if isinstance(target, (str, Path)):
                Path(target).write_bytes(b"\0" * 100)  # a partial file, as a full disk leaves
            else:
                target.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    if failing == "safetensors save_file":
        monkeypatch.setattr(ckpt_mod, "save_file", full_disk)
    else:
        monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "run"
    code, _, err = run_cli(["pretrain", *FAST, "--max-steps", "4", "--checkpoint-every", "1", "--out", out], capsys)
    assert code == 1
    assert "could not write a checkpoint" in err and "No space left on device" in err
    manager = CheckpointManager(out)
    assert step_of(manager.latest()) == 1
    manager.load()
    assert leftovers(out) == [] and sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "latest", "step-00000001"]


def test_disk_full_when_exporting_the_final_weights(tmp_path, capsys, monkeypatch, no_knn) -> None:
    real = ckpt_mod.save_file

    def full_for_final(tensors, filename, metadata=None):
        if "checkpoints" not in str(filename):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt_mod, "save_file", full_for_final)
    out = tmp_path / "run"
    code, _, err = run_cli(["pretrain", *FAST, "--max-steps", "2", "--out", out], capsys)
    assert code == 1 and "could not write the final weights" in err and "Traceback" not in err
    assert step_of(CheckpointManager(out).latest()) == 2 and leftovers(out) == []
    assert not (out / "model.safetensors").exists()


# =============================================================================== 7. distributed faults
_RANK_SCRIPT = textwrap.dedent("""
    import os, sys, time
    rank, mode, flag = int(os.environ["RANK"]), sys.argv[1], sys.argv[2]
    import simclrv2.training.pretrain as P
    P.PretrainTrainer.monitor_knn = lambda self, step: None
    if rank == 1:
        real, calls = P.PretrainStep.__call__, {"n": 0}
        def faulty(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:  # rank 1 fails just before the collectives of step 2
                open(flag, "w").close()
                if mode == "exit":
                    os._exit(17)
                time.sleep(600)
            return real(self, *args, **kwargs)
        P.PretrainStep.__call__ = faulty
    from simclrv2.cli.main import main
    sys.exit(main(sys.argv[3:]))
""")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["exit", "hang"])
def test_dead_or_hung_peer_stops_the_other_rank(mode, tmp_path) -> None:
    script, flag = tmp_path / "rank.py", tmp_path / "rank1-failed"
    script.write_text(_RANK_SCRIPT)
    port = _free_port()
    args = ["pretrain", *FAST, "--max-steps", "4", "--checkpoint-every", "100",
            "--no-global-bn", "--num-workers", "0", "--dist-timeout", "5", "--out", str(tmp_path / "run")]
    procs = []
    for rank in (0, 1):
        env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(script), mode, str(flag), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    rank0, rank1 = procs
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert time.monotonic() < deadline and rank0.poll() is None, rank0.communicate()[1][-3000:]
            time.sleep(0.05)
        failed_at = time.monotonic()
        try:
            _, err0 = rank0.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("rank 0 still hangs 60 s after rank 1 failed")
        elapsed = time.monotonic() - failed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert rank0.returncode == 1, err0[-3000:]
    assert "a peer process stopped or timed out" in err0 and "Traceback" not in err0
    assert elapsed < 30, f"rank 0 needed {elapsed:.1f} s to notice"
