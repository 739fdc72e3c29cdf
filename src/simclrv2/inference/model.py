"""A trained network ready for inference: ``simclrv2.load_model(path)``.

:class:`InferenceModel` wraps the :class:`~simclrv2.models.SimCLRNet` saved by any stage with the
description stored next to its weights (class names, image size, stage) and adds the one
evaluation preprocessing of ``simclrv2 evaluate`` (SPEC §6 'Eval preprocessing',
:func:`simclrv2.data.decode.eval_input`): above 32 px each image is decoded to RGB at **full
resolution** and :class:`simclrv2.augment.EvalTransform` centre-crops 0.875 of the whole image
(crop shape from its aspect ratio, as the reference's ``_compute_crop_shape``) and resizes the
crop once to ``image_size``; at CIFAR sizes (<= 32 px) the image is used as it is (letterboxed
into the ``S x S`` canvas, as a cached folder). The resize kernel is the checkpoint's recorded one
(``bicubic_legacy`` for imported TF1 checkpoints), else ``bicubic``; ``resize_mode`` overrides it.
The network input is float32 RGB in [0, 1], NCHW, **without** mean/std normalisation (the
reference's convention, SPEC §1.7).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import torch
from PIL import Image
from torch import nn

from simclrv2.augment import EvalTransform
from simclrv2.data.decode import eval_input
from simclrv2.errors import CheckpointError, ConfigError
from simclrv2.models.network import SimCLRNet, SimCLRNetOutput
from simclrv2.training.evaluate import eval_transform_for

__all__ = ["INPUT_CONTRACT", "ImageLike", "InferenceModel", "load_model", "input_contract"]

ImageLike = Union[str, Path, Image.Image]

INPUT_CONTRACT = "float32 RGB in [0, 1], NCHW, H = W = {size}; no mean/std normalisation; preprocessing: {prep}"

_RESIZE_WORDS = {
    "bicubic": "bicubic (TF2 tf.image.resize: half-pixel centres, a = -0.5, no antialias)",
    "bicubic_legacy": "bicubic (TF1 tf.image.resize_bicubic: align_corners=False, half_pixel_centers=False, "
                      "a = -0.75)",
    "bilinear": "bilinear (half-pixel centres, no antialias)",
}


def input_contract(image_size: int, resize_mode: str = "bicubic") -> str:
    """The input the network expects, in one sentence (written into exported files); the
    preprocessing is :class:`EvalTransform`'s (SPEC §6 'Eval preprocessing')."""
    size = int(image_size)
    how = _RESIZE_WORDS[resize_mode]
    if EvalTransform(size).center_crop:
        prep = (f"decode at full resolution, centre crop of 0.875 of the shorter side (rint, offset "
                f"((H - h) + 1) // 2), one {how} resize of the crop to {size}x{size}, clip to [0, 1]")
    else:
        prep = f"no crop (image size <= 32), the whole image resized ({how}) to {size}x{size} if needed"
    return INPUT_CONTRACT.format(size=size, prep=prep)


class InferenceModel(nn.Module):
    """A trained :class:`SimCLRNet` in eval mode with its classes, image size and preprocessing.

    ``model(x)`` is the network's forward (the dict of ``features`` / ``hiddens`` /
    ``projection`` / ``logits``); :meth:`predict` and :meth:`embed` take images (paths, PIL
    images, or an already preprocessed float tensor) and return labels or vectors.

    Attributes: ``net`` (the SimCLRNet), ``meta`` (the checkpoint's description), ``classes``
    (names, index = label), ``image_size``, ``stage`` (``pretrain``, ``finetune``, ...), ``source``
    (the weights file).
    """

    def __init__(self, net: SimCLRNet, meta: dict[str, Any], source: str | Path | None = None,
                 resize_mode: str | None = None) -> None:
        super().__init__()
        self.net = net
        self.meta = dict(meta)
        # names stored by the stage; a classifier without names (e.g. an imported checkpoint) gets "0".."N-1"
        num_classes = 0 if net.classifier is None else int(net.classifier.out_features)
        self.classes: list[str] = list(meta.get("classes") or [str(i) for i in range(num_classes)])
        self.image_size = int(meta["image_size"])
        self.stage = str(meta.get("stage") or "")
        self.source = None if source is None else Path(source)
        self.transform = eval_transform_for(self.meta, self.image_size, resize_mode)
        self.eval()

    @property
    def resize_mode(self) -> str:
        """The resize kernel of :meth:`preprocess` (``bicubic``, ``bicubic_legacy`` or ``bilinear``)."""
        return self.transform.resize_mode

    def set_resize_mode(self, resize_mode: str | None) -> "InferenceModel":
        """Preprocess with ``resize_mode`` from now on (None: the checkpoint's default); returns self."""
        self.transform = eval_transform_for(self.meta, self.image_size, resize_mode)
        return self

    # ---- what the network can do ---------------------------------------------------------
    @property
    def has_classifier(self) -> bool:
        """True for fine-tuned, supervised, distilled and linear-eval networks.

        A pretraining run's online linear probe (``stage == "pretrain"``) is a monitor trained on
        stop-gradient features, not a classifier of the method, so it does not count."""
        return self.net.classifier is not None and self.stage != "pretrain"

    @property
    def input_contract(self) -> str:
        return input_contract(self.image_size, self.resize_mode)

    def output_names(self) -> list[str]:
        """Outputs :meth:`output_view` and :meth:`embed` accept (``logits`` only with a classifier)."""
        names = self.net.output_names()
        kept = self.meta.get("head_layers_kept")
        if kept is not None and kept < int(self.meta.get("num_proj_layers", 0)):
            # a fine-tuned head cut after layer ``kept`` (SPEC §2.1): its last layer is not the projection
            names = [n for n in names if n != "projection"]
        return names if self.has_classifier else [n for n in names if n != "logits"]

    def output_view(self, name: str = "logits") -> SimCLRNetOutput:
        """``x -> one tensor`` module for ``name`` (see :meth:`SimCLRNet.output_view`), in eval mode."""
        if name == "logits":
            self.require_classifier("this")
        if name not in self.output_names():
            raise ConfigError(f"layer: {name!r} is not an output of this network; choose one of "
                              f"{', '.join(self.output_names())}")
        return self.net.output_view(name).eval()

    def require_classifier(self, command: str) -> None:
        """Refuse a network without a classifier with the message every command shares."""
        if self.has_classifier:
            return
        where = f" ({self.source})" if self.source is not None else ""
        what = ("a pretraining checkpoint: its online linear probe is a training monitor, not a classifier"
                if self.stage == "pretrain" else "it has no classifier")
        raise CheckpointError(f"checkpoint{where}: {command} needs a classifier, but this is {what}. Fine-tune "
                              "it first (simclrv2 finetune --checkpoint RUN ...), or use `simclrv2 embed` for "
                              "its features")

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        return self.net(x)

    # ---- preprocessing ----------------------------------------------------------------------
    def preprocess(self, images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
        """Network input for one image or a list: float32 ``[B, 3, S, S]`` in [0, 1] (SPEC §6;
        :func:`simclrv2.data.decode.eval_input`, the preprocessing of ``simclrv2 evaluate``)."""
        items = [images] if isinstance(images, (str, Path, Image.Image)) else list(images)
        if not items:
            return torch.empty((0, 3, self.image_size, self.image_size))
        return torch.stack([eval_input(item, self.transform) for item in items])

    def _as_input(self, images: ImageLike | Sequence[ImageLike] | torch.Tensor) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            x = images if images.dim() == 4 else images.unsqueeze(0)
            s = self.image_size
            if x.dtype != torch.float32 or tuple(x.shape[1:]) != (3, s, s):
                raise ConfigError(f"images: a tensor input must be {self.input_contract}; got {x.dtype} "
                                  f"{tuple(x.shape)}")
            return x
        return self.preprocess(images)

    def _device(self) -> torch.device:
        return next(self.net.parameters()).device

    # ---- inference --------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, images: ImageLike | Sequence[ImageLike] | torch.Tensor) -> torch.Tensor:
        """Classifier logits ``[B, num_classes]`` (fp32, CPU)."""
        self.require_classifier("predict")
        x = self._as_input(images).to(self._device())
        return self.output_view("logits")(x).float().cpu()

    def predict(self, images: ImageLike | Sequence[ImageLike] | torch.Tensor, top_k: int = 5) -> list[dict[str, Any]]:
        """Top-k classes of each image: ``[{"label", "prob", "labels", "probs"}, ...]``.

        ``label``/``prob`` are the most likely class and its softmax probability; ``labels``
        / ``probs`` the ``top_k`` best (capped at the number of classes), most likely first."""
        return top_k_rows(self.logits(images), self.classes, top_k)

    @torch.no_grad()
    def embed(self, images: ImageLike | Sequence[ImageLike] | torch.Tensor, layer: str = "features") -> torch.Tensor:
        """Vectors ``[B, D]`` of ``layer`` (``features`` = encoder output, ``proj_j``, ``projection``)."""
        x = self._as_input(images).to(self._device())
        return self.output_view(layer)(x).float().cpu()


def top_k_rows(logits: torch.Tensor, classes: Sequence[str], top_k: int) -> list[dict[str, Any]]:
    """Softmax probabilities of ``logits`` as per-image dicts of the ``top_k`` best classes."""
    if top_k < 1:
        raise ConfigError(f"top_k: must be >= 1; got {top_k}")
    probs = torch.softmax(logits.float(), dim=1)
    k = min(top_k, probs.shape[1])
    values, indices = probs.topk(k, dim=1)
    rows = []
    for vals, idx in zip(values.tolist(), indices.tolist()):
        labels = [classes[i] for i in idx]
        rows.append({"label": labels[0], "prob": vals[0], "labels": labels, "probs": vals})
    return rows


def load_model(path: str | Path, *, device: str | torch.device = "cpu",
               resize_mode: str | None = None) -> InferenceModel:
    """The network saved at ``path`` (a run directory or a ``.safetensors`` file), in eval mode.

    ``resize_mode`` sets the kernel of :meth:`InferenceModel.preprocess` (default: the checkpoint's
    recorded one, ``bicubic_legacy`` for imported TF1 checkpoints, else ``bicubic``).

    Raises :class:`~simclrv2.errors.CheckpointError` for a missing or foreign file."""
    from simclrv2.training.model_io import build_from_meta, load_checkpoint, load_state_into

    state, meta, file = load_checkpoint(path)
    # Built on the meta device (no random initialisation: ~6 s for a ResNet-18 on a CPU), then every
    # parameter and buffer is overwritten by the checkpoint (a strict load, as load_network does).
    with torch.device("meta"):
        net = build_from_meta(meta)
    net = net.to_empty(device="cpu")
    with torch.no_grad():
        for name, buffer in net.named_buffers():
            if name.endswith("num_batches_tracked"):
                buffer.zero_()  # not always saved; unused in eval mode
    load_state_into(net, state, source=str(file), expected_arch=meta["arch"], source_arch=meta["arch"])
    return InferenceModel(net, meta, source=file, resize_mode=resize_mode).to(torch.device(device))
