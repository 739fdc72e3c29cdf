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
A kill at any moment therefore leaves a complete checkpoint behind. ``latest`` is a hint, not
an authority: a resume uses the newest COMPLETE ``step-*`` folder directly inside ``checkpoints/``
(all files present, meta.json naming the same step; no ``..``, no absolute path, no symlink),
which is what ``latest`` names unless it was damaged, edited, or a kill fell between a folder's
rename and the pointer update; the caller then says which folder it used instead.

Nothing is ever written through a symlink: every file is created fresh under a temporary name
(``O_CREAT | O_EXCL | O_NOFOLLOW``) and renamed over its target, which replaces a symlink
instead of following it; a symlinked ``checkpoints/`` is refused. A manager deletes only
checkpoint folders it wrote itself (pruning keeps the last ``keep``), so a resumed run never
deletes the checkpoint it resumed from or any older one.

Write errors: torch and safetensors report a full disk as ``RuntimeError`` / ``SafetensorError``,
not ``OSError``; :func:`as_os_error` turns them into an ``OSError`` with the real errno so that
one handler (in the trainer and in ``export_model``) explains every failed write.

Final weights for the next stage are exported as ``model.safetensors`` in the run directory,
with the architecture in the file's safetensors metadata (key ``simclrv2``, JSON).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import time
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
STEP_RE = re.compile(r"^step-(\d{8,})$")
TMP_DIR_RE = re.compile(r"^\.tmp-step-\d+-(\d+)-[0-9a-f]+$")
TMP_FILE_RE = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]+$")
"""Temporary names: ``.tmp-step-NNNNNNNN-PID-RAND`` (checkpoint folders being written) and
``.NAME.tmp-PID-RAND`` (files being written); both are removed by :func:`remove_stale_temporaries`."""
CHECKPOINT_FILES = ("model.safetensors", "state.pt", "meta.json")
"""What a complete checkpoint folder holds (``ema.safetensors`` is optional)."""
MAX_META_BYTES = 1 << 20
"""A checkpoint's meta.json is a few kilobytes; a larger one was not written by simclrv2."""

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_fresh(path: str | Path, mode: int = 0o644) -> int:
    """Create ``path`` as a NEW regular file and return a write descriptor. Fails (``FileExistsError``)
    if anything, a symlink included, already has that name: nothing is ever written through a link."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, mode)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def as_os_error(exc: BaseException, path: str | Path) -> OSError:
    """An ``OSError`` (with the real errno where the message tells it) for a failed write.

    torch.save reports a full disk as ``RuntimeError: ... unexpected pos`` or ``file write failed``,
    safetensors as ``SafetensorError: ... No space left on device (os error 28)``; neither is an
    ``OSError``. When the message names no errno, a file system with (almost) no free space means
    ENOSPC, anything else EIO."""
    if isinstance(exc, OSError):
        return exc
    text = str(exc)
    match = re.search(r"os error (\d+)", text)
    if match:
        code = int(match.group(1))
    elif "No space left" in text:
        code = errno.ENOSPC
    else:
        code = errno.EIO
        try:
            stats = os.statvfs(Path(path).parent)
            if stats.f_bavail * stats.f_frsize < (1 << 20):
                code = errno.ENOSPC
        except OSError:
            pass
    error = OSError(code, os.strerror(code), str(path))
    error.__cause__ = exc
    return error


def _write_atomically(path: str | Path, write: Callable[[Path], None], *, sync_dir: bool = True) -> None:
    """``write(tmp)`` must fill and fsync the fresh temporary file ``tmp`` (already created, empty);
    it then replaces ``path`` atomically. A failure removes the temporary file and raises an
    ``OSError`` (see :func:`as_os_error`). ``sync_dir`` also fsyncs the parent folder."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        os.close(create_fresh(tmp))
        write(tmp)
        os.replace(tmp, path)  # replaces a symlink named `path`, never follows it
    except (RuntimeError, SafetensorError) as exc:
        error = as_os_error(exc, path)  # before the removal frees the space it looks at
        _remove_quietly(tmp)
        raise error from exc
    except BaseException:
        _remove_quietly(tmp)
        raise
    if sync_dir:
        _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` so that readers see either the old or the new file, never half of one."""

    def write(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC | _NOFOLLOW | _CLOEXEC)
        with open(fd, "w", closefd=True) as handle:
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


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | Path, *, any_pid: bool = False) -> list[Path]:
    """Remove the temporary files/folders a killed writer left in ``folder`` (not recursive): those of
    processes no longer alive on this machine, or all of them with ``any_pid`` (the caller holds the
    run's lock, so no one else can be writing). Returns what was removed."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = TMP_DIR_RE.match(entry.name) or TMP_FILE_RE.match(entry.name)
        if match is None:
            continue
        pid = int(match.group(1))
        if not any_pid and (pid == os.getpid() or _pid_alive(pid)):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            _remove_quietly(path)
        removed.append(path)
    return removed


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


def _parse_meta_json(raw: str | bytes, where: str) -> dict[str, Any]:
    """Parse simclrv2 metadata: a JSON object, at most :data:`MAX_META_BYTES`; invalid JSON, another
    type or nesting deep enough to exhaust the parser is a CheckpointError."""
    if len(raw) > MAX_META_BYTES:
        raise CheckpointError(f"checkpoint: the simclrv2 metadata of {where} is {len(raw)} bytes, far more "
                              "than simclrv2 writes; refused")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else "not valid JSON"
        raise CheckpointError(f"checkpoint: the simclrv2 metadata of {where} is {reason}; it was not "
                              "written by simclrv2 or is damaged") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint: the simclrv2 metadata of {where} is a JSON {type(meta).__name__}, "
                              "not an object; it was not written by simclrv2")
    return meta


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
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint: {path} is not a readable safetensors file "
                              f"({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})") from exc
    return tensors, _parse_meta_json(raw, str(path))


def save_state(state: dict[str, Any], path: str | Path) -> None:
    """Save non-weight state (optimiser, RNG, counters) with torch.save; only tensors, numbers,
    strings and containers, so :func:`load_state` can read it with ``weights_only=True``."""

    def write(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC | _NOFOLLOW | _CLOEXEC)
        with open(fd, "wb", closefd=True) as handle:
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
            f"simclrv2 are accepted; delete this checkpoint folder (--resume then uses the newest complete "
            f"one) or start a new run."
            + (f" ({detail})" if detail else "")
        ) from exc
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"checkpoint: {path} is unreadable ({str(exc).splitlines()[0][:200]}); delete this "
                              "checkpoint folder (--resume then uses the newest complete one)") from exc


def step_of_name(name: str) -> int | None:
    """The step of a ``step-NNNNNNNN`` folder name, None for any other name."""
    match = STEP_RE.match(name)
    return int(match.group(1)) if match else None


class CheckpointManager:
    """Writes and finds step checkpoints in ``run_dir/checkpoints`` (see module doc)."""

    def __init__(self, run_dir: str | Path, keep: int = 2) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.written: set[str] = set()
        """Names of the folders this manager wrote: the only ones it may delete."""
        self.note = ""
        """Why :meth:`latest` did not use the ``latest`` pointer (empty when it did)."""

    def _check_root(self) -> None:
        if self.root.is_symlink():
            raise CheckpointError(f"checkpoints: {self.root} is a symlink; a run's checkpoints must be a real "
                                  "folder inside the run directory (remove the link or use a new --out)")

    def is_complete(self, folder: Path) -> bool:
        """A real ``step-*`` folder directly inside ``checkpoints/`` holding every checkpoint file (regular
        files, not links) and a meta.json whose ``step`` matches its name."""
        step = step_of_name(folder.name)
        if step is None or folder.parent != self.root or folder.is_symlink() or not folder.is_dir():
            return False
        for name in CHECKPOINT_FILES:
            file = folder / name
            if file.is_symlink() or not file.is_file():
                return False
        try:
            meta = json.loads((folder / "meta.json").read_text()[:MAX_META_BYTES])
        except (OSError, ValueError, RecursionError):
            return False
        return isinstance(meta, dict) and meta.get("step") == step

    def complete_folders(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        if not self.root.is_dir() or self.root.is_symlink():
            return []
        folders = [p for p in self.root.iterdir() if step_of_name(p.name) is not None]
        return sorted((p for p in folders if self.is_complete(p)), key=lambda p: step_of_name(p.name))

    def step_folders(self) -> list[Path]:
        """Every ``step-*`` entry, complete or not."""
        if not self.root.is_dir() or self.root.is_symlink():
            return []
        return sorted(p for p in self.root.iterdir() if step_of_name(p.name) is not None)

    def latest(self) -> Path | None:
        """The checkpoint to resume from: the newest complete ``step-*`` folder inside ``checkpoints/``
        (None if there is none). ``latest`` normally names it; when it does not (empty, a deleted or
        incomplete folder, a path outside the run, or a kill between a folder's rename and the pointer
        update) ``self.note`` says so and the pointer is ignored."""
        self.note = ""
        if self.root.is_symlink():
            self._check_root()
        complete = self.complete_folders()
        newest = complete[-1] if complete else None
        pointer = self.root / LATEST
        named = ""
        if pointer.is_file() and not pointer.is_symlink():
            try:
                named = pointer.read_text()[:256].strip()
            except (OSError, UnicodeDecodeError):
                named = ""
        if newest is None or named == newest.name:
            return newest
        if not pointer.exists() and not pointer.is_symlink():
            why = "there is no checkpoints/latest"
        elif not named:
            why = "checkpoints/latest is empty, unreadable or a link"
        elif "/" in named or "\\" in named or named in (".", ".."):
            why = f"checkpoints/latest names {named[:80]!r}, outside the checkpoints folder (ignored)"
        elif self.is_complete(self.root / named):
            why = f"checkpoints/latest names the older {named[:80]!r} (a kill before the pointer moved)"
        else:
            why = f"checkpoints/latest names {named[:80]!r}, which is missing or incomplete"
        self.note = f"{why}; using the newest complete checkpoint {newest.name}"
        return newest

    def save(self, step: int, *, weights: dict[str, dict[str, torch.Tensor]], state: dict[str, Any],
             meta: dict[str, Any]) -> Path:
        """Write one checkpoint: ``weights`` maps a file stem (model, ema, ...) to a state dict."""
        self._check_root()
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
            # write_id: unique per write, so copies of one checkpoint agree and two writes of the same step
            # (another run, another node's disk) never look alike (the ranks of a resume compare meta.json)
            text = json.dumps({**meta, "step": step, "write_id": uuid.uuid4().hex}, indent=2, default=str)
            with open(create_fresh(tmp / "meta.json"), "w", closefd=True) as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            _fsync_dir(tmp)
        except BaseException:
            # Disk full, a write error or an interrupt: remove the incomplete folder so that
            # nothing half-written stays next to the last complete checkpoint.
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.is_symlink() or (final.exists() and not final.is_dir()):
            raise CheckpointError(f"checkpoints: {final} exists and is not a checkpoint folder; remove it")
        if final.exists():
            # The same step again: swap the complete new folder in by two renames (a kill between
            # them leaves the old folder under a temporary name and the newest complete one is used).
            # Only a folder this manager wrote is deleted; any other (an incomplete folder of that
            # name) is kept as step-N.replaced-<time>.
            if name in self.written:
                old = self.root / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            else:
                old = self.root / f"{name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
            os.rename(final, old)
            os.rename(tmp, final)
            if name in self.written:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(self.root)
        self.written.add(name)
        atomic_write_text(self.root / LATEST, name)
        self._prune(current=name)
        return final

    def _prune(self, current: str) -> None:
        """Delete this manager's own older folders beyond the last ``keep``; never another run's."""
        folders = self.step_folders()
        for old in folders[:-self.keep]:
            if old.name != current and old.name in self.written and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
                self.written.discard(old.name)
        remove_stale_temporaries(self.root)

    def read_meta(self, folder: Path) -> dict[str, Any]:
        """The JSON description (architecture, step ...) of a checkpoint folder."""
        file = folder / "meta.json"
        try:
            raw = file.read_bytes()
        except OSError as exc:
            raise CheckpointError(f"checkpoint: {file} is unreadable ({exc.strerror or exc})") from exc
        return _parse_meta_json(raw, str(file))

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
    manager = CheckpointManager(path)
    latest = None if manager.root.is_symlink() else manager.latest()
    if latest is not None and (latest / "model.safetensors").is_file():
        return latest / "model.safetensors"
    raise CheckpointError(f"checkpoint: found no model.safetensors in {path} (nor a step checkpoint under "
                          f"{path / 'checkpoints'})")
