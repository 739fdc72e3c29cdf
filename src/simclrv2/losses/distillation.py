"""Distillation losses of the paper's step 3 (Eq. 2 and Eq. 3; SPEC §0, §5).

Eq. 2 (default, no labels):
    L = - sum_x sum_y P_T(y|x; τ) log P_S(y|x; τ),   P(y|x; τ) = softmax(logits / τ)
reported here as a batch MEAN over x (the sum differs only by the batch size, which the
learning rate absorbs). The teacher is fixed, so its logits are detached.

Hinton et al. multiply the soft-target term by τ² to keep gradient magnitudes comparable
across temperatures; the paper's Eq. 2 does NOT, while the reference distillation colab
(SPEC §9) uses τ²·CE. These functions follow the paper by default and expose
``scale_by_temperature_squared=True`` for the colab's variant; the ``distill`` stage turns it
on by default (``--no-temperature-squared`` gives Eq. 2 as written, see training/distill.py).

Eq. 3 (optional mix with true labels):
    L = -(1-α) sum_{labelled} log P_S(y_i|x_i) - α · (Eq. 2 term)
The label term uses P_S at temperature 1 (the equation writes P^S(y_i|x_i) without τ). Both
sums run over the same batch, so both are divided by the batch size B: a labelled row's
cross-entropy weighs as much as one row's distillation term. (Dividing the label term by the
number of labelled rows instead would weigh it ~1/(labelled share) times more, e.g. 100x at 1%
labels, and drown the distillation term.)

All computation is in (at least) fp32 so mixed-precision logits are safe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["distillation_loss", "mixed_distillation_loss"]


def _fp32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    *,
    scale_by_temperature_squared: bool = False,
) -> Tensor:
    """Batch mean of ``-sum_y softmax(t/τ)_y · log_softmax(s/τ)_y`` (paper Eq. 2).

    Args:
        student_logits: [B, C] student logits (gradients flow).
        teacher_logits: [B, C] teacher logits (detached).
        temperature: τ; paper uses 0.1 for self-distillation, 1.0 for big-to-small.
        scale_by_temperature_squared: multiply by τ² (Hinton / reference colab), off by
            default to match Eq. 2.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student/teacher logits shapes differ: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}"
        )
    p_teacher = F.softmax(_fp32(teacher_logits.detach()) / temperature, dim=-1)
    log_p_student = F.log_softmax(_fp32(student_logits) / temperature, dim=-1)
    loss = -(p_teacher * log_p_student).sum(dim=-1).mean()
    if scale_by_temperature_squared:
        loss = loss * temperature**2
    return loss


def mixed_distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    temperature: float,
    alpha: float,
    *,
    scale_by_temperature_squared: bool = False,
) -> Tensor:
    """Paper Eq. 3: ``[(1-α)·Σ_labelled CE + α·Σ_all distillation] / B``.

    Rows with ``labels < 0`` (convention: -1) are unlabelled and add nothing to the CE sum
    (a masked sum, so no host-device sync). The CE is at temperature 1; the distillation term
    is :func:`distillation_loss` (a batch mean) over every row. Both sums are divided by the
    batch size B, as Eq. 3 sums both over the same images. ``alpha=1`` gives pure
    distillation (the paper's default); ``alpha=0`` the labelled CE alone.
    """
    labelled = labels >= 0
    log_p = F.log_softmax(_fp32(student_logits), dim=-1)
    safe_labels = labels.clamp(min=0).long()
    nll = -log_p.gather(1, safe_labels.unsqueeze(1)).squeeze(1)
    mask = labelled.to(nll.dtype)
    ce = (nll * mask).sum() / labels.numel()
    distill = distillation_loss(
        student_logits,
        teacher_logits,
        temperature,
        scale_by_temperature_squared=scale_by_temperature_squared,
    )
    return (1.0 - alpha) * ce + alpha * distill
