"""Errors that stop a run after it started (as opposed to configuration errors, which stop it before)."""

from simclrv2.config import ConfigError


class TrainingError(RuntimeError):
    """A run stopped for a reason the user must see (non-finite loss, unwritable output, dead peer...)."""


class CheckpointError(ConfigError):
    """A checkpoint is missing, unsafe to load, or does not match the requested architecture.

    A subclass of :class:`ConfigError` so the command line exits with code 2 before any work."""
