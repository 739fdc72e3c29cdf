"""simclrv2: SimCLRv2 (Chen et al., 2020) in PyTorch.

Three steps, each a command and a Python API: task-agnostic contrastive pretraining,
fine-tuning on few labels from the first projection-head layer, and distillation of the
fine-tuned teacher into a student using unlabelled images. See ``SPEC.md`` sections cited
in each module's docstring.
"""

__version__ = "0.1.0"
