"""Tests of the batched SimCLR augmentations (SPEC §6, §1.7 'Input')."""

from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from simclrv2.augment import (
    AugmentConfig,
    EvalTransform,
    SimCLRAugmentation,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    apply_blur_params,
    apply_color_params,
    blur_radius,
    center_crop_boxes,
    color_jitter,
    crop_and_resize,
    gaussian_blur,
    gaussian_kernel1d,
    hsv_to_rgb,
    random_color_distortion,
    random_gaussian_blur,
    random_horizontal_flip,
    rgb_to_hsv,
    sample_blur_params,
    sample_color_params,
    sample_crop_boxes,
    to_grayscale,
)
from simclrv2.augment import _rows
from simclrv2.augment.color import PERMUTATIONS, STAGES, ColorParams, schedule_table
from simclrv2.augment.resize import resample_taps


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, h, w), generator=gen(seed), dtype=torch.uint8)


def smooth_images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Coloured, spatially smooth uint8 images (upsampled noise)."""
    small = torch.rand(b, 3, 4, 4, generator=gen(seed))
    big = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return (big * 255).round().to(torch.uint8)


def changed_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).abs().amax(1) > 0


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Small tensors: one intra-op thread is fastest, and immune to a busy shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(params=["gather", "where"])
def strategy(request, monkeypatch):
    """Run a test under both row-selection strategies (CPU gather / accelerator where)."""
    monkeypatch.setattr(_rows, "FORCE_STRATEGY", request.param)
    return request.param


# --------------------------------------------------------------------------- crops


def test_reference_crop_ranges_and_coverage():
    n = 4000
    sizes = torch.tensor([[48, 64]]).expand(n, 2)
    boxes = sample_crop_boxes(sizes, gen(1))
    top, left, h, w = boxes.double().unbind(1)
    area = h * w / (48 * 64)
    assert area.min() >= 0.1 - 1e-9  # min_object_covered makes 0.10 the effective minimum
    assert area.max() <= 1.0
    ratio = w / h
    # width = round(h * ar) with ar in [3/4, 4/3]: the ratio is within rounding of the range
    assert (w - torch.round(h * 0.75) >= 0).all() and (w - torch.round(h * 4 / 3) <= 0).all()
    assert ratio.min() > 0.6 and ratio.max() < 1.5
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 48).all() and (left + w <= 64).all()
    # TF offsets are Uniform(H - h): a crop narrower than the image never touches the far edge
    narrower = w < 64
    assert (left[narrower] + w[narrower] < 64).all()
    # the distribution is spread over the range, not stuck at the fallback
    assert (area < 0.3).float().mean() > 0.1 and (area > 0.8).float().mean() > 0.02


def _tf_sample_distorted_bounding_box(height, width, rng, area=(0.08, 1.0), aspect=(0.75, 4 / 3), cover=0.1):
    """Scalar port of TF's GenerateRandomCrop loop (float32 like the kernel), for comparison."""

    def lrint(v):
        return int(np.rint(np.float32(v)))

    for _ in range(100):
        ar = np.float32(rng.random()) * np.float32(aspect[1] - aspect[0]) + np.float32(aspect[0])
        min_area, max_area = np.float32(area[0]) * width * height, np.float32(area[1]) * width * height
        h, max_h = lrint(np.sqrt(np.float32(min_area / ar))), lrint(np.sqrt(np.float32(max_area / ar)))
        if lrint(max_h * ar) > width:
            max_h = int((width + 0.5 - 1e-7) / float(ar))
            max_h -= lrint(max_h * ar) > width
        max_h = min(max_h, height)
        h = min(h, max_h)
        h += rng.randrange(max_h - h + 1)
        w = lrint(h * ar)
        if w * h < min_area:
            h += 1
            w = lrint(h * ar)
        if w * h > max_area:
            h -= 1
            w = lrint(h * ar)
        if w * h < min_area or w * h > max_area or w > width or h > height or w <= 0 or h <= 0:
            continue
        top = rng.randrange(height - h) if h < height else 0
        left = rng.randrange(width - w) if w < width else 0
        if w * h / (width * height) >= cover:
            return top, left, h, w
    return 0, 0, height, width


def test_reference_crop_matches_scalar_tf_port_in_distribution():
    import random

    n, height, width = 4000, 48, 64
    rng = random.Random(0)
    ref = np.array([_tf_sample_distorted_bounding_box(height, width, rng) for _ in range(n)], dtype=float)
    ours = sample_crop_boxes(torch.tensor([[height, width]]).expand(n, 2), gen(5)).double().numpy()
    for col in range(4):  # top, left, height, width
        assert abs(ref[:, col].mean() - ours[:, col].mean()) < 0.06 * ref[:, col].mean() + 0.5
    ref_area = ref[:, 2] * ref[:, 3] / (height * width)
    our_area = ours[:, 2] * ours[:, 3] / (height * width)
    qs = [0.1, 0.25, 0.5, 0.75, 0.9]
    assert np.allclose(np.quantile(ref_area, qs), np.quantile(our_area, qs), atol=0.03)


def test_reference_crop_aspect_uniform_linear():
    n = 4000
    sizes = torch.tensor([[200, 200]]).expand(n, 2)
    boxes = sample_crop_boxes(sizes, gen(2), area_range=(0.2, 0.2), min_object_covered=0.0)
    ratio = boxes[:, 3].double() / boxes[:, 2].double()
    # linear-uniform aspect: mean ~ (3/4 + 4/3) / 2 = 1.042 (log-uniform would give 1.0)
    assert abs(ratio.mean().item() - (0.75 + 4 / 3) / 2) < 0.02


def test_reference_crop_fallback_whole_image():
    sizes = torch.tensor([[10, 10], [7, 9]])
    boxes = sample_crop_boxes(sizes, gen(0), area_range=(0.99, 1.0), aspect_range=(3.0, 4.0))
    assert boxes.tolist() == [[0, 0, 10, 10], [0, 0, 7, 9]]


def test_torchvision_crop_ranges_and_fallback():
    n = 4000
    sizes = torch.tensor([[60, 40]]).expand(n, 2)
    boxes = sample_crop_boxes(sizes, gen(3), method="torchvision", max_attempts=10)
    top, left, h, w = boxes.double().unbind(1)
    assert (top + h <= 60).all() and (left + w <= 40).all() and (top >= 0).all()
    area = h * w / 2400
    assert area.min() >= 0.07 and area.max() <= 1.0
    # w and h are rounded separately: the ratio is in range up to half a pixel each
    assert ((w + 0.5) / (h - 0.5) >= 0.75).all() and ((w - 0.5) / (h + 0.5) <= 4 / 3).all()
    assert ((w / h) < 0.8).any() and ((w / h) > 1.25).any()
    # no candidate fits -> centre crop clamped to the ratio range (torchvision fallback):
    # in_ratio = 40/60 < 2 so w = 40, h = round(40 / 2) = 20, top = (60 - 20) // 2
    fb = sample_crop_boxes(
        torch.tensor([[60, 40]]), gen(0), area_range=(0.9, 1.0), aspect_range=(2.0, 3.0), method="torchvision"
    )
    assert fb.tolist() == [[20, 0, 20, 40]]


def test_crop_boxes_respect_per_image_sizes():
    sizes = torch.tensor([[20, 30], [64, 64], [33, 17], [5, 40]]).repeat(500, 1)
    for method in ("reference", "torchvision"):
        boxes = sample_crop_boxes(sizes, gen(4), method=method)
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 0] + boxes[:, 2] <= sizes[:, 0]).all()
        assert (boxes[:, 1] + boxes[:, 3] <= sizes[:, 1]).all()
        assert (boxes[:, 2] > 0).all() and (boxes[:, 3] > 0).all()


def test_center_crop_boxes_spec_formula_odd_sizes():
    sizes = torch.tensor([[37, 51], [51, 37], [44, 44], [36, 100]])
    boxes = center_crop_boxes(sizes)
    expected = []
    for h, w in sizes.tolist():
        side = int(np.rint(0.875 * min(h, w)))  # rint: half to even (38.5 -> 38, 31.5 -> 32)
        expected.append([((h - side) + 1) // 2, ((w - side) + 1) // 2, side, side])
    assert boxes.tolist() == expected
    assert boxes[0].tolist() == [3, 10, 32, 32]
    assert boxes[2].tolist() == [3, 3, 38, 38]


# --------------------------------------------------------------------------- resize


def _tf2_bicubic_1d(n_in: int, n_out: int) -> np.ndarray:
    """Dense [n_out, n_in] matrix of TF2 resize_bicubic(half_pixel_centers=True)."""
    a = -0.5

    def k(x):
        x = abs(x)
        if x <= 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        if x < 2:
            return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
        return 0.0

    m = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for i in range(n_out):
        loc = (i + 0.5) * scale - 0.5
        base = math.floor(loc)
        delta = round((loc - base) * 1024) / 1024
        ws = {}
        for off in (-1, 0, 1, 2):
            j = base + off
            if 0 <= j < n_in:
                ws[j] = ws.get(j, 0.0) + k(delta - off)
        total = sum(ws.values())
        for j, wgt in ws.items():
            m[i, j] = wgt / total
    return m


def test_bicubic_matches_tf2_reference_on_crop():
    img = rand_images(1, 11, 13, seed=5)
    box = torch.tensor([[2, 3, 7, 9]])  # top, left, h, w
    crop = img[0, :, 2:9, 3:12].double().numpy() / 255
    for out_size in (5, 12):
        ref = np.einsum("ij,cjk,lk->cil", _tf2_bicubic_1d(7, out_size), crop, _tf2_bicubic_1d(9, out_size))
        got = crop_and_resize(img, box, out_size).double().numpy()[0]
        np.testing.assert_allclose(got, np.clip(ref, 0, 1), atol=2e-6)


def test_bilinear_matches_interpolate_and_identity():
    img = rand_images(3, 20, 24, seed=6)
    x = img.float() / 255
    whole = torch.tensor([[0, 0, 20, 24]]).expand(3, 4)
    got = crop_and_resize(img, whole, 16, mode="bilinear")
    want = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(got, want, atol=1e-6)
    # a same-size box is the identity for every kernel
    box = torch.tensor([[2, 5, 16, 16]]).expand(3, 4)
    for mode in ("bicubic", "bicubic_legacy", "bilinear"):
        out = crop_and_resize(img, box, 16, mode=mode)
        assert torch.allclose(out, x[:, :, 2:18, 5:21], atol=1e-6), mode


def test_resample_taps_weights_and_bounds():
    start = torch.tensor([0, 3, 10])
    length = torch.tensor([5, 40, 1])
    for mode in ("bicubic", "bicubic_legacy", "bilinear"):
        idx, w = resample_taps(start, length, 17, mode)
        assert torch.allclose(w.sum(-1), torch.ones(3, 17), atol=1e-6)
        assert (idx >= start[:, None, None]).all() and (idx < (start + length)[:, None, None]).all()


def test_crop_stays_inside_box_letterbox():
    """Taps never leave the crop: the zero letterbox of a canvas never leaks in."""
    img = torch.zeros(8, 3, 40, 40, dtype=torch.uint8)
    sizes = torch.tensor([[30, 20], [40, 40], [12, 33], [25, 25]] * 2)
    for i, (h, w) in enumerate(sizes.tolist()):
        img[i, :, :h, :w] = 200
    cfg = AugmentConfig(24, color=False, use_blur=False)
    out = SimCLRAugmentation(cfg).two_views(img, gen(7), sizes)
    assert torch.allclose(out, torch.full_like(out, 200 / 255), atol=1e-6)


def test_fused_flip_and_grid_sample_backend():
    img = rand_images(4, 30, 30, seed=8)
    boxes = sample_crop_boxes(torch.tensor([[30, 30]]).expand(4, 2), gen(8))
    flip = torch.tensor([True, False, True, False])
    a = crop_and_resize(img, boxes, 16, flip=flip)
    b = crop_and_resize(img, boxes, 16)
    assert torch.equal(a[0], b[0].flip(-1)) and torch.equal(a[1], b[1])
    g1 = crop_and_resize(img, boxes, 16, mode="bilinear", backend="grid_sample")
    s1 = crop_and_resize(img, boxes, 16, mode="bilinear")
    assert torch.allclose(g1[..., 1:-1, 1:-1], s1[..., 1:-1, 1:-1], atol=1e-5)  # differ only at crop edges
    g2 = crop_and_resize(img, boxes, 16, mode="bilinear", flip=flip, backend="grid_sample")
    assert torch.allclose(g2[0], g1[0].flip(-1), atol=1e-6)


def test_grid_sample_backend_equals_affine_grid():
    img = rand_images(3, 21, 27, seed=9)
    boxes = torch.tensor([[0, 0, 21, 27], [3, 4, 10, 12], [10, 2, 11, 20]])
    top, left, h, w = boxes.float().unbind(1)
    theta = torch.zeros(3, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w / 27, (2 * left + w) / 27 - 1
    theta[:, 1, 1], theta[:, 1, 2] = h / 21, (2 * top + h) / 21 - 1
    grid = F.affine_grid(theta, (3, 3, 16, 16), align_corners=False)
    want = F.grid_sample(img.float() / 255, grid, mode="bicubic", padding_mode="border", align_corners=False)
    got = crop_and_resize(img, boxes, 16, backend="grid_sample")
    assert torch.allclose(got, want.clamp(0, 1), atol=1e-5)


# --------------------------------------------------------------------------- colour


def test_rgb_hsv_roundtrip_and_colorsys():
    x = torch.rand(2, 3, 9, 9, generator=gen(9))
    x[0, :, 0, 0] = 0.5  # grey
    x[0, :, 0, 1] = 0.0  # black
    x[0, :, 0, 2] = torch.tensor([1.0, 0.0, 0.0])
    hsv = rgb_to_hsv(x)
    ref = np.array([colorsys.rgb_to_hsv(*p) for p in x.permute(0, 2, 3, 1).reshape(-1, 3).tolist()])
    got = hsv.permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert torch.allclose(hsv_to_rgb(hsv), x, atol=2e-6)


def test_hue_shift_identity_and_full_circle():
    x = torch.rand(3, 3, 8, 8, generator=gen(10))
    assert torch.allclose(adjust_hue(x, 0.0), x, atol=2e-6)
    assert torch.allclose(adjust_hue(x, 1.0), x, atol=2e-6)
    assert torch.allclose(adjust_hue(x, -1.0), x, atol=2e-6)
    half = adjust_hue(adjust_hue(x, 0.3), -0.3)
    assert torch.allclose(half, x, atol=2e-6)


def test_saturation_and_hue_match_colorsys():
    x = torch.rand(2, 3, 6, 6, generator=gen(11))
    factor, delta = torch.tensor([0.3, 1.7]), torch.tensor([0.12, -0.2])
    sat, hue = adjust_saturation(x, factor), adjust_hue(x, delta)
    for b in range(2):
        for i in range(6):
            for j in range(6):
                h, s, v = colorsys.rgb_to_hsv(*x[b, :, i, j].tolist())
                want_s = colorsys.hsv_to_rgb(h, min(1.0, s * factor[b].item()), v)
                want_h = colorsys.hsv_to_rgb((h + delta[b].item()) % 1.0, s, v)
                assert np.allclose(sat[b, :, i, j].tolist(), want_s, atol=2e-6)
                assert np.allclose(hue[b, :, i, j].tolist(), want_h, atol=2e-6)


def test_contrast_uses_per_channel_mean_and_brightness():
    x = torch.rand(2, 3, 5, 7, generator=gen(12))
    f = torch.tensor([0.5, 1.6])
    mean = x.mean(dim=(2, 3), keepdim=True)  # per channel, not the grey mean
    want = ((x - mean) * f.view(2, 1, 1, 1) + mean).clamp(0, 1)
    assert torch.allclose(adjust_contrast(x, f), want, atol=1e-6)
    assert torch.allclose(adjust_brightness(x, f), (x * f.view(2, 1, 1, 1)).clamp(0, 1), atol=1e-7)
    d = torch.tensor([-0.2, 0.3])
    assert torch.allclose(adjust_brightness(x, d, impl="simclrv1"), (x + d.view(2, 1, 1, 1)).clamp(0, 1))


def test_grayscale_weights_equal_channels():
    x = torch.rand(2, 3, 4, 4, generator=gen(13))
    g = to_grayscale(x)
    want = 0.2989 * x[:, 0] + 0.5870 * x[:, 1] + 0.1140 * x[:, 2]
    assert torch.allclose(g[:, 0], want, atol=1e-6)
    assert torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 1], g[:, 2])


def test_schedule_embeds_every_permutation_in_order():
    table = schedule_table()
    assert table.shape == (24, len(STAGES))
    for perm, row in zip(PERMUTATIONS, table.tolist()):
        ops = []  # ops as they run through the stages
        for kind, code in zip(STAGES, row):
            if kind == "A" and code:
                ops.append(code - 1)
            elif kind == "V":
                ops += [op for op, bit in ((2, 1), (3, 2)) if code & bit]
        # every op exactly once; B/C keep their order, S/H merged into one stage commute
        assert sorted(ops) == [0, 1, 2, 3]
        pos = {op: i for i, op in enumerate(perm)}
        for i, a in enumerate(ops):
            for b in ops[i + 1 :]:
                if not ({a, b} == {2, 3}):
                    assert pos[a] < pos[b], (perm, row)


@pytest.mark.parametrize("impl", ["simclrv2", "simclrv1"])
def test_random_order_equals_sequential_ops(impl, strategy):
    """Each of the 24 orders, batched, equals applying the 4 ops one by one (clip after each)."""
    n = len(PERMUTATIONS)
    x = torch.rand(n, 3, 6, 6, generator=gen(14))
    g = gen(15)
    params = sample_color_params(n, 1.0, g, p_jitter=1.0, p_gray=0.0, impl=impl)
    perm = torch.arange(n)
    params = ColorParams(
        stages=schedule_table()[perm], brightness=params.brightness, contrast=params.contrast,
        saturation=params.saturation, hue=params.hue, jitter=params.jitter,
        grayscale=params.grayscale, permutation=perm, brightness_impl=impl,
    )
    got = apply_color_params(x, params)
    for i, order in enumerate(PERMUTATIONS):
        y = x[i : i + 1]
        for op in order:
            if op == 0:
                y = adjust_brightness(y, params.brightness[i : i + 1], impl=impl)
            elif op == 1:
                y = adjust_contrast(y, params.contrast[i : i + 1])
            elif op == 2:
                y = adjust_saturation(y, params.saturation[i : i + 1])
            else:
                y = adjust_hue(y, params.hue[i : i + 1])
            y = y.clamp(0, 1)
        assert torch.allclose(got[i : i + 1], y, atol=1e-5), order


def test_color_param_ranges_and_rates():
    n = 4000
    for s in (1.0, 0.5):
        p = sample_color_params(n, s, gen(16))
        assert p.brightness.min() >= max(0.0, 1 - 0.8 * s) and p.brightness.max() <= 1 + 0.8 * s
        assert p.contrast.min() >= 1 - 0.8 * s and p.contrast.max() <= 1 + 0.8 * s
        assert p.saturation.min() >= 1 - 0.8 * s and p.saturation.max() <= 1 + 0.8 * s
        assert p.hue.abs().max() <= 0.2 * s
        assert p.brightness.min() < 1 - 0.7 * s and p.brightness.max() > 1 + 0.7 * s
        assert abs(p.jitter.float().mean().item() - 0.8) < 0.03
        assert abs(p.grayscale.float().mean().item() - 0.2) < 0.03
        counts = torch.bincount(p.permutation, minlength=24).float()
        assert counts.min() > 0.5 * n / 24 and counts.max() < 1.5 * n / 24
        assert (p.stages[~p.jitter] == 0).all() and (p.stages[p.jitter].sum(1) > 0).all()


def test_jitter_and_gray_rates_from_pixels(strategy):
    n = 600
    x = torch.rand(n, 3, 6, 6, generator=gen(17))  # coloured: never grey by chance
    jittered = random_color_distortion(x, 1.0, gen(18), p_gray=0.0)
    assert abs(changed_rows(jittered, x).float().mean().item() - 0.8) < 0.06
    out = random_color_distortion(x, 1.0, gen(19))
    grey = (out[:, 0] == out[:, 1]).flatten(1).all(1) & (out[:, 1] == out[:, 2]).flatten(1).all(1)
    assert abs(grey.float().mean().item() - 0.2) < 0.06
    assert out.min() >= 0 and out.max() <= 1
    full = color_jitter(x, 1.0, gen(20))
    assert changed_rows(full, x).all()


# --------------------------------------------------------------------------- blur and flip


def test_blur_kernel_size_and_normalisation():
    assert 2 * blur_radius(224) + 1 == 23
    assert 2 * blur_radius(32) + 1 == 3
    assert 2 * blur_radius(64) + 1 == 7
    k = gaussian_kernel1d(torch.tensor([0.1, 1.0, 2.0]), blur_radius(224))
    assert k.shape == (3, 23)
    assert torch.allclose(k.sum(1), torch.ones(3))
    assert torch.allclose(k, k.flip(1))


def test_blur_zero_padding_darkens_borders():
    x = torch.ones(2, 3, 40, 40)
    zeros = gaussian_blur(x, torch.tensor([1.5, 2.0]), blur_radius(40))
    assert (zeros[:, :, 0, :] < 0.9).all() and (zeros[:, :, :, -1] < 0.9).all()
    assert torch.allclose(zeros[:, :, 20, 20], torch.ones(2, 3))
    reflect = gaussian_blur(x, 1.5, blur_radius(40), padding="reflect")
    assert torch.allclose(reflect, x)
    noise = torch.rand(3, 3, 24, 20, generator=gen(21))
    for padding in ("zeros", "reflect"):
        a = gaussian_blur(noise, torch.tensor([0.5, 1.0, 2.0]), 4, padding, method="conv")
        b = gaussian_blur(noise, torch.tensor([0.5, 1.0, 2.0]), 4, padding, method="shift")
        assert torch.allclose(a, b, atol=1e-6)


def test_blur_rate_and_sigma_modes(strategy):
    x = torch.rand(800, 3, 20, 20, generator=gen(22))  # radius int((20 // 10) / 2) = 1
    out = random_gaussian_blur(x, gen(23))
    assert abs(changed_rows(out, x).float().mean().item() - 0.5) < 0.06
    assert out.min() >= 0 and out.max() <= 1
    per_view = sample_blur_params(6, gen(24), per_image_sigma=False, sigma_groups=2)
    assert per_view.sigma[:3].unique().numel() == 1 and per_view.sigma[3:].unique().numel() == 1
    assert per_view.sigma[0] != per_view.sigma[3]
    per_image = sample_blur_params(1000, gen(25))
    assert per_image.sigma.min() >= 0.1 and per_image.sigma.max() <= 2.0
    assert per_image.sigma.unique().numel() > 900


def test_flip_rate():
    x = torch.arange(8.0).view(1, 1, 1, 8).expand(2000, 3, 2, 8)
    out = random_horizontal_flip(x, gen(26))
    flipped = out[:, 0, 0, 0] == 7
    assert abs(flipped.float().mean().item() - 0.5) < 0.04
    assert torch.equal(out[flipped], x[flipped].flip(-1))


# --------------------------------------------------------------------------- pipeline


def test_presets():
    cifar = AugmentConfig.for_pretraining(32)
    assert cifar.color_jitter_strength == 0.5 and not cifar.use_blur
    imagenet = AugmentConfig.for_pretraining(224)
    assert imagenet.color_jitter_strength == 1.0 and imagenet.use_blur
    custom = AugmentConfig.for_pretraining(32, color_jitter_strength=1.0, use_blur=True)
    assert custom.color_jitter_strength == 1.0 and custom.use_blur
    ft = AugmentConfig.for_finetuning(224)
    assert not ft.color and not ft.use_blur and ft.flip
    with pytest.raises(ValueError):
        AugmentConfig(32, crop_method="nope")


def test_pipeline_shape_range_and_reproducibility():
    img = rand_images(6, 40, 48, seed=27)
    aug = SimCLRAugmentation(AugmentConfig.for_pretraining(64))
    a = aug(img, gen(1))
    assert a.shape == (6, 3, 64, 64) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, aug(img, gen(1)))
    assert not torch.equal(a, aug(img, gen(2)))
    pair = aug.two_views(img, gen(3))
    assert pair.shape == (12, 3, 64, 64)
    assert changed_rows(pair[:6], pair[6:]).all()  # two views of one image differ
    cl = aug.two_views(img, gen(3), out_memory_format=torch.channels_last)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, pair)
    buf = torch.empty(12, 3, 64, 64)
    assert aug.two_views(img, gen(3), out=buf) is buf and torch.equal(buf, pair)


def test_two_views_layout():
    colours = torch.randint(0, 256, (5, 3, 1, 1), generator=gen(28), dtype=torch.uint8)
    img = colours.expand(5, 3, 20, 20).contiguous()
    aug = SimCLRAugmentation(AugmentConfig(16, color=False, use_blur=False))
    out = aug.two_views(img, gen(29))
    want = (colours.float() / 255).expand(5, 3, 16, 16)
    assert torch.allclose(out[:5], want, atol=1e-6) and torch.allclose(out[5:], want, atol=1e-6)


def test_chunking_and_strategies_do_not_change_values(monkeypatch):
    img = rand_images(7, 36, 36, seed=30)
    sizes = torch.tensor([[36, 36], [30, 20], [36, 36], [20, 36], [36, 36], [25, 25], [36, 30]])
    base = AugmentConfig.for_pretraining(48, blur_per_image_sigma=False)
    ref = SimCLRAugmentation(base).two_views(img, gen(31), sizes)
    for chunk in (1, 3, 100):
        cfg = AugmentConfig.for_pretraining(48, blur_per_image_sigma=False, chunk_size=chunk)
        out = SimCLRAugmentation(cfg).two_views(img, gen(31), sizes)
        assert torch.allclose(out, ref, atol=1e-6), chunk
    monkeypatch.setattr(_rows, "FORCE_STRATEGY", "where")
    out = SimCLRAugmentation(base).two_views(img, gen(31), sizes)
    assert torch.allclose(out, ref, atol=1e-5)


def test_pipeline_rates_flip_gray():
    """Flip and grey rates measured on outputs of the full pipeline."""
    n = 512
    img = smooth_images(n, 16, 16, seed=32)
    # flip: crop = whole image (area 1) so a flip is detectable against the plain resize
    cfg = AugmentConfig(16, color=False, use_blur=False, area_range=(1.0, 1.0), min_object_covered=1.0)
    out = SimCLRAugmentation(cfg)(img, gen(33))
    plain = img.float() / 255
    flipped = (out - plain.flip(-1)).flatten(1).abs().amax(1) < 1e-5
    same = (out - plain).flatten(1).abs().amax(1) < 1e-5
    assert (flipped | same).all()
    assert abs(flipped.float().mean().item() - 0.5) < 0.07
    full = SimCLRAugmentation(AugmentConfig.for_pretraining(16))(img, gen(34))
    grey = (full[:, 0] == full[:, 1]).flatten(1).all(1) & (full[:, 1] == full[:, 2]).flatten(1).all(1)
    assert abs(grey.float().mean().item() - 0.2) < 0.06


def test_pipeline_equals_composition_of_public_ops():
    img = rand_images(5, 30, 26, seed=35)
    aug = SimCLRAugmentation(AugmentConfig.for_pretraining(24, use_blur=True, chunk_size=2))
    params = aug.sample_params(torch.tensor([[30, 26]]).expand(5, 2), gen(36))
    assert torch.equal(aug.render(img, params), aug.render(img, params))
    x = crop_and_resize(img, params.boxes, 24, flip=params.flip)
    x = apply_color_params(x, params.color)
    x = apply_blur_params(x, params.blur, blur_radius(24))
    assert torch.allclose(aug.render(img, params), x, atol=1e-6)
    assert torch.allclose(aug(img, gen(36)), x, atol=1e-6)  # sampled in the same order
    # float input in [0, 1] is accepted as is
    assert torch.allclose(aug(img.float() / 255, gen(36)), x, atol=1e-5)


def test_generator_device_mismatch_is_an_error():
    if not hasattr(torch, "cuda") or not torch.cuda.is_available():
        pytest.skip("needs a second device")
    aug = SimCLRAugmentation(AugmentConfig(16))
    with pytest.raises(ValueError):
        aug(rand_images(2, 16, 16).cuda(), gen(0))


def test_eval_transform():
    img = rand_images(3, 37, 51, seed=37)
    ev = EvalTransform(64)
    out = ev(img)
    assert out.shape == (3, 3, 64, 64) and out.min() >= 0 and out.max() <= 1
    boxes = center_crop_boxes(torch.tensor([[37, 51]]).expand(3, 2))
    assert torch.allclose(out, crop_and_resize(img, boxes, 64), atol=1e-6)
    # letterboxed canvas: crop computed from the valid size only
    canvas = torch.zeros(1, 3, 60, 60, dtype=torch.uint8)
    canvas[0, :, :37, :51] = img[0]
    sized = ev(canvas, torch.tensor([[37, 51]]))
    assert torch.allclose(sized, out[:1], atol=1e-6)
    # CIFAR: the raw image in [0, 1]; resized only when the size differs
    small = rand_images(2, 32, 32, seed=38)
    raw = EvalTransform(32)(small)
    assert torch.allclose(raw, small.float() / 255)
    assert EvalTransform(32)(rand_images(2, 40, 40)).shape == (2, 3, 32, 32)
    cl = EvalTransform(32)(small, out_memory_format=torch.channels_last)
    assert cl.is_contiguous(memory_format=torch.channels_last)
