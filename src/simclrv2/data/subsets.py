"""Which training images keep their labels in a semi-supervised run.

SimCLRv2 fine-tunes on 1% / 10% of ImageNet's labels while pretraining and distillation
use every training image (SPEC §0, §6). Two ways to choose the labelled part:

* :func:`label_fraction_indices` -- a class-balanced random fraction, reproducible
  from a seed (for datasets without official subsets, e.g. CIFAR);
* :func:`labeled_list_indices` -- an explicit list of files, like the reference's
  ``imagenet_subsets/1percent.txt`` / ``10percent.txt``.

:func:`make_split` combines them; its unlabelled pool is always the whole train set.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch

from simclrv2.errors import DataError
from .sources import ImageSource

__all__ = [
    "label_fraction_indices",
    "labeled_list_indices",
    "read_labeled_list",
    "first_per_class_indices",
    "SemiSupervisedSplit",
    "make_split",
]


def label_fraction_indices(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Sorted indices of a class-balanced ``fraction`` of the labelled images.

    Each class ``c`` with ``n_c`` images contributes ``round(fraction * n_c)`` images
    (half rounds up) but at least one, so no class is absent from fine-tuning even at
    tiny fractions. The images are the first ones of a permutation drawn from a
    ``torch.Generator`` seeded with ``seed`` (classes visited in increasing order), so
    the subset is a pure function of ``(labels, fraction, seed)``. Label -1 (unlabelled)
    is never selected. Raises :class:`DataError` unless ``0 < fraction <= 1``.
    """
    if not isinstance(fraction, (int, float)) or not 0.0 < float(fraction) <= 1.0:
        raise DataError(f"label fraction must satisfy 0 < fraction <= 1; got {fraction!r}")
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    classes = sorted(c for c in set(labels.tolist()) if c >= 0)
    if not classes:
        raise DataError("no labelled images (every label is -1) to take a fraction of")
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    chosen = []
    for cls in classes:
        members = torch.nonzero(labels == cls).flatten()
        take = max(1, math.floor(float(fraction) * members.numel() + 0.5))
        chosen.append(members[torch.randperm(members.numel(), generator=gen)[:take]])
    return torch.cat(chosen).sort().values


MAX_LIST_BYTES = 256 * 1024 * 1024
"""ImageNet's full train list is ~40 MB; a labelled-image list larger than this is refused unread."""


def _read_list_lines(list_file: str | Path) -> list[tuple[int, str]]:
    """``(line number, entry)`` of a labelled-image list: blanks and ``#`` lines skipped, backslashes
    made ``/``, leading ``./`` dropped (lists written on Windows or by ``find .`` match too)."""
    path = Path(list_file).expanduser()
    if not path.is_file():
        raise DataError(f"labelled-image list {path} does not exist")
    try:
        if path.stat().st_size > MAX_LIST_BYTES:
            raise DataError(f"labelled-image list {path} is larger than {MAX_LIST_BYTES >> 20} MiB")
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"labelled-image list {path} is not UTF-8 text (invalid byte at offset {exc.start}): "
                        "expected one image path per line") from exc
    except OSError as exc:
        raise DataError(f"labelled-image list {path} cannot be read ({exc.strerror or exc})") from exc
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        entry = entry.replace("\\", "/")
        while entry.startswith("./"):
            entry = entry[2:]
        entries.append((number, entry))
    return entries


def read_labeled_list(list_file: str | Path) -> list[str]:
    """Entries of a labelled-image list: one path per line, blanks and ``#`` lines skipped.

    Backslashes become ``/`` and a leading ``./`` is dropped, so lists written on Windows
    or by ``find .`` match too. Not UTF-8 text or over :data:`MAX_LIST_BYTES`: :class:`DataError`.
    """
    return [entry for _, entry in _read_list_lines(list_file)]


def _lines(numbers: list[int], limit: int = 10) -> str:
    shown = ", ".join(map(str, numbers[:limit]))
    return "line" + ("s " if len(numbers) > 1 else " ") + shown + (", ..." if len(numbers) > limit else "")


def labeled_list_indices(source: ImageSource, list_file: str | Path) -> torch.Tensor:
    """Sorted source indices of the images named in ``list_file``.

    An entry containing ``/`` must equal a path relative to the train root
    (``<class>/<file>``); a bare file name (the format of the reference's
    ``1percent.txt``: ``n01440764_10026.JPEG``) is matched by base name, and must then be
    unique among the source's files. Duplicated entries count once. Unknown or ambiguous
    entries raise :class:`DataError` giving their count and line numbers, never the lines
    themselves: the file may be something else passed by mistake, and its contents must not
    end up in a log.
    """
    if source.paths is None:
        raise DataError(
            "labelled-image lists need a folder dataset (with file paths); "
            "use a label fraction for built-in datasets"
        )
    entries = _read_list_lines(list_file)
    if not entries:
        raise DataError(f"labelled-image list {list_file} has no entries")
    by_path = {p: i for i, p in enumerate(source.paths)}
    by_name: dict[str, list[int]] = {}
    for i, p in enumerate(source.paths):
        by_name.setdefault(p.rsplit("/", 1)[-1], []).append(i)
    found: set[int] = set()
    unknown: list[int] = []
    ambiguous: list[int] = []
    for number, entry in entries:
        if "/" in entry:
            if entry in by_path:
                found.add(by_path[entry])
            else:
                unknown.append(number)
            continue
        hits = by_name.get(entry, [])
        if len(hits) == 1:
            found.add(hits[0])
        elif hits:
            ambiguous.append(number)
        else:
            unknown.append(number)
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} of {len(entries)} entries name no image under "
                        f"{source.root or 'the training data'} ({_lines(unknown)}; entries are paths relative "
                        "to the train root, <class>/<file>, or unique file names)")
    if ambiguous:
        problems.append(f"{len(ambiguous)} bare file names match several files, write <class>/<file> "
                        f"({_lines(ambiguous)})")
    if problems:
        raise DataError(f"labelled-image list {list_file}: " + "; ".join(problems))
    return torch.tensor(sorted(found), dtype=torch.long)


def first_per_class_indices(labels: torch.Tensor, max_per_class: int) -> torch.Tensor:
    """Sorted indices of the first ``max_per_class`` images of every label value.

    A deterministic subsample (no randomness) for quick runs; label -1 counts as one
    more group so unlabelled pools shrink the same way.
    """
    if max_per_class < 1:
        raise DataError(f"max_per_class must be >= 1; got {max_per_class}")
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    keep = [torch.nonzero(labels == c).flatten()[:max_per_class] for c in labels.unique().tolist()]
    return torch.cat(keep).sort().values if keep else torch.empty(0, dtype=torch.long)


class SemiSupervisedSplit(NamedTuple):
    """Labelled indices (fine-tuning) and unlabelled pool (pretraining, distillation)."""

    labeled: torch.Tensor
    unlabeled: torch.Tensor


def make_split(
    train_source: ImageSource,
    *,
    label_fraction: float | None = None,
    labeled_list: str | Path | None = None,
    seed: int = 0,
) -> SemiSupervisedSplit:
    """Split a training source into labelled indices and the unlabelled pool.

    ``labeled_list`` takes precedence over ``label_fraction`` (an explicit list is the
    more specific request, e.g. the reference's ``1percent.txt``); with neither, every
    image with a label (>= 0) is labelled (fully supervised). The unlabelled pool is *every*
    training image, labelled or not, as in the paper. Unpacks as
    ``labeled, unlabeled = make_split(...)``.
    """
    if labeled_list is not None:
        labeled = labeled_list_indices(train_source, labeled_list)
    elif label_fraction is not None:
        labeled = label_fraction_indices(train_source.labels, label_fraction, seed)
    else:
        labeled = torch.nonzero(train_source.labels >= 0).flatten()
    labeled_labels = train_source.labels.index_select(0, labeled)
    if (labeled_labels < 0).any():
        bad = labeled[labeled_labels < 0][:10].tolist()
        raise DataError(f"labelled-image list names images without labels (indices {bad})")
    return SemiSupervisedSplit(labeled, torch.arange(len(train_source)))

