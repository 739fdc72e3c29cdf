"""Throughput of the batched SimCLR augmentation vs torchvision's per-image PIL pipeline.

Both run on one CPU thread (``torch.set_num_threads(1)``) and produce float tensors in
[0, 1] from 8-bit RGB images of the same canvas size; the three variants are timed in
interleaved windows (median of ``--repeats``) so background load hits them alike:

* ours: ``SimCLRAugmentation`` on a uint8 batch (one view per image), with a fresh output
  tensor per call and, separately, writing into a reused ``out=`` buffer;
* torchvision (transforms v1): RandomResizedCrop(bicubic) -> RandomHorizontalFlip ->
  RandomApply(ColorJitter(0.8s, 0.8s, 0.8s, 0.2s), p=0.8) -> RandomGrayscale(0.2) ->
  [RandomApply(GaussianBlur(k, (0.1, 2.0)), p=0.5)] -> ToTensor, per PIL image (no collate).

Usage::

    python benchmarks/augment_speed.py            # 32 px (CIFAR preset) and 224 px with blur
    python benchmarks/augment_speed.py --seconds 5 --batch-224 64

``measure_case`` / ``format_case`` are imported by ``benchmarks/throughput.py``.
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
    return _rates({"fn": fn}, items_per_call, seconds, repeats)["fn"]


def _rates(fns: dict, items_per_call: int, seconds: float, repeats: int) -> dict[str, float]:
    """Median images/s of each callable over ``repeats`` rounds; every round times one window of
    about ``seconds / repeats`` per callable, in turn, so that on a shared machine all of them see
    the same background load (interleaved rather than one after the other)."""
    for fn in fns.values():
        fn()  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            calls, start = 0, time.perf_counter()
            while True:
                fn()
                calls += 1
                elapsed = time.perf_counter() - start
                if elapsed >= seconds / repeats:
                    break
            rates[name].append(calls * items_per_call / elapsed)
    return {name: statistics.median(values) for name, values in rates.items()}


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


def measure_case(size: int, canvas: int, batch: int, blur: bool, seconds: float, repeats: int) -> dict:
    """Images/s of ours (fresh output, ``out=`` buffer) and of torchvision for one setting, on
    the current thread count (the CLI sets one thread).  Returns a JSON-ready dict."""
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, size=(batch, canvas, canvas, 3), dtype=np.uint8)
    images = torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()
    pil_images = [Image.fromarray(a) for a in arrays]

    config = AugmentConfig.for_pretraining(size, use_blur=blur)
    aug = SimCLRAugmentation(config)
    generator = torch.Generator().manual_seed(0)
    out = torch.empty(batch, 3, size, size)
    tv = torchvision_pipeline(size, config.color_jitter_strength, blur)
    torch.manual_seed(0)

    rates = _rates(
        {
            "ours": lambda: aug(images, generator),
            "ours_out": lambda: aug(images, generator, out=out),
            "torchvision": lambda: [tv(im) for im in pil_images],
        },
        batch,
        seconds,
        repeats,
    )
    return {
        "size": size,
        "canvas": canvas,
        "batch": batch,
        "blur": blur,
        "color_jitter_strength": config.color_jitter_strength,
        "threads": torch.get_num_threads(),
        "ours_images_per_s": rates["ours"],
        "ours_out_images_per_s": rates["ours_out"],
        "torchvision_images_per_s": rates["torchvision"],
        "speedup": rates["ours"] / rates["torchvision"],
    }


def format_case(result: dict) -> str:
    label = (f"{result['size']:>3d} px (canvas {result['canvas']}, s={result['color_jitter_strength']}, "
             f"blur={'on' if result['blur'] else 'off'})")
    return (
        f"{label:<42s} ours {result['ours_images_per_s']:8.0f} img/s | "
        f"ours out= {result['ours_out_images_per_s']:8.0f} img/s | "
        f"torchvision {result['torchvision_images_per_s']:7.0f} img/s | speed-up {result['speedup']:4.1f}x"
    )


def run_case(size: int, canvas: int, batch: int, blur: bool, seconds: float, repeats: int) -> dict:
    result = measure_case(size, canvas, batch, blur, seconds, repeats)
    print(format_case(result))
    return result


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
