"""Random horizontal flips (SPEC §6 step 2: each view is mirrored with p = 0.5).

The pipeline folds the flip into the crop's column taps (:func:`crop_and_resize` ``flip=``),
so it costs nothing; :func:`random_horizontal_flip` is the standalone form.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._rows import bernoulli


def sample_flips(batch: int, generator: torch.Generator, p: float = 0.5) -> Tensor:
    """Bool [B]: which images to mirror (each with probability ``p``)."""
    return bernoulli(batch, p, generator)


def horizontal_flip(x: Tensor, flips: Tensor) -> Tensor:
    """Mirror the rows of ``x`` [B, C, H, W] where ``flips`` [B] is true (``torch.where``)."""
    return torch.where(flips.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)


def random_horizontal_flip(x: Tensor, generator: torch.Generator, p: float = 0.5) -> Tensor:
    """Mirror each image of ``x`` independently with probability ``p``."""
    return horizontal_flip(x, sample_flips(x.shape[0], generator, p))
