"""Training objectives: NT-Xent with global negatives and momentum memory (SPEC §3, §0),
and distillation losses (paper Eq. 2/3, SPEC §0, §5)."""

from simclrv2.losses.distillation import distillation_loss, mixed_distillation_loss
from simclrv2.losses.ntxent import ContrastiveOutput, contrastive_loss, nt_xent
from simclrv2.losses.queue import NegativeQueue

__all__ = [
    "nt_xent",
    "contrastive_loss",
    "ContrastiveOutput",
    "distillation_loss",
    "mixed_distillation_loss",
    "NegativeQueue",
]
