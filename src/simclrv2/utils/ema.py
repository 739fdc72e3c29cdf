"""Exponential moving average (momentum encoder) of a model.

Why: SimCLRv2's MoCo-style memory takes its negatives from a momentum copy of the
network updated as ``ema ← decay·ema + (1−decay)·online`` with decay 0.999 (paper §2,
SPEC §0); the released checkpoints store this copy as ``ema_model/*`` (SPEC §8). The
reference code does not contain it (SPEC §9), so this is our own minimal version.

Choices:

* Floating-point **parameters** are averaged with ``torch._foreach_mul_`` /
  ``torch._foreach_add_`` (a few fused kernels, no per-parameter host sync).
* **Buffers** (BN running mean/var, ``num_batches_tracked``) are *copied* from the
  online model rather than averaged. The online model's running statistics are already an
  exponential average over batches, and copying keeps the EMA copy's eval-mode BN consistent
  with the online network's; if the EMA copy is run in train mode its BN uses batch
  statistics anyway, so the copied buffers only matter for evaluation.
* The copy's train/eval mode is left to the caller: :meth:`update` does not depend on it.
* DDP / DataParallel / ``torch.compile`` wrappers are unwrapped so the copy is a plain
  module whose ``state_dict`` keys match the bare model.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["ModelEMA", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


class ModelEMA:
    """A frozen deep copy of ``model`` tracking ``decay·ema + (1−decay)·param``.

    Attributes:
        module: the averaged copy (``requires_grad=False`` everywhere); use it for the
            momentum-encoder forward pass under ``torch.no_grad()``.
        decay: EMA decay (paper: 0.999).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(unwrap_model(model))
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step from the online ``model`` (wrapped or not)."""
        online = unwrap_model(model)
        ema_params = list(self.module.parameters())
        src_params = list(online.parameters())
        if len(ema_params) != len(src_params):
            raise ValueError("model structure differs from the EMA copy")
        ema_float = [e for e in ema_params if e.is_floating_point()]
        src_float = [s.detach() for s in src_params if s.is_floating_point()]
        if ema_float:
            torch._foreach_mul_(ema_float, self.decay)
            torch._foreach_add_(ema_float, src_float, alpha=1.0 - self.decay)
        for e, s in zip(ema_params, src_params):
            if not e.is_floating_point():
                e.copy_(s)
        for e, s in zip(self.module.buffers(), online.buffers()):
            e.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        """State of the averaged copy (same keys as the bare model's ``state_dict``)."""
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> Any:
        """Restore the averaged copy from :meth:`state_dict` output."""
        return self.module.load_state_dict(state_dict, strict=strict)
