"""One folder per run: effective config, logs (JSON lines + TensorBoard), checkpoints, results.

Only the main process writes. The folder is checked for writability before any work, so a
typo'd or read-only ``--out`` fails in the first second instead of at the first checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from simclrv2.config import Config, save_config
from simclrv2.errors import ConfigError
from simclrv2.utils.checkpoint import CheckpointManager, atomic_write_text


def default_run_dir(stage: str) -> Path:
    return Path("runs") / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"


class RunDirectory:
    """Paths and writers of a run. Use :meth:`create` on every process; writes happen on rank 0."""

    def __init__(self, path: Path, stage: str, is_main: bool = True) -> None:
        self.path = path
        self.stage = stage
        self.is_main = is_main
        self.checkpoints = CheckpointManager(path)
        self._jsonl = None
        self._tb = None

    @classmethod
    def create(cls, cfg: Config, stage: str, is_main: bool = True) -> "RunDirectory":
        path = Path(cfg.out) if cfg.out else default_run_dir(stage)
        run = cls(path, stage, is_main)
        if is_main:
            try:
                (path / "logs").mkdir(parents=True, exist_ok=True)
                probe = path / ".write-test"
                probe.write_text("ok")
                probe.unlink()
            except OSError as exc:
                raise ConfigError(f"out: cannot write to run directory {str(path)!r} ({exc.strerror or exc})") \
                    from exc
            save_config(cfg, path / "config.yaml", stage)
        return run

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
                self._jsonl = open(self.path / "logs" / "metrics.jsonl", "a", buffering=1)
            self._jsonl.write(json.dumps(record) + "\n")
            writer = self._tensorboard()
            if writer is not None:
                for key, value in clean.items():
                    if isinstance(value, float) and math.isfinite(value):
                        writer.add_scalar(f"{prefix}/{key}", value, step)
        except OSError as exc:
            raise _write_error(self.path / "logs", exc) from exc

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


def _write_error(path: Path, exc: OSError):
    from simclrv2.errors import TrainingError
    return TrainingError(f"could not write {path} ({exc.strerror or exc}); free disk space or fix the "
                         "permissions, then continue with --resume (the last complete checkpoint is intact)")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The JSON-lines log of a run (used by reports and tests)."""
    path = Path(run_dir) / "logs" / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
