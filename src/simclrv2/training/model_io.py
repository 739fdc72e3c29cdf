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
    try:
        save_weights(unwrap(model).state_dict(), path, meta)
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
    return state, meta, file


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
