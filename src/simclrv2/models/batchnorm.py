"""BatchNorm constructors with the reference constants, and SyncBatchNorm conversion.

SPEC §1.6: TF ``BATCH_NORM_EPSILON = 1e-5`` and ``batch_norm_decay = 0.9`` (moving =
0.9 * moving + 0.1 * batch) are PyTorch's defaults ``eps=1e-5, momentum=0.1``.  The
reference uses global (cross-replica) BN for pretraining and fine-tuning, whose PyTorch
equivalent is :class:`torch.nn.SyncBatchNorm` over all ranks (SPEC §12).
"""

from __future__ import annotations

from torch import nn

__all__ = ["BN_EPS", "BN_MOMENTUM", "batch_norm_2d", "batch_norm_1d", "batchnorm_layers", "convert_sync_batchnorm"]

BN_EPS = 1e-5
BN_MOMENTUM = 0.1


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer of ``model`` (torch's, SyncBatchNorm and our GlobalBatchNorm: all are
    ``_BatchNorm``). Setting them to ``eval()`` inside a training network freezes their running
    statistics (normalise with them, do not update them) while gamma and beta still train."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def batch_norm_2d(num_features: int, zero_init: bool = False) -> nn.BatchNorm2d:
    """``BatchNorm2d`` with gamma 1 (or 0 when ``zero_init``, SPEC §1.6) and beta 0."""
    bn = nn.BatchNorm2d(num_features, eps=BN_EPS, momentum=BN_MOMENTUM)
    if zero_init:
        nn.init.zeros_(bn.weight)
    return bn


def batch_norm_1d(num_features: int, center: bool = True) -> nn.BatchNorm1d:
    """``BatchNorm1d`` for the projection head (SPEC §2.1).

    ``center=False`` gives a BN with gamma but *no* beta parameter (TF ``center=False``,
    used by the last head layer): the module has ``weight``, ``running_mean`` and
    ``running_var`` but ``bias is None``, so there is nothing to train, decay or convert.
    """
    return nn.BatchNorm1d(num_features, eps=BN_EPS, momentum=BN_MOMENTUM, bias=center)


def convert_sync_batchnorm(model: nn.Module, process_group: object | None = None) -> nn.Module:
    """Replace every BatchNorm (trunk 2d *and* head 1d) by ``nn.SyncBatchNorm``.

    Thin wrapper over :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`, which keeps
    ``bias=None`` for the beta-free last head BN.  Call it before wrapping the model in
    DDP; it is the PyTorch counterpart of the reference's ``global_bn=True`` (SPEC §1.6).
    """
    return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
