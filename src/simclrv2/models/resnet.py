"""ResNet v1 encoders of SimCLRv2: post-activation, optional SK / ResNet-D / SE (SPEC §1).

Faithful to the TF reference (``resnet.py`` / ``tf2/resnet.py``):

* Post-activation blocks (conv-BN-ReLU), residual add then ReLU; bottleneck stride on
  the 3x3 conv (v1.5); the first block of *every* group has a projection shortcut (also
  for ResNet-18/34 group 1, unlike torchvision) (SPEC §1.1, §1.3).
* ``sk_ratio > 0`` switches on Selective-Kernel convs in bottleneck blocks, the
  three-conv ResNet-C/D stem and ResNet-D avg-pool shortcuts (SPEC §1.2-§1.4).
* ``cifar_stem=True``: a single 3x3/s1 conv, no max-pool, no deep stem (SPEC §1.2).
* BN eps 1e-5 / momentum 0.1, last BN gamma of each block zero-initialised, bias-free
  convs with TF truncated-normal fan-in init (SPEC §1.6); TF padding rules (SPEC §1.7).

Modules are registered in TF graph-construction order -- per block the shortcut conv and
BN come first, then the main path; inside an SK conv: main conv, BN, mixing conv, BN,
mixing conv -- so ``[m for m in model.modules() if isinstance(m, nn.Conv2d)]`` lines up
with TF's ``conv2d, conv2d_1, ...`` (and likewise for BN) when converting checkpoints by
creation order (SPEC §8.3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .batchnorm import batch_norm_2d
from .layers import Conv2dFixedPadding, make_resnet_d_avg_pool, make_stem_max_pool, variance_scaling_

__all__ = [
    "BLOCK_COUNTS",
    "SK_MIN_DIM",
    "SelectiveKernelConv",
    "SqueezeExcite",
    "ProjectionShortcut",
    "BasicBlock",
    "BottleneckBlock",
    "Stem",
    "ResNet",
    "scaled_channels",
]

#: Blocks per group for each supported depth (SPEC §1.1).
BLOCK_COUNTS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
}
#: ``min_dim`` of the SK mixing bottleneck (SPEC §1.4).
SK_MIN_DIM = 32


def scaled_channels(base: int, width_multiplier: float) -> int:
    """``int(base * w)``: the channel count the reference gets for a (possibly fractional)
    width multiplier ``w`` (TF1 ``resnet.py`` passes ``base * w`` to a conv, which truncates).
    Block groups use ``base = 64 * 2**(g-1)``; the SK/deep stem's first convs use
    ``int(64 * w // 2)`` instead (see :class:`Stem`)."""
    return int(base * width_multiplier)


class SelectiveKernelConv(nn.Module):
    """Selective-Kernel conv as in the reference ``sk_conv2d`` (SPEC §1.4).

    Both branches are 3x3 and computed by ONE conv with ``2f`` outputs -> BN -> ReLU,
    split channel-wise into two ``f``-channel branches.  Mixing weights: spatial mean of
    the branch sum -> 1x1 conv to ``mid_dim = max(int(f * sk_ratio), min_dim)`` -> BN ->
    ReLU -> 1x1 conv to ``2f`` (no BN) -> softmax over the two branches per channel.
    Output = weighted sum of the branches.  (As in PyTorch generally, the mixing BN sees
    a 1x1 map, so training needs batch size > 1.)
    """

    def __init__(
        self, in_channels: int, filters: int, stride: int, sk_ratio: float, min_dim: int = SK_MIN_DIM
    ) -> None:
        super().__init__()
        self.filters = filters
        self.mid_dim = max(int(filters * sk_ratio), min_dim)
        self.conv = Conv2dFixedPadding(in_channels, 2 * filters, 3, stride)
        self.bn = batch_norm_2d(2 * filters)
        self.fc1 = Conv2dFixedPadding(filters, self.mid_dim, 1)
        self.fc1_bn = batch_norm_2d(self.mid_dim)
        self.fc2 = Conv2dFixedPadding(self.mid_dim, 2 * filters, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)), inplace=True)
        branch0, branch1 = torch.chunk(x, 2, dim=1)
        pooled = (branch0 + branch1).mean(dim=(2, 3), keepdim=True)
        mix = self.fc2(F.relu(self.fc1_bn(self.fc1(pooled)), inplace=True))
        mix0, mix1 = torch.chunk(mix, 2, dim=1)
        weights = torch.softmax(torch.stack((mix0, mix1), dim=0), dim=0)
        return branch0 * weights[0] + branch1 * weights[1]


class SqueezeExcite(nn.Module):
    """Squeeze-excite after a block's last BN (SPEC §1.5; unused by released models).

    Reduction width is ``max(1, int(filters * se_ratio))`` where ``filters`` is the block
    width ``f`` (not ``4f``); both 1x1 convs have biases (zero-initialised, as TF).
    """

    def __init__(self, channels: int, filters: int, se_ratio: float) -> None:
        super().__init__()
        reduced = max(1, int(filters * se_ratio))
        self.reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.expand = nn.Conv2d(reduced, channels, 1, bias=True)
        for conv in (self.reduce, self.expand):
            variance_scaling_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        s = self.expand(F.relu(self.reduce(s)))
        return x * torch.sigmoid(s)


class ProjectionShortcut(nn.Module):
    """Projection shortcut of a group's first block (SPEC §1.3).

    Standard: 1x1 conv with the block stride -> BN (no ReLU).  ResNet-D (SK models):
    2x2 avg-pool with the block stride (stride 1: TF 'SAME'; stride 2: zero-pad + VALID)
    -> 1x1 conv stride 1 -> BN.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, resnet_d: bool, reference_padding: bool = True
    ) -> None:
        super().__init__()
        self.pool = make_resnet_d_avg_pool(stride, reference_padding) if resnet_d else None
        self.conv = Conv2dFixedPadding(in_channels, out_channels, 1, 1 if resnet_d else stride)
        self.bn = batch_norm_2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = self.pool(x)
        return self.bn(self.conv(x))


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34, TF ``residual_block``; SPEC §1.1, §1.3).

    With ``sk_ratio > 0`` only the ResNet-D shortcut changes (the reference has no SK conv
    in basic blocks).  We follow TF2 ``ResidualBlock``.  Known TF1 bug, not reproduced:
    TF1 ``residual_block`` writes the ResNet-D avg-pool result into the *main-path* input,
    which smooths the main path in group 1 and makes groups 2-4 downsample twice (the
    graph then cannot even be built); no released checkpoint is affected.
    """

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        filters: int,
        stride: int = 1,
        use_projection: bool = False,
        resnet_d: bool = False,
        se_ratio: float = 0.0,
        reference_padding: bool = True,
        zero_init_last_bn: bool = True,
    ) -> None:
        super().__init__()
        out_channels = filters * self.expansion
        # Registration order = TF creation order: shortcut first (SPEC §8.3).
        self.shortcut = (
            ProjectionShortcut(in_channels, out_channels, stride, resnet_d, reference_padding)
            if use_projection
            else None
        )
        self.conv1 = Conv2dFixedPadding(in_channels, filters, 3, stride)
        self.bn1 = batch_norm_2d(filters)
        self.conv2 = Conv2dFixedPadding(filters, filters, 3, 1)
        self.bn2 = batch_norm_2d(filters, zero_init=zero_init_last_bn)
        self.se = SqueezeExcite(out_channels, filters, se_ratio) if se_ratio > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.shortcut is None else self.shortcut(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        if self.se is not None:
            out = self.se(out)
        return F.relu(out + shortcut, inplace=True)


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 (stride; or SK conv) -> 1x1 (4f) bottleneck (SPEC §1.3).

    The last BN gamma is zero-initialised; SE (optional) comes after it, before the add.
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        filters: int,
        stride: int = 1,
        use_projection: bool = False,
        sk_ratio: float = 0.0,
        se_ratio: float = 0.0,
        reference_padding: bool = True,
        zero_init_last_bn: bool = True,
    ) -> None:
        super().__init__()
        out_channels = filters * self.expansion
        self.shortcut = (
            ProjectionShortcut(in_channels, out_channels, stride, sk_ratio > 0, reference_padding)
            if use_projection
            else None
        )
        self.conv1 = Conv2dFixedPadding(in_channels, filters, 1, 1)
        self.bn1 = batch_norm_2d(filters)
        if sk_ratio > 0:
            self.sk = SelectiveKernelConv(filters, filters, stride, sk_ratio)
            self.conv2 = None
            self.bn2 = None
        else:
            self.sk = None
            self.conv2 = Conv2dFixedPadding(filters, filters, 3, stride)
            self.bn2 = batch_norm_2d(filters)
        self.conv3 = Conv2dFixedPadding(filters, out_channels, 1, 1)
        self.bn3 = batch_norm_2d(out_channels, zero_init=zero_init_last_bn)
        self.se = SqueezeExcite(out_channels, filters, se_ratio) if se_ratio > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.shortcut is None else self.shortcut(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        if self.sk is not None:
            out = self.sk(out)
        else:
            out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        if self.se is not None:
            out = self.se(out)
        return F.relu(out + shortcut, inplace=True)


class Stem(nn.Module):
    """Stem convs (SPEC §1.2), without the max-pool.

    * standard: 7x7/s2 conv (64w) -> BN -> ReLU
    * deep (SK models): 3x3/s2 (32w) -> BN-ReLU -> 3x3 (32w) -> BN-ReLU -> 3x3 (64w) -> BN-ReLU
    * CIFAR: 3x3/s1 conv (64w) -> BN -> ReLU

    Here "64w" is ``int(64 * w)`` and "32w" is ``int(64 * w // 2)``, the reference's
    expressions, which also hold for a fractional ``w`` (``r50_0.125x_sk1``: 4, 4, 8).

    :meth:`forward` returns ``(initial_conv, out)``: the reference's ``initial_conv`` tap
    is the last stem conv's output *before* its BN-ReLU.
    """

    def __init__(self, width_multiplier: float, deep: bool, cifar: bool) -> None:
        super().__init__()
        full, half = scaled_channels(64, width_multiplier), int(64 * width_multiplier // 2)
        if cifar:
            specs = [(3, full, 3, 1)]
        elif deep:
            specs = [(3, half, 3, 2), (half, half, 3, 1), (half, full, 3, 1)]
        else:
            specs = [(3, full, 7, 2)]
        self.num_convs = len(specs)
        # conv1..conv3 / bn1..bn3 always exist as attributes (None when the stem has fewer convs),
        # so that forward() is plain attribute access that torch.jit.script accepts; a None module
        # adds nothing to the state dict.
        for i in range(1, 4):
            conv = bn = None
            if i <= len(specs):
                cin, cout, k, s = specs[i - 1]
                conv, bn = Conv2dFixedPadding(cin, cout, k, s), batch_norm_2d(cout)
            self.add_module(f"conv{i}", conv)
            self.add_module(f"bn{i}", bn)
        self.out_channels = specs[-1][1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre_bn = self.conv1(x)
        x = F.relu(self.bn1(pre_bn))
        if self.conv2 is not None and self.bn2 is not None:
            pre_bn = self.conv2(x)
            x = F.relu(self.bn2(pre_bn))
        if self.conv3 is not None and self.bn3 is not None:
            pre_bn = self.conv3(x)
            x = F.relu(self.bn3(pre_bn))
        return pre_bn, x


class ResNet(nn.Module):
    """SimCLRv2 ResNet encoder up to the global average pool (SPEC §1).

    Args:
        depth: 18, 34 (basic blocks) or 50, 101, 152, 200 (bottleneck blocks).
        width_multiplier: channel multiplier ``w`` (group widths ``int(64 * 2**(g-1) * w)``):
            an integer for the released models, or a fraction (0.5, 0.25, ...) for small
            nets; channel counts are computed as the reference computes them for a float
            ``w`` (:func:`scaled_channels`).
        sk_ratio: > 0 enables SK convs + ResNet-D stem/shortcuts (0.0625 for released models).
        cifar_stem: 3x3/s1 stem without max-pool (the reference uses it when image_size <= 32).
        se_ratio: > 0 adds squeeze-excite to every block (SPEC §1.5).
        reference_padding: True = TF 'SAME' max-pool / stride-1 avg-pool (faithful, needed
            for converted checkpoints); False = common PyTorch-port padding (SPEC §1.7).
        zero_init_residual: zero-init the last BN gamma of each block (reference: True).

    ``forward(x)`` returns the ``final_avg_pool`` features ``[B, feature_dim]``;
    ``forward_features(x)`` returns all named taps of the reference hub signature.
    """

    def __init__(
        self,
        depth: int,
        width_multiplier: float = 1,
        sk_ratio: float = 0.0,
        cifar_stem: bool = False,
        se_ratio: float = 0.0,
        reference_padding: bool = True,
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        if depth not in BLOCK_COUNTS:
            raise ValueError(f"unsupported ResNet depth {depth}; expected one of {sorted(BLOCK_COUNTS)}")
        if not width_multiplier > 0 or int(64 * width_multiplier // 2) < 1:
            raise ValueError(f"width_multiplier must be a number >= 1/32 (so that every layer keeps a channel), "
                             f"got {width_multiplier}")
        if sk_ratio < 0 or se_ratio < 0:
            raise ValueError(f"sk_ratio and se_ratio must be >= 0, got {sk_ratio}, {se_ratio}")
        w = int(width_multiplier) if float(width_multiplier).is_integer() else float(width_multiplier)
        self.depth = depth
        self.width_multiplier = w
        self.sk_ratio = float(sk_ratio)
        self.se_ratio = float(se_ratio)
        self.cifar_stem = bool(cifar_stem)
        self.reference_padding = bool(reference_padding)
        self.block_counts = BLOCK_COUNTS[depth]
        bottleneck = depth >= 50
        block_cls: type[BasicBlock] | type[BottleneckBlock] = BottleneckBlock if bottleneck else BasicBlock

        self.stem = Stem(w, deep=sk_ratio > 0, cifar=cifar_stem)
        self.max_pool = None if cifar_stem else make_stem_max_pool(reference_padding)

        in_ch = self.stem.out_channels
        for g, (n_blocks, stride) in enumerate(zip(self.block_counts, (1, 2, 2, 2)), start=1):
            filters = scaled_channels(64 * 2 ** (g - 1), w)
            blocks = []
            for b in range(n_blocks):
                common = dict(
                    stride=stride if b == 0 else 1,
                    use_projection=b == 0,
                    se_ratio=se_ratio,
                    reference_padding=reference_padding,
                    zero_init_last_bn=zero_init_residual,
                )
                if bottleneck:
                    blocks.append(BottleneckBlock(in_ch, filters, sk_ratio=sk_ratio, **common))
                else:
                    blocks.append(BasicBlock(in_ch, filters, resnet_d=sk_ratio > 0, **common))
                in_ch = filters * block_cls.expansion
            self.add_module(f"block_group{g}", nn.Sequential(*blocks))
        self.feature_dim = in_ch

    __jit_unused_properties__ = ["block_groups"]

    @property
    def block_groups(self) -> list[nn.Sequential]:
        """The four block groups, in order."""
        return [self.block_group1, self.block_group2, self.block_group3, self.block_group4]

    def stages(self) -> list[nn.Module]:
        """``[stem(+max-pool), block_group1, ..., block_group4]``: the reference's
        ``fine_tune_after_block`` indices 0..4 (k freezes stages[:k+1]; SPEC §7)."""
        stem: nn.Module = self.stem if self.max_pool is None else nn.ModuleList([self.stem, self.max_pool])
        return [stem, *self.block_groups]

    def _run(self, x: torch.Tensor, taps: dict[str, torch.Tensor] | None) -> torch.Tensor:
        initial_conv, x = self.stem(x)
        if self.max_pool is not None:
            x = self.max_pool(x)
        if taps is not None:
            taps["initial_conv"] = initial_conv
            # The reference also names the CIFAR stem's BN-ReLU output 'initial_max_pool'.
            taps["initial_max_pool"] = x
        # Spelled out group by group (not a loop over block_groups) so torch.jit.script accepts it.
        x = self.block_group1(x)
        if taps is not None:
            taps["block_group1"] = x
        x = self.block_group2(x)
        if taps is not None:
            taps["block_group2"] = x
        x = self.block_group3(x)
        if taps is not None:
            taps["block_group3"] = x
        x = self.block_group4(x)
        if taps is not None:
            taps["block_group4"] = x
        out = x.mean(dim=(2, 3))
        if taps is not None:
            taps["final_avg_pool"] = out
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] (no normalisation, SPEC §1.7) -> ``[B, feature_dim]``."""
        return self._run(x, None)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named taps ``initial_conv, initial_max_pool, block_group1..4, final_avg_pool``."""
        taps: dict[str, torch.Tensor] = {}
        self._run(x, taps)
        return taps

    def extra_repr(self) -> str:
        return (
            f"depth={self.depth}, width_multiplier={self.width_multiplier}, sk_ratio={self.sk_ratio}, "
            f"se_ratio={self.se_ratio}, cifar_stem={self.cifar_stem}, reference_padding={self.reference_padding}"
        )
