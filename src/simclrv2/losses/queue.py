"""FIFO memory of momentum-encoder projections used as extra NT-Xent negatives.

Why: SimCLRv2 adds a MoCo-style memory (paper §2; SPEC §0: 64K entries, EMA 0.999, ~1%
gain) that the reference code leaves out (SPEC §9). The queue holds L2-normalised,
detached projections from the momentum (EMA) encoder; :func:`simclrv2.losses.ntxent.
contrastive_loss` appends them as negatives via its ``queue`` argument.

It is an ``nn.Module`` whose ``embeddings``, ``pointer`` and ``filled`` are buffers, so a
checkpoint restores the memory exactly. The write position and fill level are also kept
as Python ints (the buffers mirror them after every enqueue and are read back once on
``load_state_dict``): slicing the filled rows needs a host-side size, and keeping it on
the host means ``enqueue``/``negatives`` never force a device sync.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["NegativeQueue"]


class NegativeQueue(nn.Module):
    """Ring buffer of ``size`` rows of width ``dim``; the oldest rows are overwritten first.

    The caller decides what goes in: pass L2-normalised, detached projections (under DDP,
    the globally gathered batch so every rank keeps an identical queue). Rows are stored
    as given, in the buffer's dtype.
    """

    embeddings: Tensor
    pointer: Tensor
    filled: Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 0 or dim <= 0:
            raise ValueError(f"need size >= 0 and dim > 0, got size={size}, dim={dim}")
        self.size = int(size)
        self.dim = int(dim)
        self.register_buffer("embeddings", torch.zeros(self.size, self.dim))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self._pointer = 0
        self._filled = 0
        self.register_load_state_dict_post_hook(_sync_host_counters)

    def __len__(self) -> int:
        return self._filled

    @torch.no_grad()
    def enqueue(self, z: Tensor) -> None:
        """Append rows of ``z`` [B, dim] in order, overwriting the oldest entries.

        Equivalent to pushing the rows one by one: when ``B > size`` only the last
        ``size`` rows survive, and the write pointer advances by ``B`` modulo ``size``.
        """
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"expected [B, {self.dim}] rows, got {tuple(z.shape)}")
        batch = z.shape[0]
        if self.size == 0 or batch == 0:
            return
        rows = z.detach()[-self.size :].to(self.embeddings.dtype)
        start = (self._pointer + batch - rows.shape[0]) % self.size
        index = (torch.arange(rows.shape[0], device=self.embeddings.device) + start) % self.size
        self.embeddings.index_copy_(0, index, rows.to(self.embeddings.device))
        self._pointer = (self._pointer + batch) % self.size
        self._filled = min(self._filled + batch, self.size)
        self.pointer.fill_(self._pointer)
        self.filled.fill_(self._filled)

    def negatives(self) -> Tensor | None:
        """The filled rows (in storage order, which the loss does not care about), or None."""
        if self._filled == 0:
            return None
        return self.embeddings[: self._filled]

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"


def _sync_host_counters(module: nn.Module, incompatible_keys: object) -> None:
    """After ``load_state_dict``: refresh the host-side mirrors from the loaded buffers."""
    assert isinstance(module, NegativeQueue)
    module._pointer = int(module.pointer)
    module._filled = int(module.filled)
