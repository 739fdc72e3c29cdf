"""Global (cross-process) BatchNorm on every device: the reference's ``global_bn=True`` (SPEC §1.6).

``torch.nn.SyncBatchNorm`` only runs on GPUs (its forward raises for CPU tensors, the
``batch_norm_stats`` kernels it uses have no CPU implementation, and DDP refuses CPU modules
holding it), so a CPU run under ``torchrun`` (Gloo) could not use global BN at all.
:func:`convert_global_bn` uses ``SyncBatchNorm`` on GPUs and :class:`GlobalBatchNorm` on the
CPU: the batch mean and variance are computed from all-reduced per-channel sums (two passes:
sum, then the sum of squared deviations, for fp32 accuracy), with a differentiable all-reduce
whose backward is an all-reduce, so gradients flow between the processes exactly as for one
big batch. Eval mode and single-process runs are plain ``batch_norm``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["GlobalBatchNorm", "convert_global_bn"]


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of a sum broadcast to every process is again a sum."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:  # type: ignore[override]
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics cover the batches of all processes (any device)."""

    def __init__(self, *args, process_group=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or not (dist.is_available() and dist.is_initialized()):
            return super().forward(input)
        group = self.process_group or dist.group.WORLD
        if dist.get_world_size(group) == 1:
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.to(torch.promote_types(input.dtype, torch.float32))  # fp32 (or fp64) statistics
        local_count = x.numel() // x.shape[1]
        first = _AllReduceSum.apply(torch.cat([x.sum(dims), x.new_tensor([float(local_count)])]), group)
        count = first[-1].detach()
        mean = first[:-1] / count
        centered = x - mean.view(shape)
        var = _AllReduceSum.apply((centered * centered).sum(dims), group) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * count / (count - 1).clamp(min=1)
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            out = out * self.weight.to(x.dtype).view(shape)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype).view(shape)
        return out.to(input.dtype)


def convert_global_bn(model: nn.Module, device: torch.device | str = "cpu", process_group=None) -> nn.Module:
    """Replace every BatchNorm by a cross-process one (weights and buffers are kept):
    ``nn.SyncBatchNorm`` for CUDA, :class:`GlobalBatchNorm` elsewhere. Call before DDP."""
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    return _convert(model, process_group)


def _convert(module: nn.Module, process_group) -> nn.Module:
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, process_group=process_group,
                              bias=module.bias is not None)
        if module.affine:
            out.weight = module.weight
            out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, _convert(child, process_group))
    return out
