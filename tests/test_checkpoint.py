"""Checkpoint files: atomic layout, the ``latest`` pointer, pruning, code-free loading, path resolution."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from simclrv2.errors import CheckpointError
from simclrv2.utils.checkpoint import (
    LATEST,
    CheckpointManager,
    find_weights,
    load_state,
    load_weights,
    save_state,
    save_weights,
)


def _weights(value: float) -> dict[str, dict[str, torch.Tensor]]:
    return {"model": {"w": torch.full((3,), value), "bn.running_mean": torch.zeros(2)},
            "ema": {"w": torch.full((3,), value / 2)}}


def _state(step: int) -> dict:
    return {"step": step, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
            "rng": {"torch_cpu": torch.get_rng_state()}, "queue": {"embeddings": torch.ones(4, 2)}}


def _save(manager: CheckpointManager, step: int) -> Path:
    return manager.save(step, weights=_weights(float(step)), state=_state(step),
                        meta={"arch": "r18_1x_sk0", "stage": "pretrain"})


def test_layout_latest_pointer_and_round_trip(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    assert manager.latest() is None
    folder = _save(manager, 5)
    assert folder == tmp_path / "checkpoints" / "step-00000005"
    assert sorted(p.name for p in folder.iterdir()) == ["ema.safetensors", "meta.json", "model.safetensors",
                                                         "state.pt"]
    assert (tmp_path / "checkpoints" / LATEST).read_text().strip() == "step-00000005"
    assert manager.latest() == folder
    meta = json.loads((folder / "meta.json").read_text())
    assert len(meta.pop("write_id")) == 32  # unique per write (ranks of a resume compare it)
    assert meta == {"arch": "r18_1x_sk0", "stage": "pretrain", "step": 5}
    loaded = manager.load()
    assert loaded["meta"]["step"] == 5
    assert torch.equal(loaded["weights"]["model"]["w"], torch.full((3,), 5.0))
    assert torch.equal(loaded["weights"]["ema"]["w"], torch.full((3,), 2.5))
    assert loaded["state"]["step"] == 5
    assert torch.equal(loaded["state"]["queue"]["embeddings"], torch.ones(4, 2))
    # the safetensors files carry the model description
    _, meta = load_weights(folder / "model.safetensors")
    assert meta["arch"] == "r18_1x_sk0"
    # nothing temporary is left behind
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_pruning_keeps_the_last_k_and_latest_moves(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2, 3, 4):
        _save(manager, step)
        assert manager.latest().name == f"step-{step:08d}"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-00000003", "step-00000004"]
    assert manager.load()["state"]["step"] == 4


def test_latest_ignores_an_incomplete_folder_and_falls_back(tmp_path):
    manager = CheckpointManager(tmp_path)
    _save(manager, 1)
    # a pointer to a folder without meta.json (e.g. written by hand, or half-deleted) is not trusted:
    # the newest complete folder is used instead, and the manager says why
    broken = tmp_path / "checkpoints" / "step-00000002"
    broken.mkdir()
    (tmp_path / "checkpoints" / LATEST).write_text("step-00000002")
    assert manager.latest() == tmp_path / "checkpoints" / "step-00000001"
    assert "missing or incomplete" in manager.note
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000001")
    assert manager.latest() is None
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        manager.load()


@pytest.mark.parametrize("pointer", ["", "step-00000009", "../../elsewhere/step-00000099", "ABSOLUTE", "..", "."])
def test_latest_pointer_outside_or_missing_is_not_trusted(tmp_path, pointer):
    """`latest` names nothing, a deleted folder, or a complete checkpoint OUTSIDE the run (relative or
    absolute path): the run's own newest complete checkpoint is used."""
    manager = CheckpointManager(tmp_path / "run")
    _save(manager, 1)
    _save(manager, 2)
    foreign = CheckpointManager(tmp_path / "elsewhere" / "x")
    _save(foreign, 99)
    shutil.move(str(tmp_path / "elsewhere" / "x" / "checkpoints" / "step-00000099"), tmp_path / "elsewhere")
    if pointer == "ABSOLUTE":
        pointer = str(tmp_path / "elsewhere" / "step-00000099")
    (manager.root / LATEST).write_text(pointer)
    assert manager.latest() == manager.root / "step-00000002"
    assert manager.note and "step-00000002" in manager.note


def test_pruning_never_deletes_folders_it_did_not_write(tmp_path):
    """A resumed run (a new manager) prunes only its own checkpoints: the one it resumed from and any
    older one stay."""
    first = CheckpointManager(tmp_path, keep=1)
    _save(first, 1)
    _save(first, 2)
    assert [p.name for p in first.step_folders()] == ["step-00000002"]  # its own step 1 went
    resumed = CheckpointManager(tmp_path, keep=1)
    for step in (3, 4, 5):
        _save(resumed, step)
    assert [p.name for p in resumed.step_folders()] == ["step-00000002", "step-00000005"]


def test_symlinked_checkpoints_folder_is_refused(tmp_path):
    foreign = tmp_path / "foreign"
    (foreign / "step-00000001").mkdir(parents=True)
    (foreign / "step-00000001" / "precious.txt").write_text("keep me")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").symlink_to(foreign)
    manager = CheckpointManager(tmp_path / "run", keep=1)
    with pytest.raises(CheckpointError, match="symlink"):
        _save(manager, 2)
    assert (foreign / "step-00000001" / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("raw", ["not json {", "[1, 2]", "\"text\"", "[" * 100000 + "]" * 100000,
                                 '{"arch": "' + "x" * (2 << 20) + '"}'])
def test_crafted_safetensors_metadata_is_a_checkpoint_error(tmp_path, raw):
    """Invalid JSON, another type, deep nesting or megabytes of metadata: one CheckpointError, no traceback."""
    from safetensors.torch import save_file
    path = tmp_path / "crafted.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"simclrv2": raw})
    with pytest.raises(CheckpointError, match="metadata"):
        load_weights(path)


class _Payload:
    """Unpickling this runs a shell command (the classic malicious-pickle pattern)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["torch.save", "pickle.dumps"])
def test_malicious_pickle_in_state_is_refused_and_never_runs(tmp_path, how):
    manager = CheckpointManager(tmp_path / "run")
    folder = _save(manager, 3)
    marker = tmp_path / "payload-ran"
    evil = {"step": 3, "optimizer": _Payload(marker)}
    if how == "torch.save":
        torch.save(evil, folder / "state.pt")
    else:
        (folder / "state.pt").write_bytes(pickle.dumps(evil))
    with pytest.raises(CheckpointError, match="refused to load") as info:
        manager.load()
    assert "state.pt" in str(info.value)
    with pytest.raises(CheckpointError):
        load_state(folder / "state.pt")
    assert not marker.exists(), "the pickle payload was executed"
    # the same dict without the payload loads fine, so the refusal is about the payload
    save_state({"step": 3, "optimizer": {}}, folder / "state.pt")
    assert manager.load()["state"]["step"] == 3


def test_garbage_state_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "state.pt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        load_state(path)


def test_non_safetensors_checkpoint_path_is_refused(tmp_path):
    for name in ("model.pt", "model.pth", "weights.bin"):
        path = tmp_path / name
        torch.save({"w": torch.ones(1)}, path)
        with pytest.raises(CheckpointError, match="not a .safetensors file"):
            find_weights(path)


def test_corrupt_safetensors_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_weights(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(tmp_path / "missing.safetensors")


def test_find_weights_resolution_order(tmp_path):
    run = tmp_path / "run"
    manager = CheckpointManager(run)
    # nothing there yet
    run.mkdir()
    with pytest.raises(CheckpointError, match="found no model.safetensors"):
        find_weights(run)
    # 1) only step checkpoints: the latest one's model.safetensors
    _save(manager, 1)
    _save(manager, 2)
    assert find_weights(run) == run / "checkpoints" / "step-00000002" / "model.safetensors"
    # 2) an exported model.safetensors in the run directory wins over step checkpoints
    save_weights({"w": torch.zeros(1)}, run / "model.safetensors", {"arch": "r18_1x_sk0"})
    assert find_weights(run) == run / "model.safetensors"
    # 3) an explicit .safetensors file is used as given, whatever its name
    other = tmp_path / "anything.safetensors"
    save_weights({"w": torch.zeros(1)}, other, {})
    assert find_weights(other) == other
    assert find_weights(str(other)) == other


def test_save_weights_is_atomic_and_keeps_metadata(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights({"a": torch.arange(6.0).view(2, 3).t()}, path, {"arch": "r50_1x_sk0", "classes": ["x", "y"]})
    tensors, meta = load_weights(path)
    assert torch.equal(tensors["a"], torch.arange(6.0).view(2, 3).t())
    assert meta == {"arch": "r50_1x_sk0", "classes": ["x", "y"]}
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


@pytest.mark.parametrize("meta", [{"arch": 5, "image_size": 16, "num_proj_layers": 3},
                                  {"arch": "r18_1x_sk0", "image_size": "16", "num_proj_layers": 3},
                                  {"arch": "r18_1x_sk0", "image_size": 10**9, "num_proj_layers": 3},
                                  {"arch": "r18_1x_sk0", "image_size": 16, "num_proj_layers": [3]},
                                  {"arch": "r18_1x_sk0", "image_size": 16, "num_proj_layers": 3, "classes": "ab"}])
def test_crafted_model_description_is_a_checkpoint_error(tmp_path, meta):
    from simclrv2.training.model_io import load_network
    save_weights({"w": torch.zeros(1)}, tmp_path / "model.safetensors", meta)
    with pytest.raises(CheckpointError, match="invalid model description"):
        load_network(tmp_path / "model.safetensors")
