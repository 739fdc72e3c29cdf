"""Architecture names ``r{depth}_{width}x_sk{0|1}`` and model factories (SPEC §8.1, §11).

The names are those of the released checkpoints (SPEC §8.1); ``sk1`` means
``sk_ratio = 0.0625`` (SPEC §1.4).  Besides the integer widths of the paper, the
fractional widths of :data:`FRACTIONAL_WIDTHS` (``r50_0.125x_sk1``, ``r18_0.25x_sk0``,
``r50_0.5x_sk0``) give small, fast nets -- students for big-to-small distillation, CPU
models, and the reference test fixtures; their channel counts follow the reference's
expressions for a float multiplier (:func:`simclrv2.models.resnet.scaled_channels`).  ``create_encoder`` picks the CIFAR stem when
``image_size <= 32``, as the reference does (SPEC §1.2, §7).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any

import torch

from .batchnorm import convert_sync_batchnorm
from .heads import LinearClassifier, ProjectionHead
from .network import SimCLRNet
from .params import count_params_paper
from .resnet import BLOCK_COUNTS, ResNet

__all__ = [
    "SK_RATIO",
    "WIDTHS",
    "FRACTIONAL_WIDTHS",
    "ArchSpec",
    "PAPER_ARCHITECTURES",
    "parse_arch",
    "arch_name",
    "list_architectures",
    "create_encoder",
    "create_model",
    "architecture_info",
    "architecture_table",
    "convert_sync_batchnorm",
]

#: ``sk_ratio`` of every released SK model (SPEC §1.4).
SK_RATIO = 0.0625
#: Supported integer width multipliers (the paper's).
WIDTHS = (1, 2, 3, 4)
#: Supported fractional width multipliers (small nets; not in the paper).
FRACTIONAL_WIDTHS = (0.5, 0.25, 0.125, 0.0625)

#: The 13 architectures of Table 1 / the released checkpoints, in table order (SPEC §0, §8.1).
PAPER_ARCHITECTURES: tuple[str, ...] = (
    "r50_1x_sk0",
    "r50_1x_sk1",
    "r50_2x_sk0",
    "r50_2x_sk1",
    "r101_1x_sk0",
    "r101_1x_sk1",
    "r101_2x_sk0",
    "r101_2x_sk1",
    "r152_1x_sk0",
    "r152_1x_sk1",
    "r152_2x_sk0",
    "r152_2x_sk1",
    "r152_3x_sk1",
)

#: Extra names shown by :func:`list_architectures`: small/CIFAR-scale nets (ResNet-18/34,
#: README's CIFAR-10 R18 example), ResNet-200, and SimCLRv1's ResNet-50 (4x).
_EXTRA_ARCHITECTURES: tuple[str, ...] = (
    "r18_1x_sk0",
    "r18_1x_sk1",
    "r34_1x_sk0",
    "r34_1x_sk1",
    "r200_1x_sk0",
    "r200_1x_sk1",
    "r50_4x_sk0",
    "r18_0.25x_sk0",
    "r50_0.125x_sk0",
    "r50_0.125x_sk1",
    "r50_0.5x_sk0",
)

_NAME_RE = re.compile(r"^r(\d+)_(\d+(?:\.\d+)?)x_sk([01])$")


@dataclass(frozen=True)
class ArchSpec:
    """A parsed architecture name."""

    depth: int
    width: int | float  # an int for the paper's widths, a float for FRACTIONAL_WIDTHS
    sk_ratio: float
    name: str

    @property
    def sk(self) -> bool:
        return self.sk_ratio > 0


def _arch_error(name: object, why: str) -> ValueError:
    return ValueError(
        f"unknown architecture {name!r} ({why}); expected 'r{{depth}}_{{width}}x_sk{{0|1}}' with depth in "
        f"{sorted(BLOCK_COUNTS)} and width in {list(WIDTHS) + list(FRACTIONAL_WIDTHS)}, e.g. 'r50_1x_sk0', "
        "'r152_3x_sk1', 'r18_1x_sk0', 'r50_0.125x_sk1'"
    )


def parse_arch(name: str | ArchSpec) -> ArchSpec:
    """Parse ``'r{depth}_{width}x_sk{0|1}'`` (an :class:`ArchSpec` is returned unchanged)."""
    if isinstance(name, ArchSpec):
        return name
    if not isinstance(name, str):
        raise _arch_error(name, "not a string")
    m = _NAME_RE.match(name.strip().lower())
    if m is None:
        raise _arch_error(name, "bad format")
    depth, sk = int(m.group(1)), m.group(3) == "1"
    value = float(m.group(2))
    width: int | float = int(value) if value.is_integer() else value
    if depth not in BLOCK_COUNTS:
        raise _arch_error(name, f"depth {depth} not supported")
    if width not in WIDTHS and width not in FRACTIONAL_WIDTHS:
        raise _arch_error(name, f"width {m.group(2)}x not supported")
    return ArchSpec(depth=depth, width=width, sk_ratio=SK_RATIO if sk else 0.0, name=arch_name(depth, width, sk))


def arch_name(depth: int, width: float, sk: bool) -> str:
    """The canonical name ``r{depth}_{width}x_sk{0|1}`` (``0.125x``, ``2x``; never ``2.0x``)."""
    return f"r{depth}_{float(width):g}x_sk{int(bool(sk))}"


def list_architectures() -> list[str]:
    """The 13 paper architectures (table order) followed by a few useful extras."""
    return list(PAPER_ARCHITECTURES) + list(_EXTRA_ARCHITECTURES)


def create_encoder(arch: str | ArchSpec, image_size: int = 224, **kw: Any) -> ResNet:
    """Build the ResNet for ``arch``; ``cifar_stem = image_size <= 32`` unless given in ``kw``.

    Other ``kw`` (``se_ratio``, ``reference_padding``, ``zero_init_residual``) go to
    :class:`ResNet`.
    """
    spec = parse_arch(arch)
    kw.setdefault("cifar_stem", image_size <= 32)
    return ResNet(spec.depth, width_multiplier=spec.width, sk_ratio=spec.sk_ratio, **kw)


def create_model(
    arch: str | ArchSpec,
    image_size: int = 224,
    num_proj_layers: int = 3,
    proj_out_dim: int = 128,
    num_classes: int = 0,
    ft_proj_selector: int = 0,
    classifier_stop_grad: bool = False,
    zero_init_classifier: bool = True,
    device: str | torch.device | None = None,
    **encoder_kw: Any,
) -> SimCLRNet:
    """Encoder + ``num_proj_layers``-layer head (0 = no head) + optional classifier.

    ``num_classes > 0`` adds a :class:`LinearClassifier` on ``hiddens[ft_proj_selector]``.
    ``device`` builds the parameters directly there (``'meta'`` allocates nothing).
    """
    ctx = torch.device(device) if device is not None else contextlib.nullcontext()
    with ctx:
        encoder = create_encoder(arch, image_size=image_size, **encoder_kw)
        head = ProjectionHead(encoder.feature_dim, num_proj_layers, proj_out_dim) if num_proj_layers > 0 else None
        classifier = None
        if num_classes > 0:
            n_layers = 0 if head is None else head.num_layers
            if ft_proj_selector > n_layers or ft_proj_selector < -(n_layers + 1):
                raise ValueError(
                    f"ft_proj_selector={ft_proj_selector} is out of range: the projection head has {n_layers} "
                    f"layer(s), so the selector must be in [{-(n_layers + 1)}, {n_layers}]"
                )
            in_dim = encoder.feature_dim if head is None else head.out_dim_at(ft_proj_selector)
            classifier = LinearClassifier(in_dim, num_classes, zero_init=zero_init_classifier)
        return SimCLRNet(encoder, head, classifier, ft_proj_selector, classifier_stop_grad)


def architecture_info(arch: str | ArchSpec, image_size: int = 224) -> dict[str, Any]:
    """Sizes of ``arch`` computed on the meta device (no memory is allocated).

    Keys: ``name, depth, width, sk, sk_ratio, block_counts, feature_dim, params``
    (encoder, SPEC §11 rule = Table 1), ``params_m`` (millions, 2 decimals),
    ``head_params`` (3-layer projection head, same rule; last BN has no beta) and
    ``fc_params_1000`` (a 1000-class linear classifier).
    """
    spec = parse_arch(arch)
    with torch.device("meta"):
        encoder = create_encoder(spec, image_size=image_size)
        head = ProjectionHead(encoder.feature_dim, 3, 128)
    params = count_params_paper(encoder)
    return {
        "name": spec.name,
        "depth": spec.depth,
        "width": spec.width,
        "sk": spec.sk,
        "sk_ratio": spec.sk_ratio,
        "block_counts": BLOCK_COUNTS[spec.depth],
        "feature_dim": encoder.feature_dim,
        "params": params,
        "params_m": round(params / 1e6, 2),
        "head_params": count_params_paper(head),
        "fc_params_1000": encoder.feature_dim * 1000 + 1000,
    }


def architecture_table(names: list[str] | None = None, image_size: int = 224) -> list[dict[str, Any]]:
    """:func:`architecture_info` for ``names`` (default: :func:`list_architectures`)."""
    return [architecture_info(n, image_size=image_size) for n in (names or list_architectures())]
