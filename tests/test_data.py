"""Tests of simclrv2.data: folders, decoding, sources, iteration, subsets, datasets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simclrv2.data import (
    DATASET_NAMES,
    Batch,
    BatchIterator,
    DataError,
    FolderImageSource,
    ImageSource,
    TensorImageSource,
    cache_in_memory,
    canvas_for_image_size,
    describe,
    find_eval_split,
    label_fraction_indices,
    labeled_list_indices,
    load_dataset,
    make_split,
    scan_image_folder,
)
from simclrv2.data.digits import digits_split_indices

CLASSES = ["blue", "green", "red"]
REPO = Path(__file__).resolve().parents[1]
CIFAR10_DIR = Path(os.environ.get("SIMCLRV2_CIFAR10_DIR", REPO.parent / "shared" / "datasets" / "cifar10"))


def folder_source(root: Path, split: str = "train", canvas: int = 16) -> FolderImageSource:
    scan = scan_image_folder(root)
    samples = scan["train"] if split == "train" else scan["eval"]
    split_dir = root / (split if split == "train" else scan["eval_split"])
    return FolderImageSource(samples, scan["classes"], canvas, root=split_dir)


def tensor_source(n: int = 23, canvas: int = 4) -> TensorImageSource:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, canvas, canvas).contiguous()
    return TensorImageSource(images, torch.arange(n) % 3, ["a", "b", "c"])


# ----------------------------------------------------------------------------- folders
@pytest.mark.parametrize("eval_name", ["test", "val"])
def test_scan_imagenet_layout(image_folder: Path, eval_name: str) -> None:
    if eval_name == "val":
        (image_folder / "test").rename(image_folder / "val")
    (image_folder / "train" / "red" / "notes.txt").write_text("not an image")
    (image_folder / "train" / "red" / ".hidden.jpg").write_bytes(b"resource fork")
    scan = scan_image_folder(image_folder)
    assert scan["classes"] == CLASSES
    assert scan["eval_split"] == eval_name == find_eval_split(image_folder)
    assert len(scan["train"]) == 12 and len(scan["eval"]) == 6
    # Mixed-case extensions (.JPG, .Png, .PNG, .jpeg) are all found, sorted per class.
    names = [p.name for p, label in scan["train"] if label == 2]
    assert names == ["red0.png", "red1.JPG", "red2.Png", "red3.jpeg"]
    assert [label for _, label in scan["train"]] == [0] * 4 + [1] * 4 + [2] * 4
    assert [p.parent.name for p, label in scan["eval"]] == [CLASSES[label] for _, label in scan["eval"]]
    assert scan_image_folder(image_folder) == scan  # deterministic


def test_scan_max_per_class_and_no_eval_split(image_folder: Path, tmp_path: Path) -> None:
    scan = scan_image_folder(image_folder, max_per_class=2)
    assert [p.name for p, _ in scan["train"]][:2] == ["blue0.png", "blue1.JPG"]
    assert len(scan["train"]) == 6 and len(scan["eval"]) == 6
    (image_folder / "test").rename(tmp_path / "elsewhere")
    scan = scan_image_folder(image_folder)
    assert scan["eval_split"] is None and scan["eval"] == [] and find_eval_split(image_folder) is None


def test_scan_class_mismatch_names_classes(image_folder: Path) -> None:
    (image_folder / "test" / "blue").rename(image_folder / "test" / "purple")
    with pytest.raises(DataError) as err:
        scan_image_folder(image_folder)
    message = str(err.value)
    assert "missing from test/: blue" in message and "missing from train/: purple" in message
    assert isinstance(err.value, ValueError)


def test_scan_errors(tmp_path: Path, make_image) -> None:
    with pytest.raises(DataError, match="does not exist"):
        scan_image_folder(tmp_path / "nowhere")
    make_image(tmp_path / "flat" / "cat" / "a.png", (4, 4), (1, 2, 3))
    with pytest.raises(DataError, match="no 'train' folder.*move them into ROOT/train"):
        scan_image_folder(tmp_path / "flat")
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        scan_image_folder(tmp_path / "empty")
    make_image(tmp_path / "half" / "train" / "cat" / "a.png", (4, 4), (1, 2, 3))
    (tmp_path / "half" / "train" / "dog").mkdir()
    with pytest.raises(DataError, match="without images.*dog"):
        scan_image_folder(tmp_path / "half")


# ----------------------------------------------------------------------------- decoding
def _save(path: Path, img: Image.Image, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **options)


def test_image_modes_decode_to_uint8_rgb(tmp_path: Path) -> None:
    d = tmp_path / "modes" / "train" / "x"
    _save(d / "gray.png", Image.new("L", (4, 4), 100))
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    _save(d / "palette.PNG", palette)
    transparent_palette = palette.copy()
    transparent_palette.info["transparency"] = 1
    _save(d / "palette_alpha.png", transparent_palette)
    _save(d / "rgba.png", Image.new("RGBA", (4, 4), (255, 0, 0, 0)))  # fully transparent red
    _save(d / "rgba_half.png", Image.new("RGBA", (4, 4), (0, 0, 0, 128)))
    _save(d / "la.png", Image.new("LA", (4, 4), (0, 0)))
    deep = np.array([[0, 257 * 100, 65535, 65535]] * 4, dtype=np.uint16)
    _save(d / "deep16.png", Image.fromarray(deep))
    _save(d / "cmyk.jpg", Image.new("CMYK", (4, 4), (0, 0, 0, 0)))
    _save(d / "bilevel.bmp", Image.new("1", (4, 4), 1))
    _save(d / "lossless.webp", Image.new("RGB", (4, 4), (7, 8, 9)), lossless=True)
    with Image.open(d / "deep16.png") as img:
        assert img.mode.startswith("I")  # really a 16-bit file

    source = folder_source(tmp_path / "modes", canvas=4)
    assert len(source) == 10
    batch = source.get_batch(range(len(source)))
    assert batch.images.dtype == torch.uint8 and batch.images.shape == (10, 3, 4, 4)
    pixel = {Path(p).stem: batch.images[i, :, 0, 0].tolist() for i, p in enumerate(source.paths)}
    pixel["deep16_row"] = batch.images[source.paths.index("x/deep16.png"), 0, 0].tolist()
    assert pixel["gray"] == [100, 100, 100]
    assert pixel["palette"] == [10, 200, 30]
    assert pixel["palette_alpha"] == [255, 255, 255]  # transparent -> white
    assert pixel["rgba"] == [255, 255, 255]
    assert all(abs(v - 127) <= 1 for v in pixel["rgba_half"])
    assert pixel["la"] == [255, 255, 255]
    assert pixel["deep16_row"] == [0, 100, 255, 255]  # 16-bit scaled, not saturated
    assert all(v >= 250 for v in pixel["cmyk"])
    assert pixel["bilevel"] == [255, 255, 255]
    assert pixel["lossless"] == [7, 8, 9]


def test_letterbox_keeps_aspect_top_left(tmp_path: Path, make_image) -> None:
    make_image(tmp_path / "lb" / "train" / "a" / "wide.png", (10, 6), (50, 60, 70))
    make_image(tmp_path / "lb" / "train" / "a" / "tall.png", (6, 40), (50, 60, 70))
    make_image(tmp_path / "lb" / "train" / "a" / "same.png", (20, 20), (50, 60, 70))
    source = folder_source(tmp_path / "lb", canvas=20)
    assert source.paths == ["a/same.png", "a/tall.png", "a/wide.png"]
    batch = source.get_batch([0, 1, 2])
    assert batch.sizes.tolist() == [[20, 20], [20, 3], [12, 20]]  # longer side = canvas
    for image, (h, w) in zip(batch.images, batch.sizes.tolist()):
        assert (image[:, :h, :w] != 0).all()  # valid region is the image ...
        assert image[:, h:, :].sum() == 0 and image[:, :, w:].sum() == 0  # ... zero fill elsewhere
    assert (batch.images[0] == torch.tensor([50, 60, 70]).view(3, 1, 1)).all()  # same size: no resampling


def test_corrupt_file_raises_or_is_skipped(image_folder: Path, caplog) -> None:
    bad = image_folder / "train" / "green" / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    source = folder_source(image_folder)
    broken = source.paths.index("green/broken.jpg")
    with pytest.raises(DataError, match="broken.jpg"):
        source.get_batch([broken])
    with pytest.raises(DataError, match="broken.jpg"):
        load_dataset(image_folder, image_size=8, num_workers=0, strict=True)
    with caplog.at_level("WARNING"):
        kept = load_dataset(image_folder, image_size=8, num_workers=0)
    assert "broken.jpg" in caplog.text
    assert len(kept) == 12 and "green/broken.jpg" not in kept.paths
    assert kept.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4


# ----------------------------------------------------------------------------- sources
def test_tensor_source_batch() -> None:
    source = tensor_source(n=10)
    assert isinstance(source, ImageSource) and len(source) == 10 and source.canvas_size == (4, 4)
    batch = source.get_batch(torch.tensor([7, 2]))
    assert isinstance(batch, Batch)
    assert batch.images[:, 0, 0, 0].tolist() == [7, 2]
    assert batch.labels.tolist() == [1, 2] and batch.indices.tolist() == [7, 2]
    assert batch.sizes.tolist() == [[4, 4], [4, 4]]
    assert source.pin_memory() is source  # no-op without CUDA
    with pytest.raises(IndexError):
        source.get_batch([10])
    with pytest.raises(IndexError):
        source.get_batch([-1])


def test_cache_equals_on_demand_decoding(image_folder: Path) -> None:
    folder = folder_source(image_folder, canvas=16)
    cached = cache_in_memory(folder, num_workers=1, batch_size=5, progress=False)
    assert isinstance(cached, TensorImageSource) and cache_in_memory(cached) is cached
    every = list(range(len(folder)))
    a, b = folder.get_batch(every), cached.get_batch(every)
    assert torch.equal(a.images, b.images) and torch.equal(a.sizes, b.sizes) and torch.equal(a.labels, b.labels)
    assert cached.paths == folder.paths and cached.root == folder.root
    with pytest.raises(DataError, match="GiB"):
        cache_in_memory(folder, max_bytes=10)


# ----------------------------------------------------------------------------- iteration
def _all_indices(iterator: BatchIterator) -> list[int]:
    return [i for batch in iterator for i in batch.indices.tolist()]


def test_batch_iterator_covers_each_index_once() -> None:
    source = tensor_source(n=23)
    it = BatchIterator(source, 5, shuffle=True, drop_last=False, seed=1, epoch=0)
    assert len(it) == 5
    seen = _all_indices(it)
    assert sorted(seen) == list(range(23)) and seen != list(range(23))
    assert _all_indices(BatchIterator(source, 5, shuffle=True, drop_last=False, seed=1, epoch=0)) == seen
    assert _all_indices(BatchIterator(source, 5, shuffle=True, drop_last=False, seed=1, epoch=1)) != seen
    assert _all_indices(BatchIterator(source, 5, shuffle=True, drop_last=False, seed=2, epoch=0)) != seen
    for batch in it:  # images/labels follow the indices
        assert batch.images[:, 0, 0, 0].tolist() == batch.indices.tolist()
        assert torch.equal(batch.labels, batch.indices % 3)
    dropped = BatchIterator(source, 5, shuffle=True, drop_last=True, seed=1, epoch=0)
    assert len(dropped) == 4 and all(b.indices.numel() == 5 for b in dropped)
    ordered = BatchIterator(source, 5, shuffle=False, drop_last=False)
    assert _all_indices(ordered) == list(range(23))


@pytest.mark.parametrize("drop_last", [False, True])
def test_two_rank_sharding_matches_single_rank(drop_last: bool) -> None:
    source = tensor_source(n=23)
    single = BatchIterator(source, 8, shuffle=True, drop_last=drop_last, seed=3, epoch=2)
    ranks = [
        BatchIterator(source, 4, shuffle=True, drop_last=drop_last, seed=3, epoch=2, rank=r, world_size=2)
        for r in range(2)
    ]
    assert len(ranks[0]) == len(ranks[1]) == len(single) == (2 if drop_last else 3)
    for whole, part0, part1 in zip(single, *ranks):
        assert torch.equal(whole.indices, torch.cat([part0.indices, part1.indices]))
        assert torch.equal(whole.images, torch.cat([part0.images, part1.images]))


def test_resume_with_start_batch_and_subset_indices() -> None:
    source = tensor_source(n=23)
    full = [b.indices for b in BatchIterator(source, 4, shuffle=True, drop_last=True, seed=5, epoch=3)]
    resumed = BatchIterator(source, 4, shuffle=True, drop_last=True, seed=5, epoch=3, start_batch=2)
    assert len(resumed) == len(full) - 2 and resumed.batches_per_epoch == len(full)
    assert all(torch.equal(a, b.indices) for a, b in zip(full[2:], resumed, strict=True))
    resumed.set_epoch(4)
    assert len(resumed) == len(full)
    with pytest.raises(ValueError):
        resumed.set_epoch(0, start_batch=len(full) + 1)
    subset = torch.tensor([1, 4, 9, 16])
    sub = BatchIterator(source, 3, shuffle=True, drop_last=False, seed=0, indices=subset)
    assert sorted(_all_indices(sub)) == subset.tolist()


def test_folder_iteration_with_workers_matches_direct(image_folder: Path) -> None:
    source = folder_source(image_folder, canvas=12)
    kwargs = dict(shuffle=True, drop_last=False, seed=0, epoch=0)
    direct = list(BatchIterator(source, 5, **kwargs))
    workers = BatchIterator(source, 5, num_workers=1, **kwargs)
    for epoch in range(2):  # the persistent worker is reused after set_epoch
        workers.set_epoch(epoch)
        expected = direct if epoch == 0 else list(BatchIterator(source, 5, **{**kwargs, "epoch": 1}))
        got = list(workers)
        assert len(got) == len(expected) == 3
        for a, b in zip(expected, got):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    workers.close()


# ----------------------------------------------------------------------------- subsets
def test_label_fraction_indices_balanced_and_seeded() -> None:
    labels = torch.cat([torch.zeros(100), torch.ones(50), torch.full((3,), 2), torch.full((7,), -1)]).long()
    labels = labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(0))]
    chosen = label_fraction_indices(labels, 0.1, seed=0)
    assert torch.equal(chosen, chosen.sort().values) and chosen.unique().numel() == chosen.numel()
    assert torch.bincount(labels[chosen], minlength=3).tolist() == [10, 5, 1]  # >= 1 per class
    assert (labels[chosen] >= 0).all()
    assert torch.equal(chosen, label_fraction_indices(labels, 0.1, seed=0))
    assert not torch.equal(chosen, label_fraction_indices(labels, 0.1, seed=1))
    assert label_fraction_indices(labels, 1.0, seed=0).numel() == 153
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(DataError, match="0 < fraction <= 1"):
            label_fraction_indices(labels, bad, seed=0)


def test_labeled_list_indices(image_folder: Path, tmp_path: Path) -> None:
    source = folder_source(image_folder)
    listing = tmp_path / "1percent.txt"
    listing.write_text("# labelled images\n\nred/red1.JPG\ngreen0.png\n  blue3.jpeg  \n./red/red1.JPG\n")
    chosen = labeled_list_indices(source, listing)
    assert [source.paths[i] for i in chosen.tolist()] == ["blue/blue3.jpeg", "green/green0.png", "red/red1.JPG"]
    listing.write_text("red/red1.JPG\nmissing.png\nred/nope.png\n")
    with pytest.raises(DataError, match="2 of 3 entries name no image.*lines 2, 3") as info:
        labeled_list_indices(source, listing)
    assert "missing.png" not in str(info.value) and "nope" not in str(info.value)  # contents never echoed
    cached = cache_in_memory(source, num_workers=0)  # paths survive caching
    listing.write_text("green0.png\n")
    assert labeled_list_indices(cached, listing).tolist() == [4]


def test_labeled_list_ambiguous_and_pathless(tmp_path: Path, make_image) -> None:
    for cls in ("a", "b"):
        make_image(tmp_path / "dup" / "train" / cls / "same.png", (4, 4), (1, 1, 1))
    source = folder_source(tmp_path / "dup")
    listing = tmp_path / "list.txt"
    listing.write_text("same.png\n")
    with pytest.raises(DataError, match="several files"):
        labeled_list_indices(source, listing)
    listing.write_text("b/same.png\n")
    assert labeled_list_indices(source, listing).tolist() == [1]
    with pytest.raises(DataError, match="folder dataset"):
        labeled_list_indices(tensor_source(), listing)


def test_make_split(image_folder: Path, tmp_path: Path) -> None:
    source = folder_source(image_folder)
    labeled, unlabeled = make_split(source, label_fraction=0.5, seed=0)
    assert labeled.numel() == 6 and torch.equal(unlabeled, torch.arange(12))
    listing = tmp_path / "l.txt"
    listing.write_text("red2.Png\n")
    assert make_split(source, labeled_list=listing).labeled.tolist() == [10]
    assert make_split(source).labeled.numel() == 12
    assert make_split(source, label_fraction=0.5, labeled_list=listing).labeled.tolist() == [10]  # list wins


# ----------------------------------------------------------------------------- datasets
def test_load_folder_dataset(image_folder: Path) -> None:
    train = load_dataset(str(image_folder), split="train", image_size=8, num_workers=0, progress=False)
    assert isinstance(train, TensorImageSource)  # tiny: cached automatically
    assert train.classes == CLASSES and len(train) == 12 and train.canvas_size == (8, 8)
    on_disk = load_dataset(image_folder, split="train", image_size=8, cache=False)
    assert isinstance(on_disk, FolderImageSource)
    assert torch.equal(train.get_batch(range(12)).images, on_disk.get_batch(range(12)).images)
    assert isinstance(load_dataset(image_folder, image_size=8, max_cache_bytes=100), FolderImageSource)
    test = load_dataset(image_folder, split="test", image_size=8, num_workers=0)
    assert len(test) == 6 and test.paths[0] == "blue/bluet0.jpg"
    (image_folder / "test").rename(image_folder / "val")
    assert len(load_dataset(image_folder, split="val", image_size=8, num_workers=0)) == 6
    (image_folder / "val").rename(image_folder.parent / "elsewhere")
    with pytest.raises(FileNotFoundError, match="no evaluation split"):  # also a DataError
        load_dataset(image_folder, split="test", image_size=8)
    inferred = load_dataset(image_folder, cache=False)  # canvas from the first images
    assert inferred.canvas_size == (10, 10)
    assert load_dataset(image_folder, canvas_size=5, cache=False).canvas_size == (5, 5)
    assert len(load_dataset(image_folder, image_size=8, max_per_class=1, num_workers=0)) == 3
    info = describe(train)
    assert info["num_images"] == 12 and info["num_classes"] == 3 and info["canvas_size"] == (8, 8)
    assert info["in_memory"] and info["memory_bytes"] == 12 * 3 * 8 * 8


def test_canvas_for_image_size() -> None:
    assert canvas_for_image_size(32) == 32 and canvas_for_image_size(224) == 256
    assert canvas_for_image_size(96) == 110


def test_load_dataset_errors(tmp_path: Path, image_folder: Path) -> None:
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset(str(tmp_path / "nope"))
    for name in ("cifar10", "stl10"):
        with pytest.raises(DataError, match="--download"):
            load_dataset(name, data_root=tmp_path / "empty", download=False)
    with pytest.raises(DataError, match="splits"):
        load_dataset("stl10", split="validation", data_root=tmp_path)
    with pytest.raises(DataError, match="splits"):
        load_dataset(image_folder, split="unlabeled")
    assert set(DATASET_NAMES) == {"digits", "cifar10", "cifar100", "stl10"}


def test_torchvision_sets_are_wrapped_in_memory(monkeypatch) -> None:
    """CIFAR arrays are NHWC, STL-10 arrays NCHW with label -1 for 'unlabeled'; no files needed."""
    from types import SimpleNamespace

    from simclrv2.data import torchvision_sets

    cifar = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    cifar[1, 0, 0] = (1, 2, 3)
    stl = np.zeros((3, 3, 96, 96), dtype=np.uint8)
    fakes = {
        "cifar10": SimpleNamespace(data=cifar, targets=[0, 1, 2, 1], classes=["a", "b", "c"]),
        "stl10": SimpleNamespace(data=stl, labels=np.array([-1, -1, -1]), classes=["x", "y"]),
    }
    monkeypatch.setattr(torchvision_sets, "_construct", lambda name, root, split, download: fakes[name])
    source = load_dataset("CIFAR10", split="test")
    assert source.canvas_size == (32, 32) and source.labels.tolist() == [0, 1, 2, 1]
    assert source.get_batch([1]).images[0, :, 0, 0].tolist() == [1, 2, 3]
    assert len(load_dataset("cifar10", max_per_class=1)) == 3
    unlabeled = load_dataset("stl10", split="unlabeled")
    assert unlabeled.canvas_size == (96, 96) and describe(unlabeled)["num_labeled"] == 0


def test_digits_dataset_offline_fixed_split() -> None:
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    assert (len(train), len(test)) == (1500, 297)
    assert train.classes == test.classes == [str(d) for d in range(10)]
    assert train.canvas_size == test.canvas_size == (32, 32)
    assert train.images.dtype == torch.uint8 and int(train.images.max()) == 255
    assert torch.bincount(train.labels).min() >= 140 and torch.bincount(test.labels).min() >= 25
    again = load_dataset("digits")
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
    # Nearest-neighbour 4x upsampling of 8x8 grayscale: constant 4x4 blocks, equal channels.
    blocks = train.images[:, 0].unfold(1, 4, 4).unfold(2, 4, 4)
    assert (blocks == blocks[..., :1, :1]).all() and (train.images[:, 0] == train.images[:, 2]).all()
    labels = torch.arange(1797) % 10
    tr, te = digits_split_indices(labels)
    assert torch.cat([tr, te]).sort().values.tolist() == list(range(1797))
    assert len(load_dataset("digits", max_per_class=7)) == 70


# ----------------------------------------------------------------------------- real data
@pytest.mark.skipif(
    not (CIFAR10_DIR / "train").is_dir(),
    reason=f"CIFAR-10 image folder not found at {CIFAR10_DIR} (set SIMCLRV2_CIFAR10_DIR to run this test)",
)
def test_real_cifar10_folder_subsample() -> None:
    scan = scan_image_folder(CIFAR10_DIR, max_per_class=20)
    assert len(scan["classes"]) == 10 and "airplane" in scan["classes"]
    assert len(scan["train"]) == 200 and scan["eval_split"] == "test"
    source = load_dataset(CIFAR10_DIR, split="train", image_size=32, max_per_class=20, num_workers=0)
    assert isinstance(source, TensorImageSource) and len(source) == 200
    assert source.classes == scan["classes"] and source.canvas_size == (32, 32)
    assert torch.bincount(source.labels).tolist() == [20] * 10
    batch = source.get_batch([0, 57, 199])
    assert batch.sizes.tolist() == [[32, 32]] * 3 and batch.images.float().std() > 10
    direct = FolderImageSource(scan["train"], scan["classes"], 32, root=CIFAR10_DIR / "train").get_batch([57])
    assert torch.equal(direct.images[0], batch.images[1])
