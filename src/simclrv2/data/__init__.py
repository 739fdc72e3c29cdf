"""Data layer: labelled uint8 image sources, batch iteration and semi-supervised subsets.

The training loop augments batches itself on the device, so this package only provides
undistorted uint8 images of a fixed canvas size (with each image's valid region), a
deterministic shardable :class:`BatchIterator`, dataset loading by name or folder, and
the choice of labelled images for fine-tuning.
"""

from .cache import DEFAULT_CACHE_BYTES, cache_in_memory
from .datasets import DATASET_NAMES, DEFAULT_DATASET, canvas_for_image_size, describe, load_dataset
from simclrv2.errors import DataError, MissingSplitError
from .folders import IMAGE_EXTENSIONS, find_eval_split, scan_image_folder
from .loader import BatchIterator
from .sources import Batch, FolderImageSource, ImageSource, TensorImageSource
from .subsets import SemiSupervisedSplit, label_fraction_indices, labeled_list_indices, make_split

__all__ = [
    "Batch",
    "BatchIterator",
    "DATASET_NAMES",
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_DATASET",
    "DataError",
    "FolderImageSource",
    "IMAGE_EXTENSIONS",
    "ImageSource",
    "MissingSplitError",
    "SemiSupervisedSplit",
    "TensorImageSource",
    "cache_in_memory",
    "canvas_for_image_size",
    "describe",
    "find_eval_split",
    "label_fraction_indices",
    "labeled_list_indices",
    "load_dataset",
    "make_split",
    "scan_image_folder",
]
