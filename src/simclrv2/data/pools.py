"""Unlabelled pools and CSV-labelled sets, and the one training source made of both.

SimCLRv2 users typically hold a large pool of unlabelled images and a small labelled set
(paper §1). Pretraining and distillation train on the union (SPEC §0: the unlabelled pool is
every training image); fine-tuning, linear evaluation and the probe/kNN monitors use only the
images with labels. Here:

* :func:`load_unlabeled_pool`: every image under one or more folders, recursively, in any
  structure (flat, nested, or class folders whose names are ignored), label -1;
* :func:`load_labels_csv` -- the labelled images named in a ``path,label`` CSV;
* :func:`combine_sources` -- labelled source first, then the pool, as one source: an in-memory
  tensor when both parts are in memory, else a :class:`ConcatImageSource`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from simclrv2.errors import DataError
from .cache import DEFAULT_CACHE_BYTES
from .datasets import _check_scan, finish_folder_source
from .folders import IMAGE_EXTENSIONS, list_images
from .labels_csv import read_labels_csv
from .scan import ScanReport, check_samples
from .sources import Batch, FolderImageSource, ImageSource, IndexLike, TensorImageSource, as_index_tensor

__all__ = ["ConcatImageSource", "combine_sources", "load_labels_csv", "load_unlabeled_pool"]


def load_unlabeled_pool(folders: Sequence[str | Path], canvas_size: int | tuple[int, int], *,
                        classes: Sequence[str] = (), num_workers: int = 2, strict: bool = False,
                        max_cache_bytes: int = DEFAULT_CACHE_BYTES) -> ImageSource:
    """Every image under ``folders`` (recursively; folder names ignored) with label -1. ``classes``
    are the labelled set's, so the pool can be combined with it."""
    samples: list[tuple[Path, int]] = []
    seen: set[Path] = set()
    for folder in folders:
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise DataError(f"unlabeled: {root} is not a folder")
        files = list_images(root)
        if not files:
            raise DataError(f"unlabeled: no images found under {root} (looked for "
                            f"{', '.join(sorted(IMAGE_EXTENSIONS))} in any letter case)")
        for file in files:
            key = file.resolve()
            if key not in seen:  # a folder given twice, or nested in another one, counts once
                seen.add(key)
                samples.append((file.absolute(), -1))
    report = ScanReport(", ".join(str(f) for f in folders))
    readable = check_samples(samples, report)
    _check_scan(report, strict=False, warn=False)
    pool = FolderImageSource(readable, classes, canvas_size)
    return finish_folder_source(pool, report, num_workers=num_workers, strict=strict,
                                max_cache_bytes=max_cache_bytes)


def load_labels_csv(csv_file: str | Path, canvas_size: int | tuple[int, int], *, image_size: int | None = None,
                    num_workers: int = 2, strict: bool = False,
                    max_cache_bytes: int = DEFAULT_CACHE_BYTES) -> ImageSource:
    """The labelled images of a ``path,label`` CSV (see :mod:`.labels_csv`); ``paths`` are relative to
    the CSV's folder, which is what ``--labeled-list`` entries are then matched against."""
    samples, classes = read_labels_csv(csv_file)
    base = Path(csv_file).expanduser().parent
    report = ScanReport(str(csv_file))
    readable = check_samples(samples, report, crop_size=image_size, relative_to=base)
    _check_scan(report, strict=False, warn=False)
    root = base if all(_inside(p, base) for p, _ in readable) else None
    source = FolderImageSource(readable, classes, canvas_size, root=root)
    return finish_folder_source(source, report, num_workers=num_workers, strict=strict,
                                max_cache_bytes=max_cache_bytes)


def _inside(path: Path, base: Path) -> bool:
    try:
        path.relative_to(base)
    except ValueError:
        return False
    return True


class ConcatImageSource(ImageSource):
    """``first`` then ``second`` as one source (same canvas); labels and classes are ``first``'s
    (``second`` is an unlabelled pool). Paths: ``first``'s as they are, then ``second``'s absolute."""

    def __init__(self, first: ImageSource, second: ImageSource) -> None:
        if tuple(first.canvas_size) != tuple(second.canvas_size):
            raise DataError(f"cannot combine sources of canvas {first.canvas_size} and {second.canvas_size}")
        self.first, self.second = first, second
        self.offset = len(first)
        self.labels = torch.cat([first.labels, second.labels])
        self.classes = list(first.classes)
        self.paths = (list(first.paths) + list(second.paths or [str(i) for i in range(len(second))])
                      if first.paths is not None else None)
        self.root = first.root

    @property
    def canvas_size(self) -> tuple[int, int]:
        return tuple(self.first.canvas_size)  # type: ignore[return-value]

    def get_batch(self, indices: IndexLike) -> Batch:
        idx = as_index_tensor(indices, len(self))
        in_first = idx < self.offset
        images = torch.empty((idx.numel(), 3, *self.canvas_size), dtype=torch.uint8)
        sizes = torch.empty((idx.numel(), 2), dtype=torch.long)
        out_idx = idx.clone()
        for mask, source, shift in ((in_first, self.first, 0), (~in_first, self.second, self.offset)):
            if mask.any():
                part = source.get_batch(idx[mask] - shift)
                images[mask], sizes[mask], out_idx[mask] = part.images, part.sizes, part.indices + shift
        return Batch(images, sizes, self.labels.index_select(0, out_idx), out_idx)


def combine_sources(labeled: ImageSource | None, pool: ImageSource | None) -> ImageSource:
    """One training source: the labelled images first (so their indices are unchanged), then the pool."""
    if pool is None:
        if labeled is None:
            raise DataError("no training images: give --data, --labels or --unlabeled")
        return labeled
    if labeled is None:
        return pool
    if isinstance(labeled, TensorImageSource) and isinstance(pool, TensorImageSource):
        paths = None
        if labeled.paths is not None:
            paths = list(labeled.paths) + list(pool.paths or [str(i) for i in range(len(pool))])
        combined = TensorImageSource(torch.cat([labeled.images, pool.images]),
                                     torch.cat([labeled.labels, pool.labels]), labeled.classes,
                                     sizes=torch.cat([labeled.sizes, pool.sizes]), paths=paths, root=labeled.root)
        return combined
    return ConcatImageSource(labeled, pool)
