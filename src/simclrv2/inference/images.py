"""The images a ``predict`` / ``embed`` command reads: files and folders given on the command line.

A folder is walked recursively (hidden files skipped, images recognised by extension, sorted by
path, :func:`simclrv2.data.folders.list_images`); a file named explicitly is always read. Every
file's header is checked first (:func:`simclrv2.data.scan.check_samples`) so unreadable files are
listed on stderr and skipped, or stop the command with ``strict`` before any work is done.

When a folder's images all lie in sub-folders, the first sub-folder level is taken as the class
(an ImageNet-style ``ROOT/<class>/...`` layout), so ``embed`` can store labels.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from simclrv2.data.decode import EvalTransformLike
from simclrv2.data.folders import list_images
from simclrv2.data.scan import ScanReport, check_samples
from simclrv2.data.sources import EvalImageSource
from simclrv2.errors import DataError

__all__ = ["ImageList", "collect_images"]


@dataclass
class ImageList:
    """Readable image files, with a class per file when every folder given had class sub-folders."""

    files: list[Path]
    classes: list[str] = field(default_factory=list)
    labels: list[int] | None = None
    skipped: list[str] = field(default_factory=list)

    def source(self, transform: EvalTransformLike) -> EvalImageSource:
        """The files as evaluation inputs (:class:`~simclrv2.data.sources.EvalImageSource`: full
        resolution, centre crop and one resize above 32 px, the preprocessing of ``evaluate``)."""
        labels = self.labels if self.labels is not None else [-1] * len(self.files)
        return EvalImageSource(list(zip(self.files, labels)), self.classes, transform)


def _expand(paths: Sequence[str | Path]) -> tuple[list[Path], list[str | None]]:
    """Every file under ``paths`` and its class (first sub-folder of a folder argument) or None."""
    files: list[Path] = []
    classes: list[str | None] = []
    for arg in paths:
        path = Path(arg).expanduser()
        if path.is_dir():
            found = list_images(path)
            if not found:
                raise DataError(f"no images found under {path} (looked for .jpg, .jpeg, .png, .bmp, .webp in any "
                                "letter case)")
            for f in found:
                parts = f.relative_to(path).parts
                files.append(f)
                classes.append(parts[0] if len(parts) > 1 else None)
        elif path.exists():
            files.append(path)
            classes.append(None)
        else:
            raise DataError(f"{path}: no such file or folder")
    return files, classes


def collect_images(paths: Sequence[str | Path], *, strict: bool = False, quiet: bool = False) -> ImageList:
    """The readable images of ``paths`` (files or folders), unreadable ones reported on stderr.

    ``strict``: an unreadable file raises :class:`DataError` (exit 2) instead of being skipped."""
    if not paths:
        raise DataError("give at least one image file or folder")
    files, folder_classes = _expand(paths)
    report = ScanReport(where="the input images")
    readable = check_samples([(f, i) for i, f in enumerate(files)], report)
    bad = [f"{item} ({report.errors.get(item, 'unreadable')})" for item in report.unreadable]
    if bad and strict:
        raise DataError(f"{len(bad)} unreadable image(s) (--strict): " + "; ".join(bad[:10])
                        + (f"; ... ({len(bad)} in all)" if len(bad) > 10 else ""))
    if bad and not quiet:
        for line in bad:
            print(f"skipped unreadable image: {line}", file=sys.stderr)
    if not readable:
        raise DataError("none of the given images could be read")
    keep = [i for _, i in readable]
    kept_classes = [folder_classes[i] for i in keep]
    result = ImageList(files=[files[i] for i in keep], skipped=bad)
    if all(c is not None for c in kept_classes):
        result.classes = sorted(set(kept_classes))  # type: ignore[arg-type]
        index = {name: j for j, name in enumerate(result.classes)}
        result.labels = [index[c] for c in kept_classes]  # type: ignore[index]
    return result
