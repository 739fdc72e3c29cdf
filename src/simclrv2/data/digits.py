"""The embedded default dataset: scikit-learn's bundled handwritten digits.

Why: the library must run end to end offline and in seconds (tests, smoke runs, the
CPU quick-start), so it needs a dataset that ships with a dependency. ``load_digits``
has 1,797 grayscale 8x8 images with 17 gray levels (0..16) in 10 classes.

Conversion: values are scaled to uint8 by ``round(v * 255 / 16)`` (0 -> 0, 16 -> 255),
replicated to 3 channels, and upsampled 4x with **nearest neighbour** to 32x32, so the
CIFAR stem and CIFAR augmentation preset apply unchanged and no interpolation invents
gray levels (every 32x32 image is exactly a blown-up 8x8 one).

Split: fixed, stratified, RNG-free so it is identical with any library version. Within
each class the images are ordered by a BLAKE2b hash of their index (a fixed
pseudo-random permutation); every image gets the key ``(rank_in_class + 0.5) /
class_size``; all images are sorted by ``(key, class)`` and the first 1,500 form the
train split, the remaining 297 the test split (each split is returned in the original
dataset order). Every prefix of that ordering is class-balanced, so both splits keep
the class proportions to within one image.
"""

from __future__ import annotations

import hashlib

import torch

from simclrv2.errors import DataError
from .sources import TensorImageSource

__all__ = ["DIGITS_TRAIN_SIZE", "digits_split_indices", "load_digits_source"]

DIGITS_TRAIN_SIZE = 1500
_UPSAMPLE = 4


def _hash_key(index: int) -> bytes:
    return hashlib.blake2b(f"simclrv2-digits-{index}".encode(), digest_size=8).digest()


def digits_split_indices(labels: torch.Tensor, train_size: int = DIGITS_TRAIN_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted ``(train, test)`` indices of the fixed stratified split described above."""
    keyed = []
    for cls in sorted(set(labels.tolist())):
        members = sorted(torch.nonzero(labels == cls).flatten().tolist(), key=_hash_key)
        keyed.extend(((rank + 0.5) / len(members), cls, idx) for rank, idx in enumerate(members))
    keyed.sort()
    order = [idx for _, _, idx in keyed]
    train = torch.tensor(sorted(order[:train_size]), dtype=torch.long)
    test = torch.tensor(sorted(order[train_size:]), dtype=torch.long)
    return train, test


def load_digits_source(split: str = "train") -> TensorImageSource:
    """The digits ``train`` (1,500) or ``test`` (297) split as a 32x32 in-memory source."""
    if split not in ("train", "test"):
        raise DataError(f"digits has splits 'train' and 'test'; got {split!r}")
    from sklearn.datasets import load_digits  # heavy import, only when used

    bunch = load_digits()
    values = torch.from_numpy(bunch.images).round().to(torch.long)  # [N, 8, 8], 0..16
    labels = torch.from_numpy(bunch.target).to(torch.long)
    gray = ((values * 255 + 8) // 16).clamp(0, 255).to(torch.uint8)
    big = gray.repeat_interleave(_UPSAMPLE, dim=1).repeat_interleave(_UPSAMPLE, dim=2)
    images = big.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()  # [N, 3, 32, 32]
    train, test = digits_split_indices(labels)
    idx = train if split == "train" else test
    classes = [str(int(c)) for c in bunch.target_names]
    return TensorImageSource(images[idx].clone(), labels[idx].clone(), classes)
