"""Describe, export and reload networks between stages.

A network is described by a small JSON-able dict ("model meta": architecture, image size, head
depth, classes ...) stored in the safetensors metadata next to the weights, so that
``--checkpoint run_dir`` rebuilds exactly the network that was trained, and a checkpoint loaded
into a different architecture fails with a message naming both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from simclrv2.models import SimCLRNet, create_model
from simclrv2.errors import CheckpointError
from simclrv2.utils.ema import unwrap_model
from simclrv2.utils.checkpoint import find_weights, load_weights, save_weights

def model_meta(*, arch: str, image_size: int, num_proj_layers: int, proj_out_dim: int = 128,
               num_classes: int = 0, ft_proj_selector: int = 0, head_layers_kept: int | None = None,
               classes: list[str] | None = None, stage: str = "") -> dict[str, Any]:
    """``num_proj_layers`` is the depth of the head as pretrained; ``head_layers_kept`` (None = all)
    how many of its layers a fine-tuned network keeps (SPEC §2.1 ``ft_proj_selector``)."""
    return dict(arch=arch, image_size=int(image_size), num_proj_layers=int(num_proj_layers),
                proj_out_dim=int(proj_out_dim), num_classes=int(num_classes),
                ft_proj_selector=int(ft_proj_selector),
                head_layers_kept=None if head_layers_kept is None else int(head_layers_kept),
                classes=list(classes or []), stage=stage)


def build_from_meta(meta: dict[str, Any], *, classifier_stop_grad: bool = False) -> SimCLRNet:
    """Rebuild the network described by ``meta`` (full head, then truncated if it was)."""
    net = create_model(meta["arch"], image_size=meta["image_size"], num_proj_layers=meta["num_proj_layers"],
                       proj_out_dim=meta.get("proj_out_dim", 128), num_classes=meta.get("num_classes", 0),
                       ft_proj_selector=meta.get("ft_proj_selector", 0),
                       classifier_stop_grad=classifier_stop_grad)
    kept = meta.get("head_layers_kept")
    if kept is not None and net.head is not None:
        net.head = net.head.truncate(kept)
    return net


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / torch.compile wrappers (one implementation: utils.ema)."""
    return unwrap_model(model)


def export_model(model: nn.Module, path: str | Path, meta: dict[str, Any]) -> Path:
    """Write the final weights of a stage (``model.safetensors``) with their description."""
    path = Path(path)
    state = unwrap(model).state_dict()
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:  # the one gate every stage's final weights pass: NaN/Inf weights are never exported
        from simclrv2.errors import TrainingError
        raise TrainingError(f"the final weights hold NaN or Inf ({len(broken)} tensors, e.g. "
                            f"{', '.join(broken[:3])}); {path.name} was not written and no accuracy is reported. "
                            "Try a lower --learning-rate or --precision fp32.")
    try:
        save_weights(state, path, meta)
    except OSError as exc:
        from simclrv2.errors import TrainingError
        raise TrainingError(f"could not write the final weights {path} ({exc.strerror or exc}); no partial "
                            "file was left. Free disk space, then rerun with --resume (the last checkpoint "
                            "is intact)") from exc
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    """(state dict, model meta, file) from a run directory or a .safetensors file."""
    file = find_weights(path)
    state, meta = load_weights(file)
    missing = [k for k in ("arch", "image_size", "num_proj_layers") if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint: {file} carries no simclrv2 model description (missing "
                              f"{', '.join(missing)}); it was not written by simclrv2")
    check_model_meta(meta, file)
    return state, meta, file


# (type, lowest, highest) of every field of a model description that builds a network; a crafted
# file must not reach create_model with a string for a depth or a 10^9-pixel image size.
_META_INTS = {"image_size": (1, 4096), "num_proj_layers": (0, 16), "proj_out_dim": (1, 1 << 16),
              "num_classes": (0, 1 << 20), "ft_proj_selector": (-1, 16), "head_layers_kept": (0, 16)}


def check_model_meta(meta: dict[str, Any], where: Any) -> None:
    """Raise :class:`CheckpointError` naming the first field of ``meta`` whose type or range is not
    one simclrv2 writes (a crafted or damaged description); nothing is built from it before."""
    def bad(key: str, why: str) -> CheckpointError:
        return CheckpointError(f"checkpoint: {where} has an invalid model description ({key}: {why}); it was "
                               "not written by simclrv2 or is damaged")

    if not isinstance(meta.get("arch"), str) or len(meta["arch"]) > 64:
        raise bad("arch", "not an architecture name")
    for key, (low, high) in _META_INTS.items():
        if key not in meta or (key == "head_layers_kept" and meta[key] is None):
            continue
        value = meta[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(key, f"a {type(value).__name__}, not an integer")
        if not low <= value <= high:
            raise bad(key, f"{value} outside {low}..{high}")
    classes = meta.get("classes", [])
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise bad("classes", "not a list of class names")


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], *, source: str, expected_arch: str,
                    source_arch: str, strict: bool = True) -> None:
    """Copy ``state`` into ``model`` and explain an architecture mismatch in one sentence."""
    target = unwrap(model)
    own = target.state_dict()
    shape_mismatch = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if shape_mismatch or (strict and (missing or unexpected)):
        detail = (f"{len(shape_mismatch)} tensors of different shape (e.g. {shape_mismatch[:2]}), "
                  f"{len(missing)} missing, {len(unexpected)} unexpected")
        raise CheckpointError(f"checkpoint: {source} holds a {source_arch} network, which does not fit the "
                              f"requested {expected_arch} ({detail})")
    target.load_state_dict(state, strict=False)


def load_network(path: str | Path, *, classifier_stop_grad: bool = False) -> tuple[SimCLRNet, dict[str, Any]]:
    """Rebuild the network saved at ``path`` exactly as it was trained."""
    state, meta, file = load_checkpoint(path)
    model = build_from_meta(meta, classifier_stop_grad=classifier_stop_grad)
    load_state_into(model, state, source=str(file), expected_arch=meta["arch"], source_arch=meta["arch"])
    return model, meta
