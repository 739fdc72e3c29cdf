"""Scan an ImageNet-style folder tree into sorted ``(path, label)`` lists.

Layout: ``ROOT/train/<class>/**/<image>`` plus an evaluation split ``ROOT/val/<class>/...``
or ``ROOT/test/<class>/...``. Class names are the sub-folder names of ``train``, sorted,
and label ``i`` is the ``i``-th name; the evaluation split must have the same class
folders so labels mean the same in both. Samples are sorted by class then by relative
path, so the order (and hence any seeded subset or permutation of it) is identical on
every machine. Hidden files and folders (names starting with ``.``, e.g. macOS ``._x.jpg``
resource forks) are skipped because they are not decodable images.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Literal

from simclrv2.errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "EVAL_SPLITS", "find_eval_split", "scan_image_folder", "list_images"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
"""Recognised extensions, compared case-insensitively (``.JPEG``, ``.Png`` ... count)."""

EVAL_SPLITS = ("val", "test")
"""Evaluation split folder names, in order of preference."""


def find_eval_split(root: str | Path) -> Literal["val", "test"] | None:
    """Name of the evaluation split folder under ``root`` (``val`` preferred), or None."""
    root = Path(root)
    for name in EVAL_SPLITS:
        if (root / name).is_dir():
            return name  # type: ignore[return-value]
    return None


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(folder: Path, ignored: list[Path] | None = None,
                duplicates: list[Path] | None = None) -> list[Path]:
    """All image files below ``folder`` (recursively, following directory links), sorted by relative
    POSIX path.

    Each directory is entered once, by device + inode, so a symlink loop or two links to one folder
    cannot list images again and again (or walk forever); a file reached twice (hard or symbolic
    link) is listed once and appended to ``duplicates`` when given. Special files (FIFOs, sockets,
    devices: opening a FIFO would block start-up) are never listed; they and visible files with other
    extensions are appended to ``ignored`` when it is given (hidden ones are skipped silently)."""
    found: list[Path] = []
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        try:
            info = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (info.st_dev, info.st_ino) in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add((info.st_dev, info.st_ino))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith("."):
                continue
            try:
                st = os.stat(path)
            except OSError:
                st = None
            if st is not None and not stat.S_ISREG(st.st_mode):
                if ignored is not None:
                    ignored.append(path)
                continue
            if not _is_image(name):
                if ignored is not None:
                    ignored.append(path)
                continue
            if st is not None:
                key = (st.st_dev, st.st_ino)
                if key in seen_files:
                    if duplicates is not None:
                        duplicates.append(path)
                    continue
                seen_files.add(key)
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def _scan_split(
    split_dir: Path, classes: list[str], max_per_class: int | None, ignored: list[Path] | None = None
) -> tuple[list[tuple[Path, int]], list[str]]:
    """Samples of one split and the classes that had no image at all."""
    samples: list[tuple[Path, int]] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        files = list_images(split_dir / name, ignored)
        if not files:
            empty.append(name)
        if max_per_class is not None:
            files = files[:max_per_class]
        samples.extend((f, label) for f in files)
    return samples, empty


def _preview(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def scan_image_folder(root: str | Path, *, max_per_class: int | None = None,
                      allow_empty_classes: bool = False, require_train: bool = True) -> dict:
    """Scan ``ROOT/train`` and the evaluation split of an ImageNet-layout folder.

    Returns a dict with keys ``root`` (Path), ``classes`` (sorted names), ``train``
    (list of ``(Path, label)``), ``eval`` (same, empty when there is no eval split) and
    ``eval_split`` (``'val'``, ``'test'`` or None). ``max_per_class`` keeps the first
    ``k`` images of each class (after sorting) in both splits -- a deterministic
    subsample for quick runs.

    Also returned: ``empty_classes`` and ``ignored_files`` (non-image files), each a dict
    ``{"train": [...], "eval": [...]}`` of class names / paths, for the data scan report.

    Raises :class:`DataError` if the root or its ``train`` folder is missing, ``train``
    has no class folders or (unless ``allow_empty_classes``) a class folder without images,
    the eval split has no images, or the class folders of the two splits differ (naming
    what each side lacks).
    """
    root = Path(root).expanduser()
    if max_per_class is not None and max_per_class < 1:
        raise DataError(f"max_per_class must be >= 1; got {max_per_class}")
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist (expected ROOT/train/<class>/<images>)")
    train_dir = root / "train"
    if not train_dir.is_dir() and not require_train and find_eval_split(root):
        return _scan_eval_only(root, max_per_class)  # evaluate scores a folder holding only val/ or test/
    if not train_dir.is_dir():
        hint = ""
        if any(_class_dirs(root)) and not find_eval_split(root):
            hint = "; if its sub-folders are classes, move them into ROOT/train/"
        raise DataError(f"{root} has no 'train' folder (expected ROOT/train/<class>/<images>){hint}")
    classes = _class_dirs(train_dir)
    if not classes:
        raise DataError(f"{train_dir} has no class folders (expected {train_dir}/<class>/<images>)")
    ignored: dict[str, list[Path]] = {"train": [], "eval": []}
    train, empty = _scan_split(train_dir, classes, max_per_class, ignored["train"])
    if not train:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DataError(f"no images found under {train_dir} (looked for {exts} in any letter case)")
    if empty and not allow_empty_classes:
        raise DataError(f"class folders without images in {train_dir}: {_preview(empty)}")
    empty_classes: dict[str, list[str]] = {"train": empty, "eval": []}

    eval_split = find_eval_split(root)
    eval_samples: list[tuple[Path, int]] = []
    if eval_split is not None:
        eval_dir = root / eval_split
        eval_classes = _class_dirs(eval_dir)
        if eval_classes != classes:
            only_train = sorted(set(classes) - set(eval_classes))
            only_eval = sorted(set(eval_classes) - set(classes))
            parts = []
            if only_train:
                parts.append(f"missing from {eval_split}/: {_preview(only_train)}")
            if only_eval:
                parts.append(f"missing from train/: {_preview(only_eval)}")
            raise DataError(f"class folders of {root}/train and {root}/{eval_split} differ; " + "; ".join(parts))
        eval_samples, empty_classes["eval"] = _scan_split(eval_dir, classes, max_per_class, ignored["eval"])
        if not eval_samples:
            raise DataError(f"no images found under {eval_dir}")
    return {"root": root, "classes": classes, "train": train, "eval": eval_samples, "eval_split": eval_split,
            "empty_classes": empty_classes, "ignored_files": ignored}


def _scan_eval_only(root: Path, max_per_class: int | None) -> dict:
    """``scan_image_folder``'s result for a folder with an evaluation split and no ``train``: the
    classes are the evaluation split's class folders."""
    eval_split = find_eval_split(root)
    eval_dir = root / eval_split
    classes = _class_dirs(eval_dir)
    if not classes:
        raise DataError(f"{eval_dir} has no class folders (expected {eval_dir}/<class>/<images>)")
    ignored: dict[str, list[Path]] = {"train": [], "eval": []}
    eval_samples, empty = _scan_split(eval_dir, classes, max_per_class, ignored["eval"])
    if not eval_samples:
        raise DataError(f"no images found under {eval_dir}")
    return {"root": root, "classes": classes, "train": [], "eval": eval_samples, "eval_split": eval_split,
            "empty_classes": {"train": [], "eval": empty}, "ignored_files": ignored}
