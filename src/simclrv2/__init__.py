"""simclrv2: SimCLRv2 (Chen et al., 2020) in PyTorch.

Three steps, each a command and a Python API: task-agnostic contrastive pretraining,
fine-tuning on few labels from the first projection-head layer, and distillation of the
fine-tuned teacher into a student using unlabelled images. See ``SPEC.md`` sections cited
in each module's docstring.

Python API (imports are lazy, so ``import simclrv2`` stays light):

* ``simclrv2.run(stage, **options)`` and ``simclrv2.pretrain / finetune / distill / evaluate /
  linear_eval / supervised / pipeline (**options)``: the options are the command-line flags with
  underscores (``max_per_class=20``), turned into a Config by :func:`simclrv2.config.build_config`
  exactly as on the command line; each returns the stage's results dict;
* ``simclrv2.load_model(path)``: a trained network for inference
  (:class:`simclrv2.inference.InferenceModel`: ``.classes``, ``.image_size``, ``.preprocess``,
  ``.predict``, ``.embed``).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "run", "load_model", "pretrain", "finetune", "distill", "evaluate", "linear_eval",
           "supervised", "pipeline"]


def run(stage: str, **options: Any) -> dict[str, Any]:
    """Run one stage (``pretrain``, ``finetune``, ``distill``, ``evaluate``, ``linear-eval``,
    ``supervised``, ``pipeline``, ``demo``) with the command line's option names; returns its results.

    Invalid options raise :class:`simclrv2.errors.ConfigError` before any work starts."""
    from simclrv2.cli.main import _runner
    from simclrv2.config import STAGES, build_config
    from simclrv2.errors import ConfigError

    stage = stage.replace("_", "-")
    if stage not in STAGES:
        raise ConfigError(f"stage: {stage!r} is not one of {', '.join(STAGES)}")
    cfg = build_config(stage, None, {key.replace("-", "_"): value for key, value in options.items()})
    return _runner(stage)(cfg)


def _stage(name: str):
    def call(**options: Any) -> dict[str, Any]:
        return run(name, **options)

    call.__name__ = call.__qualname__ = name.replace("-", "_")
    call.__doc__ = f"``simclrv2 {name}`` from Python: ``run({name!r}, **options)``."
    return call


pretrain = _stage("pretrain")
finetune = _stage("finetune")
distill = _stage("distill")
evaluate = _stage("evaluate")
linear_eval = _stage("linear-eval")
supervised = _stage("supervised")
pipeline = _stage("pipeline")


def load_model(path: Any, **kwargs: Any):
    """The network saved at ``path`` (run directory or .safetensors) in eval mode, ready to predict;
    see :func:`simclrv2.inference.load_model`."""
    from simclrv2.inference import load_model as _load

    return _load(path, **kwargs)
