"""Per-row helpers shared by the batched augmentations (SPEC §6).

Every augmentation in this package draws its random parameters as one tensor row per image
and applies them to the whole batch at once.  What recurs lives here:

* applying an op only to the rows selected by a random mask.  On CUDA (and any non-CPU
  device) the op is computed for every row and merged with ``torch.where``: no
  data-dependent shapes, hence no host-device synchronisation.  On CPU there is nothing to
  synchronise with, so the selected rows are gathered first and only they are computed
  (e.g. the blur, kept with p=0.5, costs half).  Both strategies give the same values.
* slicing a dataclass of per-row parameters (for the pipeline's cache-sized chunks);
* random draws on the generator's device, cached per-device constants (no blocking
  host-to-device copies in the hot path), and a scratch-buffer :class:`Workspace`.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Callable, TypeVar

import torch
from torch import Tensor

#: Forces the row-selection strategy ("where" or "gather"); ``None`` picks by device.
#: Only tests are expected to set it (to check both strategies agree).
FORCE_STRATEGY: str | None = None

_CONSTANTS: dict[tuple[str, torch.device], Tensor] = {}

T = TypeVar("T")


def strategy_for(device: torch.device) -> str:
    """``"gather"`` on CPU, ``"where"`` elsewhere (unless :data:`FORCE_STRATEGY` is set)."""
    if FORCE_STRATEGY is not None:
        return FORCE_STRATEGY
    return "gather" if device.type == "cpu" else "where"


def apply_to_rows(
    fn: Callable[..., Tensor],
    x: Tensor,
    mask: Tensor,
    *row_args: Tensor,
    inplace: bool = False,
    workspace: "Workspace | None" = None,
) -> Tensor:
    """Return ``x`` with rows where ``mask`` is true replaced by ``fn(x, *row_args)``.

    ``row_args`` are per-row tensors (first dim = batch) that ``fn`` takes after ``x``.
    ``fn`` must act on each row independently and return a new tensor (or, when a
    ``workspace`` is given, possibly one of its buffers).  ``inplace=True`` allows (but
    does not promise) updating ``x`` itself; callers pass it only for tensors they own and
    always use the returned tensor.  ``workspace`` (CPU) holds the gathered rows.
    """
    if strategy_for(x.device) == "where":
        y = fn(x, *row_args)
        return torch.where(mask.view(-1, *([1] * (x.dim() - 1))), y, x)
    idx = mask.nonzero().squeeze(1)
    count = idx.numel()
    if count == 0:
        return x if inplace else x.clone()
    if count == x.shape[0]:
        y = fn(x, *row_args)  # a new tensor, or a workspace buffer
        if workspace is None:
            return y
        return x.copy_(y) if inplace else y.clone()
    out = x if inplace else x.clone()
    sub = empty(workspace, "rows_in", (count, *x.shape[1:]), x.dtype, x.device)
    torch.index_select(x, 0, idx, out=sub)
    y = fn(sub, *(a.index_select(0, idx) for a in row_args))
    return out.index_copy_(0, idx, y)


def take_rows(params: T, index: Tensor) -> T:
    """Copy of a parameter dataclass with every tensor field (also inside nested parameter
    dataclasses) restricted to the ``index`` rows."""
    changes = {}
    for field in dataclasses.fields(params):  # type: ignore[arg-type]
        value = getattr(params, field.name)
        if isinstance(value, Tensor):
            changes[field.name] = value.index_select(0, index)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes[field.name] = take_rows(value, index)
    return dataclasses.replace(params, **changes)  # type: ignore[type-var]


def slice_rows(params: T, start: int, stop: int) -> T:
    """Like :func:`take_rows` for the contiguous rows ``start:stop`` (views, no copies)."""
    changes = {}
    for field in dataclasses.fields(params):  # type: ignore[arg-type]
        value = getattr(params, field.name)
        if isinstance(value, Tensor):
            changes[field.name] = value[start:stop]
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes[field.name] = slice_rows(value, start, stop)
    return dataclasses.replace(params, **changes)  # type: ignore[type-var]


def device_constant(name: str, device: torch.device, build: Callable[[], Tensor]) -> Tensor:
    """A small constant tensor built once per device.

    Creating it from a Python list on every call would be a blocking host-to-device copy
    on CUDA; caching keeps the hot path free of those.
    """
    key = (name, torch.device(device))
    value = _CONSTANTS.get(key)
    if value is None:
        value = build().to(device)
        _CONSTANTS[key] = value
    return value


def per_row(value: Tensor | float, x: Tensor) -> Tensor:
    """A per-image scalar (float or tensor [B]) as a float tensor broadcastable to ``x``."""
    if not isinstance(value, Tensor):
        value = torch.full((x.shape[0],), float(value), device=x.device)
    return value.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    """``n`` float32 draws from U[low, high) on the generator's device."""
    u = torch.rand(n, generator=generator, device=generator.device)
    return u * (high - low) + low


def bernoulli(n: int, p: float, generator: torch.Generator) -> Tensor:
    """``n`` booleans, true with probability ``p`` (reference: ``uniform < p``)."""
    return torch.rand(n, generator=generator, device=generator.device) < p


class Workspace:
    """Reusable scratch buffers for the CPU hot path.

    Large CPU tensors come from ``malloc``'s mmap path, so every fresh temporary of a few
    MB pays page faults on first touch — more than the arithmetic done on it.  The
    pipeline processes equal-sized chunks, so it keeps its big temporaries here and
    reuses them.  Buffers are per thread; a buffer handed out under a name stays valid
    until the same name is requested again, so callers never let one escape.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised tensor of ``shape`` backed by the buffer called ``name``."""
        buffers = self._local.__dict__.setdefault("buffers", {})
        key = (name, dtype, torch.device(device))
        numel = math.prod(shape)
        buf = buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=device)
            buffers[key] = buf
        return buf[:numel].view(shape)

    def __getstate__(self) -> dict:
        return {}  # buffers are a cache: pickling (DataLoader workers) starts empty

    def __setstate__(self, state: dict) -> None:
        self._local = threading.local()


def empty(
    workspace: Workspace | None, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``workspace.get(...)`` when a workspace is given, else a fresh ``torch.empty``."""
    if workspace is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return workspace.get(name, shape, dtype, device)
