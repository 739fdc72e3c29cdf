"""Import of the released SimCLRv2 TF1 checkpoints (issue 13; SPEC §8).

The fixtures in ``../shared/tf_reference`` were written by the official TF1 code (random weights)
together with the official graph's outputs at every tap; these tests skip without them.
"""

from __future__ import annotations

import http.server
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from simclrv2.errors import CheckpointError, ConfigError
from simclrv2.interop.download import download_checkpoint
from simclrv2.interop.importer import convert_checkpoint
from simclrv2.interop.tf_bundle import TFCheckpoint, resolve_prefix
from simclrv2.interop.tf_names import infer_architecture, is_optimizer_slot, map_network
from simclrv2.models import count_params_paper, create_model

REF = Path(__file__).resolve().parents[2] / "shared" / "tf_reference"
needs_ref = pytest.mark.skipif(not REF.is_dir(), reason=f"reference TF checkpoints not found at {REF} "
                               "(../shared/tf_reference is provided in CI, not in a user's clone)")
FIXTURES = ["r50_0.125x_sk1", "r50_0.125x_sk0", "r18_0.25x_sk0_cifar"]
TABLE1_MILLIONS = {"r50_1x_sk0": 24, "r50_1x_sk1": 35, "r50_2x_sk0": 94, "r50_2x_sk1": 140, "r101_1x_sk0": 43,
                   "r101_1x_sk1": 65, "r101_2x_sk0": 170, "r101_2x_sk1": 257, "r152_1x_sk0": 58,
                   "r152_1x_sk1": 89, "r152_2x_sk0": 233, "r152_2x_sk1": 354, "r152_3x_sk1": 795}
TOLERANCE = 1e-4


def _spec(name: str) -> dict:
    return json.loads((REF / name / "spec.json").read_text())


def _taps(net, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Our outputs at the reference's tap names (feature maps back to NHWC)."""
    taps: dict[str, torch.Tensor] = {}
    hooks = [layer.bn.register_forward_hook(lambda _m, _i, out, j=j: taps.__setitem__(f"head_nl_{j}", out))
             for j, layer in enumerate(net.head.layers)]
    try:
        with torch.no_grad():
            taps.update(net.encoder.forward_features(x))
            taps["logits_sup"] = net(x)["logits"]
    finally:
        for h in hooks:
            h.remove()
    return {k: (v.permute(0, 2, 3, 1) if v.dim() == 4 else v).numpy() for k, v in taps.items()}


def _copy_fixture(name: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in (REF / name).iterdir():
        if f.name.startswith(("model.ckpt", "checkpoint")):
            shutil.copyfile(f, dest / f.name)
    return dest


# ------------------------------------------------------------------ parity with the official graph


@needs_ref
@pytest.mark.parametrize("name", FIXTURES)
def test_every_tap_matches_the_reference_graph(name: str) -> None:
    spec = _spec(name)
    net, report = convert_checkpoint(TFCheckpoint(REF / name), ft_proj_selector=spec["ft_proj_selector"])
    assert not net.training and report["global_step"] == spec["global_step"]
    ref = np.load(REF / name / "reference.npz")
    compared = []
    for size in spec["image_sizes"]:
        ours = _taps(net, torch.from_numpy(ref[f"images_{size}"]).permute(0, 3, 1, 2).contiguous())
        for tap, value in ours.items():
            key = f"{tap}_{size}"
            if key not in ref:
                continue
            expected = ref[key]
            assert value.shape == expected.shape, key
            err = float(np.abs(value - expected).max() / np.abs(expected).max())
            assert err < TOLERANCE, f"{name} {key}: relative error {err:.2e}"
            compared.append(key)
    assert len(compared) == len([k for k in ref.files if not k.startswith("images_")])


@needs_ref
def test_ema_imports_the_momentum_copy() -> None:
    ckpt = TFCheckpoint(REF / "r18_0.25x_sk0_cifar")
    live, _ = convert_checkpoint(ckpt, ft_proj_selector=2)
    ema, report = convert_checkpoint(ckpt, ft_proj_selector=2, ema=True)
    live_state, ema_state = live.state_dict(), ema.state_dict()
    for key in live_state:
        if key.endswith("num_batches_tracked"):
            continue
        factor = 1.0 if key.startswith("classifier.") else 0.9  # the fixture's EMA = 0.9 x live
        torch.testing.assert_close(ema_state[key], live_state[key] * factor, rtol=1e-6, atol=1e-7)
    assert report["classifier_source"] == "head_supervised/linear_layer/dense/" and "note" in report
    reasons = {u["reason"] for u in report["unused"]}
    assert "live weights (the EMA copy was imported)" in reasons


@needs_ref
@pytest.mark.parametrize("arch", sorted(TABLE1_MILLIONS))
def test_released_manifest_maps_completely(arch: str) -> None:
    manifest = json.loads((REF / "manifests" / f"{arch}.json").read_text())
    shapes = {n: tuple(s) for n, s in manifest["variables"]}
    info = infer_architecture(shapes)
    assert (info.arch, info.num_classes, info.num_proj_layers, info.cifar_stem) == (arch, 1000, 3, False)
    with torch.device("meta"):
        net = create_model(arch, num_classes=1000, ft_proj_selector=0)
    assignments = map_network(net, list(shapes))
    assert sorted(a.tf_name for a in assignments) == sorted(shapes)  # every variable, once
    own = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert sorted(a.key for a in assignments) == sorted(own)  # every parameter and buffer
    for a in assignments:
        moved = a.transform(np.broadcast_to(np.float32(0), shapes[a.tf_name]))
        assert tuple(moved.shape) == a.shape == tuple(own[a.key].shape), a.tf_name
    trunk = sum(int(np.prod(s)) for n, s in shapes.items() if n.startswith("base_model/"))
    assert trunk == count_params_paper(net.encoder)
    assert round(trunk / 1e6) == TABLE1_MILLIONS[arch]


# ------------------------------------------------------------------ the bundle reader


@needs_ref
def test_reader_accepts_directory_prefix_and_index(tmp_path: Path) -> None:
    prefix = REF / "r18_0.25x_sk0_cifar" / "model.ckpt-751"
    for given in (prefix.parent, prefix, Path(f"{prefix}.index"), Path(f"{prefix}.data-00000-of-00001")):
        assert resolve_prefix(given) == prefix
    ckpt = TFCheckpoint(prefix)
    spec = _spec("r18_0.25x_sk0_cifar")
    assert {n: e.shape for n, e in ckpt.entries.items()} == {n: tuple(s) for n, s in spec["variables"]}
    assert ckpt.read("global_step") == 751 and ckpt.read("global_step").dtype == np.int64
    assert ckpt.verify() == (REF / "r18_0.25x_sk0_cifar" / "model.ckpt-751.data-00000-of-00001").stat().st_size
    with pytest.raises(CheckpointError, match="no TF checkpoint"):
        TFCheckpoint(tmp_path / "model.ckpt-1")
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-9"\n')
    with pytest.raises(CheckpointError, match="model.ckpt-9.index does not exist"):
        TFCheckpoint(tmp_path)


@needs_ref
def test_corrupted_copies_fail_cleanly_naming_the_file(tmp_path: Path) -> None:
    src = _copy_fixture("r18_0.25x_sk0_cifar", tmp_path / "flip")
    data = src / "model.ckpt-751.data-00000-of-00001"
    ckpt = TFCheckpoint(src)
    victim = max(ckpt.entries.values(), key=lambda e: e.size if not is_optimizer_slot(e.name) else 0)
    raw = bytearray(data.read_bytes())
    raw[victim.offset + victim.size // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"crc32c of tensor '{victim.name}'"):
        convert_checkpoint(TFCheckpoint(src), ft_proj_selector=2)

    short = _copy_fixture("r18_0.25x_sk0_cifar", tmp_path / "short")
    data = short / "model.ckpt-751.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="is truncated or does not belong"):
        TFCheckpoint(short)

    index = _copy_fixture("r18_0.25x_sk0_cifar", tmp_path / "index") / "model.ckpt-751.index"
    raw = bytearray(index.read_bytes())
    raw[100] ^= 0xFF
    index.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="crc32c mismatch"):
        TFCheckpoint(index)
    index.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(CheckpointError, match="bad magic"):
        TFCheckpoint(index)

    # another checkpoint's data file under this index: sizes differ
    mixed = _copy_fixture("r18_0.25x_sk0_cifar", tmp_path / "mixed")
    shutil.copyfile(REF / "r50_0.125x_sk0" / "model.ckpt-751.data-00000-of-00001",
                    mixed / "model.ckpt-751.data-00000-of-00001")
    with pytest.raises(CheckpointError, match="r18|crc32c|truncated"):
        TFCheckpoint(mixed).verify()


# ------------------------------------------------------------------ the command


@needs_ref
def test_import_tf_command_writes_a_loadable_run_directory(tmp_path: Path) -> None:
    from simclrv2.cli.main import main
    from simclrv2.training.model_io import load_network

    classes = tmp_path / "classes.txt"
    classes.write_text("".join(f"class{i}\n" for i in range(10)))
    out = tmp_path / "imported"
    src = REF / "r18_0.25x_sk0_cifar" / "model.ckpt-751.index"
    assert main(["import-tf", str(src), "--ft-proj-selector", "2", "--classes", str(classes), "--out",
                 str(out), "--arch", "r18_0.25x_sk0"]) == 0
    net, meta = load_network(out)
    assert (meta["arch"], meta["stage"], meta["image_size"], meta["ft_proj_selector"]) == \
        ("r18_0.25x_sk0", "imported", 32, 2)
    assert meta["classes"] == [f"class{i}" for i in range(10)]
    ref = np.load(REF / "r18_0.25x_sk0_cifar" / "reference.npz")
    net.eval()
    with torch.no_grad():
        logits = net(torch.from_numpy(ref["images_32"]).permute(0, 3, 1, 2).contiguous())["logits"].numpy()
    assert np.abs(logits - ref["logits_sup_32"]).max() / np.abs(ref["logits_sup_32"]).max() < TOLERANCE
    results = json.loads((out / "results.json").read_text())
    spec_names = {n for n, _ in _spec("r18_0.25x_sk0_cifar")["variables"]}
    listed = {e["tf"] for e in results["imported"]} | {e["name"] for e in results["unused"]}
    assert listed == spec_names and results["num_imported"] == len(results["imported"])
    # a second import into the same directory, a wrong --arch, a wrong class count: exit 2, one line
    assert main(["import-tf", str(src), "--ft-proj-selector", "2", "--out", str(out)]) == 2
    classes.write_text("a\nb\n")
    assert main(["import-tf", str(src), "--ft-proj-selector", "2", "--classes", str(classes), "--out",
                 str(tmp_path / "x")]) == 2
    assert main(["import-tf", "--out", str(tmp_path / "z")]) == 2  # neither PATH nor --download
    assert main(["import-tf", str(src), "--cache-dir", str(tmp_path), "--out", str(tmp_path / "z")]) == 2
    assert main(["import-tf", "--download", "r50_1x_sk1", "--out", str(tmp_path / "z")]) == 2  # no --kind
    assert not (tmp_path / "z").exists()
    proc = subprocess.run([sys.executable, "-m", "simclrv2.cli.main", "import-tf", str(src), "--arch",
                           "r50_1x_sk0", "--kind", "finetuned_1pct", "--out", str(tmp_path / "y")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "holds a r18_0.25x_sk0 network" in proc.stderr and "not r50_1x_sk0" in proc.stderr


# ------------------------------------------------------------------ download


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with HTTP Range support (the stdlib handler has none), and a request log."""

    requests: list[tuple[str, str | None]] = []

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802
        path = Path(self.translate_path(self.path))
        self.requests.append((self.path, self.headers.get("Range")))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            data = data[start:]
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def bucket(tmp_path: Path):
    root = tmp_path / "bucket"
    _copy_fixture("r18_0.25x_sk0_cifar", root / "finetuned_1pct" / "r18_0.25x_sk0")
    handler = type("Handler", (_RangeHandler,), {"requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root, handler.requests
    finally:
        server.shutdown()
        server.server_close()


@needs_ref
def test_download_resumes_a_partial_file_and_verifies(bucket, tmp_path: Path) -> None:
    url, root, requests = bucket
    # released pointer files may name the writer's absolute path
    (root / "finetuned_1pct" / "r18_0.25x_sk0" / "checkpoint").write_text(
        'model_checkpoint_path: "gs://bucket/run/model.ckpt-751"\n')
    cache = tmp_path / "cache"
    folder = cache / "finetuned_1pct" / "r18_0.25x_sk0"
    folder.mkdir(parents=True)
    name = "model.ckpt-751.data-00000-of-00001"
    original = (REF / "r18_0.25x_sk0_cifar" / name).read_bytes()
    (folder / f"{name}.part").write_bytes(original[:3_000_000])
    got = download_checkpoint("r18_0.25x_sk0", "finetuned_1pct", cache_dir=cache, base_url=url, progress=False)
    assert got == folder and (folder / name).read_bytes() == original and not (folder / f"{name}.part").exists()
    assert (f"/finetuned_1pct/r18_0.25x_sk0/{name}", "bytes=3000000-") in requests
    # a second call uses the cache: nothing is fetched again but the pointer file
    before = len(requests)
    download_checkpoint("r18_0.25x_sk0", "finetuned_1pct", cache_dir=cache, base_url=url, progress=False)
    assert len(requests) == before
    # the command end to end
    from simclrv2.cli.main import main
    assert main(["import-tf", "--download", "r18_0.25x_sk0", "--kind", "finetuned_1pct", "--cache-dir",
                 str(cache), "--mirror", url, "--no-progress", "--ft-proj-selector", "2",
                 "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "model.safetensors").is_file()


@needs_ref
def test_download_rejects_a_tampered_file_and_reports_offline(bucket, tmp_path: Path) -> None:
    url, root, _ = bucket
    served = root / "finetuned_1pct" / "r18_0.25x_sk0" / "model.ckpt-751.data-00000-of-00001"
    raw = bytearray(served.read_bytes())
    raw[len(raw) // 3] ^= 0x01
    served.write_bytes(bytes(raw))
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match="integrity check"):
        download_checkpoint("r18_0.25x_sk0", "finetuned_1pct", cache_dir=cache, base_url=url, progress=False)
    assert not (cache / "finetuned_1pct" / "r18_0.25x_sk0" / served.name).exists()
    with pytest.raises(CheckpointError, match="HTTP 404"):
        download_checkpoint("r50_1x_sk0", "finetuned_1pct", cache_dir=cache, base_url=url, progress=False)
    with pytest.raises(ConfigError, match="kind"):
        download_checkpoint("r18_0.25x_sk0", "finetuned_2pct", cache_dir=cache, base_url=url)


def test_download_offline_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CheckpointError, match="are you offline"):
        download_checkpoint("r50_1x_sk1", "pretrained", cache_dir=tmp_path, base_url=f"http://127.0.0.1:{port}",
                            progress=False)


# ------------------------------------------------------------------ defaults per kind


@needs_ref
@pytest.mark.parametrize("name, kinds", [
    ("r50_0.125x_sk0", ["pretrained", "finetuned_100pct", "supervised", "distill_1pct"]),  # written with selector 0
    ("r50_0.125x_sk1", ["finetuned_1pct", "finetuned_10pct"]),                            # written with selector 1
])
def test_default_selector_of_each_kind_reads_what_the_reference_head_read(name: str, kinds: list[str]) -> None:
    """``--kind`` alone (no ``--ft-proj-selector``) must reproduce ``logits_sup`` of a checkpoint trained the way
    that kind was (SPEC §2.1, §2.2, §7; importer docstring): 0 for pretrained / 100% / supervised / distilled,
    1 for the 1% and 10% fine-tunes. The other selector gives other logits, so the check can fail."""
    spec = _spec(name)
    ref = np.load(REF / name / "reference.npz")
    size = min(spec["image_sizes"])  # the cheaper forward; logits_sup is recorded at both sizes
    x = torch.from_numpy(ref[f"images_{size}"]).permute(0, 3, 1, 2).contiguous()
    expected = ref[f"logits_sup_{size}"]
    ckpt = TFCheckpoint(REF / name)

    def error(net) -> float:
        with torch.no_grad():
            logits = net(x)["logits"].numpy()
        return float(np.abs(logits - expected).max() / np.abs(expected).max())

    for kind in kinds:
        net, report = convert_checkpoint(ckpt, kind=kind)
        assert report["ft_proj_selector"] == spec["ft_proj_selector"], kind
        assert error(net) < TOLERANCE, kind
    other, _ = convert_checkpoint(ckpt, ft_proj_selector=1 - spec["ft_proj_selector"])
    assert error(other) > 0.01


@needs_ref
def test_import_records_the_tf1_eval_resize_kernel(tmp_path: Path) -> None:
    import simclrv2
    from simclrv2.interop.importer import import_tf_checkpoint

    out = tmp_path / "imported"
    report = import_tf_checkpoint(REF / "r50_0.125x_sk0", out, kind="supervised")
    assert report["eval_resize_mode"] == "bicubic_legacy"
    model = simclrv2.load_model(out)
    assert model.resize_mode == "bicubic_legacy" and "resize_bicubic" in model.input_contract
    assert simclrv2.load_model(out, resize_mode="bicubic").resize_mode == "bicubic"
