"""LARS optimiser as in the SimCLR reference (``lars_optimizer.py``; SPEC §4).

Per parameter w with gradient g, for groups that are not ``exclude``-d:

1. ``g ← g + wd·w`` (weight decay added to the gradient, not to the loss);
2. ``trust = eeta·‖w‖/‖g‖`` if both norms are > 0, else 1 (no clipping, no
   ``‖w‖/(‖g‖+wd‖w‖)`` form: g already contains ``wd·w``);
3. classic momentum with the learning rate inside: ``v ← m·v + lr·trust·g``;
   ``w ← w − v`` (Nesterov: ``w ← w − (m·v + lr·trust·g)``, off by default).

``exclude=True`` groups get neither weight decay nor adaptation (trust 1), i.e. plain
momentum SGD with the raw lr; SimCLR puts BN parameters, biases and the supervised head
there (SPEC §4) — see :func:`lars_param_groups`; the supervised head then receives its
L2 via :func:`l2_penalty` in the loss, as the reference's ``add_weight_decay`` does.

Only the reference's default ``classic_momentum=True`` variant is implemented.
Everything stays on the device: norms come from ``torch._foreach_norm`` and the
"both norms > 0" test is a ``torch.where``, so a step issues no host-device sync.
The momentum buffer starts at zero (TF slot initialisation) and lives in
``state[p]['momentum_buffer']`` so the standard optimiser ``state_dict`` round-trips.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["EETA_DEFAULT", "LARS", "lars_param_groups", "l2_penalty"]

EETA_DEFAULT = 0.001


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling with classic momentum (SPEC §4).

    Param-group keys: ``lr``, ``momentum`` (0.9), ``weight_decay`` (0), ``eeta`` (1e-3),
    ``exclude`` (False: apply weight decay and trust ratio; True: neither),
    ``nesterov`` (False).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eeta: float = EETA_DEFAULT,
        exclude: bool = False,
        nesterov: bool = False,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if momentum < 0.0:
            raise ValueError(f"invalid momentum {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        if eeta <= 0.0:
            raise ValueError(f"invalid eeta {eeta}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            eeta=eeta,
            exclude=exclude,
            nesterov=nesterov,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Apply one LARS update to every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            buffers: list[Tensor] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
                params.append(p)
                grads.append(p.grad)
                buffers.append(state["momentum_buffer"])
            if params:
                _lars_update(params, grads, buffers, group)
        return loss


def _trust_ratios(params: list[Tensor], grads: list[Tensor], eeta: float) -> list[Tensor]:
    """Per-parameter ``eeta·‖w‖/‖g‖`` (1 where either norm is 0), as 0-d device tensors."""
    w_norms = torch._foreach_norm(params)
    g_norms = torch._foreach_norm(grads)
    # at least fp32 (bf16 norms are too coarse), fp64 when any parameter is fp64
    dtype = torch.float32
    for p in params:
        dtype = torch.promote_types(dtype, p.dtype)
    device = params[0].device
    if all(p.device == device for p in params):
        w = torch.stack([n.to(dtype) for n in w_norms])
        g = torch.stack([n.to(dtype) for n in g_norms])
        trust = torch.where((w > 0) & (g > 0), eeta * w / g, torch.ones_like(w))
        return list(trust.unbind())
    out = []
    for w, g in zip(w_norms, g_norms):
        w, g = w.to(dtype), g.to(dtype)
        out.append(torch.where((w > 0) & (g > 0), eeta * w / g, torch.ones_like(w)))
    return out


def _lars_update(
    params: list[Tensor], grads: list[Tensor], buffers: list[Tensor], group: dict[str, Any]
) -> None:
    lr = group["lr"]
    momentum = group["momentum"]
    weight_decay = group["weight_decay"]
    exclude = group["exclude"]

    if not exclude and weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if exclude:
        scaled = torch._foreach_mul(grads, lr)
    else:
        scaled = torch._foreach_mul(grads, _trust_ratios(params, grads, group["eeta"]))
        torch._foreach_mul_(scaled, lr)

    torch._foreach_mul_(buffers, momentum)
    torch._foreach_add_(buffers, scaled)
    if group["nesterov"]:
        update = torch._foreach_mul(buffers, momentum)
        torch._foreach_add_(update, scaled)
    else:
        update = buffers
    torch._foreach_sub_(params, update)


def lars_param_groups(
    model: nn.Module,
    weight_decay: float,
    exclude_names: tuple[str, ...] = ("classifier",),
) -> list[dict[str, Any]]:
    """Split trainable parameters into an adapted group and an excluded group (SPEC §4).

    The reference excludes by variable name ``batch_normalization``, ``bias`` and
    ``head_supervised``. Here BN weights/biases and all biases are recognised by shape
    (``ndim <= 1``), and the supervised head by any of ``exclude_names`` appearing in the
    parameter name. Excluded parameters get no weight decay and trust ratio 1. Empty
    groups are dropped.
    """
    adapted: list[nn.Parameter] = []
    excluded: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or any(key in name for key in exclude_names):
            excluded.append(p)
        else:
            adapted.append(p)
    groups = [
        {"params": adapted, "weight_decay": weight_decay, "exclude": False},
        {"params": excluded, "weight_decay": 0.0, "exclude": True},
    ]
    return [g for g in groups if g["params"]]


def l2_penalty(module: nn.Module, weight_decay: float) -> Tensor:
    """``wd · Σ ‖W‖² / 2`` over trainable weights with ``ndim > 1`` (biases skipped).

    The reference adds this to the loss for the supervised head when training with LARS,
    because LARS excludes that head from its own weight decay (SPEC §4).
    """
    weights = [p for p in module.parameters() if p.requires_grad and p.ndim > 1]
    if not weights:
        p0 = next(module.parameters(), None)
        device = p0.device if p0 is not None else None
        return torch.zeros((), device=device)
    total = torch.stack([w.float().pow(2).sum() for w in weights]).sum()
    return weight_decay * total / 2
