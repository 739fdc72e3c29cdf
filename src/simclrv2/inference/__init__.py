"""Use a trained network: load it, classify images, extract embeddings, export it.

* :mod:`.model` -- :func:`load_model` and :class:`InferenceModel` (``.classes``, ``.image_size``,
  ``.preprocess``, ``.predict``, ``.embed``);
* :mod:`.images` -- the image files a command reads (files and folders, unreadable ones reported);
* :mod:`.predict` / :mod:`.embed` / :mod:`.export` -- ``simclrv2 predict | embed | export``.

Every path uses the one evaluation preprocessing of ``simclrv2 evaluate`` (SPEC §6 'Eval
preprocessing', :func:`simclrv2.data.decode.eval_input` with :class:`simclrv2.augment.EvalTransform`):
RGB in [0, 1], no mean/std normalisation; above 32 px each image decoded at full resolution,
centre crop of 0.875 and one resize with the checkpoint's kernel (``--resize-mode``).
"""

from .model import INPUT_CONTRACT, InferenceModel, load_model

__all__ = ["INPUT_CONTRACT", "InferenceModel", "load_model"]
