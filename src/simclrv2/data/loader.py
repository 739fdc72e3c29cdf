"""Deterministic, shardable batch iteration over an :class:`ImageSource`.

Why a custom iterator instead of ``DataLoader(shuffle=True)`` + ``DistributedSampler``:

* The order must be a pure function of ``(seed, epoch)`` so that a run resumed from a
  checkpoint (``start_batch``) sees exactly the batches it would have seen.
* Sharding must preserve *global batches*: the global permutation is cut into global
  batches of ``batch_size * world_size`` images and rank ``r`` takes the ``r``-th
  contiguous slice of each. One process with batch ``2N`` therefore sees, step for step,
  the concatenation of what two ranks with batch ``N`` see -- the property the
  multi-process equivalence test of the training loop relies on. (``DistributedSampler``
  strides the permutation instead, which breaks this.)
* In-memory sources need no workers at all (a batch is an ``index_select``), while
  folder sources decode whole batches in ``num_workers`` persistent worker processes.
"""

from __future__ import annotations

import gc
import hashlib
import math
import sys
import traceback
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from simclrv2.errors import TrainingError

from .sources import Batch, ImageSource, TensorImageSource, as_index_tensor

__all__ = ["BatchIterator", "epoch_permutation", "quiet_abandoned_transfers", "release_dead_loader", "worker_failure"]


def _generator_seed(seed: int, epoch: int) -> int:
    """Hash (seed, epoch) into one generator seed.

    A hash rather than bit packing because torch's CPU generator (mt19937) only uses the
    low 32 bits of its seed: ``seed << 32 | epoch`` would make every seed identical.
    """
    digest = hashlib.blake2b(f"simclrv2-epoch:{int(seed)}:{int(epoch)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order ``randperm(n)`` of one epoch, a pure function of (seed, epoch)."""
    gen = torch.Generator()
    gen.manual_seed(_generator_seed(seed, epoch))
    return torch.randperm(n, generator=gen)


class _BatchDataset(Dataset):
    """Map-style dataset whose "index" is a whole batch of indices (decoded in a worker)."""

    def __init__(self, source: ImageSource) -> None:
        self.source = source

    def __getitem__(self, indices: torch.Tensor) -> Batch:
        return self.source.get_batch(indices)

    def __len__(self) -> int:
        return len(self.source)


def _identity(batch: Batch) -> Batch:
    return batch


class _EpochSampler(Sampler):
    """Yields the owning iterator's current index batches; re-read every epoch so a
    persistent-worker ``DataLoader`` can be reused across ``set_epoch`` calls."""

    def __init__(self, owner: "BatchIterator") -> None:
        self.owner = owner

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.owner.batch_indices())

    def __len__(self) -> int:
        return len(self.owner)


class BatchIterator:
    """Iterable of :class:`Batch` for one epoch of one rank.

    Args:
        source: images to read.
        batch_size: images per batch *per rank*; the global batch is
            ``batch_size * world_size``.
        shuffle: permute with ``randperm`` seeded by ``(seed, epoch)``; otherwise keep the
            order of ``indices`` (or ``0..N-1``).
        drop_last: drop the last, incomplete global batch (use for training).
            Without it the incomplete global batch is split as evenly as possible into
            contiguous parts (``tensor_split``), so every rank yields the same number of
            batches; a rank's last batch may be smaller, or even empty when fewer images
            than ranks remain.
        seed, epoch: determine the permutation.
        rank, world_size: this process's shard.
        num_workers: decoding processes for non-memory sources (ignored for
            :class:`TensorImageSource`); workers persist across :meth:`set_epoch`.
        indices: restrict iteration to these source indices (e.g. a labelled subset);
            ``Batch.indices`` still refer to the source.
        start_batch: skip the first ``start_batch`` batches of the epoch without
            decoding them (mid-epoch resume).
        pin_memory: return pinned batches when CUDA is available.

    ``len(iterator)`` is the number of batches an iteration yields, i.e.
    ``batches_per_epoch - start_batch``.
    """

    def __init__(
        self,
        source: ImageSource,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        indices: torch.Tensor | Sequence[int] | None = None,
        start_batch: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size; got rank={rank}, world_size={world_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0; got {num_workers}")
        self.source = source
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.num_workers = int(num_workers)
        self.pool = (
            torch.arange(len(source)) if indices is None else as_index_tensor(indices, len(source))
        )
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        self.prefetch_factor = int(prefetch_factor)
        self._loader: DataLoader | None = None
        self.epoch = 0
        self.start_batch = 0
        self.set_epoch(epoch, start_batch=start_batch)

    # ------------------------------------------------------------------ ordering
    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Move to another epoch (and optionally resume inside it) keeping the workers."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch must lie in [0, {self.batches_per_epoch}]; got {start_batch}")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    @property
    def global_batch_size(self) -> int:
        """Images per step summed over all ranks."""
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        """Batches in a full epoch (independent of ``start_batch``)."""
        n, g = self.pool.numel(), self.global_batch_size
        return n // g if self.drop_last else math.ceil(n / g)

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def order(self) -> torch.Tensor:
        """All source indices of this epoch in global (pre-sharding) order."""
        if not self.shuffle:
            return self.pool
        return self.pool[epoch_permutation(self.pool.numel(), self.seed, self.epoch)]

    def batch_indices(self) -> list[torch.Tensor]:
        """This rank's index batches for the rest of the epoch (after ``start_batch``)."""
        order, g = self.order(), self.global_batch_size
        batches = []
        for step in range(self.start_batch, self.batches_per_epoch):
            global_batch = order[step * g : (step + 1) * g]
            batches.append(global_batch.tensor_split(self.world_size)[self.rank])
        return batches

    # ------------------------------------------------------------------ iteration
    def _uses_workers(self) -> bool:
        return self.num_workers > 0 and not isinstance(self.source, TensorImageSource)

    def __iter__(self) -> Iterator[Batch]:
        if self._uses_workers():
            if self._loader is None:
                quiet_abandoned_transfers()  # this (main) process hands index batches to the workers
                self._loader = DataLoader(
                    _BatchDataset(self.source),
                    batch_size=None,
                    sampler=_EpochSampler(self),
                    num_workers=self.num_workers,
                    collate_fn=_identity,
                    pin_memory=self.pin_memory,
                    persistent_workers=True,
                    prefetch_factor=self.prefetch_factor,
                    worker_init_fn=quiet_abandoned_transfers,
                )
            yield from self._loader
            return
        for idx in self.batch_indices():
            batch = self.source.get_batch(idx)
            if self.pin_memory and not batch.images.is_pinned():
                batch = Batch(*(t.pin_memory() for t in batch))
            yield batch

    def close(self) -> None:
        """Shut down persistent decode workers (they also stop when garbage-collected)."""
        self._loader = None


def worker_failure(exc: BaseException) -> TrainingError | None:
    """The one-paragraph error for a decoding worker process that died, or None if ``exc`` is not that.

    ``DataLoader`` reports a worker killed by a signal (SIGKILL from the kernel's out-of-memory killer,
    most often) or exiting unexpectedly as a plain ``RuntimeError`` naming "DataLoader worker", raised
    from its SIGCHLD handler wherever the main process is at that moment; the command line turns it
    into this message (exit 1) instead of a traceback. Workers decode folders into the memory cache
    (:mod:`simclrv2.data.cache`) and folders too large for it while training or extracting features."""
    if isinstance(exc, TrainingError) or not isinstance(exc, RuntimeError) or "DataLoader worker" not in str(exc):
        return None
    first = str(exc).strip().splitlines()[0][:200]
    return TrainingError(f"an image-decoding worker process stopped ({first}); a worker killed by a signal is "
                         "most often the kernel's out-of-memory killer. Use fewer --num-workers (0 decodes in the "
                         "main process) or free memory, then run the command again (a training run continues "
                         "from its last checkpoint with --resume)")


def _is_partial_iterator_teardown(unraisable: "sys.UnraisableHookArgs") -> bool:
    return (isinstance(unraisable.exc_value, AttributeError) and "_workers_status" in str(unraisable.exc_value)
            and "_MultiProcessingDataLoaderIter" in repr(unraisable.object))


def release_dead_loader(exc: BaseException) -> None:
    """Free the DataLoader iterator that ``exc`` (a worker death, :func:`worker_failure`) still holds, quietly.

    ``DataLoader``'s SIGCHLD handler can raise while ``_MultiProcessingDataLoaderIter.__init__`` is
    still running (a worker killed while the others start), before ``_workers_status`` exists. The
    half-built iterator lives on in the exception's traceback; when that is freed, its ``__del__``
    fails on the missing attribute and Python prints "Exception ignored in ... AttributeError" with a
    traceback under the one-line message (torch 2.14; seen 1 in 12 runs of the SIGKILL test in
    tests/test_faults.py). This clears the traceback's finished frames now, under an unraisable hook
    that drops exactly that AttributeError, so the iterator's workers are shut down here and every
    other unraisable error is still reported."""
    previous = sys.unraisablehook

    def hook(unraisable: "sys.UnraisableHookArgs") -> None:
        if not _is_partial_iterator_teardown(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        seen: set[int] = set()
        link: BaseException | None = exc
        while link is not None and id(link) not in seen:
            seen.add(id(link))
            traceback.clear_frames(link.__traceback__)
            link = link.__cause__ or link.__context__
        gc.collect()
    finally:
        sys.unraisablehook = previous


def _is_abandoned_transfer(exc_type: type, exc_value: BaseException, tb) -> bool:
    """An EOF or reset in ``multiprocessing.resource_sharer``'s serving thread: a receiver hung up."""
    if not issubclass(exc_type, (EOFError, ConnectionError)):
        return False
    return any(frame.f_code.co_name == "_serve" and frame.f_code.co_filename.endswith("resource_sharer.py")
               for frame, _ in traceback.walk_tb(tb))


def quiet_abandoned_transfers(worker_id: int | None = None) -> None:
    """Drop the traceback of a shared-memory handover abandoned by its receiver, in this process.

    Tensors cross between the main process and the decoding workers as shared memory whose file
    descriptor the receiver collects through the sender's ``multiprocessing.resource_sharer``
    thread. Batches go from a worker to the main process; index batches (tensors) from the main
    process to a worker. When the receiver goes away in the middle of that handshake (the main
    process stopping because another worker was killed; a worker killed while it collects its
    indices), the sender's thread gets EOFError or ConnectionResetError and prints a traceback under
    the command's one-line message (2 of 10 runs of the SIGKILL test in tests/test_faults.py on the
    worker side; once in a CI run on the main side). The thread reports through ``sys.excepthook``;
    this wraps it to drop exactly that case and pass every other error on.

    The ``worker_init_fn`` of our DataLoaders (``worker_id`` given), and called in the main process
    when it builds one (``worker_id`` None). Installs the wrapper once per process."""
    previous = sys.excepthook
    if getattr(previous, "_drops_abandoned_transfers", False):
        return

    def hook(exc_type, exc_value, tb) -> None:
        if not _is_abandoned_transfer(exc_type, exc_value, tb):
            previous(exc_type, exc_value, tb)

    hook._drops_abandoned_transfers = True  # type: ignore[attr-defined]
    sys.excepthook = hook
