"""Turn the data options of a Config into the sources a stage trains and evaluates on."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from simclrv2.config import Config, is_dataset_name
from simclrv2.data import ImageSource, load_dataset, make_split

log = logging.getLogger(__name__)

NATIVE_IMAGE_SIZE = {"digits": 32, "cifar10": 32, "cifar100": 32, "stl10": 96}


def default_image_size(cfg: Config) -> int:
    if cfg.image_size:
        return int(cfg.image_size)
    if is_dataset_name(cfg.data):
        return NATIVE_IMAGE_SIZE.get(cfg.data, 224)
    return folder_native_size(cfg.data)


def folder_native_size(root: str) -> int:
    """Image folders train at 224 px unless their images are small (<= 32 px, e.g. CIFAR as JPEGs),
    judged from the first training image: then the native size and the CIFAR presets apply."""
    from PIL import Image

    from simclrv2.data import IMAGE_EXTENSIONS
    from pathlib import Path
    train = Path(root) / "train"
    for class_dir in sorted(p for p in train.iterdir() if p.is_dir()) if train.is_dir() else []:
        for file in sorted(class_dir.iterdir()):
            if file.suffix.lower() in IMAGE_EXTENSIONS:
                try:
                    with Image.open(file) as img:
                        side = max(img.size)
                except Exception:  # noqa: BLE001 - unreadable files are reported by the data scan
                    continue
                return side if side <= 32 else 224
    return 224


@dataclass
class RunData:
    """Training images (all of them: the unlabelled pool), the labelled subset, the test split."""

    train: ImageSource
    test: ImageSource | None
    labeled_indices: torch.Tensor
    image_size: int

    @property
    def classes(self) -> list[str]:
        return list(self.train.classes)

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)

    def labels_for_training(self) -> torch.Tensor:
        """Training labels with every image outside the labelled subset set to -1 (unlabelled)."""
        labels = torch.full_like(self.train.labels, -1)
        labels[self.labeled_indices] = self.train.labels[self.labeled_indices]
        return labels


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


def prepare_data(cfg: Config, *, need_test: bool = True, unlabeled_pool: bool = False) -> RunData:
    """Load the train (and test) split and choose the labelled subset (SPEC §0 step 2).

    ``unlabeled_pool``: for STL-10, add the 100k 'unlabeled' split to the training pool of
    pretraining and distillation."""
    image_size = default_image_size(cfg)
    common = dict(image_size=image_size, data_root=cfg.data_root, download=cfg.download,
                  num_workers=cfg.num_workers, strict=cfg.strict)
    train = load_dataset(cfg.data, split="train", max_per_class=cfg.max_per_class, **common)
    test = None
    if need_test:
        try:
            test = load_dataset(cfg.data, split="test", **common)
        except FileNotFoundError:
            test = None
        if test is not None and list(test.classes) != list(train.classes):
            from simclrv2.data import DataError
            raise DataError("data: the class lists of the train and test splits differ")
    print_scan_reports(train, test)
    labeled, _ = make_split(train, label_fraction=cfg.label_fraction, labeled_list=cfg.labeled_list,
                            seed=cfg.seed)
    return RunData(train=train, test=test, labeled_indices=labeled, image_size=image_size)
