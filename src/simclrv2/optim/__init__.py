"""Optimisation: LARS with SimCLR's exclusions (SPEC §4) and the warmup + cosine
learning-rate schedule with its scaling rules and step counts (SPEC §5)."""

from simclrv2.optim.lars import LARS, l2_penalty, lars_param_groups
from simclrv2.optim.schedule import (
    WarmupCosineSchedule,
    scale_learning_rate,
    steps_for,
    warmup_steps_for,
)

__all__ = [
    "LARS",
    "lars_param_groups",
    "l2_penalty",
    "WarmupCosineSchedule",
    "scale_learning_rate",
    "steps_for",
    "warmup_steps_for",
]
