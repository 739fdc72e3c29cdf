"""Process-group helpers and a differentiable all-gather for cross-replica negatives.

Why: NT-Xent in SimCLR draws its negatives from the GLOBAL batch (SPEC §3). The reference
builds the global concatenation with ``tpu_cross_replica_concat`` (scatter the local block
into a zero tensor, then all-reduce SUM); because the gradient of an all-reduce is an
all-reduce, gradients produced by *other* replicas' logits flow back to the local features.
:func:`gather_with_grad` reproduces that: forward = ``all_gather`` + concatenation in rank
order, backward = all-reduce SUM of the incoming gradient then the local slice, which is
exactly the reference's scatter + all-reduce SUM seen from one rank.

Everything here degrades to the identity / single-process values when ``torch.distributed``
is unavailable or not initialised, so the same code path runs on a laptop and under torchrun.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "is_distributed",
    "get_rank",
    "get_world_size",
    "gather_with_grad",
    "all_reduce_mean",
    "setup_distributed",
    "cleanup_distributed",
    "is_peer_failure",
    "peer_failure_message",
    "io_timeout",
    "broadcast_object",
    "share_outcome",
    "all_agree",
]

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)
MIN_IO_TIMEOUT = datetime.timedelta(minutes=30)
"""Collectives that wait for rank 0's disk I/O (a checkpoint of a large network on a slow or network
file system can take minutes) use their own Gloo group with ``max(30 min, 3 x --dist-timeout)``, so a
slow write never trips ``--dist-timeout`` while a dead peer in training still does."""

_IO_GROUP = None


def is_distributed() -> bool:
    """True when a default process group is initialised (any world size)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank, 0 when not distributed."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes, 1 when not distributed."""
    return dist.get_world_size() if is_distributed() else 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every rank's gradient for our slice.

    Forward: ``out = cat([x_0, ..., x_{W-1}])`` (all ranks must pass the same shape).
    Backward: rank r's ``x_r`` appears in the ``out`` of every rank, so
    ``dL_total/dx_r = sum_s dL_s/dout_s[r-th block]``: an all-reduce SUM of the incoming
    gradient followed by taking block r (SPEC §3: scatter + all-reduce SUM).
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        world_size = dist.get_world_size()
        ctx.rank = dist.get_rank()
        ctx.local_rows = x.shape[0]
        x = x.contiguous()
        chunks = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(chunks, x)
        return torch.cat(chunks, dim=0)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.local_rows
        return grad[start : start + ctx.local_rows]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0 in rank order, keeping gradients.

    Identity when not distributed (or world size 1). Every rank must pass a tensor of the
    same shape (SimCLR uses drop_remainder batches, SPEC §6).
    """
    if not is_distributed() or get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_mean(t: Tensor) -> Tensor:
    """Mean of ``t`` over ranks (a new tensor); for logging metrics, not for gradients."""
    if not is_distributed() or get_world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / get_world_size()


def setup_distributed(
    backend: str | None = None,
    timeout: datetime.timedelta | float | None = None,
) -> tuple[int, int, int]:
    """Initialise the default process group from torchrun's environment variables.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (``MASTER_ADDR``/``MASTER_PORT`` are
    read by ``init_process_group`` itself). A no-op returning ``(0, 1, 0)`` when
    ``WORLD_SIZE`` is absent or 1. Backend defaults to NCCL when CUDA is available, else
    Gloo; with CUDA the local device is selected before initialisation. ``timeout`` (a
    timedelta or seconds; default 10 minutes) bounds how long a collective may hang.

    Returns ``(rank, world_size, local_rank)``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, 0
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if is_distributed():
        return get_rank(), get_world_size(), local_rank
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if timeout is None:
        timeout = DEFAULT_TIMEOUT
    elif not isinstance(timeout, datetime.timedelta):
        timeout = datetime.timedelta(seconds=float(timeout))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend=backend, rank=rank, world_size=world_size, timeout=timeout
    )
    global _IO_GROUP
    _IO_GROUP = dist.new_group(backend="gloo", timeout=io_timeout(timeout))  # every rank, same order
    return rank, world_size, local_rank


def io_timeout(timeout: datetime.timedelta | None = None) -> datetime.timedelta:
    """How long a rank waits for rank 0's disk I/O (see :data:`MIN_IO_TIMEOUT`)."""
    return max(MIN_IO_TIMEOUT, 3 * (timeout or DEFAULT_TIMEOUT))


def _io_group():
    global _IO_GROUP
    if _IO_GROUP is None:  # a process group initialised by someone else: make ours (collectively)
        _IO_GROUP = dist.new_group(backend="gloo", timeout=io_timeout())
    return _IO_GROUP


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable, small), over the I/O group (CPU, long timeout)."""
    if not is_distributed() or get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_io_group())
    return box[0]


def all_agree(ok: bool) -> bool:
    """True on every rank when ``ok`` is true on every rank (over the I/O group)."""
    if not is_distributed() or get_world_size() == 1:
        return bool(ok)
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.SUM, group=_io_group())
    return int(flag.item()) == 0


def share_outcome(work: Callable[[], Any] | None) -> Any:
    """Run ``work`` on rank 0 (others pass anything, it is not called there) and give its result to every
    rank; an exception on rank 0 is raised on every rank, the same class with the same message when it
    is a :class:`~simclrv2.errors.SimCLRv2Error`. The other ranks wait with the I/O timeout, so a slow
    checkpoint write or a rank-0-only check never trips ``--dist-timeout`` nor leaves them hanging."""
    from simclrv2 import errors

    if not is_distributed() or get_world_size() == 1:
        return work() if work is not None else None
    outcome: tuple[str, Any] = ("ok", None)
    failure: BaseException | None = None
    if get_rank() == 0:
        try:
            outcome = ("ok", work() if work is not None else None)
        except BaseException as exc:  # shared, then re-raised below
            failure = exc
            name = type(exc).__name__ if isinstance(exc, errors.SimCLRv2Error) else "TrainingError"
            outcome = ("error", (name, str(exc) if isinstance(exc, errors.SimCLRv2Error)
                                 else f"rank 0 failed: {type(exc).__name__}: {str(exc)[:300]}"))
    outcome = broadcast_object(outcome)
    if failure is not None:
        raise failure
    kind, value = outcome
    if kind == "error":
        name, message = value
        cls = getattr(errors, name, None)
        if not (isinstance(cls, type) and issubclass(cls, errors.SimCLRv2Error)):
            cls = errors.TrainingError
        raise cls(message)
    return value


def cleanup_distributed() -> None:
    """Destroy our Gloo I/O group, and the default group when it is Gloo (the command line calls this
    as it exits).

    Why: a process that exits with a live Gloo group can die in C++ teardown ("terminate called
    without an active exception", SIGABRT, exit -6) after it has done its work and printed its
    result. Two plain ``torchrun`` processes doing one Gloo all_reduce aborted so in 5 of 12 exits
    without ``destroy_process_group`` and in none of 12 with it; ``tests/test_distributed_resume.py``
    failed so about once in 6 runs. An NCCL default group is left to the interpreter: destroying it
    with collectives pending on a failed peer can block, and that path is not measured here."""
    global _IO_GROUP
    if not is_distributed():
        return
    if _IO_GROUP is not None:
        dist.destroy_process_group(_IO_GROUP)
        _IO_GROUP = None
    if dist.get_backend() == "gloo":
        dist.destroy_process_group()


_PEER_FAILURE_MARKERS = ("gloo", "nccl", "connection reset", "connection closed", "connection refused",
                         "broken pipe", "timed out", "timeout", "processgroup", "watchdog", "socket")


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (raised inside a collective) means another process died or stopped answering.

    Gloo reports a dead peer as a plain ``RuntimeError`` ("Connection reset by peer", "Connection
    closed by peer") and a silent one as "Timed out waiting ...ms" once the process-group timeout
    (``--dist-timeout``) passes; newer PyTorch versions raise ``torch.distributed.DistError``
    subclasses. Only meaningful while a process group is initialised."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(marker in text for marker in _PEER_FAILURE_MARKERS)


def peer_failure_message(exc: BaseException) -> str:
    """A one-paragraph explanation of a failed collective, naming this rank and the cause."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"a peer process stopped or timed out (seen by rank {get_rank()} of {get_world_size()}): {first}. "
            "Check the other processes' logs for the original error; resume with --resume once they are fixed.")
