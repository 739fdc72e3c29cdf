"""Check the files of an image folder before training and report what was found.

Why: folders in the wild hold zero-byte files, truncated downloads, HTML error pages saved as
``.jpg``, CMYK JPEGs, 16-bit PNGs and images smaller than the training crop. A run that meets one
of them hours in must neither crash nor silently train on something else, so every split is
scanned when it is loaded and the counts per kind are printed before training starts:

* **unreadable** files (``zero_byte``, ``not_an_image``, ``truncated``, ``corrupt``) are left out
  with a warning naming them, or stop the run before training with ``--strict``;
* files that decode but are **converted** (``16bit``, ``palette``, ``cmyk``, ``alpha``) or
  **upscaled** (``small``: a side shorter than the crop) are only counted;
* non-image files (unknown extension) and empty class folders are listed.

The scan reads only each file's header (cheap even for ImageNet). Folders decoded into memory are
then decoded completely, and the images that fail there (typically truncated ones) are added to
the same report. Folders read from disk during training are protected differently: an image that
cannot be decoded later (e.g. a file changed or a network disk failed) is replaced by another image
with a warning, see :class:`~simclrv2.data.sources.FolderImageSource`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

__all__ = ["KINDS", "UNREADABLE_KINDS", "ScanReport", "inspect_image", "check_samples", "error_kind"]

KINDS = {
    "zero_byte": "zero-byte file",
    "not_an_image": "not an image",
    "truncated": "truncated image",
    "corrupt": "corrupt image",
    "empty_class": "empty class folder",
    "non_image_file": "non-image file ignored",
    "small": "smaller than the crop (upscaled)",
    "16bit": "16-bit (scaled to 8 bits)",
    "palette": "palette (converted to RGB)",
    "cmyk": "CMYK (converted to RGB)",
    "alpha": "transparency (composited on white)",
}
"""Every kind a scan counts, in report order, with its description."""

UNREADABLE_KINDS = ("zero_byte", "not_an_image", "truncated", "corrupt")
"""Kinds whose files cannot be used and are skipped (or stop the run with ``--strict``)."""

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_PARALLEL_FROM = 64


def error_kind(message: str) -> str:
    """``truncated`` or ``corrupt`` from a decoder's error message."""
    return "truncated" if "truncat" in message.lower() else "corrupt"


@dataclass
class ScanReport:
    """What a scan of one split found: ``found[kind]`` lists the files (or folders) of each kind."""

    where: str
    num_files: int = 0
    found: dict[str, list[str]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # unreadable file -> decoder message

    def add(self, kind: str, item: str, error: str | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown scan kind {kind!r}")
        items = self.found.setdefault(kind, [])
        if item not in items:
            items.append(item)
        if error is not None:
            self.errors[item] = error

    def count(self, kind: str) -> int:
        return len(self.found.get(kind, []))

    def counts(self) -> dict[str, int]:
        """Number of files per kind, only kinds that occurred, in report order."""
        return {kind: self.count(kind) for kind in KINDS if self.count(kind)}

    @property
    def unreadable(self) -> list[str]:
        return [item for kind in UNREADABLE_KINDS for item in self.found.get(kind, [])]

    def summary(self, limit: int = 10, skipped: bool = True) -> str:
        """A few lines for the console: counts per kind, then the unreadable files by name."""
        head = f"data scan of {self.where}: {self.num_files} image files"
        counts = self.counts()
        if not counts:
            return head + ", no problems found"
        lines = [head + "; found: " + ", ".join(f"{n} {KINDS[k]}" for k, n in counts.items())]
        bad = self.unreadable
        if bad:
            shown = "; ".join(f"{item} ({self.errors.get(item, 'unreadable')})" for item in bad[:limit])
            more = f"; ... ({len(bad)} in all)" if len(bad) > limit else ""
            lines.append(f"  unreadable{', skipped' if skipped else ''}: {shown}{more}")
        for kind in ("empty_class", "non_image_file"):
            items = self.found.get(kind, [])
            if items:
                more = f", ... ({len(items)} in all)" if len(items) > limit else ""
                lines.append(f"  {KINDS[kind]}: {', '.join(items[:limit])}{more}")
        return "\n".join(lines)


def inspect_image(path: str | Path, crop_size: int | None = None) -> tuple[list[str], str | None]:
    """Kinds that apply to one file from its header, and the error message when it is unreadable."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        return ["corrupt"], f"cannot read the file: {exc.strerror or exc}"
    if size == 0:
        return ["zero_byte"], "the file is empty (0 bytes)"
    try:
        with Image.open(path) as img:
            mode, (width, height), info = img.mode, img.size, dict(img.info)
    except UnidentifiedImageError:
        return ["not_an_image"], "not an image PIL can identify"
    except Exception as exc:  # noqa: BLE001 - PIL raises many types (SyntaxError, struct.error ...)
        message = str(exc) or type(exc).__name__
        return [error_kind(message)], message
    kinds = []
    if mode == "I" or mode.startswith("I;16"):
        kinds.append("16bit")
    if mode in ("P", "PA"):
        kinds.append("palette")
    if mode == "CMYK":
        kinds.append("cmyk")
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in info):
        kinds.append("alpha")
    if crop_size is not None and min(width, height) < crop_size:
        kinds.append("small")
    return kinds, None


def check_samples(samples: Sequence[tuple[Path, int]], report: ScanReport, *, crop_size: int | None = None,
                  relative_to: Path | None = None, num_threads: int | None = None) -> list[tuple[Path, int]]:
    """Inspect every sample's file, record the findings in ``report`` and return the readable samples.

    Header reads are I/O bound, so large folders are inspected by a thread pool."""

    def name(path: Path) -> str:
        if relative_to is not None:
            try:
                return Path(path).relative_to(relative_to).as_posix()
            except ValueError:
                pass
        return str(path)

    paths = [Path(p) for p, _ in samples]
    if len(paths) >= _PARALLEL_FROM:
        threads = num_threads or min(32, 4 * (os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=threads) as pool:
            results: Iterable[tuple[list[str], str | None]] = list(
                pool.map(lambda p: inspect_image(p, crop_size), paths, chunksize=64))
    else:
        results = [inspect_image(p, crop_size) for p in paths]
    report.num_files += len(paths)
    good = []
    for sample, (kinds, error) in zip(samples, results):
        for kind in kinds:
            report.add(kind, name(sample[0]), error if kind in UNREADABLE_KINDS else None)
        if error is None:
            good.append(sample)
    return good
