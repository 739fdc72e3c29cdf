"""Turn the data options of a Config into the sources a stage trains and evaluates on.

Inputs (SPEC §0 step 2; issue "semi-supervised data as users have it"): labelled images from
``--data ROOT`` (class folders or a named data set) or ``--labels FILE.csv``; unlabelled pools from
``--unlabeled DIR`` (pretraining and distillation train on the union); the labelled subset from
``--labeled-list`` or ``--label-fraction`` (default: every labelled image). What was used is
recorded (:func:`data_record`) in each stage's model metadata and results, so a later stage can
inherit exactly the labelled set its teacher or checkpoint was trained with (no label leakage).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from simclrv2.config import Config, is_dataset_name
from simclrv2.data import ImageSource, load_dataset, make_split
from simclrv2.data.imagesize import native_image_size
from simclrv2.errors import DataError

log = logging.getLogger(__name__)


def default_image_size(cfg: Config) -> int:
    """``--image-size``, else the data's native size (see :mod:`simclrv2.data.imagesize`)."""
    if cfg.image_size:
        return int(cfg.image_size)
    return native_image_size(cfg.data, unlabeled=cfg.unlabeled, labels=cfg.labels).size


def folder_native_size(root: str) -> int:
    """The training size of an image folder: median longest side of a sample when <= 32 px, else 224."""
    return native_image_size(root).size


# ---- the labelled set -----------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelSpec:
    """How the labelled subset is chosen: an explicit list (wins), a seeded class-balanced fraction,
    or every labelled image. ``origin`` says where the choice came from (for the plan line)."""

    fraction: float | None = None
    seed: int = 0
    labeled_list: str | None = None
    origin: str = "options"

    @classmethod
    def from_config(cls, cfg: Config) -> "LabelSpec":
        return cls(cfg.label_fraction, cfg.seed, cfg.labeled_list, "options")

    @classmethod
    def from_record(cls, record: dict[str, Any], origin: str) -> "LabelSpec":
        fraction = record.get("fraction")
        listed = record.get("list")
        return cls(float(fraction) if isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
                   else None, int(record.get("seed") or 0) if isinstance(record.get("seed"), int) else 0,
                   listed if isinstance(listed, str) else None, origin)

    @property
    def explicit(self) -> bool:
        return self.fraction is not None or self.labeled_list is not None


def _file_sha256(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _indices_sha256(source: ImageSource, indices: torch.Tensor) -> str:
    digest = hashlib.sha256()
    if source.paths is not None:
        for i in indices.tolist():
            digest.update(source.paths[i].encode("utf-8", "surrogateescape") + b"\n")
    else:
        digest.update(indices.numpy().tobytes())
    return digest.hexdigest()


def _absolute(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


@dataclass
class RunData:
    """Training images (labelled set first, then the unlabelled pools), the labelled subset, the test split."""

    train: ImageSource | None
    test: ImageSource | None
    labeled_indices: torch.Tensor
    image_size: int
    label_spec: LabelSpec = field(default_factory=LabelSpec)
    num_with_labels: int = 0
    num_unlabeled_pool: int = 0
    size_note: str = ""
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        source = self.train if self.train is not None else self.test
        return list(source.classes) if source is not None else []

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def labels_for_training(self) -> torch.Tensor:
        """Training labels with every image outside the labelled subset set to -1 (unlabelled)."""
        labels = torch.full_like(self.train.labels, -1)
        labels[self.labeled_indices] = self.train.labels[self.labeled_indices]
        return labels

    def labeled_record(self) -> dict[str, Any]:
        """The labelled set, as stored in checkpoints and results.json."""
        return self.record["labeled_set"]

    def describe_labels(self) -> str:
        """The labelled set in words, for plan lines."""
        rec = self.labeled_record()
        n, of = rec["num_labeled"], rec["num_with_labels"]
        if rec["kind"] == "none":
            what = "no labels"
        elif rec["kind"] == "list":
            what = f"labelled list {rec['list']}"
        elif rec["kind"] == "fraction":
            what = f"label fraction {rec['fraction']:g} (seed {rec['seed']})"
        else:
            what = "all labels"
        share = f", {100.0 * n / of:.3g}%" if of else ""
        origin = "" if self.label_spec.origin == "options" else f", {self.label_spec.origin}"
        pool = f", plus {self.num_unlabeled_pool} unlabelled pool images" if self.num_unlabeled_pool else ""
        return f"labelled: {n} of {of} images ({what}{share}{origin}){pool}"

    def describe(self) -> str:
        """Image size and labelled set, appended to every plan line."""
        size = f"image size {self.image_size} px"
        if self.size_note:
            size += f" (note: {self.size_note})"
        return f"{size}; {self.describe_labels()}"


def print_scan_reports(*sources: ImageSource | None) -> None:
    """Print what the data scan of image folders found (counts per problem kind), on rank 0, before
    training starts (see :mod:`simclrv2.data.scan`)."""
    from simclrv2.utils.distributed import get_rank
    if get_rank() != 0:
        return
    for source in sources:
        report = getattr(source, "scan_report", None) if source is not None else None
        if report is not None:
            print(report.summary(), flush=True)


def labeled_indices_for(train: ImageSource, spec: LabelSpec) -> torch.Tensor:
    """The labelled subset ``spec`` selects from ``train`` (a pure function of both)."""
    if not bool((train.labels >= 0).any()):
        if spec.explicit:
            raise DataError("label_fraction/labeled_list: the training data has no labelled images (only "
                            "--unlabeled folders); give labelled images with --data ROOT or --labels FILE.csv")
        return torch.empty(0, dtype=torch.long)
    labeled, _ = make_split(train, label_fraction=spec.fraction, labeled_list=spec.labeled_list, seed=spec.seed)
    return labeled


def prepare_data(cfg: Config, *, need_test: bool = True, need_train: bool = True, unlabeled_pool: bool = False,
                 label_spec: LabelSpec | None = None, with_pool: bool = True) -> RunData:
    """Load the labelled training images (+ the ``--unlabeled`` pools when the stage accepts them),
    the test split, and choose the labelled subset (SPEC §0 step 2).

    ``label_spec``: the labelled set to use (default: from the options); distill and linear-eval pass
    the one recorded in their teacher/checkpoint. ``with_pool=False``: stages that train on labelled images
    only (finetune, supervised, linear-eval) skip the ``--unlabeled`` folders a pipeline hands every
    stage. ``need_train=False`` (evaluate) loads only the
    evaluation split, so a folder holding only ``val/`` or ``test/`` can be scored."""
    image_size = default_image_size(cfg)
    estimate = native_image_size(cfg.data, unlabeled=cfg.unlabeled, labels=cfg.labels)
    common = dict(image_size=image_size, data_root=cfg.data_root, download=cfg.download,
                  num_workers=cfg.num_workers, strict=cfg.strict)
    spec = label_spec or LabelSpec.from_config(cfg)
    labeled_source: ImageSource | None = None
    if need_train:
        if cfg.labels:
            from simclrv2.data.datasets import canvas_for_image_size
            from simclrv2.data.pools import load_labels_csv
            labeled_source = load_labels_csv(cfg.labels, canvas_for_image_size(image_size), image_size=image_size,
                                             num_workers=cfg.num_workers, strict=cfg.strict)
        elif cfg.data is not None:
            labeled_source = load_dataset(cfg.data, split="train", max_per_class=cfg.max_per_class, **common)
    test = None
    if need_test and cfg.data is not None:
        # The split every stage scores (final and periodic evaluation, kNN monitor, linear evaluation) is
        # read as `simclrv2 evaluate` reads it (SPEC §6: folders above 32 px at full resolution, centre
        # crop 0.875, one resize), so a stage's logged top-1 equals what evaluate reports for its weights.
        from simclrv2.augment import EvalTransform
        from simclrv2.data.datasets import load_eval_dataset
        try:
            test = load_eval_dataset(cfg.data, EvalTransform(image_size), data_root=cfg.data_root,
                                     download=cfg.download, num_workers=cfg.num_workers, strict=cfg.strict,
                                     progress=cfg.progress)
        except FileNotFoundError:
            test = None
        if test is not None and labeled_source is not None and list(test.classes) != list(labeled_source.classes):
            raise DataError(f"data: the class lists of the training labels ({_names(labeled_source.classes)}) and "
                            f"of the test split ({_names(test.classes)}) differ")
    pool = None
    unlabeled = list(cfg.unlabeled or []) if (need_train and with_pool) else []
    if unlabeled:
        from simclrv2.data.datasets import canvas_for_image_size
        from simclrv2.data.pools import load_unlabeled_pool
        canvas = labeled_source.canvas_size if labeled_source is not None else canvas_for_image_size(image_size)
        classes = labeled_source.classes if labeled_source is not None else (test.classes if test else [])
        pool = load_unlabeled_pool(unlabeled, canvas, classes=classes, num_workers=cfg.num_workers,
                                   strict=cfg.strict)
    print_scan_reports(labeled_source, pool, test)
    train = None
    labeled = torch.empty(0, dtype=torch.long)
    if need_train:
        from simclrv2.data.pools import combine_sources
        train = combine_sources(labeled_source, pool)
        labeled = labeled_indices_for(train, spec)
    num_with_labels = int((train.labels >= 0).sum()) if train is not None else 0
    data = RunData(train=train, test=test, labeled_indices=labeled, image_size=image_size, label_spec=spec,
                   num_with_labels=num_with_labels, num_unlabeled_pool=len(pool) if pool is not None else 0,
                   size_note=estimate.note if estimate is not None else "")
    data.record = data_record(cfg, data)
    return data


def _names(classes: list[str], limit: int = 5) -> str:
    shown = ", ".join(classes[:limit])
    return (shown + f", ... ({len(classes)} in all)") if len(classes) > limit else (shown or "none")


def data_record(cfg: Config, data: RunData) -> dict[str, Any]:
    """What a stage trained on: stored in its model metadata (so finetune/distill/evaluate default
    ``--data`` to it and distill/linear-eval inherit its labelled set) and in results.json."""
    spec = data.label_spec
    if data.train is not None and not data.num_with_labels:
        kind = "none"
    elif spec.labeled_list is not None:
        kind = "list"
    elif spec.fraction is not None:
        kind = "fraction"
    else:
        kind = "all"
    labeled_set = {
        "kind": kind, "fraction": spec.fraction if kind == "fraction" else None,
        "seed": spec.seed if kind == "fraction" else None,
        "list": _absolute(spec.labeled_list) if kind == "list" else None,
        "list_sha256": _file_sha256(spec.labeled_list) if kind == "list" else None,
        "num_labeled": int(len(data.labeled_indices)), "num_with_labels": data.num_with_labels,
        "indices_sha256": _indices_sha256(data.train, data.labeled_indices) if data.train is not None else None,
        "origin": spec.origin,
    }
    data_field = cfg.data if cfg.data is None or is_dataset_name(cfg.data) else _absolute(cfg.data)
    return {"data": data_field, "unlabeled": [_absolute(u) for u in cfg.unlabeled or []] or None,
            "labels_csv": _absolute(cfg.labels), "labeled_set": labeled_set}


def inherited_label_spec(cfg: Config, record: dict[str, Any] | None, whose: str) -> LabelSpec:
    """The labelled set for a stage that starts from another network: the options when they name one,
    else the one ``record`` (the teacher's or checkpoint's ``labeled_set``) says it was trained with."""
    if cfg.label_fraction is not None or cfg.labeled_list is not None:
        return LabelSpec.from_config(cfg)
    if isinstance(record, dict) and record.get("kind") in ("fraction", "list"):
        return LabelSpec.from_record(record, f"inherited from the {whose}")
    if isinstance(record, dict) and record.get("kind") == "all":
        return LabelSpec(origin=f"all labels, as the {whose}")
    return LabelSpec(origin=f"all labels: the {whose} records no labelled set")
