"""Learning-rate scaling, warmup + cosine schedule and step counts (SPEC §5).

Mirrors the reference ``learning_rate_schedule`` / ``WarmUpAndCosineDecay``:

* ``scaled_lr = base·B/256`` (linear) or ``base·sqrt(B)`` (sqrt; SimCLRv2 uses
  0.1·sqrt(4096) = 6.4), B = global batch size;
* ``warmup_steps = int(round(warmup_epochs · num_examples // B))``, linear ramp from 0;
* cosine decay to 0 over ``total_steps − warmup_steps``;
* ``total_steps = num_examples · epochs // B + 1`` (the reference's +1; 800 epochs of
  ImageNet at 4096 gives the released checkpoints' 250,228 steps, SPEC §8).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "scale_learning_rate",
    "WarmupCosineSchedule",
    "steps_for",
    "warmup_steps_for",
]


def scale_learning_rate(base_lr: float, batch_size: int, scaling: str = "linear") -> float:
    """Peak learning rate for a global batch: ``base·B/256`` or ``base·sqrt(B)``."""
    if scaling == "linear":
        return base_lr * batch_size / 256.0
    if scaling == "sqrt":
        return base_lr * math.sqrt(batch_size)
    raise ValueError(f"unknown learning-rate scaling {scaling!r} (use 'linear' or 'sqrt')")


def steps_for(num_examples: int, epochs: float, batch_size: int) -> int:
    """Total training steps ``num_examples·epochs // B + 1`` (reference's +1)."""
    return int(num_examples * epochs // batch_size) + 1


def warmup_steps_for(warmup_epochs: float, num_examples: int, batch_size: int) -> int:
    """Warmup steps ``int(round(warmup_epochs · num_examples // B))`` (floor, then round)."""
    return int(round(warmup_epochs * num_examples // batch_size))


class WarmupCosineSchedule:
    """Linear warmup from 0 to ``peak_lr`` then cosine decay to 0 at ``total_steps``.

    ``lr_at(step)`` is ``step/warmup·peak`` for ``step < warmup`` and
    ``peak·½(1+cos(π·(step−warmup)/(total−warmup)))`` afterwards, clamped to 0 at and after
    ``total_steps`` (TF ``cosine_decay`` clips the step).
    """

    def __init__(self, peak_lr: float, warmup_steps: int, total_steps: int) -> None:
        if warmup_steps < 0 or total_steps < 0:
            raise ValueError("warmup_steps and total_steps must be >= 0")
        if warmup_steps > total_steps:
            raise ValueError(f"warmup_steps ({warmup_steps}) > total_steps ({total_steps})")
        self.peak_lr = float(peak_lr)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)

    def lr_at(self, step: int) -> float:
        """Learning rate at global step ``step`` (0-based, as TF's global_step)."""
        if step < self.warmup_steps:
            return step / self.warmup_steps * self.peak_lr
        if step >= self.total_steps:
            return 0.0
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return self.peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    __call__ = lr_at

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's ``lr`` to ``lr_at(step)·group.get('lr_scale', 1)``; return lr_at(step)."""
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr
