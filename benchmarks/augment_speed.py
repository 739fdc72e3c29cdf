"""Throughput of the batched SimCLR augmentation vs torchvision's per-image PIL pipeline.

Both run on one CPU thread (``torch.set_num_threads(1)``) and produce float tensors in
[0, 1] from 8-bit RGB images of the same canvas size:

* ours: ``SimCLRAugmentation`` on a uint8 batch (one view per image), with a fresh output
  tensor per call and, separately, writing into a reused ``out=`` buffer;
* torchvision (transforms v1): RandomResizedCrop(bicubic) -> RandomHorizontalFlip ->
  RandomApply(ColorJitter(0.8s, 0.8s, 0.8s, 0.2s), p=0.8) -> RandomGrayscale(0.2) ->
  [RandomApply(GaussianBlur(k, (0.1, 2.0)), p=0.5)] -> ToTensor, per PIL image (no collate).

Usage::

    python benchmarks/augment_speed.py            # 32 px (CIFAR preset) and 224 px with blur
    python benchmarks/augment_speed.py --seconds 5 --batch-224 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

from simclrv2.augment import AugmentConfig, SimCLRAugmentation


def _rate(fn, items_per_call: int, seconds: float, repeats: int) -> float:
    """Median images/s over ``repeats`` timed windows of about ``seconds`` each."""
    fn()  # warm-up
    rates = []
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds / repeats:
                break
        rates.append(calls * items_per_call / elapsed)
    return statistics.median(rates)


def torchvision_pipeline(size: int, strength: float, blur: bool) -> T.Compose:
    """The torchvision v1 per-image equivalent of one SimCLR view."""
    s = strength
    ops = [
        T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    if blur:
        kernel = (size // 10) // 2 * 2 + 1  # 23 at 224 px, as the reference
        ops.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
    ops.append(T.ToTensor())
    return T.Compose(ops)


def run_case(size: int, canvas: int, batch: int, blur: bool, seconds: float, repeats: int) -> None:
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, size=(batch, canvas, canvas, 3), dtype=np.uint8)
    images = torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()
    pil_images = [Image.fromarray(a) for a in arrays]

    config = AugmentConfig.for_pretraining(size, use_blur=blur)
    aug = SimCLRAugmentation(config)
    generator = torch.Generator().manual_seed(0)
    out = torch.empty(batch, 3, size, size)

    ours = _rate(lambda: aug(images, generator), batch, seconds, repeats)
    ours_out = _rate(lambda: aug(images, generator, out=out), batch, seconds, repeats)
    tv = torchvision_pipeline(size, config.color_jitter_strength, blur)
    torch.manual_seed(0)
    theirs = _rate(lambda: [tv(im) for im in pil_images], batch, seconds, repeats)

    label = f"{size:>3d} px (canvas {canvas}, s={config.color_jitter_strength}, blur={'on' if blur else 'off'})"
    print(
        f"{label:<42s} ours {ours:8.0f} img/s | ours out= {ours_out:8.0f} img/s | "
        f"torchvision {theirs:7.0f} img/s | speed-up {ours / theirs:4.1f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="timing budget per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows per measurement (median)")
    parser.add_argument("--batch-32", type=int, default=256)
    parser.add_argument("--batch-224", type=int, default=64)
    parser.add_argument("--canvas-224", type=int, default=256, help="source image side for the 224 px case")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), images/s (median of {args.repeats})")
    run_case(32, 32, args.batch_32, blur=False, seconds=args.seconds, repeats=args.repeats)
    run_case(224, args.canvas_224, args.batch_224, blur=True, seconds=args.seconds, repeats=args.repeats)


if __name__ == "__main__":
    main()
