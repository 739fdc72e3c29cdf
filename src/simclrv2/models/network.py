"""Encoder + projection head + optional linear classifier (SPEC §0, §2).

One module serves the three stages of the paper:

* pretraining: ``projection`` (last head activation) feeds NT-Xent; an optional
  classifier on ``stop_gradient(hiddens[ft_proj_selector])`` is TF2's
  ``lineareval_while_pretraining`` online probe (``classifier_stop_grad=True``);
* fine-tuning: the classifier reads ``hiddens[ft_proj_selector]`` (1 = first head layer
  for 1%/10% labels, 0 = head input for 100%) and gradients flow into everything;
* distillation students: no head, classifier on the encoder features.
"""

from __future__ import annotations

import torch
from torch import nn

from .heads import LinearClassifier, ProjectionHead
from .resnet import ResNet

__all__ = ["SimCLRNet", "SimCLRNetOutput"]


class SimCLRNet(nn.Module):
    """``encoder`` -> ``head`` (hiddens list) -> ``classifier`` on a selected activation.

    Args:
        encoder: the ResNet trunk (``forward(x) -> [B, feature_dim]``).
        head: projection head or ``None`` (equivalent to a 0-layer head).
        classifier: supervised linear head or ``None``.
        ft_proj_selector: which head activation feeds the classifier (0 = head input,
            ``j`` = output of layer ``j``, -1 = last); must be <= number of head layers.
        classifier_stop_grad: detach the classifier input (online linear probe).

    ``forward(x)`` returns ``{"features", "hiddens", "projection", "logits"}`` (``projection`` /
    ``logits`` are ``None`` without a head / classifier); :meth:`output_view` gives one of them as a
    ``Tensor -> Tensor`` module for ``torch.jit.trace`` / ``torch.jit.script`` / ONNX export.
    """

    # Python-only properties: TorchScript must not try to compile them (``torch.jit.script``).
    __jit_unused_properties__ = ["num_head_layers", "feature_dim", "selected_dim"]

    def __init__(
        self,
        encoder: ResNet | nn.Module,
        head: ProjectionHead | None = None,
        classifier: LinearClassifier | nn.Module | None = None,
        ft_proj_selector: int = 0,
        classifier_stop_grad: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.classifier = classifier
        n = self.num_head_layers
        if ft_proj_selector > n or ft_proj_selector < -(n + 1):
            raise ValueError(
                f"ft_proj_selector={ft_proj_selector} is out of range: the projection head has {n} layer(s), "
                f"so the selector must be in [{-(n + 1)}, {n}] (0 = head input, -1 = last activation)"
            )
        self.ft_proj_selector = ft_proj_selector
        self.classifier_stop_grad = classifier_stop_grad
        if classifier is not None and isinstance(classifier, nn.Linear):
            expected = self.selected_dim
            if classifier.in_features != expected:
                raise ValueError(
                    f"classifier expects {classifier.in_features} input features but head activation "
                    f"{ft_proj_selector} has width {expected}"
                )

    @property
    def num_head_layers(self) -> int:
        return 0 if self.head is None else self.head.num_layers

    @property
    def feature_dim(self) -> int:
        return int(getattr(self.encoder, "feature_dim"))

    @property
    def selected_dim(self) -> int:
        """Width of ``hiddens[ft_proj_selector]`` (the classifier input)."""
        if self.head is None:
            return self.feature_dim
        return self.head.out_dim_at(self.ft_proj_selector)

    def hiddens(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[features, head layer 1, ..., last head layer]`` (the reference's ``hiddens_list``)."""
        features = self.encoder(x)
        return [features] if self.head is None else self.head(features)

    def classify(self, hiddens: list[torch.Tensor]) -> torch.Tensor:
        """Logits of the classifier on ``hiddens[ft_proj_selector]`` (needs a classifier)."""
        if self.classifier is None:
            raise ValueError("this network has no classifier (a pretraining network without labels)")
        selected = hiddens[self.ft_proj_selector]
        if self.classifier_stop_grad:
            selected = selected.detach()
        return self.classifier(selected)

    # The dict output (a list and possibly None entries) is what the training stages read; it is
    # not a TorchScript type, so scripting compiles the single-tensor views (output_view) instead.
    @torch.jit.unused
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor] | None]:
        hiddens = self.hiddens(x)
        projection = hiddens[-1] if len(hiddens) > 1 else None
        logits = None if self.classifier is None else self.classify(hiddens)
        return {"features": hiddens[0], "hiddens": hiddens, "projection": projection, "logits": logits}

    # ---- single-tensor views (inference, torch.jit.trace / script, ONNX) -------------------
    def output_names(self) -> list[str]:
        """Names accepted by :meth:`output_view`: ``logits`` (with a classifier), ``features``
        (head input), ``proj_1`` .. ``proj_k`` (head layer outputs) and ``projection`` (the last)."""
        names = ["features"] + [f"proj_{j}" for j in range(1, self.num_head_layers + 1)]
        if self.num_head_layers:
            names.append("projection")
        if self.classifier is not None:
            names.insert(0, "logits")
        return names

    def output_view(self, name: str = "logits") -> "SimCLRNetOutput":
        """A module ``x -> one tensor`` sharing this network's weights (see :class:`SimCLRNetOutput`)."""
        return SimCLRNetOutput(self, name)


class SimCLRNetOutput(nn.Module):
    """One named output of a :class:`SimCLRNet` as a plain ``Tensor -> Tensor`` module.

    :meth:`SimCLRNet.forward` returns a dict with a list and possibly ``None`` entries (what the
    training stages read); tracers, ``torch.jit.script`` and ONNX need a single tensor.  This view
    runs exactly the same layers (same numerics) and returns only the requested activation:
    ``logits``, ``features``, ``proj_j`` (output of head layer ``j``) or ``projection`` (last).
    """

    def __init__(self, net: SimCLRNet, name: str = "logits") -> None:
        super().__init__()
        valid = net.output_names()
        if name not in valid:
            raise ValueError(f"unknown output {name!r} for this network; choose one of {', '.join(valid)}")
        self.net = net
        self.name = name
        self.is_logits = name == "logits"
        self.index = -1 if name == "projection" else (int(name[5:]) if name.startswith("proj_") else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hiddens = self.net.hiddens(x)
        if self.is_logits:
            return self.net.classify(hiddens)
        return hiddens[self.index]

    def extra_repr(self) -> str:
        return f"output={self.name!r}"
