"""NT-Xent contrastive loss with global negatives and an optional momentum memory.

Follows the reference ``add_contrastive_loss`` (SPEC §3) step by step:

1. L2-normalise each projection row (``hidden_norm``), after promoting to at least fp32
   so bf16/fp16 inputs cannot overflow; logits are built in fp32 (autocast is disabled
   inside the loss) and reduced with log-softmax (log-sum-exp), never with raw ``exp``.
2. Gather the projections of both views from all ranks once each, differentiably
   (:func:`simclrv2.utils.distributed.gather_with_grad`); local anchors are compared with
   global candidates and the positive of local row i sits at column ``i + rank * N``.
3. Self-similarity is masked by subtracting ``LARGE_NUM = 1e9`` (not ``-inf``), like the
   reference.
4. ``loss_a = CE([logits_ab | logits_aa])``, ``loss_b = CE([logits_ba | logits_bb])`` and
   ``loss = mean_i loss_a_i + mean_i loss_b_i`` over the LOCAL batch: the SUM of the two
   directions (2x the "mean over 2N anchors" convention), kept for fidelity. Under DDP the
   gradient mean over ranks turns this into the global mean over all images of
   (CE_a + CE_b), which is the reference's effective objective.

Momentum memory (paper §2 "MoCo-style memory", SPEC §0; absent from the reference code,
SPEC §9): an optional ``queue`` of K already-normalised, detached projections from the
momentum encoder adds ``h·Qᵀ/τ`` as extra negative columns to both directions. The label
index does not change since queue columns are appended last.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from simclrv2.utils.distributed import gather_with_grad, get_rank

__all__ = ["LARGE_NUM", "ContrastiveOutput", "contrastive_loss", "nt_xent"]

LARGE_NUM = 1e9


class ContrastiveOutput(NamedTuple):
    """Loss plus the reference's logged quantities (SPEC §3); metrics are detached.

    ``logits_ab``: [N_local, N_global] cross-view logits of view-a anchors.
    ``labels``: [N_local] column of each anchor's positive in ``logits_ab``.
    ``accuracy``: fraction of anchors whose positive beats the cross-view candidates only
    (``contrast_acc``; self-view and queue candidates are not considered, as the reference).
    ``entropy``: mean entropy of ``softmax(logits_ab)`` with +1e-8 in the log
    (``contrast_entropy``).
    """

    loss: Tensor
    logits_ab: Tensor
    labels: Tensor
    accuracy: Tensor
    entropy: Tensor


def _prepare(z: Tensor, hidden_norm: bool) -> Tensor:
    """Promote to >= fp32 and optionally L2-normalise rows (tf.math.l2_normalize eps)."""
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    if hidden_norm:
        # tf.math.l2_normalize: x / sqrt(max(sum x^2, 1e-12)) == x / max(||x||, 1e-6).
        z = F.normalize(z, p=2.0, dim=1, eps=1e-6)
    return z


def contrastive_loss(
    z_a: Tensor,
    z_b: Tensor,
    temperature: float = 0.1,
    *,
    queue: Tensor | None = None,
    hidden_norm: bool = True,
) -> ContrastiveOutput:
    """NT-Xent of SPEC §3 on local projections ``z_a``, ``z_b`` of shape [N, d].

    Args:
        z_a, z_b: projections of view a / view b of the same N local images (row i of
            each is the positive pair).
        temperature: τ (reference flag default 0.1).
        queue: optional [K, d] memory of L2-normalised momentum-encoder projections used
            as extra negatives for both directions; detached here defensively.
        hidden_norm: L2-normalise rows first (reference default True).

    Returns:
        :class:`ContrastiveOutput` with ``loss = mean_i CE_a,i + mean_i CE_b,i``.
    """
    if z_a.shape != z_b.shape or z_a.dim() != 2:
        raise ValueError(f"z_a and z_b must both be [N, d]; got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
    # Autocast would run the similarity matmuls in bf16/fp16 again; keep them in fp32.
    with torch.autocast(device_type=z_a.device.type, enabled=False):
        return _contrastive_loss_fp32(z_a, z_b, temperature, queue, hidden_norm)


def _contrastive_loss_fp32(
    z_a: Tensor, z_b: Tensor, temperature: float, queue: Tensor | None, hidden_norm: bool
) -> ContrastiveOutput:
    h_a = _prepare(z_a, hidden_norm)
    h_b = _prepare(z_b, hidden_norm)
    n_local = h_a.shape[0]

    big_a = gather_with_grad(h_a)
    big_b = gather_with_grad(h_b)
    n_global = big_a.shape[0]

    labels = torch.arange(n_local, device=h_a.device) + get_rank() * n_local
    self_mask = F.one_hot(labels, n_global).to(h_a.dtype) * LARGE_NUM

    logits_aa = h_a @ big_a.T / temperature - self_mask
    logits_bb = h_b @ big_b.T / temperature - self_mask
    logits_ab = h_a @ big_b.T / temperature
    logits_ba = h_b @ big_a.T / temperature

    cands_a = [logits_ab, logits_aa]
    cands_b = [logits_ba, logits_bb]
    if queue is not None and queue.shape[0] > 0:
        q = queue.detach().to(h_a.dtype)
        cands_a.append(h_a @ q.T / temperature)
        cands_b.append(h_b @ q.T / temperature)

    loss_a = F.cross_entropy(torch.cat(cands_a, dim=1), labels)
    loss_b = F.cross_entropy(torch.cat(cands_b, dim=1), labels)
    loss = loss_a + loss_b

    with torch.no_grad():
        logits_det = logits_ab.detach()
        accuracy = (logits_det.argmax(dim=1) == labels).to(h_a.dtype).mean()
        probs = logits_det.softmax(dim=1)
        entropy = -(probs * torch.log(probs + 1e-8)).sum(dim=1).mean()

    return ContrastiveOutput(
        loss=loss,
        logits_ab=logits_ab.detach(),
        labels=labels,
        accuracy=accuracy,
        entropy=entropy,
    )


def nt_xent(
    z_a: Tensor,
    z_b: Tensor,
    temperature: float = 0.1,
    *,
    queue: Tensor | None = None,
    hidden_norm: bool = True,
) -> Tensor:
    """Scalar NT-Xent loss (SPEC §3).

    The mean over the N local images of (CE of view a against all candidates + CE of view
    b against all candidates), where the candidates of an anchor are every view in the
    global batch except itself, plus the ``queue`` rows if given.
    """
    return contrastive_loss(
        z_a, z_b, temperature, queue=queue, hidden_norm=hidden_norm
    ).loss
