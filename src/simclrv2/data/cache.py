"""Decode a whole source once into memory.

Re-decoding 50,000 CIFAR JPEGs every epoch costs more than a small ResNet's step on a
GPU; holding them as one uint8 tensor (150 MB) costs nothing. Any source whose canvas
tensor fits under a byte budget is therefore cached by :func:`load_dataset` by default.
"""

from __future__ import annotations

import sys

import torch
from tqdm.auto import tqdm

from .errors import DataError
from .loader import BatchIterator
from .sources import ImageSource, TensorImageSource

__all__ = ["DEFAULT_CACHE_BYTES", "cache_nbytes", "fits_in_memory", "cache_in_memory"]

DEFAULT_CACHE_BYTES = 4 * 1024**3
"""Default budget (4 GiB): CIFAR/STL-sized sets are cached, ImageNet is not."""


def cache_nbytes(source: ImageSource) -> int:
    """Bytes of the uint8 ``[N, 3, H, W]`` tensor caching ``source`` would allocate."""
    h, w = source.canvas_size
    return len(source) * 3 * h * w


def fits_in_memory(source: ImageSource, max_bytes: int | None = DEFAULT_CACHE_BYTES) -> bool:
    """Whether caching ``source`` stays within ``max_bytes`` (``None`` = no limit)."""
    return max_bytes is None or cache_nbytes(source) <= max_bytes


def cache_in_memory(
    source: ImageSource,
    *,
    max_bytes: int | None = DEFAULT_CACHE_BYTES,
    num_workers: int = 2,
    batch_size: int = 256,
    progress: bool | None = None,
) -> TensorImageSource:
    """Decode every image of ``source`` (in ``num_workers`` processes) into one tensor.

    Returns ``source`` itself if it is already in memory. Raises :class:`DataError` when
    the cache would exceed ``max_bytes`` (pass ``None`` to force it). ``progress=None``
    shows a progress bar only when stderr is a terminal.
    """
    if isinstance(source, TensorImageSource):
        return source
    needed = cache_nbytes(source)
    if not fits_in_memory(source, max_bytes):
        raise DataError(
            f"caching {len(source)} images of canvas {source.canvas_size} needs {needed / 2**30:.2f} GiB, "
            f"over the {max_bytes / 2**30:.2f} GiB limit; read from disk instead or raise the limit"
        )
    images = torch.empty((len(source), 3, *source.canvas_size), dtype=torch.uint8)
    sizes = torch.empty((len(source), 2), dtype=torch.long)
    batches = BatchIterator(source, batch_size, shuffle=False, drop_last=False, num_workers=num_workers)
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=len(source), unit="img", desc="decoding images", disable=not show) as bar:
        for batch in batches:
            images[batch.indices] = batch.images
            sizes[batch.indices] = batch.sizes
            bar.update(batch.indices.numel())
    batches.close()
    return TensorImageSource(
        images, source.labels.clone(), source.classes, sizes=sizes, paths=source.paths, root=source.root
    )
