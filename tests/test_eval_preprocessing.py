"""Evaluation preprocessing equal to the reference (issue 13 item 6; SPEC §6 'Eval preprocessing').

The expected values are computed here, independently of the code under test, from the SPEC's
description of the reference's ``center_crop`` / ``_compute_crop_shape`` (float32, rint, offset
``((H - h) + 1) // 2``) and of the TF resize kernels, on the full-resolution pixels read with PIL.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import simclrv2
from simclrv2.augment import EvalTransform
from simclrv2.cli.main import main
from simclrv2.data import TensorImageSource, load_dataset
from simclrv2.data.datasets import load_eval_dataset
from simclrv2.data.decode import decode_image, eval_input
from simclrv2.data.sources import EvalImageSource
from simclrv2.errors import DataError
from simclrv2.inference.embed import load_embeddings
from simclrv2.inference.export import read_torchscript_metadata
from simclrv2.models import create_model
from simclrv2.training.evaluate import EVAL_RESIZE_MODE_KEY, run_inference
from simclrv2.training.model_io import export_model, model_meta
from simclrv2.training.runtime import Runtime

CLASSES = ["ant", "bee"]
SIZES = [(300, 400), (400, 300), (257, 383)]  # (H, W): wide, tall, odd


def _smooth_rgb(h: int, w: int, seed: int) -> np.ndarray:
    """Spatially varying colour image (gradients + a few blobs + noise), uint8 [H, W, 3]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([128 + 100 * np.sin(xx / (9 + 3 * c) + yy / (13 + c) + c) for c in range(3)], axis=-1)
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _write(path: Path, h: int, w: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_smooth_rgb(h, w, seed)).save(path)
    return path


# ---- the reference, written from the SPEC (not through simclrv2) ----------------------------------


def _spec_center_crop_box(h: int, w: int, out_h: int, out_w: int, proportion: float = 0.875):
    """``_compute_crop_shape`` + ``center_crop`` offsets of the TF1 reference, in float32 as TF."""
    f32 = np.float32
    aspect_ratio = out_h / out_w  # the reference passes height / width
    image_w, image_h = f32(w), f32(h)
    if f32(aspect_ratio) > image_w / image_h:  # requested aspect ratio wider than the image
        crop_h = int(np.rint(f32(proportion / aspect_ratio) * image_w))
        crop_w = int(np.rint(f32(proportion) * image_w))
    else:
        crop_h = int(np.rint(f32(proportion) * image_h))
        crop_w = int(np.rint(f32(proportion * aspect_ratio) * image_h))
    return ((h - crop_h) + 1) // 2, ((w - crop_w) + 1) // 2, crop_h, crop_w


def _keys(x: float, a: float) -> float:
    x = abs(x)
    if x <= 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


def _resize_matrix(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """Dense [n_out, n_in] matrix of TF's resize_bicubic along one axis.

    ``bicubic``: TF2 (half_pixel_centers=True): source (i + 0.5) * scale - 0.5, a = -0.5, taps
    outside the image dropped and the rest renormalised. ``bicubic_legacy``: TF1 (both flags False):
    source i * scale, a = -0.75, taps clamped to the edge. Both quantise the fraction to 1/1024 (the
    kernel's coefficient table) and compute coordinates in float32."""
    f32 = np.float32
    scale = f32(n_in) / f32(n_out)
    a = -0.75 if mode == "bicubic_legacy" else -0.5
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        loc = f32(i) * scale if mode == "bicubic_legacy" else (f32(i) + f32(0.5)) * scale - f32(0.5)
        base = math.floor(loc)
        frac = round(float(loc - f32(base)) * 1024) / 1024
        taps = {}
        for off in (-1, 0, 1, 2):
            j, wgt = base + off, _keys(frac - off, a)
            if mode == "bicubic_legacy":
                j = min(max(j, 0), n_in - 1)
            elif not 0 <= j < n_in:
                continue
            taps[j] = taps.get(j, 0.0) + wgt
        total = sum(taps.values()) if mode == "bicubic" else 1.0
        for j, wgt in taps.items():
            m[i, j] = wgt / total
    return m


def _reference_eval(path: Path, size: int, mode: str) -> np.ndarray:
    """float [3, S, S]: the reference's preprocess_for_eval of the file at full resolution."""
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
    h, w = pixels.shape[:2]
    top, left, ch, cw = _spec_center_crop_box(h, w, size, size)
    crop = pixels[top:top + ch, left:left + cw].transpose(2, 0, 1)
    out = _resize_matrix(ch, size, mode) @ crop @ _resize_matrix(cw, size, mode).T  # rows, then columns
    return np.clip(out, 0.0, 1.0)


def test_spec_crop_box_of_a_400x300_image():
    # 0.875 * 300 = 262.5 -> rint 262 (half to even); offsets ((300-262)+1)//2, ((400-262)+1)//2
    assert _spec_center_crop_box(300, 400, 224, 224) == (19, 69, 262, 262)
    assert _spec_center_crop_box(400, 300, 224, 224) == (69, 19, 262, 262)


@pytest.mark.parametrize("mode", ["bicubic", "bicubic_legacy"])
@pytest.mark.parametrize("hw", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_large_image_is_the_reference_crop_of_the_full_resolution_image(tmp_path, hw, mode):
    h, w = hw
    path = _write(tmp_path / "img.png", h, w, seed=h + w)
    got = eval_input(path, EvalTransform(224, resize_mode=mode)).double().numpy()
    expected = _reference_eval(path, 224, mode)
    assert got.shape == (3, 224, 224)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)
    # the former path (letterbox into a 256-px canvas first) is measurably different
    canvas, valid = decode_image(path, (256, 256))
    old = EvalTransform(224, resize_mode=mode)(canvas[None], sizes=torch.tensor([valid]))[0].double().numpy()
    assert np.abs(old - expected).max() > 0.02


def test_legacy_and_tf2_kernels_differ(tmp_path):
    path = _write(tmp_path / "img.png", 300, 400, seed=3)
    legacy = eval_input(path, EvalTransform(224, resize_mode="bicubic_legacy"))
    tf2 = eval_input(path, EvalTransform(224, resize_mode="bicubic"))
    assert (legacy - tf2).abs().max() > 1e-2


# ---- one preprocessing for evaluate / predict / embed / export ------------------------------------


def _randomised_net(image_size: int):
    net = create_model("r18_0.25x_sk0", image_size=image_size, num_proj_layers=2, num_classes=2,
                       ft_proj_selector=0, device="meta").to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1:
                p.normal_(0, (1.0 / p[0].numel()) ** 0.5, generator=g)
            else:
                p.zero_()
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
                m.num_batches_tracked.zero_()
                if m.weight is not None:
                    m.weight.fill_(1.0)
        net.classifier.weight.normal_(0, 2.0, generator=g)
    return net.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 40-px classifier (centre crop on) and an evaluation folder of large non-square images."""
    root = tmp_path_factory.mktemp("evalprep")
    data = root / "data"
    for c, name in enumerate(CLASSES):
        for i, (h, w) in enumerate([(300, 400), (250, 180)]):
            _write(data / "val" / name / f"{i}.png", h, w, seed=10 * c + i)
    size = 40
    net = _randomised_net(size)
    ckpt = root / "ckpt"
    ckpt.mkdir()
    meta = model_meta(arch="r18_0.25x_sk0", image_size=size, num_proj_layers=2, num_classes=2, classes=CLASSES,
                      stage="finetune")
    export_model(net, ckpt / "model.safetensors", meta)
    legacy = root / "legacy"
    legacy.mkdir()
    export_model(net, legacy / "model.safetensors", {**meta, EVAL_RESIZE_MODE_KEY: "bicubic_legacy"})
    files = sorted((data / "val").rglob("*.png"))
    return {"root": root, "data": data, "ckpt": ckpt, "legacy": legacy, "net": net, "size": size, "files": files}


def _manual(setup, mode: str) -> dict[str, torch.Tensor]:
    """The network on the SPEC reference inputs of every file (computed without simclrv2's preprocessing)."""
    x = torch.from_numpy(np.stack([_reference_eval(f, setup["size"], mode) for f in setup["files"]])).float()
    with torch.no_grad():
        out = setup["net"](x)
    return {"logits": out["logits"], "features": out["features"]}


def test_evaluate_predict_embed_agree_on_the_same_tensor(setup, capsys):
    tmp = setup["root"]
    manual = _manual(setup, "bicubic")
    # the evaluation split as `simclrv2 evaluate` reads it
    transform = EvalTransform(setup["size"])
    source = load_eval_dataset(setup["data"], transform, num_workers=0)
    assert source.preprocessed and len(source) == 4
    rt = Runtime(device=torch.device("cpu"), precision="fp32", channels_last=False)
    outs, labels = run_inference(setup["net"], source, rt, image_size=setup["size"], transform=transform,
                                 keys=("logits", "features"))
    order = [setup["files"].index(setup["data"] / "val" / p) for p in source.paths]
    torch.testing.assert_close(outs["logits"], manual["logits"][order], rtol=0, atol=2e-5)
    torch.testing.assert_close(outs["features"], manual["features"][order], rtol=0, atol=2e-5)
    # the command itself: the top-1 of those logits, and the preprocessing recorded
    out_dir = tmp / "eval_run"
    assert main(["evaluate", "--data", str(setup["data"]), "--checkpoint", str(setup["ckpt"]), "--out",
                 str(out_dir), "--device", "cpu", "--precision", "fp32", "--num-workers", "0",
                 "--no-progress"]) == 0
    results = json.loads((out_dir / "results.json").read_text())
    top1 = float((outs["logits"].argmax(1) == labels).float().mean())
    assert results["top1"] == pytest.approx(top1) and results["num_images"] == 4
    assert results["preprocessing"] == {"resize_mode": "bicubic", "center_crop": True, "crop_proportion": 0.875,
                                        "full_resolution": True}
    # predict: probabilities of the same logits
    csv_out = tmp / "pred.csv"
    assert main(["predict", "--checkpoint", str(setup["ckpt"]), str(setup["data"]), "--out", str(csv_out),
                 "--device", "cpu", "--precision", "fp32", "--top-k", "2", "--no-progress"]) == 0
    rows = {Path(r["path"]): r for r in csv.DictReader(csv_out.open())}
    probs = torch.softmax(manual["logits"], dim=1)
    for k, f in enumerate(setup["files"]):
        best = int(probs[k].argmax())
        assert rows[f]["label"] == CLASSES[best]
        assert float(rows[f]["prob"]) == pytest.approx(float(probs[k, best]), abs=2e-6)
    # embed: the same encoder features
    emb = tmp / "emb.safetensors"
    assert main(["embed", "--checkpoint", str(setup["ckpt"]), "--data", str(setup["data"]), "--out", str(emb),
                 "--device", "cpu", "--precision", "fp32", "--no-progress"]) == 0
    loaded = load_embeddings(emb)
    order = [setup["files"].index(Path(p)) for p in loaded["paths"]]
    torch.testing.assert_close(loaded["embeddings"], manual["features"][order], rtol=0, atol=2e-5)
    # the Python API
    torch.testing.assert_close(simclrv2.load_model(setup["ckpt"]).embed(setup["files"]), manual["features"],
                               rtol=0, atol=2e-5)
    capsys.readouterr()


def test_resize_mode_option_takes_effect(setup, capsys):
    tmp = setup["root"]
    legacy = _manual(setup, "bicubic_legacy")
    outs = {}
    for mode in ("bicubic", "bicubic_legacy"):
        emb = tmp / f"emb_{mode}.npz"
        assert main(["embed", "--checkpoint", str(setup["ckpt"]), "--data", str(setup["data"]), "--out", str(emb),
                     "--device", "cpu", "--precision", "fp32", "--no-progress", "--resize-mode", mode]) == 0
        loaded = load_embeddings(emb)
        order = [setup["files"].index(Path(p)) for p in loaded["paths"]]
        outs[mode] = loaded["embeddings"][torch.argsort(torch.tensor(order))]
    assert (outs["bicubic"] - outs["bicubic_legacy"]).abs().max() > 1e-3
    torch.testing.assert_close(outs["bicubic_legacy"], legacy["features"], rtol=0, atol=2e-5)  # = TF1 formula
    # a checkpoint that records the legacy kernel (as import-tf writes) uses it by default; the option wins
    assert simclrv2.load_model(setup["legacy"]).resize_mode == "bicubic_legacy"
    assert simclrv2.load_model(setup["legacy"], resize_mode="bilinear").resize_mode == "bilinear"
    assert simclrv2.load_model(setup["ckpt"]).resize_mode == "bicubic"
    out_dir = tmp / "eval_legacy"
    assert main(["evaluate", "--data", str(setup["data"]), "--checkpoint", str(setup["legacy"]), "--out",
                 str(out_dir), "--device", "cpu", "--num-workers", "0", "--no-progress"]) == 0
    assert json.loads((out_dir / "results.json").read_text())["preprocessing"]["resize_mode"] == "bicubic_legacy"
    out_dir = tmp / "eval_bilinear"
    assert main(["evaluate", "--data", str(setup["data"]), "--checkpoint", str(setup["legacy"]), "--out",
                 str(out_dir), "--device", "cpu", "--num-workers", "0", "--no-progress",
                 "--resize-mode", "bilinear"]) == 0
    assert json.loads((out_dir / "results.json").read_text())["preprocessing"]["resize_mode"] == "bilinear"
    # export records the kernel in the file's input contract
    pt = tmp / "m.pt"
    assert main(["export", "--checkpoint", str(setup["ckpt"]), "--format", "torchscript", "--out", str(pt),
                 "--resize-mode", "bicubic_legacy"]) == 0
    meta = read_torchscript_metadata(pt)
    assert meta["simclrv2.resize_mode"] == "bicubic_legacy"
    assert "resize_bicubic" in meta["simclrv2.input_contract"] and "full resolution" in meta["simclrv2.input_contract"]
    # an unknown kernel is a usage error naming the option
    with pytest.raises(SystemExit) as info:
        main(["predict", "--checkpoint", str(setup["ckpt"]), str(setup["data"]), "--resize-mode", "lanczos"])
    assert info.value.code == 2 and "--resize-mode" in capsys.readouterr().err


# ---- small images keep the in-memory fast path ------------------------------------------------------


def test_small_images_keep_the_memory_cache(tmp_path):
    for c, name in enumerate(CLASSES):
        for i, (h, w) in enumerate([(32, 32), (20, 24), (32, 32)]):
            _write(tmp_path / "test" / name / f"{i}.png", h, w, seed=c * 5 + i)
    transform = EvalTransform(32)
    assert not transform.center_crop
    source = load_eval_dataset(tmp_path, transform, num_workers=0)
    assert isinstance(source, TensorImageSource) and not source.preprocessed  # decoded once, into memory
    same = load_dataset(tmp_path, split="test", image_size=32, num_workers=0)
    assert isinstance(same, TensorImageSource) and source.paths == same.paths
    assert torch.equal(source.images, same.images) and torch.equal(source.sizes, same.sizes)
    # the per-file path (predict / embed / load_model) gives the network input evaluation gives
    batch = source.get_batch(range(len(source)))
    cached = transform(batch.images, sizes=batch.sizes)
    one_by_one = torch.stack([eval_input(source.root / p, transform) for p in source.paths])
    torch.testing.assert_close(one_by_one, cached, rtol=0, atol=0)
    # a 32x32 image is the raw image in [0, 1] (SPEC §6: no crop at CIFAR sizes)
    with Image.open(source.root / source.paths[0]) as img:
        raw = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).float() / 255
    assert source.paths[0].endswith("0.png") and tuple(source.sizes[0].tolist()) == (32, 32)
    torch.testing.assert_close(one_by_one[0], raw, rtol=0, atol=1e-7)  # x * (1/255) vs x / 255
    assert isinstance(load_eval_dataset("digits", EvalTransform(32)), TensorImageSource)


def test_a_file_unreadable_while_decoding_is_left_out_not_replaced(tmp_path):
    good = _write(tmp_path / "a.png", 60, 80, seed=1)
    jpeg = tmp_path / "b.jpg"
    Image.fromarray(_smooth_rgb(60, 80, 2)).save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[:300])  # the header survives, the scan data does not
    transform = EvalTransform(40)
    source = EvalImageSource([(good, 0), (jpeg, 1), (good, 1)], CLASSES, transform, skip_unreadable=True)
    batch = source.get_batch([0, 1, 2])
    assert batch.indices.tolist() == [0, 2] and batch.labels.tolist() == [0, 1]  # shorter, never substituted
    torch.testing.assert_close(batch.images[0], eval_input(good, transform), rtol=0, atol=0)
    strict = EvalImageSource([(good, 0), (jpeg, 1)], CLASSES, transform)
    with pytest.raises(DataError, match="b.jpg"):
        strict.get_batch([0, 1])
