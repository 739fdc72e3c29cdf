"""One entry point from a dataset name or folder path to an :class:`ImageSource`.

``load_dataset`` is what the commands call with ``--data``: a known name (``digits``,
the embedded offline default; ``cifar10``, ``cifar100``, ``stl10`` via torchvision) or a
path to an ImageNet-layout image folder. Folder sources are decoded into memory when
the result fits a byte budget (CIFAR-sized folders) and read from disk otherwise
(ImageNet). ``load_eval_dataset`` is the evaluation split as ``simclrv2 evaluate`` reads it:
above 32 px each file at full resolution, centre-cropped and resized once (SPEC §6).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from PIL import Image

from .cache import DEFAULT_CACHE_BYTES, cache_in_memory, cache_nbytes, fits_in_memory
from .digits import load_digits_source
from simclrv2.errors import DataError, MissingSplitError
from .folders import scan_image_folder
from .scan import ScanReport, check_samples
from .decode import EvalTransformLike
from .sources import EvalImageSource, FolderImageSource, ImageSource, TensorImageSource
from .subsets import first_per_class_indices
from .torchvision_sets import TORCHVISION_SPLITS, load_torchvision_source

log = logging.getLogger(__name__)

__all__ = ["DATASET_NAMES", "DEFAULT_DATASET", "canvas_for_image_size", "load_dataset", "load_eval_dataset",
           "describe"]

DEFAULT_DATASET = "digits"
DATASET_NAMES = ("digits", *TORCHVISION_SPLITS)
"""Names ``load_dataset`` understands; anything else is taken as a folder path."""

CROP_PROPORTION = 0.875
"""Reference eval centre-crop proportion (SPEC §6): the crop keeps 0.875 of the full image's
limiting side (224 of a 256 px side); also sets the training canvas 256 = round(224 / 0.875)."""

_MAX_INFERRED_CANVAS = 256


def canvas_for_image_size(image_size: int) -> int:
    """Canvas side a folder source is decoded into for *training* at ``image_size``.

    Small images (<= 32, CIFAR-like) are used at their own size. Larger ones get
    ``round(image_size / 0.875)`` (256 for 224), which bounds the in-memory/decoded size.

    Training only: images are letterboxed into this canvas (longer side scaled to it) and
    the random crop is sampled inside the valid region, so a training crop is resampled
    twice for images larger than the canvas. **Evaluation does not use this canvas** above
    32 px: :func:`load_eval_dataset` (``simclrv2 evaluate``) and the prediction commands
    decode each file at full resolution and crop 0.875 of the full image, as the reference's
    ``preprocess_for_eval`` (SPEC §6; :class:`~simclrv2.data.sources.EvalImageSource`). The
    accuracies the training stages log on a folder's test split still read this canvas (a
    4:3 image's eval crop is then 168 px upsampled to 224); ``simclrv2 evaluate`` is the
    measurement that matches the reference.
    """
    if image_size < 1:
        raise DataError(f"image_size must be positive; got {image_size}")
    return image_size if image_size <= 32 else int(round(image_size / CROP_PROPORTION))


def _infer_canvas(samples: list[tuple[Path, int]]) -> int:
    """Longest side among the first image of up to 8 classes, capped at 256."""
    firsts: dict[int, Path] = {}
    for path, label in samples:
        if label not in firsts:
            firsts[label] = path
            if len(firsts) == 8:
                break
    longest = 1
    for path in firsts.values():
        try:
            with Image.open(path) as img:
                longest = max(longest, *img.size)
        except Exception:  # noqa: BLE001 - unreadable files are reported by the scan, not here
            continue
    return min(longest, _MAX_INFERRED_CANVAS)


def _take_per_class(source: TensorImageSource, max_per_class: int) -> TensorImageSource:
    idx = first_per_class_indices(source.labels, max_per_class)
    paths = [source.paths[i] for i in idx.tolist()] if source.paths is not None else None
    return TensorImageSource(
        source.images[idx], source.labels[idx], source.classes, sizes=source.sizes[idx], paths=paths, root=source.root
    )


def _load_folder(
    root: Path,
    split: str,
    *,
    image_size: int | None,
    canvas_size: int | None,
    max_per_class: int | None,
    strict: bool = False,
) -> FolderImageSource:
    """Scan the folder (layout, then every file's header, see :mod:`.scan`) and build the source of
    the readable files; the findings are attached as ``source.scan_report``."""
    scan = scan_image_folder(root, max_per_class=max_per_class, allow_empty_classes=not strict,
                             require_train=split == "train")
    if split == "train":
        samples, split_dir, part = scan["train"], root / "train", "train"
    elif split in ("test", "val"):
        if scan["eval_split"] is None:
            raise MissingSplitError(f"{root} has no evaluation split (expected ROOT/val/<class>/* or ROOT/test/<class>/*)")
        samples, split_dir, part = scan["eval"], root / scan["eval_split"], "eval"
    else:
        raise DataError(f"image folders have splits 'train' and 'test' (or 'val'); got {split!r}")
    report = ScanReport(str(split_dir))
    for name in scan["empty_classes"][part]:
        report.add("empty_class", name)
    for path in scan["ignored_files"][part]:
        report.add("non_image_file", path.relative_to(split_dir).as_posix())
    readable = check_samples(samples, report, crop_size=image_size, relative_to=split_dir)
    _check_scan(report, strict=False, warn=False)  # only stops when nothing is readable; --strict is
    # decided by load_dataset once decoding into memory has found what headers cannot show
    if canvas_size is None:
        canvas_size = canvas_for_image_size(image_size) if image_size is not None else _infer_canvas(readable)
    source = FolderImageSource(readable, scan["classes"], canvas_size, root=split_dir)
    source.scan_report = report
    return source


def _check_scan(report: ScanReport, strict: bool, warn: bool = True) -> None:
    """Stop on unreadable files with ``strict`` or when nothing is left; else (``warn``) warn, naming them."""
    bad = report.unreadable
    if not bad:
        return
    if strict:
        raise DataError(report.summary(skipped=False) + "\n--strict: stopping before training; remove or fix "
                        "these files, or run without --strict to skip them")
    if len(bad) >= report.num_files:
        raise DataError(f"none of the {report.num_files} images under {report.where} can be read:\n"
                        + report.summary(skipped=False))
    if not warn:
        return
    shown = "; ".join(f"{item} ({report.errors.get(item, 'unreadable')})" for item in bad[:10])
    log.warning("skipping %d unreadable image(s) of %d in %s: %s%s", len(bad), report.num_files, report.where,
                shown, f"; ... ({len(bad)} in all)" if len(bad) > 10 else "")


def finish_folder_source(folder: FolderImageSource, report: ScanReport, *, cache: bool | str = "auto",
                         num_workers: int = 2, progress: bool = False, strict: bool = False,
                         max_cache_bytes: int | None = DEFAULT_CACHE_BYTES) -> ImageSource:
    """A scanned folder as the source training reads: decoded into memory when it fits (or
    ``cache=True``), else read from disk; then the scan report is checked (``strict``) and attached.
    Shared by labelled folders (:func:`load_dataset`) and unlabelled pools (:mod:`.pools`)."""
    if cache is True or (cache == "auto" and fits_in_memory(folder, max_cache_bytes)):
        # Decoding everything finds what the header scan cannot (truncated files): add it to the report.
        source: ImageSource = cache_in_memory(
            folder, max_bytes=None, num_workers=num_workers, progress=progress, strict=False, report=report
        )
    else:
        # Read from disk while training: a file that fails later is replaced, not fatal.
        folder.skip_unreadable = True
        source = folder
    _check_scan(report, strict)
    source.scan_report = report
    return source


def load_dataset(
    name_or_path: str | Path = DEFAULT_DATASET,
    *,
    split: Literal["train", "test", "val", "unlabeled", "train+unlabeled"] = "train",
    image_size: int | None = None,
    canvas_size: int | None = None,
    data_root: str | Path | None = None,
    download: bool = False,
    cache: bool | Literal["auto"] = "auto",
    num_workers: int = 2,
    max_per_class: int | None = None,
    max_cache_bytes: int = DEFAULT_CACHE_BYTES,
    progress: bool | None = None,
    strict: bool = False,
) -> ImageSource:
    """Return the images of one split of a named dataset or an image folder.

    Args:
        name_or_path: one of :data:`DATASET_NAMES` (names win; write ``./cifar10`` for a
            folder of that name) or the root of an ImageNet-layout folder
            (``ROOT/train/<class>/*`` and ``ROOT/val|test/<class>/*``).
        split: ``train`` or ``test``; for folders ``test`` and ``val`` both mean the
            folder's evaluation split; ``stl10`` also has ``unlabeled`` (100,000 images,
            label -1) and ``train+unlabeled``.
        image_size: training resolution; for folders it sets the canvas via
            :func:`canvas_for_image_size` (32 -> 32, 224 -> 256). Named datasets keep
            their native size (digits/CIFAR 32, STL-10 96). ``None`` on a folder infers
            the canvas from the first images (longest side, at most 256).
        canvas_size: explicit canvas side for folders, overriding ``image_size``.
        data_root: where torchvision datasets live (default ``$SIMCLRV2_DATA_ROOT`` or
            ``~/.cache/simclrv2/datasets``).
        download: let torchvision fetch a missing named dataset.
        cache: folders only: ``'auto'`` decodes into memory when the uint8 tensor fits
            ``max_cache_bytes`` (4 GiB by default); ``True`` always; ``False`` never.
        num_workers: decoding processes when caching a folder.
        max_per_class: keep only the first ``k`` images of each class (deterministic;
            for quick runs and tests).
        progress: progress bar while caching (default: when stderr is a terminal).
        strict: raise :class:`DataError` (listing them) when the scan finds unreadable
            images, instead of leaving them out with a logged warning. Every file's header
            is checked (see :mod:`simclrv2.data.scan`); cached folders are also fully
            decoded. Folders read from disk skip files that fail to decode later: such a
            file is replaced in its batch by a readable image, with a warning.

    Raises:
        DataError: unknown name and no such folder, missing files without ``download``,
            bad split, or any folder-layout problem.
    """
    name = str(name_or_path)
    key = name.lower()
    if key == "digits":
        source: ImageSource = load_digits_source(split)
    elif key in TORCHVISION_SPLITS:
        source = load_torchvision_source(key, split, data_root=data_root, download=download)
    else:
        root = Path(name).expanduser()
        if not root.exists():
            raise DataError(
                f"unknown dataset {name!r}: not one of {', '.join(DATASET_NAMES)} and no such folder"
            )
        folder = _load_folder(
            root, split, image_size=image_size, canvas_size=canvas_size, max_per_class=max_per_class,
            strict=strict,
        )
        return finish_folder_source(folder, folder.scan_report, cache=cache, num_workers=num_workers,
                                    progress=progress, strict=strict, max_cache_bytes=max_cache_bytes)
    if max_per_class is not None:
        source = _take_per_class(source, max_per_class)  # type: ignore[arg-type]
    return source


def load_eval_dataset(
    name_or_path: str | Path,
    transform: EvalTransformLike,
    *,
    data_root: str | Path | None = None,
    download: bool = False,
    num_workers: int = 2,
    max_cache_bytes: int = DEFAULT_CACHE_BYTES,
    progress: bool | None = None,
    strict: bool = False,
) -> ImageSource:
    """The evaluation split of a dataset as ``simclrv2 evaluate`` reads it (SPEC §6 'Eval preprocessing').

    * An image folder evaluated with a centre crop (``transform.center_crop``, image size > 32):
      an :class:`~simclrv2.data.sources.EvalImageSource`: every file decoded at full resolution,
      0.875 of the full image cropped (shape from its aspect ratio, rounded with rint, offset
      ``((H - h) + 1) // 2``) and resized once to S with ``transform.resize_mode``.
    * Everything else -- named datasets (digits, CIFAR, STL-10: their native images *are* full
      resolution) and folders of images used at <= 32 px -- is exactly what :func:`load_dataset`
      returns for ``split="test"`` (in memory when it fits, the fast path of CIFAR-size data);
      ``transform`` is then applied to its batches by the caller.

    The folder's files are scanned as for training (unreadable ones reported; ``strict`` stops).
    A file that fails to decode later is left out of the evaluation with a warning (``strict``:
    an error), never replaced by another image.
    """
    name = str(name_or_path)
    image_size = int(transform.image_size)
    if name.lower() in DATASET_NAMES or not transform.center_crop:
        return load_dataset(name_or_path, split="test", image_size=image_size, data_root=data_root,
                            download=download, num_workers=num_workers, max_cache_bytes=max_cache_bytes,
                            progress=progress, strict=strict)
    root = Path(name).expanduser()
    if not root.exists():
        raise DataError(f"unknown dataset {name!r}: not one of {', '.join(DATASET_NAMES)} and no such folder")
    folder = _load_folder(root, "test", image_size=image_size, canvas_size=None, max_per_class=None, strict=strict)
    report = folder.scan_report
    _check_scan(report, strict)
    samples = [(folder.file_path(i), int(label)) for i, label in enumerate(folder.labels.tolist())]
    source = EvalImageSource(samples, folder.classes, transform, root=folder.root, skip_unreadable=not strict)
    source.scan_report = report
    return source


def describe(source: ImageSource) -> dict:
    """Summary of a source for logs: counts, classes, canvas and memory footprint."""
    labeled = int((source.labels >= 0).sum())
    in_memory = isinstance(source, TensorImageSource)
    return {
        "type": type(source).__name__,
        "num_images": len(source),
        "num_labeled": labeled,
        "num_classes": source.num_classes,
        "classes": list(source.classes),
        "canvas_size": tuple(source.canvas_size),
        "in_memory": in_memory,
        "memory_bytes": cache_nbytes(source) if in_memory else 0,
        "root": str(source.root) if source.root is not None else None,
    }
