"""SimCLR view generation and eval preprocessing on batches (SPEC §6, §1.7 'Input', §12).

Input: uint8 images [B, 3, H, W] on any device, optionally with ``sizes`` [B, 2] giving
each image's valid (height, width) in the top-left corner of the canvas (folder datasets
letterbox images into a fixed canvas).  Output: float32 in [0, 1] [N, 3, S, S] on the same
device — no mean/std normalisation (SPEC §1.7).

One pretraining view (SPEC §6 order): random crop (TF ``sample_distorted_bounding_box``)
+ bicubic resize -> horizontal flip p 0.5 -> colour distortion (jitter p 0.8, grey p 0.2)
-> Gaussian blur p 0.5 -> clip.  Fine-tuning keeps crop + flip only.

All random parameters of a call are drawn first, as tensors with one row per output image,
from the caller's ``torch.Generator`` (same seed -> same output, on any chunking).  The
pixel work then runs on the whole batch on accelerators, and in cache-sized chunks of
images on CPU (``AugmentConfig.chunk_size``; chunking changes speed, not values).  The
flip is folded into the resize taps.

CPU note: use one intra-op thread per data-loading process (``torch.set_num_threads(1)``,
the DataLoader-worker default).  On a shared, busy machine OpenMP's spin-waiting makes
multi-threaded small tensor ops many times slower (``OMP_WAIT_POLICY=PASSIVE`` also avoids it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from ._rows import Workspace, slice_rows, take_rows
from .blur import PADDINGS, BlurParams, apply_blur_params, blur_radius, sample_blur_params
from .color import ColorParams, ColorStageParams, apply_color_stages, color_stage_params, sample_color_params
from .crop import CROP_METHODS, center_crop_boxes, crop_and_resize, default_sizes, sample_crop_boxes
from .flip import sample_flips
from .resize import RESIZE_MODES, ResizePlan, apply_resize, plan_resize

#: Images up to this size use the CIFAR presets (SPEC §6 'CIFAR variant', 'Eval preprocessing').
CIFAR_MAX_SIZE = 32

_CPU_CHUNK_BYTES = 8 << 20  # float working set per chunk on CPU (measured sweet spot: 3-8 images at 224 px)


@dataclass
class AugmentConfig:
    """Settings of one SimCLR view (SPEC §6).  Defaults are the ImageNet pretraining ones.

    Attributes:
        image_size: output side S.
        color_jitter_strength: s; brightness/contrast/saturation 0.8·s, hue 0.2·s.
        use_blur: Gaussian blur p 0.5 (pretraining on ImageNet).
        crop_method: 'reference' (TF sampler) or 'torchvision' (RandomResizedCrop).
        resize_mode: 'bicubic' (TF2), 'bicubic_legacy' (TF1) or 'bilinear'.
        flip: random horizontal flip p 0.5.
        color: colour distortion (jitter p 0.8 then grey p 0.2).
        blur_per_image_sigma: one sigma per image (default) or, as the reference, one per
            view batch.
        area_range, aspect_range, min_object_covered: crop sampler ranges (aspect = w / h).
        max_attempts: crop candidates; None = 100 for 'reference', 10 for 'torchvision'.
        brightness_impl: 'simclrv2' (multiplicative, default) or 'simclrv1' (additive).
        blur_padding: 'zeros' (reference, darkened borders) or 'reflect'.
        resize_backend: 'separable' (exact TF2 kernel) or 'grid_sample'.
        chunk_size: images per chunk of pixel work; None = whole batch off-CPU, a few MB of
            data per chunk on CPU (cache-sized chunks are ~1.5x faster than one pass).
    """

    image_size: int
    color_jitter_strength: float = 1.0
    use_blur: bool = True
    crop_method: str = "reference"
    resize_mode: str = "bicubic"
    flip: bool = True
    color: bool = True
    blur_per_image_sigma: bool = True
    area_range: tuple[float, float] = (0.08, 1.0)
    aspect_range: tuple[float, float] = (3 / 4, 4 / 3)
    min_object_covered: float = 0.1
    max_attempts: int | None = None
    brightness_impl: str = "simclrv2"
    blur_padding: str = "zeros"
    resize_backend: str = "separable"
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError("image_size must be positive")
        if self.crop_method not in CROP_METHODS:
            raise ValueError(f"crop_method must be one of {CROP_METHODS}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}")
        if self.blur_padding not in PADDINGS:
            raise ValueError(f"blur_padding must be one of {PADDINGS}")
        if self.color_jitter_strength < 0:
            raise ValueError("color_jitter_strength must be >= 0")

    @classmethod
    def for_pretraining(
        cls,
        image_size: int,
        color_jitter_strength: float | None = None,
        use_blur: bool | None = None,
        **overrides,
    ) -> "AugmentConfig":
        """Pretraining preset: CIFAR (s = 0.5, no blur) for image_size <= 32, else ImageNet
        (s = 1.0, blur).  Explicit arguments override the preset (SPEC §6)."""
        cifar = image_size <= CIFAR_MAX_SIZE
        if color_jitter_strength is None:
            color_jitter_strength = 0.5 if cifar else 1.0
        if use_blur is None:
            use_blur = not cifar
        return cls(image_size, color_jitter_strength=color_jitter_strength, use_blur=use_blur, **overrides)

    @classmethod
    def for_finetuning(cls, image_size: int, **overrides) -> "AugmentConfig":
        """Fine-tune / linear-eval training preset: crop + flip, no colour, no blur (SPEC §6)."""
        overrides.setdefault("color", False)
        overrides.setdefault("use_blur", False)
        return cls(image_size, **overrides)


@dataclass
class ViewParams:
    """Random parameters of N output rows (see :meth:`SimCLRAugmentation.sample_params`)."""

    boxes: Tensor
    flip: Tensor | None
    color: ColorParams | None = None
    blur: BlurParams | None = None


@dataclass
class _Prepared:
    """Per-row kernel parameters derived once per call from :class:`ViewParams`."""

    boxes: Tensor
    flip: Tensor | None
    plan: ResizePlan | None
    color: ColorStageParams | None
    blur: BlurParams | None


def _resolve_sizes(images: Tensor, sizes: Tensor | None) -> Tensor:
    b, _, h, w = images.shape
    if sizes is None:
        return default_sizes(b, h, w, images.device)
    if sizes.shape != (b, 2):
        raise ValueError(f"sizes must have shape [{b}, 2], got {tuple(sizes.shape)}")
    return sizes.to(device=images.device, dtype=torch.int64)


def _image_chunks(
    images: Tensor, out_size: int, rows_per_image: int, chunk_size: int | None
) -> Iterator[tuple[int, int]]:
    """(start, stop) image ranges: the whole batch off-CPU, cache-sized chunks on CPU."""
    b, c, h, w = images.shape
    if chunk_size is None:
        if images.device.type != "cpu":
            chunk_size = b
        else:
            per_image = 4 * c * (h * w + rows_per_image * out_size * max(out_size, w))
            chunk_size = max(1, _CPU_CHUNK_BYTES // per_image)
    chunk_size = max(1, int(chunk_size))
    for start in range(0, b, chunk_size):
        yield start, min(b, start + chunk_size)


def _output(
    out: Tensor | None, shape: tuple[int, ...], device: torch.device, memory_format: torch.memory_format
) -> Tensor:
    """A fresh float32 output of ``shape``, or the caller's ``out`` after checking it."""
    if out is None:
        return torch.empty(shape, device=device, dtype=torch.float32, memory_format=memory_format)
    if tuple(out.shape) != shape or out.dtype != torch.float32 or out.device != torch.device(device):
        raise ValueError(f"out must be a float32 tensor of shape {list(shape)} on {device}")
    return out


def _check_images(images: Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")


class SimCLRAugmentation:
    """Random SimCLR views of a batch (SPEC §6): ``aug(images, generator, sizes)``.

    ``__call__`` makes one view per image; :meth:`two_views` makes the positive pairs as
    [2B, 3, S, S] with all first views, then all second views (rows i and B + i come from
    image i), the layout the NT-Xent loss expects (SPEC §3).
    """

    def __init__(self, config: AugmentConfig):
        self.config = config
        self.blur_radius = blur_radius(config.image_size)
        self._workspace = Workspace()

    def __repr__(self) -> str:
        return f"SimCLRAugmentation({self.config!r})"

    def sample_params(self, sizes: Tensor, generator: torch.Generator, num_views: int = 1) -> ViewParams:
        """Draw all random parameters for the rows described by ``sizes`` [N, 2].

        Order of draws: crop boxes, flips, colour, blur.  ``num_views`` only matters for
        ``blur_per_image_sigma=False`` (one sigma per view).
        """
        cfg = self.config
        n = sizes.shape[0]
        attempts = cfg.max_attempts or (100 if cfg.crop_method == "reference" else 10)
        boxes = sample_crop_boxes(
            sizes, generator, cfg.area_range, cfg.aspect_range, cfg.min_object_covered, attempts, cfg.crop_method
        )
        flips = sample_flips(n, generator) if cfg.flip else None
        color = None
        if cfg.color:
            color = sample_color_params(
                n, cfg.color_jitter_strength, generator, impl=cfg.brightness_impl
            )
        blur = None
        if cfg.use_blur:
            blur = sample_blur_params(
                n, generator, per_image_sigma=cfg.blur_per_image_sigma, sigma_groups=num_views
            )
        return ViewParams(boxes=boxes, flip=flips, color=color, blur=blur)

    def _prepare(self, params: ViewParams) -> _Prepared:
        cfg = self.config
        plan = None
        if cfg.resize_backend == "separable":
            plan = plan_resize(params.boxes, cfg.image_size, cfg.resize_mode, params.flip)
        color = color_stage_params(params.color) if params.color is not None else None
        return _Prepared(boxes=params.boxes, flip=params.flip, plan=plan, color=color, blur=params.blur)

    def _render(
        self, images: Tensor, prep: _Prepared, source_index: Tensor, workspace: Workspace | None
    ) -> Tensor:
        cfg = self.config
        if prep.plan is not None:
            x = apply_resize(images, prep.plan, source_index, workspace).clamp_(0.0, 1.0)
        else:
            x = crop_and_resize(
                images, prep.boxes, cfg.image_size, cfg.resize_mode, prep.flip, source_index, cfg.resize_backend
            )
        if prep.color is not None:
            x = apply_color_stages(x, prep.color, inplace=True, workspace=workspace)
        if prep.blur is not None:
            x = apply_blur_params(x, prep.blur, self.blur_radius, cfg.blur_padding, inplace=True, workspace=workspace)
        return x

    def render(self, images: Tensor, params: ViewParams, source_index: Tensor | None = None) -> Tensor:
        """Apply ``params`` (N rows) to ``images``; row r is cut from ``images[source_index[r]]``
        (default: image r).  Deterministic: the same params give the same views."""
        if source_index is None:
            source_index = torch.arange(images.shape[0], device=images.device)
        return self._render(images, self._prepare(params), source_index, None)

    def views(
        self,
        images: Tensor,
        generator: torch.Generator,
        num_views: int,
        sizes: Tensor | None = None,
        *,
        out_memory_format: torch.memory_format = torch.contiguous_format,
        out: Tensor | None = None,
    ) -> Tensor:
        """``num_views`` independent views per image: float32 [num_views * B, 3, S, S],
        view-major (rows v * B + i come from image i).

        ``out``: optional float32 tensor of that shape to write into (e.g. a reused or
        pinned buffer; a fresh multi-MB CPU tensor costs page faults on first write).
        """
        _check_images(images)
        b = images.shape[0]
        s = self.config.image_size
        device = images.device
        if generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device} but images are on {device}; use a generator there")
        sizes = _resolve_sizes(images, sizes)
        params = self.sample_params(sizes.repeat(num_views, 1), generator, num_views)
        prep = self._prepare(params)
        workspace = self._workspace if device.type == "cpu" else None
        out = _output(out, (num_views * b, 3, s, s), device, out_memory_format)
        out_by_view = out.view(num_views, b, 3, s, s)
        view_offsets = (torch.arange(num_views, device=device) * b)[:, None]
        for start, stop in _image_chunks(images, s, num_views, self.config.chunk_size):
            n = stop - start
            local = torch.arange(n, device=device)
            if n == b:
                chunk = prep
            elif num_views == 1:
                chunk = slice_rows(prep, start, stop)
            else:
                chunk = take_rows(prep, (view_offsets + start + local).reshape(-1))
            x = self._render(images[start:stop], chunk, local.repeat(num_views), workspace)
            out_by_view[:, start:stop].copy_(x.view(num_views, n, 3, s, s))
        return out

    def __call__(
        self,
        images: Tensor,
        generator: torch.Generator,
        sizes: Tensor | None = None,
        *,
        out_memory_format: torch.memory_format = torch.contiguous_format,
        out: Tensor | None = None,
    ) -> Tensor:
        """One random view per image: float32 [B, 3, S, S] in [0, 1]."""
        return self.views(images, generator, 1, sizes, out_memory_format=out_memory_format, out=out)

    def two_views(
        self,
        images: Tensor,
        generator: torch.Generator,
        sizes: Tensor | None = None,
        *,
        out_memory_format: torch.memory_format = torch.contiguous_format,
        out: Tensor | None = None,
    ) -> Tensor:
        """Two independent views per image: [2B, 3, S, S], first views then second views."""
        return self.views(images, generator, 2, sizes, out_memory_format=out_memory_format, out=out)


class EvalTransform:
    """Deterministic eval preprocessing (reference ``preprocess_for_eval``, SPEC §6).

    image_size > 32: centre crop keeping ``crop_proportion`` (0.875) of the side that limits
    the (square) output -- the shorter side -- with the reference's ``_compute_crop_shape``
    (float32, rint) and offset ``((H - h) + 1) // 2``, then one resize of the crop to S, clip.
    The crop is taken from each image's valid ``sizes``; for the reference's result the input
    must be the **full-resolution** decoded image (what :func:`simclrv2.data.decode.eval_input`
    hands over), not a letterboxed training canvas.  image_size <= 32 (CIFAR): the raw image in
    [0, 1], only resized when its valid size differs from S.

    ``resize_mode``: ``bicubic`` (TF2 ``tf.image.resize``, half-pixel centres, a = -0.5; the
    default, what our training stages use), ``bicubic_legacy`` (TF1 ``tf.image.resize_bicubic``,
    a = -0.75, no half-pixel offset: the root-level reference code the released checkpoints were
    trained and evaluated with) or ``bilinear`` (see :mod:`simclrv2.augment.resize`).
    """

    def __init__(
        self,
        image_size: int,
        crop_proportion: float = 0.875,
        resize_mode: str = "bicubic",
        center_crop: bool | None = None,
        chunk_size: int | None = None,
    ):
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        self.image_size = image_size
        self.crop_proportion = crop_proportion
        self.resize_mode = resize_mode
        self.center_crop = image_size > CIFAR_MAX_SIZE if center_crop is None else center_crop
        self.chunk_size = chunk_size
        self._workspace = Workspace()

    def __repr__(self) -> str:
        return (
            f"EvalTransform(image_size={self.image_size}, crop_proportion={self.crop_proportion}, "
            f"resize_mode={self.resize_mode!r}, center_crop={self.center_crop})"
        )

    def boxes(self, sizes: Tensor) -> Tensor:
        """The crop box of each image: centre crop, or the whole valid region."""
        if self.center_crop:
            return center_crop_boxes(sizes, self.crop_proportion)
        return torch.cat((torch.zeros_like(sizes), sizes), dim=1)

    def __call__(
        self,
        images: Tensor,
        sizes: Tensor | None = None,
        *,
        out_memory_format: torch.memory_format = torch.contiguous_format,
        out: Tensor | None = None,
    ) -> Tensor:
        """float32 [B, 3, S, S] in [0, 1] on ``images``' device (written into ``out`` if given)."""
        _check_images(images)
        b, _, h, w = images.shape
        s = self.image_size
        out = _output(out, (b, 3, s, s), images.device, out_memory_format)
        if not self.center_crop and sizes is None and h == s and w == s:
            out.copy_(images)
            return out.mul_(1.0 / 255.0) if images.dtype == torch.uint8 else out.clamp_(0.0, 1.0)
        plan = plan_resize(self.boxes(_resolve_sizes(images, sizes)), s, self.resize_mode)
        workspace = self._workspace if images.device.type == "cpu" else None
        for start, stop in _image_chunks(images, s, 1, self.chunk_size):
            chunk = slice_rows(plan, start, stop)
            out[start:stop] = apply_resize(images[start:stop], chunk, None, workspace).clamp_(0.0, 1.0)
        return out


__all__ = ["AugmentConfig", "EvalTransform", "SimCLRAugmentation", "ViewParams", "CIFAR_MAX_SIZE"]
