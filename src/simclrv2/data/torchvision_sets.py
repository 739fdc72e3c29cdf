"""CIFAR-10/100 and STL-10 through torchvision's dataset classes, held in memory.

torchvision already loads these sets into numpy arrays, so wrapping them as a
:class:`TensorImageSource` costs one view and makes every epoch decode-free. Files are
only fetched with ``download=True``; otherwise a missing dataset raises
:class:`DataError` pointing at ``--download`` or at using an image folder instead
(useful on machines without network access).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from simclrv2.errors import DataError
from .sources import TensorImageSource

__all__ = ["TORCHVISION_SPLITS", "default_data_root", "load_torchvision_source"]

TORCHVISION_SPLITS = {
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "stl10": ("train", "test", "unlabeled", "train+unlabeled"),
}


def default_data_root() -> Path:
    """Where named datasets live: ``$SIMCLRV2_DATA_ROOT`` or ``~/.cache/simclrv2/datasets``."""
    return Path(os.environ.get("SIMCLRV2_DATA_ROOT", "~/.cache/simclrv2/datasets")).expanduser()


def _construct(name: str, root: Path, split: str, download: bool):
    from torchvision import datasets  # deferred: importing torchvision.datasets is slow

    if name == "cifar10":
        return datasets.CIFAR10(str(root), train=split == "train", download=download)
    if name == "cifar100":
        return datasets.CIFAR100(str(root), train=split == "train", download=download)
    return datasets.STL10(str(root), split=split, download=download)


def load_torchvision_source(
    name: str, split: str = "train", *, data_root: str | Path | None = None, download: bool = False
) -> TensorImageSource:
    """Load ``name`` (``cifar10``/``cifar100``/``stl10``) ``split`` into memory.

    STL-10's ``unlabeled`` split (100,000 images) has label -1 everywhere; ``train`` is
    its 5,000 labelled images. Raises :class:`DataError` if the files are absent and
    ``download`` is False, or if the download fails.
    """
    if name not in TORCHVISION_SPLITS:
        raise DataError(f"unknown torchvision dataset {name!r}; known: {', '.join(TORCHVISION_SPLITS)}")
    if split not in TORCHVISION_SPLITS[name]:
        raise DataError(f"{name} has splits {', '.join(TORCHVISION_SPLITS[name])}; got {split!r}")
    root = Path(data_root).expanduser() if data_root is not None else default_data_root()
    try:
        ds = _construct(name, root, split, download)
    except (RuntimeError, OSError) as exc:
        if download:
            raise DataError(f"could not download {name} into {root}: {exc}") from exc
        raise DataError(
            f"{name} not found under {root}. Pass --download (download=True) to fetch it, set "
            f"--data-root to where it lives, or point --data at an image folder "
            f"(ROOT/train/<class>/*, ROOT/test/<class>/*)"
        ) from exc
    data = torch.from_numpy(ds.data)
    if name.startswith("cifar"):  # numpy [N, 32, 32, 3] -> [N, 3, 32, 32]
        data = data.permute(0, 3, 1, 2)
        labels = torch.as_tensor(ds.targets, dtype=torch.long)
    else:  # STL-10 is stored [N, 3, 96, 96] already
        labels = torch.as_tensor(ds.labels, dtype=torch.long)
    return TensorImageSource(data.contiguous(), labels, list(ds.classes))
