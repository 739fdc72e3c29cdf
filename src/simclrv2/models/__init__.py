"""SimCLRv2 model zoo: ResNet encoders, projection / linear heads, registry (SPEC §1, §2, §11)."""

from .batchnorm import BN_EPS, BN_MOMENTUM, convert_sync_batchnorm
from .heads import LinearClassifier, ProjectionHead, ProjectionLayer, truncate_head
from .layers import AvgPool2dSame, Conv2dFixedPadding, MaxPool2dSame, variance_scaling_
from .network import SimCLRNet
from .params import count_params_paper, count_trainable_params
from .registry import (
    PAPER_ARCHITECTURES,
    SK_RATIO,
    ArchSpec,
    architecture_info,
    architecture_table,
    create_encoder,
    create_model,
    list_architectures,
    parse_arch,
)
from .resnet import BLOCK_COUNTS, BasicBlock, BottleneckBlock, ResNet, SelectiveKernelConv, SqueezeExcite

__all__ = [
    "BN_EPS",
    "BN_MOMENTUM",
    "BLOCK_COUNTS",
    "PAPER_ARCHITECTURES",
    "SK_RATIO",
    "ArchSpec",
    "AvgPool2dSame",
    "BasicBlock",
    "BottleneckBlock",
    "Conv2dFixedPadding",
    "LinearClassifier",
    "MaxPool2dSame",
    "ProjectionHead",
    "ProjectionLayer",
    "ResNet",
    "SelectiveKernelConv",
    "SimCLRNet",
    "SqueezeExcite",
    "architecture_info",
    "architecture_table",
    "convert_sync_batchnorm",
    "count_params_paper",
    "count_trainable_params",
    "create_encoder",
    "create_model",
    "list_architectures",
    "parse_arch",
    "truncate_head",
    "variance_scaling_",
]
