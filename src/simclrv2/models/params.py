"""Parameter counting with the rule that reproduces Table 1 of the paper (SPEC §11).

The reference colab sums the sizes of every checkpoint variable except optimizer slots,
EMA copies, memory and heads.  A TF checkpoint stores, per BN, gamma, beta *and* the
moving mean / variance, so the count is: all conv kernels + 4 numbers per BN channel
(rounded to millions it matches all 13 Table-1 entries; trainable-only does not).
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["count_params_paper", "count_trainable_params"]


def count_params_paper(module: nn.Module) -> int:
    """Number of TF checkpoint variables' elements of ``module`` (SPEC §11 rule).

    Counts every parameter (conv kernels, BN gamma/beta, and any biases, e.g. of the
    optional SE convs) plus each BatchNorm's ``running_mean`` and ``running_var``;
    ``num_batches_tracked`` is excluded.  Pass the encoder alone to get the Table-1
    number (heads are not part of it).  Uses shapes only, so it works on meta modules.
    """
    total = sum(p.numel() for p in module.parameters())
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            for buf in (m.running_mean, m.running_var):
                if buf is not None:
                    total += buf.numel()
    return total


def count_trainable_params(module: nn.Module) -> int:
    """Plain ``numel`` of parameters (the usual PyTorch count, e.g. torchvision's)."""
    return sum(p.numel() for p in module.parameters())
