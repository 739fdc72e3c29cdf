"""The training image size a data set implies when ``--image-size`` is not given.

Named data sets have their native size (digits/CIFAR 32, STL-10 96). For image folders the size is
judged from a *sample* of images spread evenly over the sorted file list (up to
:data:`SAMPLE_SIZE`), not from one file: the median longest side decides. A median of at most
32 px (CIFAR-like images saved as files) trains at that size with the CIFAR stem and augmentation
preset (SPEC §1.2, §6); anything larger trains at 224, the ImageNet recipe. A folder whose images
are mostly above 32 px therefore never selects the CIFAR stem because a few files are small, and a
note is printed when the sampled sizes differ by more than a factor of two.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

__all__ = ["NATIVE_IMAGE_SIZE", "SAMPLE_SIZE", "SizeEstimate", "native_image_size"]

NATIVE_IMAGE_SIZE = {"digits": 32, "cifar10": 32, "cifar100": 32, "stl10": 96}
SAMPLE_SIZE = 64
CIFAR_MAX_SIDE = 32
FOLDER_DEFAULT_SIZE = 224


@dataclass(frozen=True)
class SizeEstimate:
    """``size`` to train at; ``median``/``smallest``/``largest`` longest sides of ``sampled`` images;
    ``note``: a sentence for the plan line when the sizes are mixed (else empty)."""

    size: int
    sampled: int = 0
    median: int = 0
    smallest: int = 0
    largest: int = 0
    note: str = ""

    def describe(self) -> str:
        if not self.sampled:
            return f"{self.size} px"
        return (f"{self.size} px (median longest side {self.median} px over {self.sampled} sampled images"
                f"{', ' + self.note if self.note else ''})")


def _sample_files(data: str | None, unlabeled: tuple[str, ...], labels: str | None) -> list[Path]:
    from .folders import EVAL_SPLITS, list_images

    files: list[Path] = []
    if data is not None:
        root = Path(data).expanduser()
        for part in ("train", *EVAL_SPLITS):
            if (root / part).is_dir():
                files.extend(list_images(root / part))
                break
    for folder in unlabeled:
        files.extend(list_images(Path(folder).expanduser()))
    if labels is not None:
        from .labels_csv import read_labels_csv
        files.extend(path for path, _ in read_labels_csv(labels)[0])
    if len(files) <= SAMPLE_SIZE:
        return files
    step = len(files) / SAMPLE_SIZE
    return [files[int(i * step)] for i in range(SAMPLE_SIZE)]


@functools.lru_cache(maxsize=32)
def _estimate(data: str | None, unlabeled: tuple[str, ...], labels: str | None) -> SizeEstimate:
    sides = []
    for file in _sample_files(data, unlabeled, labels):
        try:
            with Image.open(file) as img:
                sides.append(max(img.size))
        except Exception:  # noqa: BLE001 - unreadable files are reported by the data scan, not here
            continue
    if not sides:
        return SizeEstimate(FOLDER_DEFAULT_SIZE)
    sides.sort()
    median = sides[len(sides) // 2]
    size = median if median <= CIFAR_MAX_SIDE else FOLDER_DEFAULT_SIZE
    note = ""
    if sides[-1] > 2 * sides[0]:
        note = (f"mixed sizes: longest sides {sides[0]} to {sides[-1]} px (median {median}) in a sample of "
                f"{len(sides)}; every image is resized to the training size (--image-size chooses it)")
    return SizeEstimate(size, len(sides), median, sides[0], sides[-1], note)


def native_image_size(data: str | None, *, unlabeled: list[str] | tuple[str, ...] | None = None,
                      labels: str | None = None) -> SizeEstimate:
    """The size to train ``data`` (a data-set name or folder) plus unlabelled folders / a labels CSV at."""
    if data is not None and data.lower() in NATIVE_IMAGE_SIZE:
        return SizeEstimate(NATIVE_IMAGE_SIZE[data.lower()])
    return _estimate(data, tuple(unlabeled or ()), labels)
