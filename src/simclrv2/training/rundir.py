"""One folder per run: effective config, logs (JSON lines + TensorBoard), checkpoints, results.

A run OWNS its folder, so that runs never lose or mix data:

* ``simclrv2-run.json`` (the marker) says the folder is a simclrv2 run of one stage, records the
  settings that change the training, and keeps the history of starts and resumes.
* ``.lock`` is held (``fcntl.flock``) for as long as a process writes to the run; the kernel drops
  it when the process ends, even on SIGKILL. Where file locks are unsupported the file itself is
  the lock (``O_EXCL``) and a stale one is recognised by its PID and host. A second writer is
  refused (exit 2).
* An ``--out`` that holds anything but a run, or a run without ``--resume``, is refused (exit 2)
  with the choices: ``--resume``, a new ``--out``, or ``--overwrite``, which moves the old contents
  aside to ``OUT.old-<time>`` (nothing is deleted).
* ``--resume`` with settings that change the training is refused, listing the differences;
  ``--resume-changed`` accepts them and records them in the history. ``config.yaml`` is written
  only after these checks pass.
* Nothing is written through a symlink: a run directory containing links is refused, and every
  file is created fresh and renamed into place (``utils/checkpoint``). Temporary files a killed
  process left behind are removed when the next one takes the lock.

Only the main process writes; the other processes learn rank 0's decision (or its error).
"""

from __future__ import annotations

import errno
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

from simclrv2.config import Config, fields_for_stage, save_config
from simclrv2.errors import ConfigError, TrainingError
from simclrv2.utils import distributed as dist_utils
from simclrv2.utils.checkpoint import (CheckpointManager, atomic_write_text, create_fresh, remove_stale_temporaries,
                                       TMP_DIR_RE, TMP_FILE_RE)

MARKER = "simclrv2-run.json"
LOCK = ".lock"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)

NOT_TRAINING = frozenset({
    "out", "resume", "resume_changed", "overwrite", "force", "device", "precision", "channels_last", "compile",
    "num_workers", "progress", "log_every", "checkpoint_every", "eval_batch_size", "eval_every", "evals_per_stage", "dist_timeout",
    "download", "data_root", "strict", "max_steps", "knn_every", "knn_k"})
"""Fields a resumed run may change freely: where and how fast it runs, what it logs, when it stops
early (``max_steps``; the schedule follows ``--epochs``/``--schedule-steps``). Every other field of the
stage changes the training and needs ``--resume-changed``."""


def default_run_dir(stage: str) -> Path:
    """``runs/<stage>-<time>``, created here so two runs started in the same second get two folders."""
    base = Path("runs") / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"out: could not create a new run directory next to {base}; pass --out")


def training_settings(cfg: Config, stage: str) -> dict[str, Any]:
    """The settings of ``stage`` that change what is trained (JSON values), for the resume check."""
    values = {f.name: getattr(cfg, f.name) for f in fields_for_stage(stage) if f.name not in NOT_TRAINING}
    return json.loads(json.dumps(values, default=str))


def _host() -> str:
    return socket.gethostname()


class RunLock:
    """The ``.lock`` of a run directory (see module doc)."""

    _held: dict[str, "RunLock"] = {}
    """Locks this process holds, by folder: a stage that failed in this process (e.g. a library user
    calling ``pretrain`` again after an exception) does not lock itself out."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / LOCK
        self.fd: int | None = None
        self.exclusive_file = False

    def _describe(self) -> str:
        info = self._read()
        if not info:
            return "another process"
        return f"process {info.get('pid')} on {info.get('host')} (since {info.get('since', '?')})"

    def _read(self) -> dict[str, Any]:
        try:
            with open(os.open(self.path, os.O_RDONLY | _NOFOLLOW), "r", closefd=True) as handle:
                info = json.loads(handle.read(4096) or "{}")
            return info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            return {}

    def _refuse(self) -> ConfigError:
        return ConfigError(f"out: {self.folder} is in use by {self._describe()}; wait for it to finish, or "
                           f"choose another --out. If that process is gone, remove {self.path}.")

    def acquire(self) -> None:
        key = str(self.folder.resolve())
        earlier = RunLock._held.pop(key, None)
        if earlier is not None:
            earlier.release()
        if self.path.is_symlink():
            raise ConfigError(f"out: {self.path} is a symlink; remove it")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._refuse() from None
        except (ImportError, OSError) as exc:  # no file locks here (some network file systems)
            os.close(fd)
            if isinstance(exc, OSError) and exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            self._acquire_exclusive_file()
            RunLock._held[key] = self
            return
        self.fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, self._info().encode())
        RunLock._held[key] = self

    def _info(self) -> str:
        return json.dumps({"pid": os.getpid(), "host": _host(), "since": time.strftime("%Y-%m-%d %H:%M:%S")})

    def _acquire_exclusive_file(self) -> None:
        """The lock file itself is the lock; a stale one (its process is dead on this host) is replaced."""
        info = self._read()
        if info and info.get("host") == _host() and isinstance(info.get("pid"), int):
            try:
                os.kill(info["pid"], 0)
            except ProcessLookupError:
                self.path.unlink(missing_ok=True)  # stale: that process is gone
            except PermissionError:
                pass
        elif not info:
            self.path.unlink(missing_ok=True)  # empty: created by a lock that worked with flock
        try:
            fd = create_fresh(self.path)
        except FileExistsError:
            raise self._refuse() from None
        os.write(fd, self._info().encode())
        os.close(fd)
        self.exclusive_file = True

    def release(self) -> None:
        RunLock._held.pop(str(self.folder.resolve()), None)
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        if self.exclusive_file:
            self.path.unlink(missing_ok=True)
            self.exclusive_file = False


def _is_ours(name: str) -> bool:
    """Entries a run may find in a folder it is about to start in: its lock and temporaries."""
    return name == LOCK or bool(TMP_FILE_RE.match(name)) or bool(TMP_DIR_RE.match(name))


def _symlinks_inside(path: Path, limit: int = 3) -> list[str]:
    found = []
    for root, dirs, files in os.walk(path, followlinks=False):
        for name in dirs + files:
            if os.path.islink(os.path.join(root, name)):
                found.append(os.path.relpath(os.path.join(root, name), path))
                if len(found) >= limit:
                    return found
    return found


def _looks_like_old_run(entries: set[str]) -> bool:
    """A run directory written before run markers existed."""
    return "config.yaml" in entries and bool(entries & {"checkpoints", "logs"})


def _move_aside(path: Path, entries: list[str]) -> Path:
    """Move ``entries`` of ``path`` to a new sibling ``PATH.old-<time>`` (or, across file systems, to
    ``PATH/.old-<time>``); nothing is deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        aside = path.with_name(f"{path.name}.old-{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            aside.mkdir()
            break
        except FileExistsError:
            continue
        except OSError:
            aside = path / f".old-{stamp}-{n}"
            aside.mkdir()
            break
    for name in entries:
        os.rename(path / name, aside / name)
    return aside


class RunDirectory:
    """Paths and writers of a run. Use :meth:`create` on every process; writes happen on rank 0."""

    def __init__(self, path: Path, stage: str, is_main: bool = True) -> None:
        self.path = path
        self.stage = stage
        self.is_main = is_main
        self.checkpoints = CheckpointManager(path)
        self.lock: RunLock | None = None
        self.resuming = False
        self._jsonl = None
        self._tb = None

    @classmethod
    def create(cls, cfg: Config, stage: str, is_main: bool = True) -> "RunDirectory":
        """Claim the run directory ``cfg.out`` (or a new ``runs/<stage>-<time>``) for ``stage``: every
        check of the module doc, then the lock, the marker and ``config.yaml``. Every process calls it;
        rank 0 decides and the others get its folder, or raise its error."""

        def claim() -> tuple[str, bool]:
            path = Path(cfg.out) if cfg.out else default_run_dir(stage)
            run = cls(path, stage, True)
            run._claim(cfg)
            claimed.append(run)
            return str(path), run.resuming

        claimed: list[RunDirectory] = []
        if not dist_utils.is_distributed():
            claim()
            run = claimed[0]
            run.is_main = is_main
            return run
        path, resuming = dist_utils.share_outcome(claim if is_main else None)
        if claimed:
            return claimed[0]
        run = cls(Path(path), stage, is_main)
        run.resuming = resuming
        return run

    def _claim(self, cfg: Config) -> None:
        path, stage = self.path, self.stage
        if path.exists() and not path.is_dir():
            raise ConfigError(f"out: {path} exists and is not a directory")
        try:
            path.mkdir(parents=True, exist_ok=True)
            self.lock = RunLock(path)
            self.lock.acquire()
        except OSError as exc:
            raise ConfigError(f"out: cannot write to run directory {str(path)!r} ({exc.strerror or exc})") from exc
        try:
            self._check_and_start(cfg)
        except BaseException:
            self.close()
            raise

    def _check_and_start(self, cfg: Config) -> None:
        path, stage = self.path, self.stage
        entries = sorted(name for name in os.listdir(path) if not _is_ours(name))
        marker = self._read_marker() if MARKER in entries else None
        is_run = marker is not None or _looks_like_old_run(set(entries))
        resume = bool(getattr(cfg, "resume", False))
        if entries and getattr(cfg, "overwrite", False):
            aside = _move_aside(path, entries)
            print(f"overwrite: moved the previous contents of {path} to {aside}", flush=True)
            entries, marker, is_run = [], None, False
        elif entries and not is_run:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise ConfigError(f"out: {path} is not empty ({shown}) and is not a simclrv2 run directory; nothing "
                              "was written. Choose a new --out, or pass --overwrite to move its contents aside to "
                              f"{path.name}.old-<time> (nothing is deleted)")
        elif is_run and marker is not None and marker.get("stage") not in (None, stage):
            raise ConfigError(f"out: {path} holds a {marker.get('stage')} run, not a {stage} run; choose a new "
                              "--out (or --overwrite to move it aside)")
        elif is_run and not resume:
            finished = (path / "results.json").is_file()
            latest = self.checkpoints.latest() if not self.checkpoints.root.is_symlink() else None
            what = "a finished" if finished else ("an unfinished" if latest is not None else "a started")
            at = f" (last checkpoint {latest.name})" if latest is not None else ""
            raise ConfigError(f"out: {path} already holds {what} {stage} run{at}; nothing was changed. Continue "
                              "it with --resume, choose a new --out, or pass --overwrite to move the old run "
                              f"aside to {path.name}.old-<time> (nothing is deleted)")
        links = _symlinks_inside(path)
        if links:
            raise ConfigError(f"out: {path} contains symlinks ({', '.join(links)}); a run never writes through "
                              "links. Remove them, or choose a new --out")
        self.resuming = bool(is_run and resume)
        settings = training_settings(cfg, stage)
        history = list(marker.get("history", [])) if marker else []
        entry: dict[str, Any] = {"action": "resume" if self.resuming else "start",
                                 "time": time.strftime("%Y-%m-%d %H:%M:%S"), "pid": os.getpid(), "host": _host()}
        recorded = marker.get("settings") if marker else None
        if self.resuming and isinstance(recorded, dict) and stage not in ("pipeline", "demo"):
            # (the pipeline compares each stage's settings itself and re-runs changed stages)
            changed = {k: {"was": recorded.get(k), "now": v} for k, v in settings.items()
                       if k in recorded and recorded[k] != v}
            changed.update({k: {"was": None, "now": v} for k, v in settings.items()
                            if k not in recorded and v is not None})
            if changed and not getattr(cfg, "resume_changed", False):
                listed = "; ".join(f"--{k.replace('_', '-')} {_show(d['was'])} -> {_show(d['now'])}"
                                   for k, d in list(changed.items())[:8])
                raise ConfigError(f"resume: these settings differ from the run in {path}: {listed}"
                                  + (f" (and {len(changed) - 8} more)" if len(changed) > 8 else "")
                                  + ". They change the training, so resuming would mix two runs. Use the original "
                                  "settings (see its config.yaml), a new --out, or --resume-changed to continue "
                                  "with the new ones (recorded in " + MARKER + ")")
            if changed:
                entry["changed"] = changed
                print(f"resume: continuing with changed settings ({', '.join(changed)}), as "
                      "--resume-changed asks; recorded in " + MARKER, flush=True)
                recorded = {**recorded, **settings}
        elif self.resuming and recorded is None:
            entry["note"] = "settings were not recorded by the run being resumed"
        history.append(entry)
        for folder in (path, path / "checkpoints", path / "logs"):
            for stale in remove_stale_temporaries(folder, any_pid=True):
                print(f"removed a temporary file left by an interrupted run: {stale}", flush=True)
        try:
            (path / "logs").mkdir(exist_ok=True)
            probe = path / f".write-test.tmp-{os.getpid()}-{os.urandom(4).hex()}"
            os.close(create_fresh(probe))
            probe.unlink()
            self._marker = {"simclrv2_run": 1, "stage": stage,
                            "settings": recorded if isinstance(recorded, dict) else settings, "history": history}
            self._write_marker()
            save_config(cfg, path / "config.yaml", stage)
        except OSError as exc:
            raise ConfigError(f"out: cannot write to run directory {str(path)!r} ({exc.strerror or exc})") from exc

    def _read_marker(self) -> dict[str, Any] | None:
        file = self.path / MARKER
        try:
            if file.is_symlink():
                raise ConfigError(f"out: {file} is a symlink; remove it")
            raw = file.read_bytes()[:1 << 20]
            marker = json.loads(raw)
        except (OSError, ValueError, RecursionError):
            raise ConfigError(f"out: {file} is unreadable or damaged; choose a new --out, or --overwrite to move "
                              "the run aside") from None
        if not isinstance(marker, dict) or not isinstance(marker.get("history", []), list):
            raise ConfigError(f"out: {file} is not a simclrv2 run marker; choose a new --out, or --overwrite")
        return marker

    def _write_marker(self) -> None:
        atomic_write_text(self.path / MARKER, json.dumps(self._marker, indent=2, default=str))

    def record(self, **details: Any) -> None:
        """Add ``details`` (e.g. the checkpoint a resume continued from) to the latest history entry."""
        if not self.is_main or not getattr(self, "_marker", None):
            return
        self._marker["history"][-1].update(details)
        try:
            self._write_marker()
        except OSError as exc:
            raise _write_error(self.path / MARKER, exc) from exc

    # ---- logging -----------------------------------------------------------------------
    def log(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        """Append one JSON line and the TensorBoard scalars for ``metrics`` at ``step``."""
        if not self.is_main:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        record = {"step": step, "stage": self.stage, "time": round(time.time(), 3),
                  **{f"{prefix}/{k}": v for k, v in clean.items()}}
        try:
            if self._jsonl is None:
                self._jsonl = self._open_log(self.path / "logs" / "metrics.jsonl")
            self._jsonl.write(json.dumps(record) + "\n")
            writer = self._tensorboard()
            if writer is not None:
                for key, value in clean.items():
                    if isinstance(value, float) and math.isfinite(value):
                        writer.add_scalar(f"{prefix}/{key}", value, step)
        except OSError as exc:
            raise _write_error(self.path / "logs", exc) from exc

    @staticmethod
    def _open_log(path: Path):
        """Append to ``path`` without following a symlink; a line cut by a kill is ended first, so the
        next record starts on its own line."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | os.O_CLOEXEC, 0o644)
        handle = open(fd, "a", buffering=1, closefd=True)
        size = os.fstat(fd).st_size
        if size:
            with open(os.open(path, os.O_RDONLY | _NOFOLLOW), "rb", closefd=True) as reader:
                reader.seek(size - 1)
                if reader.read(1) != b"\n":
                    handle.write("\n")
        return handle

    def _tensorboard(self):
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                self._tb = False
                return None
            self._tb = SummaryWriter(log_dir=str(self.path / "logs" / "tensorboard"))
        return self._tb or None

    def write_results(self, results: dict[str, Any]) -> Path:
        path = self.path / "results.json"
        if self.is_main:
            try:
                atomic_write_text(path, json.dumps(results, indent=2, default=float))
            except OSError as exc:
                raise _write_error(path, exc) from exc
        return path

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _write_error(path: Path, exc: OSError):
    return TrainingError(f"could not write {path} ({exc.strerror or exc}); free disk space or fix the "
                         "permissions, then continue with --resume (the last complete checkpoint is intact)")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The JSON-lines log of a run (used by reports and tests). A line that is not a JSON object (the
    last line cut by a kill or a full disk) is skipped."""
    path = Path(run_dir) / "logs" / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
