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

__all__ = ["SimCLRNet"]


class SimCLRNet(nn.Module):
    """``encoder`` -> ``head`` (hiddens list) -> ``classifier`` on a selected activation.

    Args:
        encoder: the ResNet trunk (``forward(x) -> [B, feature_dim]``).
        head: projection head or ``None`` (equivalent to a 0-layer head).
        classifier: supervised linear head or ``None``.
        ft_proj_selector: which head activation feeds the classifier (0 = head input,
            ``j`` = output of layer ``j``, -1 = last); must be <= number of head layers.
        classifier_stop_grad: detach the classifier input (online linear probe).

    ``forward(x)`` returns ``{"features", "hiddens", "projection", "logits"}``.
    """

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

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor] | None]:
        features = self.encoder(x)
        hiddens = [features] if self.head is None else self.head(features)
        projection = hiddens[-1] if len(hiddens) > 1 else None
        logits = None
        if self.classifier is not None:
            selected = hiddens[self.ft_proj_selector]
            if self.classifier_stop_grad:
                selected = selected.detach()
            logits = self.classifier(selected)
        return {"features": features, "hiddens": hiddens, "projection": projection, "logits": logits}
