"""Projection head g and supervised linear head (SPEC §2).

The projection head follows the reference ``projection_head`` in ``nonlinear`` mode
(SPEC §2.1): ``num_layers - 1`` hidden layers ``Linear(in -> in, no bias) -> BN(gamma,
beta) -> ReLU`` and a last layer ``Linear(in -> out_dim, no bias) -> BN(gamma, no beta)``
without ReLU.  Dense kernels are N(0, 0.01) (SPEC §1.6).  The reference's ``linear`` mode
is exactly ``num_layers=1``; ``none`` is ``num_layers=0``.

``forward`` returns the reference's ``hiddens_list``: index 0 is the head input
(avg-pool features), index ``j`` the output of layer ``j`` (after ReLU for hidden
layers).  Fine-tuning picks entry ``ft_proj_selector`` (SPEC §2.1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .batchnorm import batch_norm_1d

__all__ = ["HEAD_INIT_STD", "ProjectionLayer", "ProjectionHead", "LinearClassifier", "truncate_head"]

#: Std of the normal init of head dense kernels (SPEC §1.6, §2.2).
HEAD_INIT_STD = 0.01


class ProjectionLayer(nn.Module):
    """``Linear(no bias) -> BN -> [ReLU]``; the BN has a beta only when ``relu`` (hidden layer).

    TF's hidden layers use the BN beta as "bias"; the last layer uses ``center=False`` so
    its BN has gamma but no beta (``bn.bias is None``), SPEC §2.1.
    """

    # Python-only properties: TorchScript must not try to compile them (``torch.jit.script``).
    __jit_unused_properties__ = ["out_dim"]

    def __init__(self, in_dim: int, out_dim: int, relu: bool) -> None:
        super().__init__()
        self.relu = relu
        self.linear = nn.Linear(in_dim, out_dim, bias=False)
        self.bn = batch_norm_1d(out_dim, center=relu)
        nn.init.normal_(self.linear.weight, std=HEAD_INIT_STD)

    @property
    def out_dim(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.linear(x))
        return F.relu(x) if self.relu else x

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


class ProjectionHead(nn.Module):
    """SimCLRv2 projection head (SPEC §2.1).

    Args:
        in_dim: encoder feature width (2048w for bottleneck nets); hidden layers keep it.
        num_layers: number of dense layers (3 for SimCLRv2, 2 for v1, 0 = identity).
        out_dim: width of the last layer (``proj_out_dim``, 128).
    """

    # Python-only properties: TorchScript must not try to compile them (``torch.jit.script``).
    __jit_unused_properties__ = ["num_layers", "out_dim"]

    def __init__(self, in_dim: int, num_layers: int = 3, out_dim: int = 128) -> None:
        super().__init__()
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        self.in_dim = in_dim
        layers = [
            ProjectionLayer(in_dim, in_dim if j < num_layers - 1 else out_dim, relu=j < num_layers - 1)
            for j in range(num_layers)
        ]
        self.layers = nn.ModuleList(layers)

    @classmethod
    def from_layers(cls, in_dim: int, layers: list[ProjectionLayer] | nn.ModuleList) -> ProjectionHead:
        """A head made of the given (shared, not copied) layers."""
        head = cls(in_dim, num_layers=0)
        head.layers = nn.ModuleList(list(layers))
        return head

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def out_dim(self) -> int:
        """Width of the last activation (``in_dim`` for an empty head)."""
        return self.out_dim_at(-1)

    def _index(self, k: int) -> int:
        n = self.num_layers
        if not -(n + 1) <= k <= n:
            raise ValueError(f"activation index {k} out of range for a head with {n} layers (valid: {-(n + 1)}..{n})")
        return k % (n + 1)

    def out_dim_at(self, k: int) -> int:
        """Width of activation ``k`` of :meth:`forward`'s list (0 = input; -1 = last)."""
        k = self._index(k)
        return self.in_dim if k == 0 else self.layers[k - 1].out_dim

    def forward(self, h: torch.Tensor) -> list[torch.Tensor]:
        """Return ``[h, layer1(h), layer2(layer1(h)), ...]`` (length ``num_layers + 1``)."""
        hiddens = [h]
        for layer in self.layers:
            hiddens.append(layer(hiddens[-1]))
        return hiddens

    def truncate(self, k: int) -> ProjectionHead:
        """Head keeping exactly the first ``k`` layers (``k=-1``: all; ``0``: none).

        This is how the reference fine-tunes "from layer ``k``" (``ft_proj_selector=k``):
        keep layers ``1..k`` with their BN (+ReLU), drop the rest (SPEC §2.1).  The kept
        layers are shared with ``self`` (use ``copy.deepcopy`` for an independent copy);
        state-dict keys are unchanged, so checkpoints of the full head load with
        ``strict=False``.
        """
        k = self._index(k)
        return ProjectionHead.from_layers(self.in_dim, list(self.layers)[:k])

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, num_layers={self.num_layers}, out_dim={self.out_dim}"


def truncate_head(head: ProjectionHead | None, k: int) -> ProjectionHead | None:
    """Functional form of :meth:`ProjectionHead.truncate` (``None`` stays ``None``)."""
    return None if head is None else head.truncate(k)


class LinearClassifier(nn.Linear):
    """Supervised head: one dense layer with bias (``head_supervised``, SPEC §2.2).

    ``zero_init=True`` mirrors ``zero_init_logits_layer`` (weight and bias 0, used by all
    fine-tune / linear-eval commands of the reference); otherwise N(0, 0.01) weight and
    zero bias.  It is an ``nn.Linear``, so its state-dict keys are ``weight`` / ``bias``.
    """

    def __init__(self, in_dim: int, num_classes: int, zero_init: bool = True) -> None:
        super().__init__(in_dim, num_classes, bias=True)
        self.zero_init = zero_init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not hasattr(self, "zero_init"):  # called by nn.Linear.__init__; redone afterwards
            return
        with torch.no_grad():
            if self.zero_init:
                nn.init.zeros_(self.weight)
            else:
                nn.init.normal_(self.weight, std=HEAD_INIT_STD)
            nn.init.zeros_(self.bias)

    def reset_to_zero(self) -> LinearClassifier:
        """Zero weight and bias in place (``zero_init_logits_layer`` after a restore)."""
        with torch.no_grad():
            self.weight.zero_()
            self.bias.zero_()
        return self
