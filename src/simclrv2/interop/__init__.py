"""Interoperability with the reference TensorFlow code: read the released SimCLRv2 TF1
checkpoints without TensorFlow, map their variables to our networks, download them (SPEC §8)."""

from simclrv2.interop.tf_bundle import TFCheckpoint, resolve_prefix

__all__ = ["TFCheckpoint", "resolve_prefix"]
