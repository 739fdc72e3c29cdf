"""``simclrv2 export``: the classifier (or the encoder) as ONNX or TorchScript, checked for parity.

The exported graph is :class:`~simclrv2.models.network.SimCLRNetOutput` -- the trained network's
own layers returning one tensor (``logits``, or ``features`` for ``what="encoder"``) -- traced in
fp32 on the CPU with a dynamic batch dimension (ONNX ``dynamic_axes``; a TorchScript trace is
batch-independent because no layer reads the batch size). The input contract (float32 RGB in
[0, 1], NCHW, H = W = image size, no mean/std normalisation, SPEC §6 eval preprocessing) and the
class names are written into the file (ONNX ``metadata_props``; TorchScript extra file
``simclrv2.json``) and printed.

After writing, the file is loaded with its own runtime (onnxruntime / ``torch.jit.load``) and run
on sample inputs of another batch size than the trace's; the largest absolute difference from the
PyTorch fp32 model is printed. Above :data:`PARITY_TOLERANCE` the file is removed and the command
fails with exit code 1.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from simclrv2.errors import ConfigError, TrainingError
from simclrv2.inference.model import InferenceModel, load_model

__all__ = ["EXPORT_FORMATS", "EXPORT_WHAT", "PARITY_TOLERANCE", "export_file", "export_metadata"]

EXPORT_FORMATS = ("onnx", "torchscript")
EXPORT_WHAT = ("classifier", "encoder")
PARITY_TOLERANCE = 1e-4
ONNX_OPSET = 17
TORCHSCRIPT_META_FILE = "simclrv2.json"


def export_metadata(model: InferenceModel, output: str) -> dict[str, str]:
    """String metadata stored in the exported file."""
    return {
        "simclrv2.input_contract": model.input_contract,
        "simclrv2.input": "images",
        "simclrv2.output": output,
        "simclrv2.image_size": str(model.image_size),
        "simclrv2.resize_mode": model.resize_mode,
        "simclrv2.classes": json.dumps(model.classes if output == "logits" else []),
        "simclrv2.arch": str(model.meta.get("arch")),
        "simclrv2.stage": model.stage,
    }


def _sample_inputs(image_size: int, batch: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((batch, 3, image_size, image_size), generator=generator)


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"format: onnx needs the onnx and onnxruntime packages ({exc}); install them with "
                          "pip install 'simclrv2[export]'") from exc


def _write_onnx(view: torch.nn.Module, example: torch.Tensor, out: Path, output: str, meta: dict[str, str]) -> None:
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(view, (example,), str(out), input_names=["images"], output_names=[output],
                          dynamic_axes={"images": {0: "batch"}, output: {0: "batch"}}, opset_version=ONNX_OPSET,
                          dynamo=False)
    proto = onnx.load(str(out))
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = meta["simclrv2.input_contract"]
    onnx.save(proto, str(out))


def _run_onnx(out: Path, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def _write_torchscript(view: torch.nn.Module, example: torch.Tensor, out: Path, meta: dict[str, str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(view, example)
        torch.jit.save(traced, str(out), _extra_files={TORCHSCRIPT_META_FILE: json.dumps(meta)})


def _run_torchscript(out: Path, x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(out), map_location="cpu")
    with torch.no_grad():
        return loaded(x)


def read_torchscript_metadata(path: str | Path) -> dict[str, str]:
    """The metadata :func:`export_file` stored in a TorchScript file."""
    extra = {TORCHSCRIPT_META_FILE: ""}
    torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[TORCHSCRIPT_META_FILE])


def export_file(checkpoint: str | Path | InferenceModel, out: str | Path, *, fmt: str = "onnx",
                what: str = "classifier", tolerance: float = PARITY_TOLERANCE, verbose: bool = True,
                resize_mode: str | None = None) -> dict[str, Any]:
    """Write ``out`` and check it; returns ``{"out", "format", "output", "max_abs_diff", "metadata"}``.

    The graph takes already preprocessed images; ``resize_mode`` (default: the checkpoint's) is the
    resize kernel the input contract in the file's metadata names (``simclrv2.resize_mode`` and in
    ``simclrv2.input_contract``), the one ``evaluate`` / ``predict`` use for this checkpoint.

    Raises :class:`TrainingError` (exit 1, file removed) when the exported model differs from the
    PyTorch model by more than ``tolerance``."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"format: must be one of {', '.join(EXPORT_FORMATS)}; got {fmt!r}")
    if what not in EXPORT_WHAT:
        raise ConfigError(f"what: must be one of {', '.join(EXPORT_WHAT)}; got {what!r}")
    if fmt == "onnx":
        _require_onnx()
    model = checkpoint if isinstance(checkpoint, InferenceModel) else load_model(checkpoint)
    if resize_mode is not None:
        model = copy.copy(model).set_resize_mode(resize_mode)  # the caller's model keeps its own
    model = model.to("cpu").float()
    output = "logits" if what == "classifier" else "features"
    if what == "classifier":
        model.require_classifier("export --what classifier")
    out = Path(out)
    if not out.parent.is_dir():
        raise ConfigError(f"out: folder {out.parent} does not exist")
    view = model.output_view(output)
    meta = export_metadata(model, output)
    example = _sample_inputs(model.image_size, 2, seed=0)
    try:
        if fmt == "onnx":
            _write_onnx(view, example, out, output, meta)
        else:
            _write_torchscript(view, example, out, meta)
    except OSError as exc:
        out.unlink(missing_ok=True)
        raise TrainingError(f"out: could not write {out} ({exc.strerror or exc})") from exc
    view.eval()  # exporters restore the mode they found; make sure the reference runs in eval mode
    check = torch.cat([_sample_inputs(model.image_size, 3, seed=1),
                       torch.zeros((1, 3, model.image_size, model.image_size)),
                       torch.ones((1, 3, model.image_size, model.image_size))])
    with torch.no_grad():
        reference = view(check).float()
    got = _run_onnx(out, check) if fmt == "onnx" else _run_torchscript(out, check)
    if got.shape != reference.shape:
        out.unlink(missing_ok=True)
        raise TrainingError(f"export: the exported model returned shape {tuple(got.shape)} for a batch of "
                            f"{len(check)}, PyTorch {tuple(reference.shape)}; {out} was removed")
    diff = float((got.float() - reference).abs().max())
    if verbose:
        print(f"wrote {out} ({fmt}, {what}: images -> {output} {tuple(reference.shape[1:])}, dynamic batch)")
        print(f"input contract: {model.input_contract}")
        if output == "logits":
            print(f"classes ({len(model.classes)}): {', '.join(model.classes)}")
        print(f"parity on {len(check)} sample inputs: max abs diff vs PyTorch fp32 = {diff:.3g} "
              f"(tolerance {tolerance:g})")
    if not diff <= tolerance:
        out.unlink(missing_ok=True)
        raise TrainingError(f"export: the exported {fmt} model differs from the PyTorch model by {diff:.3g} "
                            f"(> {tolerance:g}); {out} was removed")
    return {"out": str(out), "format": fmt, "output": output, "max_abs_diff": diff, "metadata": meta}
