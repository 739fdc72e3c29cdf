"""Crash-safe, code-free checkpoints.

Layout of a run directory's checkpoints::

    checkpoints/step-00000500/model.safetensors   weights + BN buffers (safetensors: no code runs on load)
    checkpoints/step-00000500/ema.safetensors     momentum-encoder copy (pretraining with memory)
    checkpoints/step-00000500/state.pt            optimiser, schedule position, queue, RNG states:
                                                  plain tensors/containers, loaded with weights_only=True
    checkpoints/step-00000500/meta.json           architecture and config (JSON)
    checkpoints/latest                            the name of the last COMPLETE checkpoint folder

A checkpoint folder is written under a temporary name, every file flushed and fsync'ed, then
the folder is renamed and only then ``latest`` is replaced atomically (write + ``os.replace``).
A kill at any moment therefore leaves ``latest`` pointing at a complete checkpoint. Older
folders are removed after the pointer moved (the last ``keep`` are kept).

Final weights for the next stage are exported as ``model.safetensors`` in the run directory,
with the architecture in the file's safetensors metadata (key ``simclrv2``, JSON).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from simclrv2.errors import CheckpointError

LATEST = "latest"
META_KEY = "simclrv2"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: str | Path, write: Callable[[Path], None], *, sync_dir: bool = True) -> None:
    """``write(tmp)`` must write and fsync a temporary file; it then replaces ``path`` atomically (a
    failure removes the temporary file and re-raises). ``sync_dir`` also fsyncs the parent folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    if sync_dir:
        _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` so that readers see either the old or the new file, never half of one."""

    def write(tmp: Path) -> None:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    _write_atomically(path, write)


def _remove_quietly(path: Path) -> None:
    """Delete a half-written temporary file (e.g. after ENOSPC) so nothing partial is left behind."""
    try:
        path.unlink()
    except OSError:
        pass


def _contiguous_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors wants dense, contiguous, non-shared CPU tensors."""
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        out[key] = value.detach().to("cpu").contiguous().clone()
    return out


def save_weights(state_dict: dict[str, torch.Tensor], path: str | Path, meta: dict[str, Any] | None = None) -> None:
    """Save tensors as safetensors (atomically) with ``meta`` as JSON in the file's metadata."""
    metadata = {META_KEY: json.dumps(meta or {})}

    def write(tmp: Path) -> None:
        save_file(_contiguous_state(state_dict), str(tmp), metadata=metadata)
        _fsync_file(tmp)

    _write_atomically(path, write)


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a safetensors file and its simclrv2 metadata. Never executes code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint: weights file {str(path)!r} does not exist")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(META_KEY, "{}")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint: {path} is not a readable safetensors file ({exc})") from exc
    return tensors, json.loads(raw)


def save_state(state: dict[str, Any], path: str | Path) -> None:
    """Save non-weight state (optimiser, RNG, counters) with torch.save; only tensors, numbers,
    strings and containers, so :func:`load_state` can read it with ``weights_only=True``."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())

    _write_atomically(path, write, sync_dir=False)  # inside a checkpoint folder that is fsync'ed on rename


def load_state(path: str | Path) -> dict[str, Any]:
    """Load state saved by :func:`save_state` without running code from the file.

    ``torch.load(weights_only=True)`` refuses pickles that reference arbitrary callables (the way
    a crafted checkpoint would run code); the refusal is turned into a clear CheckpointError."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message suggests weights_only=False, exactly what must not be done here: keep
        # only the line naming the refused object.
        detail = next((line.strip() for line in str(exc).splitlines()
                       if "Unsupported" in line or "global" in line.lower()), "")
        raise CheckpointError(
            f"checkpoint: refused to load {path}: it contains objects other than tensors and plain data "
            f"(a pickle that could run code); nothing from it was executed. Only checkpoints written by "
            f"simclrv2 are accepted; delete this checkpoint folder or start a new run."
            + (f" ({detail})" if detail else "")
        ) from exc
    except (OSError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"checkpoint: {path} is unreadable ({exc})") from exc


class CheckpointManager:
    """Writes and finds step checkpoints in ``run_dir/checkpoints`` (see module doc)."""

    def __init__(self, run_dir: str | Path, keep: int = 2) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        folder = self.root / pointer.read_text().strip()
        return folder if (folder / "meta.json").is_file() else None

    def save(self, step: int, *, weights: dict[str, dict[str, torch.Tensor]], state: dict[str, Any],
             meta: dict[str, Any]) -> Path:
        """Write one checkpoint: ``weights`` maps a file stem (model, ema, ...) to a state dict."""
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:08d}"
        final = self.root / name
        # A name no earlier (possibly killed) process can have used, even with a recycled pid.
        tmp = self.root / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            for stem, tensors in weights.items():
                save_weights(tensors, tmp / f"{stem}.safetensors", meta)
            save_state(state, tmp / "state.pt")
            with open(tmp / "meta.json", "w") as handle:
                handle.write(json.dumps({**meta, "step": step}, indent=2, default=str))
                handle.flush()
                os.fsync(handle.fileno())
            _fsync_dir(tmp)
        except BaseException:
            # Disk full, a write error or an interrupt: remove the incomplete folder so that
            # nothing half-written stays next to the last complete checkpoint.
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():
            # The same step again (e.g. a resumed run that was already finished): point `latest`
            # at the complete temporary folder first, so that a kill between deleting the old
            # folder and renaming the new one still leaves `latest` on a complete checkpoint.
            atomic_write_text(self.root / LATEST, tmp.name)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        atomic_write_text(self.root / LATEST, name)
        self._prune(current=name)
        return final

    def _prune(self, current: str) -> None:
        folders = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        for old in folders[:-self.keep]:
            if old.name != current:
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def read_meta(self, folder: Path) -> dict[str, Any]:
        """The JSON description (architecture, step ...) of a checkpoint folder."""
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint: {folder / 'meta.json'} is unreadable ({exc})") from exc
        if not isinstance(meta, dict):
            raise CheckpointError(f"checkpoint: {folder / 'meta.json'} is not a JSON object")
        return meta

    def load(self, folder: Path | None = None) -> dict[str, Any]:
        folder = folder or self.latest()
        if folder is None:
            raise CheckpointError(f"resume: no complete checkpoint in {self.root}")
        out: dict[str, Any] = {"meta": self.read_meta(folder), "weights": {}}
        for file in folder.glob("*.safetensors"):
            out["weights"][file.stem] = load_weights(file)[0]
        out["state"] = load_state(folder / "state.pt")
        return out


def find_weights(path: str | Path) -> Path:
    """Resolve ``--checkpoint``/``--teacher``: a .safetensors file, a run directory holding
    ``model.safetensors``, or a run directory with step checkpoints (the latest is used)."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"checkpoint: {path} is not a .safetensors file; pass a run directory or "
                                  "the model.safetensors it contains (pickled .pt/.pth files are not loaded "
                                  "because unpickling can run code)")
        return path
    if (path / "model.safetensors").is_file():
        return path / "model.safetensors"
    latest = CheckpointManager(path).latest()
    if latest is not None and (latest / "model.safetensors").is_file():
        return latest / "model.safetensors"
    raise CheckpointError(f"checkpoint: found no model.safetensors in {path} (nor a step checkpoint under "
                          f"{path / 'checkpoints'})")
