"""Map the variables of the reference TF1 graph to our networks (SPEC §8.1, §8.3).

The reference (``resnet.py``, ``model_util.py``) names its layers by creation order:
``base_model/conv2d, conv2d_1, ...`` and ``base_model/batch_normalization, _1, ...`` (two
independent counters).  Our :class:`~simclrv2.models.resnet.ResNet` registers its modules in
that same creation order (per block: shortcut, then main path; per SK conv: conv, BN, mixing
conv, BN, mixing conv), so the k-th ``nn.Conv2d`` / ``nn.BatchNorm2d`` of
``encoder.modules()`` is the TF layer with the k-th smallest numeric suffix.  Suffixes are
sorted as numbers, not strings (``conv2d_10`` comes after ``conv2d_9``).

Layouts: conv kernels are ``[kh, kw, in, out]`` (ours ``[out, in, kh, kw]``), dense kernels
``[in, out]`` (ours ``[out, in]``); BN ``gamma, beta, moving_mean, moving_variance`` are
``weight, bias, running_mean, running_var``.  The head is ``head_contrastive/nl_{j}/dense``
+ ``nl_{j}/batch_normalization`` (the last has no beta), the classifier
``head_supervised/linear_layer/dense/{kernel,bias}`` on ``hiddens[ft_proj_selector]``.

:func:`infer_architecture` recovers depth, width, SK and stem from the shapes alone, by
comparing the checkpoint's ordered conv-kernel shapes with those of every candidate network
(built on the meta device, no memory).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from simclrv2.errors import CheckpointError
from simclrv2.models.network import SimCLRNet
from simclrv2.models.registry import FRACTIONAL_WIDTHS, SK_RATIO, WIDTHS, arch_name
from simclrv2.models.resnet import BLOCK_COUNTS, ResNet

__all__ = [
    "BASE",
    "HEAD",
    "SUPERVISED",
    "EMA_PREFIX",
    "TFArchitecture",
    "Assignment",
    "numbered_layers",
    "infer_architecture",
    "map_network",
    "is_optimizer_slot",
]

BASE = "base_model/"
HEAD = "head_contrastive/"
SUPERVISED = "head_supervised/linear_layer/dense/"
EMA_PREFIX = "ema_model/"
_BN_FIELDS = (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"),
              ("moving_variance", "running_var"))


def is_optimizer_slot(name: str) -> bool:
    """LARS / momentum slots (``.../Momentum``) and the step counter: never weights."""
    return name.endswith("/Momentum") or name == "global_step"


def numbered_layers(names: list[str], prefix: str, layer: str) -> list[str]:
    """``prefix + layer[_N]`` scopes present in ``names``, sorted by the numeric suffix (none = 0)."""
    pattern = re.compile(rf"^{re.escape(prefix)}{layer}(?:_(\d+))?/")
    found: dict[int, str] = {}
    for n in names:
        m = pattern.match(n)
        if m:
            found[int(m.group(1) or 0)] = m.group(0)[:-1]
    return [found[k] for k in sorted(found)]


@dataclass(frozen=True)
class TFArchitecture:
    """What the variables say about the network that wrote them."""

    depth: int
    width: int | float
    sk: bool
    cifar_stem: bool
    num_proj_layers: int
    proj_out_dim: int
    num_classes: int
    classifier_in_dim: int
    feature_dim: int
    ambiguous: tuple[str, ...] = ()  # other names that fit the shapes equally well

    @property
    def arch(self) -> str:
        return arch_name(self.depth, self.width, self.sk)


def _encoder_conv_shapes(encoder: nn.Module) -> list[tuple[int, ...]]:
    """Our conv weights in the TF layout ``[kh, kw, in, out]``, in creation order."""
    return [(m.kernel_size[0], m.kernel_size[1], m.in_channels, m.out_channels)
            for m in encoder.modules() if isinstance(m, nn.Conv2d)]


def _conv_count(depth: int, sk: bool, cifar: bool) -> int:
    blocks = sum(BLOCK_COUNTS[depth])
    per_block = 2 if depth < 50 else (5 if sk else 3)
    stem = 1 if cifar or not sk else 3
    return stem + blocks * per_block + 4  # + one projection shortcut per group


def infer_architecture(shapes: dict[str, tuple[int, ...]], prefix: str = "") -> TFArchitecture:
    """Depth, width, SK, stem, head and classifier sizes from the variable shapes.

    ``shapes`` maps variable names to shapes; ``prefix`` is ``""`` or ``"ema_model/"``.
    Raises :class:`CheckpointError` when no network of the zoo has these shapes.
    """
    names = list(shapes)
    convs = numbered_layers(names, prefix + BASE, "conv2d")
    if not convs:
        raise CheckpointError(f"checkpoint: no {prefix}{BASE}conv2d*/kernel variables; this is not a SimCLR "
                              "(v1/v2) ResNet checkpoint")
    kernels = []
    for scope in convs:
        key = f"{scope}/kernel"
        if key not in shapes or len(shapes[key]) != 4:
            raise CheckpointError(f"checkpoint: {key} is missing or not a 4-d conv kernel")
        kernels.append(tuple(shapes[key]))
    stem_kernel, stem_out = kernels[0][0], kernels[0][3]
    deep = stem_kernel == 3 and len(kernels) > 2 and kernels[1][:2] == (3, 3) and kernels[1][2] == stem_out
    stem_channels = kernels[2][3] if deep else stem_out
    value = stem_channels / 64
    width: int | float = int(value) if float(value).is_integer() else value
    if width not in WIDTHS and width not in FRACTIONAL_WIDTHS:
        raise CheckpointError(f"checkpoint: the stem has {stem_channels} output channels, i.e. width "
                              f"{value:g}x, which the model zoo does not support (widths "
                              f"{list(WIDTHS) + list(FRACTIONAL_WIDTHS)})")
    if deep:
        stem_options = [(True, False)]  # (sk, cifar)
    elif stem_kernel == 3:
        stem_options = [(False, True), (True, True)]
    else:
        stem_options = [(False, False)]
    matches: list[tuple[int, bool, bool]] = []
    for depth in sorted(BLOCK_COUNTS):
        for sk, cifar in stem_options:
            if _conv_count(depth, sk, cifar) != len(kernels):
                continue
            with torch.device("meta"):
                enc = ResNet(depth, width_multiplier=width, sk_ratio=SK_RATIO if sk else 0.0, cifar_stem=cifar)
            if _encoder_conv_shapes(enc) == kernels:
                matches.append((depth, sk, cifar))
    if not matches:
        raise CheckpointError(f"checkpoint: its {len(kernels)} conv kernels (stem {list(kernels[0])}) match no "
                              f"ResNet of the model zoo at width {width:g}x (depths {sorted(BLOCK_COUNTS)}, "
                              "with or without selective kernels)")
    depth, sk, cifar = matches[0]  # for basic blocks with the CIFAR stem, SK changes no shape: sk0 first
    feature_dim = kernels[-1][3]
    heads = numbered_layers(names, prefix + HEAD, "nl")
    proj_out = feature_dim
    for j, scope in enumerate(heads):
        if scope != f"{prefix}{HEAD}nl_{j}":
            raise CheckpointError(f"checkpoint: the projection head layers are not nl_0..nl_{len(heads) - 1} "
                                  f"(found {scope})")
        kernel = shapes.get(f"{scope}/dense/kernel")
        if kernel is None or len(kernel) != 2:
            raise CheckpointError(f"checkpoint: {scope}/dense/kernel is missing or not a 2-d kernel")
        proj_out = kernel[1]
    num_classes = in_dim = 0
    sup = shapes.get(f"{prefix}{SUPERVISED}kernel", shapes.get(f"{SUPERVISED}kernel"))
    if sup is not None:
        if len(sup) != 2:
            raise CheckpointError(f"checkpoint: {SUPERVISED}kernel has shape {list(sup)}, not [in, classes]")
        in_dim, num_classes = int(sup[0]), int(sup[1])
    others = tuple(arch_name(d, width, s) + ("" if c == cifar else " (other stem)") for d, s, c in matches[1:])
    return TFArchitecture(depth=depth, width=width, sk=sk, cifar_stem=cifar, num_proj_layers=len(heads),
                          proj_out_dim=int(proj_out), num_classes=num_classes, classifier_in_dim=in_dim,
                          feature_dim=int(feature_dim), ambiguous=others)


@dataclass(frozen=True)
class Assignment:
    """Copy TF variable ``tf_name`` (after ``transform``) into our tensor ``key``."""

    tf_name: str
    key: str
    transform: Callable[[np.ndarray], np.ndarray]
    shape: tuple[int, ...]  # our shape


def _identity(a: np.ndarray) -> np.ndarray:
    return a


def _conv_kernel(a: np.ndarray) -> np.ndarray:
    return a.transpose(3, 2, 0, 1)  # [kh, kw, in, out] -> [out, in, kh, kw]


def _dense_kernel(a: np.ndarray) -> np.ndarray:
    return a.T  # [in, out] -> [out, in]


def _bn_assignments(scope: str, module_key: str, bn: _BatchNorm) -> list[Assignment]:
    out = []
    for tf_field, ours in _BN_FIELDS:
        tensor = getattr(bn, ours)
        if tensor is None:  # the last head BN has no beta (center=False)
            continue
        out.append(Assignment(f"{scope}/{tf_field}", f"{module_key}.{ours}", _identity, tuple(tensor.shape)))
    return out


def map_network(net: SimCLRNet, tf_names: list[str], *, prefix: str = "",
                classifier_prefix: str | None = None) -> list[Assignment]:
    """Every tensor of ``net`` (but ``num_batches_tracked``) paired with its TF variable.

    ``prefix`` selects the live weights (``""``) or the momentum copy (``"ema_model/"``);
    ``classifier_prefix`` (default ``prefix``) is where ``head_supervised`` is read from.
    Raises :class:`CheckpointError` when the numbers of conv / BN layers differ.
    """
    out: list[Assignment] = []
    convs = [(k, m) for k, m in net.encoder.named_modules() if isinstance(m, nn.Conv2d)]
    bns = [(k, m) for k, m in net.encoder.named_modules() if isinstance(m, _BatchNorm)]
    tf_convs = numbered_layers(tf_names, prefix + BASE, "conv2d")
    tf_bns = numbered_layers(tf_names, prefix + BASE, "batch_normalization")
    if len(tf_convs) != len(convs) or len(tf_bns) != len(bns):
        raise CheckpointError(f"checkpoint: {prefix}{BASE} holds {len(tf_convs)} convolutions and {len(tf_bns)} "
                              f"batch norms, the {len(convs)}-conv / {len(bns)}-BN network needs exactly as many")
    for scope, (key, conv) in zip(tf_convs, convs):
        out.append(Assignment(f"{scope}/kernel", f"encoder.{key}.weight", _conv_kernel, tuple(conv.weight.shape)))
        if conv.bias is not None:
            out.append(Assignment(f"{scope}/bias", f"encoder.{key}.bias", _identity, tuple(conv.bias.shape)))
    for scope, (key, bn) in zip(tf_bns, bns):
        out.extend(_bn_assignments(scope, f"encoder.{key}", bn))
    if net.head is not None:
        for j, layer in enumerate(net.head.layers):
            scope = f"{prefix}{HEAD}nl_{j}"
            out.append(Assignment(f"{scope}/dense/kernel", f"head.layers.{j}.linear.weight", _dense_kernel,
                                  tuple(layer.linear.weight.shape)))
            out.extend(_bn_assignments(f"{scope}/batch_normalization", f"head.layers.{j}.bn", layer.bn))
    if net.classifier is not None:
        cp = prefix if classifier_prefix is None else classifier_prefix
        out.append(Assignment(f"{cp}{SUPERVISED}kernel", "classifier.weight", _dense_kernel,
                              tuple(net.classifier.weight.shape)))
        out.append(Assignment(f"{cp}{SUPERVISED}bias", "classifier.bias", _identity,
                              tuple(net.classifier.bias.shape)))
    return out
