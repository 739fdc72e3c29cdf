"""Every error simclrv2 raises for a problem the user can fix, each with its exit code.

This module sits at the bottom of the package: it imports nothing from simclrv2, so every
layer (``utils``, ``models``, ``data``, ``config``, ``training``, ``interop``, ``inference``,
``cli``) can raise these without an import circle. The command line prints the message of a
:class:`SimCLRv2Error` as one paragraph and exits with its ``exit_code``; it never shows a
traceback for one of these.

Exit codes (documented in the README, "What to expect after a crash"):

====  =====================================================================
0     done
1     stopped during training (:class:`TrainingError`: NaN, write error, dead peer)
2     bad settings, data or checkpoint; nothing was trained (:class:`ConfigError`,
      :class:`DataError`, :class:`CheckpointError`)
130   interrupted with Ctrl-C (resumable)
141   the reader of standard output went away (``simclrv2 models | head``; 128 + SIGPIPE, as a shell reports it)
143   stopped by SIGTERM (inside training after saving a checkpoint; resumable)
====  =====================================================================
"""

from __future__ import annotations

__all__ = [
    "SimCLRv2Error", "ConfigError", "DataError", "MissingSplitError", "CheckpointError",
    "TrainingError", "Terminated", "EXIT_OK", "EXIT_TRAINING", "EXIT_USAGE", "EXIT_INTERRUPTED", "EXIT_TERMINATED",
    "EXIT_BROKEN_PIPE",
]

EXIT_OK = 0
EXIT_TRAINING = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
EXIT_BROKEN_PIPE = 141


class SimCLRv2Error(Exception):
    """Base of every user-facing error; ``exit_code`` is what the command line returns."""

    exit_code: int = EXIT_USAGE


class ConfigError(SimCLRv2Error, ValueError):
    """An invalid configuration; the message names the field and what is allowed (exit 2)."""

    exit_code = EXIT_USAGE


class DataError(SimCLRv2Error, ValueError):
    """A dataset, folder or subset specification that cannot be used as given (exit 2).

    Missing folders, mismatched class lists, bad subset fractions or unknown entries in a
    labelled-image list are mistakes in the user's input, not bugs. Also a ``ValueError`` so
    library users can catch it as one."""

    exit_code = EXIT_USAGE


class MissingSplitError(DataError, FileNotFoundError):
    """The requested split does not exist (e.g. an image folder without ``val``/``test``).

    Also a ``FileNotFoundError`` so callers that treat an absent evaluation split as
    optional can catch it as such, while it remains a :class:`DataError` for the CLI."""


class CheckpointError(ConfigError):
    """A checkpoint is missing, unsafe to load, or does not match the requested architecture.

    A subclass of :class:`ConfigError` so the command line exits with code 2 before any work."""


class TrainingError(SimCLRv2Error, RuntimeError):
    """A run stopped for a reason the user must see (non-finite loss, unwritable output, dead
    peer...); exit 1."""

    exit_code = EXIT_TRAINING


class Terminated(TrainingError):
    """SIGTERM (what batch schedulers send before pre-emption) stopped training after a checkpoint was
    saved; continue with ``--resume`` (exit 143, the shell's code for SIGTERM)."""

    exit_code = EXIT_TERMINATED
