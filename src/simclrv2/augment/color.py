"""Batched colour distortion with per-image random parameters (SPEC §6 step 3).

Reference (``data_util.py``: ``random_color_jitter`` / ``color_jitter_rand``): with p = 0.8
apply colour jitter of strength s, then independently with p = 0.2 convert to grey
(``tf.image.rgb_to_grayscale`` weights 0.2989, 0.5870, 0.1140, tiled to 3 channels).
Jitter = brightness, contrast, saturation, hue in a random order (one of the 24
permutations, uniformly, per image), each followed by a clip to [0, 1]:

* brightness ('simclrv2', default): ``x * f``, f ~ U[max(0, 1 - 0.8s), 1 + 0.8s];
  ('simclrv1'): ``x + d``, d ~ U[-0.8s, 0.8s] (``tf.image.random_brightness``);
* contrast: ``(x - mean_c) * f + mean_c`` with the **per-channel** spatial mean,
  f ~ U[1 - 0.8s, 1 + 0.8s] (torchvision uses the grey mean instead);
* saturation: HSV, S * f clipped, f ~ U[1 - 0.8s, 1 + 0.8s] (torchvision blends with grey);
* hue: HSV, H + d, d ~ U[-0.2s, 0.2s] in fractions of the circle.

TF rejects strengths whose lower contrast/saturation bound is negative (s > 1.25); here the
bounds are clamped at 0 instead.

Random order, batched: brightness and contrast are per-channel affine maps (cheap, 'A'),
saturation and hue both act in HSV ('V'), and two V ops that are adjacent in an image's
order share one HSV round trip.  Every permutation embeds, in order, into the fixed stage
schedule ``A V A A V A`` (see :data:`STAGES`), so the whole batch runs 4 affine stages and
only 2 HSV stages; in each stage an image applies the op its permutation puts there, or
nothing.  Affine stages use neutral parameters (factor 1) for idle images, which is an
exact identity; HSV stages are applied only to the images that use them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from ._rows import Workspace, apply_to_rows, bernoulli, device_constant, empty, per_row, uniform
from .hsv import adjust_saturation_hue

BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
#: All orders of the four ops; index 0 is the fixed order (brightness, contrast, saturation, hue).
PERMUTATIONS: tuple[tuple[int, ...], ...] = tuple(itertools.permutations(range(4)))
#: Stage kinds of the batched schedule: 'A' = brightness/contrast, 'V' = saturation/hue.
STAGES = ("A", "V", "A", "A", "V", "A")

GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)


def _schedule_row(perm: tuple[int, ...]) -> list[int]:
    """Stage codes for one op order: A stages hold 0/1+BRIGHTNESS/1+CONTRAST, V stages a
    bit mask (1 = saturation, 2 = hue).  Greedy in-order embedding into :data:`STAGES`."""
    codes = [0] * len(STAGES)
    pos = 0
    prev_v = -1  # stage of the previous op if it was a V op
    for op in perm:
        if op in (SATURATION, HUE):
            bit = 1 if op == SATURATION else 2
            if prev_v >= 0:
                codes[prev_v] |= bit
                prev_v = -1
                continue
            while STAGES[pos] != "V":
                pos += 1
            codes[pos] = bit
            prev_v = pos
        else:
            while STAGES[pos] != "A":
                pos += 1
            codes[pos] = 1 + op
            prev_v = -1
        pos += 1
    return codes


def schedule_table() -> Tensor:
    """int64 [24, len(STAGES)]: stage codes of each permutation in :data:`PERMUTATIONS`."""
    return torch.tensor([_schedule_row(p) for p in PERMUTATIONS], dtype=torch.int64)


@dataclass
class ColorParams:
    """Per-image colour-distortion parameters (all tensors have one row per image).

    ``stages`` [B, 6] already has the jitter coin folded in (all zero = no jitter).
    ``brightness`` is a factor ('simclrv2') or an additive delta ('simclrv1').
    """

    stages: Tensor
    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor
    jitter: Tensor
    grayscale: Tensor
    permutation: Tensor
    brightness_impl: str = "simclrv2"


def jitter_ranges(strength: float, impl: str = "simclrv2") -> dict[str, tuple[float, float]]:
    """Sampling ranges of the four jitter parameters for strength ``s`` (SPEC §6)."""
    b, c, s, h = 0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength
    if impl == "simclrv2":
        brightness = (max(0.0, 1.0 - b), 1.0 + b)
    elif impl == "simclrv1":
        brightness = (-b, b)
    else:
        raise ValueError(f"impl must be 'simclrv2' or 'simclrv1', got {impl!r}")
    return {
        "brightness": brightness,
        "contrast": (max(0.0, 1.0 - c), 1.0 + c),
        "saturation": (max(0.0, 1.0 - s), 1.0 + s),
        "hue": (-h, h),
    }


def sample_color_params(
    batch: int,
    strength: float,
    generator: torch.Generator,
    p_jitter: float = 0.8,
    p_gray: float = 0.2,
    random_order: bool = True,
    impl: str = "simclrv2",
) -> ColorParams:
    """Draw the colour-distortion parameters of ``batch`` images on the generator's device."""
    ranges = jitter_ranges(strength, impl)
    device = generator.device
    jitter = bernoulli(batch, p_jitter, generator)
    if random_order:
        perm = torch.randint(len(PERMUTATIONS), (batch,), generator=generator, device=device)
    else:
        perm = torch.zeros(batch, dtype=torch.int64, device=device)
    table = device_constant("color_schedule", device, schedule_table)
    stages = table.index_select(0, perm) * jitter[:, None]
    return ColorParams(
        stages=stages,
        brightness=uniform(batch, *ranges["brightness"], generator),
        contrast=uniform(batch, *ranges["contrast"], generator),
        saturation=uniform(batch, *ranges["saturation"], generator),
        hue=uniform(batch, *ranges["hue"], generator),
        jitter=jitter,
        grayscale=bernoulli(batch, p_gray, generator),
        permutation=perm,
        brightness_impl=impl,
    )


def _affine_(x: Tensor, scale: Tensor, shift: Tensor, contrast: Tensor) -> Tensor:
    """In place: ``clip(scale * x + shift + contrast * (1 - scale) * mean_c)`` per image and
    channel, with per-image ``scale``, ``shift``, ``contrast`` [B] (contrast is 0 or 1).

    One kernel covers brightness (multiplicative or additive) and contrast; neutral
    parameters (scale 1, shift 0, contrast 0) leave a row exactly unchanged.
    """
    scale, shift, contrast = (per_row(v, x) for v in (scale, shift, contrast))
    offset = shift + contrast * (1.0 - scale) * x.mean(dim=(-2, -1), keepdim=True)
    return x.mul_(scale).add_(offset).clamp_(0.0, 1.0)


def adjust_brightness(x: Tensor, factor: Tensor | float, impl: str = "simclrv2") -> Tensor:
    """Brightness per image: ``x * factor`` ('simclrv2') or ``x + factor`` ('simclrv1'), clipped."""
    factor = per_row(factor, x).flatten()
    one, zero = torch.ones_like(factor), torch.zeros_like(factor)
    if impl == "simclrv1":
        return _affine_(x.clone(), one, factor, zero)
    return _affine_(x.clone(), factor, zero, zero)


def adjust_contrast(x: Tensor, factor: Tensor | float) -> Tensor:
    """TF contrast per image: ``(x - mean_c) * factor + mean_c`` (per-channel mean), clipped."""
    factor = per_row(factor, x).flatten()
    return _affine_(x.clone(), factor, torch.zeros_like(factor), torch.ones_like(factor))


def adjust_saturation(x: Tensor, factor: Tensor | float) -> Tensor:
    """TF saturation per image: scale HSV saturation by ``factor`` and clip it to [0, 1]."""
    return adjust_saturation_hue(x, factor, 0.0)


def adjust_hue(x: Tensor, delta: Tensor | float) -> Tensor:
    """TF hue per image: rotate HSV hue by ``delta`` (fraction of the circle)."""
    return adjust_saturation_hue(x, 1.0, delta)


def to_grayscale(x: Tensor, workspace: Workspace | None = None) -> Tensor:
    """TF ``rgb_to_grayscale`` (0.2989 R + 0.5870 G + 0.1140 B) tiled to 3 channels."""
    r, g, b = x.unbind(-3)
    gray = torch.mul(r, GRAY_WEIGHTS[0], out=empty(workspace, "gray", r.shape, x.dtype, x.device))
    gray.add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2])
    return empty(workspace, "gray_out", x.shape, x.dtype, x.device).copy_(gray.unsqueeze(-3).expand_as(x))


@dataclass
class ColorStageParams:
    """Per-image parameters of every stage of :data:`STAGES` (derived from :class:`ColorParams`).

    Affine stages: ``scale``, ``shift``, ``contrast`` [B, 4]; HSV stages: ``saturation``,
    ``hue`` [B, 2] and ``hsv_active`` (bool [B, 2], whether the image uses the stage);
    ``grayscale`` bool [B].
    """

    scale: Tensor
    shift: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor
    hsv_active: Tensor
    grayscale: Tensor


def color_stage_params(params: ColorParams) -> ColorStageParams:
    """Turn sampled parameters into per-stage ones (a few tiny tensor ops, no pixels)."""
    codes = params.stages
    a_cols = [i for i, kind in enumerate(STAGES) if kind == "A"]
    v_cols = [i for i, kind in enumerate(STAGES) if kind == "V"]
    # Column stacks, not list indexing (which would copy an index list to the device).
    a = torch.stack([codes[:, i] for i in a_cols], dim=1)
    v = torch.stack([codes[:, i] for i in v_cols], dim=1)
    is_b = a == 1 + BRIGHTNESS
    is_c = a == 1 + CONTRAST
    one = torch.ones_like(a, dtype=torch.float32)
    contrast = params.contrast[:, None].expand_as(one)
    brightness = params.brightness[:, None].expand_as(one)
    if params.brightness_impl == "simclrv1":
        scale = torch.where(is_c, contrast, one)
        shift = torch.where(is_b, brightness, one * 0)
    else:
        scale = torch.where(is_b, brightness, torch.where(is_c, contrast, one))
        shift = one * 0
    sat_on = (v & 1) > 0
    hue_on = (v & 2) > 0
    return ColorStageParams(
        scale=scale,
        shift=shift,
        contrast=is_c.to(torch.float32),
        saturation=torch.where(sat_on, params.saturation[:, None], 1.0),
        hue=torch.where(hue_on, params.hue[:, None], 0.0),
        hsv_active=sat_on | hue_on,
        grayscale=params.grayscale,
    )


def apply_color_stages(
    x: Tensor, sp: ColorStageParams, inplace: bool = False, workspace: Workspace | None = None
) -> Tensor:
    """Run the stage schedule on ``x`` [B, 3, H, W] in [0, 1]; ``inplace=True`` lets it
    overwrite ``x`` (always use the returned tensor); ``workspace`` holds temporaries."""
    if not inplace:
        x = x.clone()
    a = v = 0
    for kind in STAGES:
        if kind == "A":
            x = _affine_(x, sp.scale[:, a], sp.shift[:, a], sp.contrast[:, a])
            a += 1
        else:
            x = apply_to_rows(
                lambda t, f, d: adjust_saturation_hue(t, f, d, workspace),
                x,
                sp.hsv_active[:, v],
                sp.saturation[:, v],
                sp.hue[:, v],
                inplace=True,
                workspace=workspace,
            )
            v += 1
    gray = lambda t: to_grayscale(t, workspace)  # noqa: E731
    return apply_to_rows(gray, x, sp.grayscale, inplace=True, workspace=workspace)


def apply_color_params(x: Tensor, params: ColorParams, inplace: bool = False) -> Tensor:
    """Apply sampled colour parameters to ``x`` [B, 3, H, W] in [0, 1] (float)."""
    return apply_color_stages(x, color_stage_params(params), inplace)


def color_jitter(
    x: Tensor,
    strength: float,
    generator: torch.Generator,
    random_order: bool = True,
    impl: str = "simclrv2",
) -> Tensor:
    """Colour jitter of every image (reference ``color_jitter``): brightness, contrast,
    saturation (0.8·s) and hue (0.2·s) in a random order per image, clip after each."""
    params = sample_color_params(x.shape[0], strength, generator, 1.0, 0.0, random_order, impl)
    return apply_color_params(x, params)


def random_color_distortion(
    x: Tensor,
    strength: float,
    generator: torch.Generator,
    p_jitter: float = 0.8,
    p_gray: float = 0.2,
    impl: str = "simclrv2",
) -> Tensor:
    """Reference ``random_color_jitter``: jitter with p ``p_jitter``, then grey with p ``p_gray``."""
    params = sample_color_params(x.shape[0], strength, generator, p_jitter, p_gray, True, impl)
    return apply_color_params(x, params)
