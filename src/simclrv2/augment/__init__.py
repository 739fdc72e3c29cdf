"""Batched, on-device SimCLR augmentations with per-image random parameters (SPEC §6).

Input: uint8 images [B, 3, H, W] (any device) and optional valid ``sizes`` [B, 2];
output: float32 [N, 3, S, S] in [0, 1] (no normalisation, SPEC §1.7).  All randomness
comes from an explicit ``torch.Generator`` on the images' device.

* :mod:`.crop` — random (TF / torchvision semantics) and centre crop boxes, crop + resize
* :mod:`.resize` — the exact TF2 separable resampler behind ``crop_and_resize``
* :mod:`.flip` — random horizontal flips
* :mod:`.hsv` / :mod:`.color` — TF colour ops and random-order colour jitter
* :mod:`.blur` — random Gaussian blur
* :mod:`.pipeline` — :class:`AugmentConfig`, :class:`SimCLRAugmentation`, :class:`EvalTransform`
"""

from .blur import (
    BlurParams,
    apply_blur_params,
    blur_radius,
    blur_with_kernel,
    gaussian_blur,
    gaussian_kernel1d,
    random_gaussian_blur,
    sample_blur_params,
)
from .color import (
    ColorParams,
    ColorStageParams,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    apply_color_params,
    apply_color_stages,
    color_jitter,
    color_stage_params,
    random_color_distortion,
    sample_color_params,
    to_grayscale,
)
from .crop import center_crop_boxes, crop_and_resize, sample_crop_boxes
from .flip import horizontal_flip, random_horizontal_flip, sample_flips
from .hsv import adjust_saturation_hue, hsv_to_rgb, rgb_to_hsv
from .pipeline import AugmentConfig, EvalTransform, SimCLRAugmentation, ViewParams
from .resize import ResizePlan, apply_resize, plan_resize, resample_taps

__all__ = [
    "AugmentConfig",
    "BlurParams",
    "ColorParams",
    "ColorStageParams",
    "ResizePlan",
    "EvalTransform",
    "SimCLRAugmentation",
    "ViewParams",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "adjust_saturation_hue",
    "apply_blur_params",
    "apply_color_params",
    "apply_color_stages",
    "apply_resize",
    "blur_radius",
    "blur_with_kernel",
    "center_crop_boxes",
    "color_jitter",
    "color_stage_params",
    "crop_and_resize",
    "gaussian_blur",
    "gaussian_kernel1d",
    "horizontal_flip",
    "hsv_to_rgb",
    "plan_resize",
    "random_color_distortion",
    "random_gaussian_blur",
    "random_horizontal_flip",
    "resample_taps",
    "rgb_to_hsv",
    "sample_blur_params",
    "sample_color_params",
    "sample_crop_boxes",
    "sample_flips",
    "to_grayscale",
]
