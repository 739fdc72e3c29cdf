"""simclrv2 predict / embed / export and the Python inference API, on tiny nets and generated images."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import simclrv2
from simclrv2.augment import EvalTransform
from simclrv2.cli.main import main
from simclrv2.data.datasets import load_eval_dataset
from simclrv2.errors import CheckpointError, ConfigError, TrainingError
from simclrv2.inference.embed import embed_files, load_embeddings
from simclrv2.inference.export import export_file, read_torchscript_metadata
from simclrv2.models import create_model
from simclrv2.training.model_io import export_model, model_meta

FOLDER_CLASSES = ["cat", "dog", "fox"]
CKPT_CLASSES = ["alpha", "beta", "gamma"]  # differ from the folder names: labels must come from the checkpoint


def _randomise(net: torch.nn.Module, seed: int) -> None:
    """Random weights (fan-in scaled normal: cheaper than the truncated-normal init), non-trivial BN
    statistics and classifier, so outputs and probabilities differ per image."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1:
                p.normal_(0, (1.0 / p[0].numel()) ** 0.5, generator=g)
            else:
                p.zero_()
        for name, b in net.named_buffers():
            if name.endswith("num_batches_tracked"):
                b.zero_()
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
        if getattr(net, "classifier", None) is not None:
            net.classifier.weight.normal_(0, 0.5, generator=g)
            net.classifier.bias.normal_(0, 0.5, generator=g)


def _save_pair(root: Path, arch: str, image_size: int, seed: int) -> tuple[Path, Path]:
    """One randomised network saved twice, as the stages write it: the pretraining run (full 3-layer
    head, online probe) and its fine-tuned form (head cut after layer 1, classifier on it)."""
    net = create_model(arch, image_size=image_size, num_proj_layers=3, num_classes=3, ft_proj_selector=1,
                       device="meta").to_empty(device="cpu")
    _randomise(net, seed)
    common = dict(arch=arch, image_size=image_size, num_proj_layers=3, num_classes=3, ft_proj_selector=1,
                  classes=CKPT_CLASSES)
    pre, ft = root / "pre", root / "ft"
    pre.mkdir()
    ft.mkdir()
    export_model(net, pre / "model.safetensors", model_meta(**common, stage="pretrain"))
    net.head = net.head.truncate(1)
    export_model(net, ft / "model.safetensors", model_meta(**common, head_layers_kept=1, stage="finetune"))
    return pre, ft


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 class folders x 3 images of assorted sizes (one nested deeper)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, name in enumerate(FOLDER_CLASSES):
        for i, (h, w) in enumerate([(20, 24), (16, 16), (45, 30)]):
            d = root / name / ("sub" if i == 2 else "")
            d.mkdir(parents=True, exist_ok=True)
            base = np.zeros((h, w, 3)) + 60 * (c + 1)
            pixels = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    (root / "cifar").mkdir()
    (root / "sk").mkdir()
    pre, cifar = _save_pair(root / "cifar", "r18_1x_sk0", 16, seed=0)   # CIFAR stem (<= 32 px)
    _, sk = _save_pair(root / "sk", "r18_1x_sk1", 33, seed=1)           # SK: deep stem, SAME pools, centre crop
    return {"cifar": cifar, "sk": sk, "pretrain": pre}


@pytest.fixture(scope="module")
def models(ckpts) -> dict[str, "simclrv2.inference.InferenceModel"]:
    return {kind: simclrv2.load_model(path) for kind, path in ckpts.items()}


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_predict_csv_rows_columns_and_probabilities(folder, ckpts, models, capsys, tmp_path):
    out = tmp_path / "p.csv"
    code, _, err = _run(capsys, "predict", "--checkpoint", str(ckpts["cifar"]), str(folder), "--out", str(out),
                        "--top-k", "5", "--no-progress", "--batch-size", "4", "--precision", "fp32")
    assert code == 0, err
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 9  # every image, nested folders included, batches of 4 (last one partial)
    # top-k capped at the 3 classes of the checkpoint
    assert list(rows[0]) == ["path", "label", "prob", "label_1", "prob_1", "label_2", "prob_2", "label_3", "prob_3"]
    assert {Path(r["path"]) for r in rows} == set(folder.rglob("*.png"))
    for r in rows:
        probs = [float(r[f"prob_{j}"]) for j in (1, 2, 3)]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert probs == sorted(probs, reverse=True)
        assert r["label"] == r["label_1"] and float(r["prob"]) == probs[0]
        assert {r[f"label_{j}"] for j in (1, 2, 3)} == set(CKPT_CLASSES)  # names from the checkpoint
    assert "predicted 9 images" in err and "images/s" in err
    # the Python API gives the same answer as the command
    by_path = {r["path"]: r for r in rows}
    files = sorted(folder.rglob("*.png"))
    for pred, file in zip(models["cifar"].predict(files, top_k=2), files):
        assert pred["label"] == by_path[str(file)]["label"]
        assert pred["prob"] == pytest.approx(float(by_path[str(file)]["prob"]), abs=1e-5)
        assert len(pred["labels"]) == len(pred["probs"]) == 2
        assert sum(pred["probs"]) <= 1.0 + 1e-6


def test_predict_jsonl_skips_unreadable_and_strict_stops(folder, ckpts, capsys, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png")
    good = sorted(folder.rglob("*.png"))[:2]
    code, out, err = _run(capsys, "predict", "--checkpoint", str(ckpts["cifar"]), str(good[0]), str(bad),
                          str(good[1]), "--format", "jsonl", "--top-k", "2", "--no-progress", "--precision", "fp32")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in rows] == [str(good[0]), str(good[1])]
    assert all(set(r) == {"path", "label", "prob", "labels", "probs"} and len(r["labels"]) == 2 for r in rows)
    assert "broken.png" in err and "skipped" in err
    code, out, err = _run(capsys, "predict", "--checkpoint", str(ckpts["cifar"]), str(good[0]), str(bad),
                          "--strict", "--no-progress")
    assert code == 2 and "broken.png" in err and out == ""


def test_predict_refuses_a_pretraining_checkpoint(folder, ckpts, models, capsys, tmp_path):
    out = tmp_path / "p.csv"
    code, _, err = _run(capsys, "predict", "--checkpoint", str(ckpts["pretrain"]), str(folder), "--out", str(out))
    assert code == 2 and not out.exists()
    assert "pretraining checkpoint" in err and "finetune" in err and "embed" in err
    with pytest.raises(CheckpointError):
        models["pretrain"].predict(sorted(folder.rglob("*.png"))[:1])
    with pytest.raises(CheckpointError, match="Fine-tune it first"):
        export_file(models["pretrain"], tmp_path / "m.onnx", fmt="onnx")


def test_embed_shapes_labels_and_layers(folder, ckpts, models, capsys, tmp_path):
    out = tmp_path / "e.npz"
    code, _, err = _run(capsys, "embed", "--checkpoint", str(ckpts["pretrain"]), "--data", str(folder),
                        "--out", str(out), "--layer", "projection", "--no-progress")
    assert code == 0, err
    data = load_embeddings(out)
    assert data["embeddings"].shape == (9, 128) and data["embeddings"].dtype == torch.float32
    assert data["classes"] == FOLDER_CLASSES and data["layer"] == "projection"
    assert data["labels"].tolist() == [FOLDER_CLASSES.index(Path(p).relative_to(folder).parts[0])
                                       for p in data["paths"]]
    # safetensors; the fine-tuned net kept one head layer: features and proj_1 exist, the projection does not
    out = tmp_path / "e.safetensors"
    result = embed_files(ckpts["cifar"], [folder / "cat"], out, layer="proj_1", progress=False, precision="fp32")
    assert result["num_images"] == 3 and result["dim"] == 512
    data = load_embeddings(out)
    assert data["embeddings"].shape == (3, 512) and data["labels"] is None  # cat/ has no class sub-folders
    torch.testing.assert_close(data["embeddings"], models["cifar"].embed([Path(p) for p in data["paths"]],
                                                                         layer="proj_1"), atol=1e-5, rtol=1e-5)
    assert models["cifar"].embed(Path(data["paths"][0])).shape == (1, 512)  # features
    assert "projection" not in models["cifar"].output_names()
    code, _, err = _run(capsys, "embed", "--checkpoint", str(ckpts["cifar"]), "--data", str(folder),
                        "--out", str(out), "--layer", "projection")
    assert code == 2 and "proj_1" in err


@pytest.mark.parametrize("kind", ["sk", "cifar"])
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_parity(folder, ckpts, models, capsys, tmp_path, kind, fmt):
    out = tmp_path / f"m.{fmt}"
    what = "encoder" if (kind, fmt) == ("cifar", "torchscript") else "classifier"
    if (kind, fmt) == ("cifar", "onnx"):  # once through the command line
        code, stdout, err = _run(capsys, "export", "--checkpoint", str(ckpts[kind]), "--format", fmt,
                                 "--out", str(out), "--what", what)
        assert code == 0, err
        diff = float(stdout.split("max abs diff vs PyTorch fp32 = ")[1].split()[0])
        assert "float32 RGB in [0, 1], NCHW" in stdout and "alpha, beta, gamma" in stdout
    else:
        diff = export_file(models[kind], out, fmt=fmt, what=what, verbose=False)["max_abs_diff"]
    assert diff <= 1e-4
    # independently: real preprocessed images at a batch size the export never saw
    model = models[kind]
    x = model.preprocess(sorted(folder.rglob("*.png"))[:7])
    with torch.no_grad():
        expected = model.output_view("logits" if what == "classifier" else "features")(x)
    if fmt == "onnx":
        import onnx
        import onnxruntime as ort

        meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    else:
        meta = read_torchscript_metadata(out)
        got = torch.jit.load(str(out))(x)
    assert got.shape == expected.shape and (got - expected).abs().max() <= 1e-4
    assert meta["simclrv2.image_size"] == str(model.image_size)
    assert "no mean/std normalisation" in meta["simclrv2.input_contract"]
    assert json.loads(meta["simclrv2.classes"]) == (CKPT_CLASSES if what == "classifier" else [])


@pytest.mark.parametrize("kind", ["sk", "cifar"])
def test_every_output_view_is_scriptable_and_equals_eager(models, kind):
    """torch.jit.script (not only tracing) compiles the single-tensor views of an SK net and a
    CIFAR-stem net; scripting the full network used to fail in the stem's getattr loop."""
    import warnings

    model = models[kind]
    x = torch.rand(3, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(0))
    names = model.output_names()
    assert {"logits", "features", "proj_1"} <= set(names), names
    for name in names:
        view = model.output_view(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.script(view)
        with torch.no_grad():
            # to fp32 rounding, not bit for bit: eager inference may run a 3x3 convolution by Winograd
            # (simclrv2.models.conv_matmul), a scripted network runs oneDNN's
            torch.testing.assert_close(scripted(x), view(x), rtol=1e-5, atol=1e-5, msg=name)


def test_export_above_tolerance_fails_and_removes_the_file(models, tmp_path):
    out = tmp_path / "m.pt"
    with pytest.raises(TrainingError, match="was removed") as info:
        export_file(models["cifar"], out, fmt="torchscript", tolerance=-1.0, verbose=False)  # no diff is <= -1
    assert info.value.exit_code == 1 and not out.exists()


def test_load_model_preprocess_is_the_evaluation_path(folder, models, tmp_path):
    model = models["sk"]
    assert model.classes == CKPT_CLASSES and model.image_size == 33 and not model.training
    files = sorted(folder.rglob("*.png"))
    x = model.preprocess(files)
    assert x.shape == (9, 3, 33, 33) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    with Image.open(files[0]) as img:
        torch.testing.assert_close(model.preprocess(img), x[:1], rtol=0, atol=0)  # PIL image == its path
    # what `simclrv2 evaluate` feeds the network for an evaluation folder of these files
    for f in files:
        dest = tmp_path / "val" / f.relative_to(folder)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest)
    source = load_eval_dataset(tmp_path, EvalTransform(33), num_workers=0)
    assert source.preprocessed
    batch = source.get_batch(range(len(source)))
    order = [files.index(folder / p) for p in source.paths]
    torch.testing.assert_close(batch.images, x[order], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="float32"):
        model.predict(torch.zeros(1, 3, 32, 32))


def test_run_api_takes_cli_option_names():
    with pytest.raises(ConfigError, match="no_such_option"):
        simclrv2.run("finetune", no_such_option=1)
    with pytest.raises(ConfigError, match="stage"):
        simclrv2.run("fly")
