"""Decode a whole source once into memory.

Re-decoding 50,000 CIFAR JPEGs every epoch costs more than a small ResNet's step on a
GPU; holding them as one uint8 tensor (150 MB) costs nothing. Any source whose canvas
tensor fits under a byte budget is therefore cached by :func:`load_dataset` by default.
Because caching decodes every file anyway, it is also where unreadable files are found:
they are either reported (``strict``) or dropped with a warning.
"""

from __future__ import annotations

import logging
import sys

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from simclrv2.errors import DataError
from .loader import quiet_abandoned_transfers
from .sources import Batch, ImageSource, TensorImageSource

__all__ = ["DEFAULT_CACHE_BYTES", "cache_nbytes", "fits_in_memory", "cache_in_memory"]

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 4 * 1024**3
"""Default budget (4 GiB): CIFAR/STL-sized sets are cached, ImageNet is not."""


def cache_nbytes(source: ImageSource) -> int:
    """Bytes of the uint8 ``[N, 3, H, W]`` tensor caching ``source`` would allocate."""
    h, w = source.canvas_size
    return len(source) * 3 * h * w


def fits_in_memory(source: ImageSource, max_bytes: int | None = DEFAULT_CACHE_BYTES) -> bool:
    """Whether caching ``source`` stays within ``max_bytes`` (``None`` = no limit)."""
    return max_bytes is None or cache_nbytes(source) <= max_bytes


class _Chunks(Dataset):
    """Decodes one chunk of indices; with ``strict=False`` a failing chunk is retried
    image by image and the unreadable ones are reported instead of raised."""

    def __init__(self, source: ImageSource, strict: bool) -> None:
        self.source, self.strict = source, strict

    def __getitem__(self, indices: torch.Tensor) -> tuple[Batch, list[tuple[int, str]]]:
        try:
            return self.source.get_batch(indices), []
        except DataError:
            if self.strict:
                raise
        h, w = self.source.canvas_size
        images = torch.zeros((indices.numel(), 3, h, w), dtype=torch.uint8)
        sizes = torch.zeros((indices.numel(), 2), dtype=torch.long)
        failed = []
        for row, i in enumerate(indices.tolist()):
            try:
                one = self.source.get_batch([i])
            except DataError as exc:
                failed.append((i, str(exc)))
                continue
            images[row], sizes[row] = one.images[0], one.sizes[0]
        return Batch(images, sizes, self.source.labels[indices], indices), failed

    def __len__(self) -> int:
        return len(self.source)


def _identity(item):
    return item


def cache_in_memory(
    source: ImageSource,
    *,
    max_bytes: int | None = DEFAULT_CACHE_BYTES,
    num_workers: int = 2,
    batch_size: int = 256,
    progress: bool | None = None,
    strict: bool = True,
    report=None,
) -> TensorImageSource:
    """Decode every image of ``source`` (in ``num_workers`` processes) into one tensor.

    Returns ``source`` itself if it is already in memory. Raises :class:`DataError` when
    the cache would exceed ``max_bytes`` (pass ``None`` to force it). With
    ``strict=False`` unreadable images are left out of the result (logged as a warning
    naming up to 10 files) instead of raising. ``progress=None`` shows a progress bar
    only when stderr is a terminal. With a ``report`` (a :class:`~simclrv2.data.scan.ScanReport`)
    the skipped images are recorded there by kind instead of being logged here.
    """
    if isinstance(source, TensorImageSource):
        return source
    if not fits_in_memory(source, max_bytes):
        raise DataError(
            f"caching {len(source)} images of canvas {source.canvas_size} needs "
            f"{cache_nbytes(source) / 2**30:.2f} GiB, over the {max_bytes / 2**30:.2f} GiB limit; "
            "read from disk instead or raise the limit"
        )
    n = len(source)
    images = torch.empty((n, 3, *source.canvas_size), dtype=torch.uint8)
    sizes = torch.empty((n, 2), dtype=torch.long)
    chunks = list(torch.arange(n).split(batch_size))
    dataset = _Chunks(source, strict)
    if num_workers > 0:
        quiet_abandoned_transfers()  # this (main) process hands index chunks to the workers
        results = DataLoader(dataset, batch_size=None, sampler=chunks, num_workers=num_workers, collate_fn=_identity,
                             worker_init_fn=quiet_abandoned_transfers)
    else:
        results = (dataset[c] for c in chunks)
    failed: list[tuple[int, str]] = []
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=n, unit="img", desc="decoding images", disable=not show) as bar:
        for batch, bad in results:
            images[batch.indices] = batch.images
            sizes[batch.indices] = batch.sizes
            failed.extend(bad)
            bar.update(batch.indices.numel())
    labels, paths = source.labels.clone(), source.paths
    if failed:
        if len(failed) == n:
            raise DataError(f"none of the {n} images could be decoded; first error: {failed[0][1]}")
        if report is not None:
            from .scan import error_kind
            for i, msg in failed:
                name = paths[i] if paths is not None else str(i)
                report.add(error_kind(msg), name, msg.split(": ", 1)[-1] if ": " in msg else msg)
        else:
            shown = "; ".join(msg for _, msg in failed[:10])
            log.warning("skipped %d unreadable image(s) of %d: %s", len(failed), n, shown)
        keep = torch.ones(n, dtype=torch.bool)
        keep[[i for i, _ in failed]] = False
        images, sizes, labels = images[keep], sizes[keep], labels[keep]
        paths = [p for p, k in zip(paths, keep.tolist()) if k] if paths is not None else None
    return TensorImageSource(images, labels, source.classes, sizes=sizes, paths=paths, root=source.root)
