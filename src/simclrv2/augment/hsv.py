"""Vectorised RGB <-> HSV and the fused saturation/hue adjustment (SPEC §6 step 3).

TF's ``adjust_saturation`` / ``adjust_hue`` convert each pixel to HSV (hexcone model),
scale-and-clip S or rotate H, and convert back.  Written with ``torch.where`` chains this is
slow on CPU, so the conversion here is branch-free, using two facts:

* with u_c = (c - min) / (max - min) the hue in sextants is
  ``q = u_g + u_b - u_r + 1`` when g >= b and ``6 - q`` otherwise (checked on all six
  sectors of the hexcone), i.e. ``h6 = 3 - copysign(3 - q, g - b)``;
* HSV -> RGB is ``c = min + range * d_c(h6)`` with
  ``d_c(h) = clamp(|((h + k_c) mod 6) - 3| - 1, 0, 1)``, k = (0, 4, 2) for (r, g, b),
  which is TF's ``hsv_to_rgb`` formula.

Saturation scaling keeps V and H and sets ``range' = min(range * f, v)`` (S clipped to 1).
Both adjustments share one conversion (:func:`adjust_saturation_hue`): applying them back to
back in either order gives the same result, as the intermediate RGB -> HSV round trip is
exact up to float rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._rows import Workspace, device_constant, empty, per_row

_EPS = 1e-12  # guards 0/0 on grey pixels; their hue is irrelevant (range = 0)


def _hue_sextants(x: Tensor, workspace: Workspace | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(h6 in [0, 6] with 6 == 0, value = max, min, range = max - min) of ``x`` [..., 3, H, W]."""
    plane = x.shape[:-3] + x.shape[-2:]

    def buf(name: str) -> Tensor:
        return empty(workspace, name, plane, x.dtype, x.device)

    r, g, b = x.unbind(-3)
    value = torch.amax(x, dim=-3, out=buf("hsv_value"))
    minimum = torch.amin(x, dim=-3, out=buf("hsv_min"))
    rng = torch.sub(value, minimum, out=buf("hsv_range"))
    # q = u_g + u_b - u_r + 1 = (g + b - r + value - 2 min) / range, in [0, 3].
    q = torch.add(g, b, out=buf("hsv_h")).sub_(r).add_(rng).sub_(minimum)
    q.div_(torch.clamp(rng, min=_EPS, out=buf("hsv_tmp")))
    h6 = q.neg_().add_(3.0).copysign_(torch.sub(g, b, out=buf("hsv_tmp"))).neg_().add_(3.0)
    return h6, value, minimum, rng


def _channel_offsets(x: Tensor) -> Tensor:
    """k_c = (0, 4, 2) shaped [3, 1, 1] on ``x``'s device, in ``x``'s dtype."""
    k = device_constant("hsv_offsets", x.device, lambda: torch.arange(3, dtype=torch.float32).mul_(-2).remainder_(6))
    return k.to(x.dtype).view(3, 1, 1)


def _sextants_to_rgb(h6: Tensor, minimum: Tensor, rng: Tensor, x: Tensor, workspace: Workspace | None = None) -> Tensor:
    """RGB [..., 3, H, W] = min + range * d_c(h6) for any real ``h6`` (periodic).

    Overwrites ``h6``.
    """
    frac = h6.mul_(1.0 / 6.0)
    frac.sub_(torch.floor(frac, out=empty(workspace, "hsv_tmp", frac.shape, x.dtype, x.device)))  # [0, 1]
    # 6*frac + k_c lies in [0, 10]; on [0, 12] |((h) mod 6) - 3| == ||h - 6| - 3|.
    out = empty(workspace, "hsv_out", x.shape, x.dtype, x.device)
    d = torch.add(_channel_offsets(x), frac.unsqueeze(-3), alpha=6.0, out=out)
    d.sub_(6.0).abs_().sub_(3.0).abs_().sub_(1.0).clamp_(0.0, 1.0)
    return d.mul_(rng.unsqueeze(-3)).add_(minimum.unsqueeze(-3))


def rgb_to_hsv(x: Tensor) -> Tensor:
    """RGB in [0, 1] [..., 3, H, W] -> HSV (h in [0, 1), s, v), TF ``rgb_to_hsv`` semantics.

    Grey pixels get h = 0, black pixels s = 0.
    """
    h6, value, _, rng = _hue_sextants(x)
    hue = h6.mul_(1.0 / 6.0)
    hue = hue.sub_(torch.floor(hue))
    sat = torch.where(value > 0, rng / value.clamp_min(_EPS), torch.zeros_like(value))
    return torch.stack((hue, sat, value), dim=-3)


def hsv_to_rgb(x: Tensor) -> Tensor:
    """HSV [..., 3, H, W] (h in fractions of the circle) -> RGB, TF ``hsv_to_rgb`` semantics."""
    hue, sat, value = x.unbind(-3)
    rng = sat * value
    return _sextants_to_rgb(hue * 6.0, value - rng, rng, x)


def adjust_saturation_hue(
    x: Tensor,
    saturation_factor: Tensor | float,
    hue_delta: Tensor | float,
    workspace: Workspace | None = None,
) -> Tensor:
    """Scale saturation by ``saturation_factor`` (S clipped to [0, 1]) and rotate hue by
    ``hue_delta`` (fraction of the circle), per image, in one HSV round trip.

    Equals TF ``adjust_saturation`` then ``adjust_hue`` (or the reverse).  Factors are a
    float or a tensor [B]; ``x`` is [B, 3, H, W] in [0, 1].  The result stays in [0, 1].
    With a ``workspace`` the temporaries and the result live in its buffers.
    """
    h6, value, minimum, rng = _hue_sextants(x, workspace)
    f = per_row(saturation_factor, x).clamp_min(0.0).squeeze(1)
    shift = per_row(hue_delta, x).squeeze(1) * 6.0
    h6.add_(shift)
    rng = torch.minimum(rng.mul_(f), value, out=rng)  # range' = S' * V with S' = min(S * f, 1)
    minimum = torch.sub(value, rng, out=minimum)
    return _sextants_to_rgb(h6, minimum, rng, x, workspace)
