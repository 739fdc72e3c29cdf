"""Labelled uint8 image sources: the one interface the training loop reads images from.

Augmentation happens batched on the device (see ``simclrv2.augment``), so a source only
has to hand out *undistorted* uint8 images of one fixed canvas shape plus the valid
region of each image. Two implementations cover the practical cases:

* :class:`TensorImageSource` -- everything decoded once into one ``[N, 3, H, W]`` uint8
  tensor; a batch is an ``index_select``. Used for CIFAR-sized data and the embedded
  digits set, where per-epoch decoding would dominate the step time.
* :class:`FolderImageSource` -- a sorted list of files decoded on demand with PIL and
  letterboxed into the canvas (see :mod:`simclrv2.data.decode`), for sets too large to
  keep in memory; :class:`~simclrv2.data.loader.BatchIterator` parallelises it.

Evaluation above 32 px reads :class:`EvalImageSource` instead: each file decoded at full
resolution and turned into its network input (centre crop of 0.875 of the full image, one
resize, SPEC §6) as it is read, so its batches are float32 ``[B, 3, S, S]`` ready for the
network (``preprocessed = True``), not canvases.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from .decode import EvalTransformLike, decode_image, eval_input
from simclrv2.errors import DataError

__all__ = ["Batch", "ImageSource", "TensorImageSource", "FolderImageSource", "EvalImageSource", "as_index_tensor"]

IndexLike = torch.Tensor | Sequence[int]


class Batch(NamedTuple):
    """One batch of undistorted images.

    ``images``: uint8 ``[B, 3, H, W]`` canvases; ``sizes``: int64 ``[B, 2]`` valid
    ``(h, w)`` of each image in the top-left of its canvas; ``labels``: int64 ``[B]``
    (-1 = unlabelled); ``indices``: int64 ``[B]`` positions in the source, so callers can
    map results back (e.g. to a labelled subset or a distillation target table).
    """

    images: torch.Tensor
    sizes: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor


def as_index_tensor(indices: IndexLike, length: int) -> torch.Tensor:
    """Indices as a 1-D int64 tensor, rejecting negatives and out-of-range values.

    Negative indices are refused rather than wrapped because a wrapped index silently
    reads the wrong image.
    """
    idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= length):
        raise IndexError(f"indices must lie in [0, {length}); got min {int(idx.min())}, max {int(idx.max())}")
    return idx


class ImageSource(ABC):
    """Abstract labelled image collection yielding uint8 batches of one canvas size.

    Attributes every source provides: ``labels`` (int64 ``[N]``, -1 = unlabelled),
    ``classes`` (names, index = label), and optionally ``paths`` (file paths relative to
    ``root``, used to match labelled-image lists; ``None`` for non-file datasets).
    """

    labels: torch.Tensor
    classes: list[str]
    paths: list[str] | None = None
    root: Path | None = None
    scan_report = None  # a simclrv2.data.scan.ScanReport for scanned image folders
    preprocessed = False
    """True when batches already hold the network input (float32 ``[B, 3, S, S]``, see
    :class:`EvalImageSource`) instead of uint8 canvases to be transformed."""

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def num_classes(self) -> int:
        """Number of class names (labels lie in ``[0, num_classes)`` or are -1)."""
        return len(self.classes)

    @property
    @abstractmethod
    def canvas_size(self) -> tuple[int, int]:
        """``(H, W)`` of the uint8 tensors this source yields."""

    @abstractmethod
    def get_batch(self, indices: IndexLike) -> Batch:
        """Images, valid sizes, labels and indices for ``indices`` (in that order)."""

    def __repr__(self) -> str:
        h, w = self.canvas_size
        return f"{type(self).__name__}(n={len(self)}, classes={self.num_classes}, canvas={h}x{w})"


def _paths_under(root: Path | None, files: list) -> list[str]:
    """Sample paths relative to ``root`` (POSIX strings; kept as given without a root). Also for
    relative roots (``--data some/folder``): paths then start with the root. An absolute path outside
    the root is an error (a sample list must not reach outside the data folder)."""
    paths: list[str] = []
    for path in files:
        p = Path(path)
        if root is not None:
            try:
                p = p.relative_to(root)
            except ValueError as exc:
                if p.is_absolute():
                    raise DataError(f"sample {p} lies outside the source root {root}") from exc
        paths.append(p.as_posix())
    return paths


def _check_labels(labels: torch.Tensor | Sequence[int], n: int) -> torch.Tensor:
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.numel() != n:
        raise ValueError(f"got {labels.numel()} labels for {n} images")
    return labels


class TensorImageSource(ImageSource):
    """All images in memory as one uint8 ``[N, 3, H, W]`` tensor (the decode cache).

    After the first decode no epoch decodes anything: ``get_batch`` is an
    ``index_select``. ``sizes`` defaults to the full canvas for every image.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | Sequence[int],
        classes: Sequence[str],
        *,
        sizes: torch.Tensor | None = None,
        paths: Sequence[str] | None = None,
        root: str | Path | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W]; got {images.dtype} {tuple(images.shape)}")
        n = images.shape[0]
        self.images = images
        self.labels = _check_labels(labels, n)
        self.classes = list(classes)
        if sizes is None:
            sizes = torch.tensor(images.shape[2:], dtype=torch.long).expand(n, 2).clone()
        self.sizes = torch.as_tensor(sizes, dtype=torch.long).reshape(n, 2)
        if paths is not None and len(paths) != n:
            raise ValueError(f"got {len(paths)} paths for {n} images")
        self.paths = list(paths) if paths is not None else None
        self.root = Path(root) if root is not None else None
        self._pinned = False

    @property
    def canvas_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    @property
    def nbytes(self) -> int:
        """Bytes held by the image tensor."""
        return self.images.numel()

    def pin_memory(self) -> "TensorImageSource":
        """Pin the image tensor (in place) so batches copy to the GPU asynchronously.

        Batches are then gathered straight into pinned buffers. A no-op without CUDA,
        so CPU-only runs can call it unconditionally. Returns ``self``.
        """
        if torch.cuda.is_available() and not self._pinned:
            self.images = self.images.pin_memory()
            self._pinned = True
        return self

    def get_batch(self, indices: IndexLike) -> Batch:
        idx = as_index_tensor(indices, len(self))
        if self._pinned:
            images = torch.empty((idx.numel(), 3, *self.canvas_size), dtype=torch.uint8, pin_memory=True)
            torch.index_select(self.images, 0, idx, out=images)
        else:
            images = self.images.index_select(0, idx)
        return Batch(images, self.sizes.index_select(0, idx), self.labels.index_select(0, idx), idx)


def _canvas_tuple(canvas_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(canvas_size, int):
        canvas_size = (canvas_size, canvas_size)
    h, w = (int(v) for v in canvas_size)
    if h < 1 or w < 1:
        raise ValueError(f"canvas_size must be positive; got {canvas_size}")
    return h, w


class FolderImageSource(ImageSource):
    """Image files decoded on demand with PIL and letterboxed into a fixed canvas.

    Each image is converted to RGB (alpha composited on white, 16-bit scaled to 8-bit;
    see :mod:`simclrv2.data.decode`), resized bicubically so that its longer side equals
    the (square) canvas side, aspect ratio kept, and placed top-left on a zero canvas.
    ``Batch.sizes`` gives the resized ``(h, w)``; the augmentation samples its random
    crop inside that region, so crops mean the same as crops of the original image up
    to one resampling.

    ``samples`` are ``(path, label)`` pairs; with ``root`` given, relative paths are
    resolved against it and ``paths`` exposes every path relative to ``root`` (POSIX
    form), which is what labelled-image lists are matched against.

    ``skip_unreadable``: an image that fails to decode (a file damaged or removed after the
    start-up scan, a flaky network disk) is replaced in its batch by another readable image,
    with its own label and index, and a warning naming it is printed once; without it a
    :class:`DataError` naming the file is raised. ``load_dataset`` turns it on for folders
    read from disk during training, so one bad file cannot stop a long run.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str | Path, int]],
        classes: Sequence[str],
        canvas_size: int | tuple[int, int],
        *,
        root: str | Path | None = None,
        skip_unreadable: bool = False,
    ) -> None:
        self.skip_unreadable = bool(skip_unreadable)
        self._unreadable: set[int] = set()
        self.root = Path(root) if root is not None else None
        self.classes = list(classes)
        self._canvas = _canvas_tuple(canvas_size)
        self.paths = _paths_under(self.root, [path for path, _ in samples])
        self.labels = _check_labels([label for _, label in samples], len(self.paths))

    @property
    def canvas_size(self) -> tuple[int, int]:
        return self._canvas

    def file_path(self, index: int) -> Path:
        """Full path of image ``index`` on disk."""
        rel = self.paths[index]
        return self.root / rel if self.root is not None else Path(rel)

    def decode(self, index: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """Decode image ``index``: uint8 ``[3, H, W]`` canvas and its valid ``(h, w)``."""
        return decode_image(self.file_path(index), self._canvas)

    def get_batch(self, indices: IndexLike) -> Batch:
        idx = as_index_tensor(indices, len(self))
        images = torch.empty((idx.numel(), 3, *self._canvas), dtype=torch.uint8)
        sizes = torch.empty((idx.numel(), 2), dtype=torch.long)
        failed: list[int] = []
        for row, i in enumerate(idx.tolist()):
            try:
                canvas, (h, w) = self.decode(i)
            except DataError as exc:
                if not self.skip_unreadable:
                    raise
                self._note_unreadable(i, exc)
                failed.append(row)
                continue
            images[row] = canvas
            sizes[row, 0], sizes[row, 1] = h, w
        if failed:
            idx = idx.clone()
            self._replace_rows(failed, idx, images, sizes)
        return Batch(images, sizes, self.labels.index_select(0, idx), idx)

    # ---- unreadable files found while training (skip_unreadable=True) --------------------
    MAX_REPLACEMENT_TRIES = 64

    def _note_unreadable(self, index: int, exc: DataError) -> None:
        if index not in self._unreadable:
            self._unreadable.add(index)
            # Printed, not logged: this runs in decoding worker processes, whose logging set-up
            # (handlers inherited from the parent, or none) cannot be relied on to show it.
            print(f"warning: skipping an image that became unreadable and using another one in its place: "
                  f"{exc}", file=sys.stderr, flush=True)

    def _replace_rows(self, failed: list[int], idx: torch.Tensor, images: torch.Tensor,
                      sizes: torch.Tensor) -> None:
        """Fill the rows of unreadable images with readable ones (with their own labels and indices)
        so a batch keeps its shape: another image of the batch, else the next readable file."""
        failed_set = set(failed)
        good = [row for row in range(idx.numel()) if row not in failed_set]
        for k, row in enumerate(failed):
            if good:
                src = good[k % len(good)]
                images[row], sizes[row], idx[row] = images[src], sizes[src], idx[src]
                continue
            start = int(idx[row])
            for step in range(1, min(len(self), self.MAX_REPLACEMENT_TRIES) + 1):
                j = (start + step) % len(self)
                if j in self._unreadable:
                    continue
                try:
                    canvas, (h, w) = self.decode(j)
                except DataError as exc:
                    self._note_unreadable(j, exc)
                    continue
                images[row], idx[row] = canvas, j
                sizes[row, 0], sizes[row, 1] = h, w
                break
            else:
                raise DataError(f"no readable image found among {self.MAX_REPLACEMENT_TRIES} files after "
                                f"{self.file_path(start)}: is the data folder {self.root} still available?")


class EvalImageSource(ImageSource):
    """Image files turned into evaluation inputs one by one: float32 ``[B, 3, S, S]`` batches.

    Each file goes through :func:`simclrv2.data.decode.eval_input` with ``transform`` (an
    :class:`simclrv2.augment.EvalTransform`): above 32 px it is decoded at **full resolution**
    and the reference's centre crop (0.875 of the full image, crop shape from its aspect ratio,
    SPEC §6 ``_compute_crop_shape``) is resized once to S; no letterbox canvas, no second
    resampling. Images differ in size, so they cannot share a canvas; the output rows can.
    Nothing is cached: an evaluation pass reads every file once.

    ``Batch.sizes`` is ``(S, S)`` for every row (the whole output is valid). With
    ``skip_unreadable`` a file that fails to decode is left out of its batch (the batch is
    shorter; a warning naming it is printed once), so it is not counted, never replaced by
    another image; without it a :class:`DataError` naming the file is raised.
    """

    preprocessed = True

    def __init__(self, samples: Sequence[tuple[str | Path, int]], classes: Sequence[str],
                 transform: EvalTransformLike, *, root: str | Path | None = None,
                 skip_unreadable: bool = False) -> None:
        self.transform = transform
        self.skip_unreadable = bool(skip_unreadable)
        self._warned: set[int] = set()
        self.root = Path(root) if root is not None else None
        self.classes = list(classes)
        self.paths = _paths_under(self.root, [path for path, _ in samples])
        self.labels = _check_labels([label for _, label in samples], len(self.paths))

    @property
    def canvas_size(self) -> tuple[int, int]:
        s = int(self.transform.image_size)
        return s, s

    def file_path(self, index: int) -> Path:
        """Full path of image ``index`` on disk."""
        rel = self.paths[index]
        return self.root / rel if self.root is not None else Path(rel)

    def load(self, index: int) -> torch.Tensor:
        """The network input of image ``index``: float32 ``[3, S, S]`` in [0, 1]."""
        return eval_input(self.file_path(index), self.transform)

    def get_batch(self, indices: IndexLike) -> Batch:
        idx = as_index_tensor(indices, len(self))
        s = int(self.transform.image_size)
        images = torch.empty((idx.numel(), 3, s, s), dtype=torch.float32)
        kept: list[int] = []
        for i in idx.tolist():
            try:
                images[len(kept)] = self.load(i)
            except DataError as exc:
                if not self.skip_unreadable:
                    raise
                if i not in self._warned:
                    self._warned.add(i)
                    print(f"warning: skipping an unreadable image: {exc}", file=sys.stderr, flush=True)
                continue
            kept.append(i)
        if len(kept) != idx.numel():
            idx = torch.tensor(kept, dtype=torch.long)
            images = images[: len(kept)]
        sizes = torch.tensor([s, s], dtype=torch.long).expand(len(kept), 2).clone()
        return Batch(images, sizes, self.labels.index_select(0, idx), idx)
