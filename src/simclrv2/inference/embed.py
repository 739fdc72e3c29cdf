"""``simclrv2 embed``: one vector per image, for retrieval, clustering or other classifiers.

``layer`` picks the activation (:meth:`SimCLRNet.output_names`): ``features`` (encoder output,
the head input), ``proj_1`` .. ``proj_k`` (outputs of the projection-head layers the checkpoint
kept) or ``projection`` (the last one, what NT-Xent sees in pretraining).

The output format follows the file name:

* ``.safetensors`` -- tensors ``embeddings`` (float32 ``[N, D]``) and, when every folder given had
  class sub-folders, ``labels`` (int64 ``[N]``); the metadata (strings) holds ``paths`` and
  ``classes`` (JSON lists), ``layer``, ``checkpoint`` and the input contract;
* ``.npz`` -- arrays ``embeddings``, ``paths`` (str), ``labels`` / ``classes`` when present, read
  with ``numpy.load(file)`` (no pickle).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simclrv2.errors import ConfigError, TrainingError
from simclrv2.inference.images import collect_images
from simclrv2.inference.model import load_model
from simclrv2.inference.runner import iter_outputs, make_runtime

__all__ = ["EMBED_SUFFIXES", "embed_files", "load_embeddings"]

EMBED_SUFFIXES = (".safetensors", ".npz")


def _write(out: Path, embeddings: torch.Tensor, paths: list[str], labels: list[int] | None,
           classes: list[str], info: dict[str, str]) -> None:
    tmp = out.with_name(out.name + ".partial" + out.suffix)
    try:
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            tensors = {"embeddings": embeddings.contiguous()}
            if labels is not None:
                tensors["labels"] = torch.tensor(labels, dtype=torch.long)
            meta = {**info, "paths": json.dumps(paths), "classes": json.dumps(classes)}
            save_file(tensors, str(tmp), metadata=meta)
        else:
            arrays: dict[str, Any] = {"embeddings": embeddings.numpy(), "paths": np.array(paths, dtype=str)}
            if labels is not None:
                arrays["labels"] = np.array(labels, dtype=np.int64)
                arrays["classes"] = np.array(classes, dtype=str)
            for key, value in info.items():
                arrays[key] = np.array(value, dtype=str)
            with open(tmp, "wb") as handle:
                np.savez(handle, **arrays)
        os.replace(tmp, out)
    except OSError as exc:
        raise TrainingError(f"out: could not write {out} ({exc.strerror or exc})") from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def embed_files(checkpoint: str | Path, paths: Sequence[str | Path], out: str | Path, *, layer: str = "features",
                batch_size: int = 256, device: str = "auto", precision: str = "auto", strict: bool = False,
                progress: bool = True, resize_mode: str | None = None) -> dict[str, Any]:
    """Embed every readable image under ``paths`` and write ``out`` (``.safetensors`` or ``.npz``).

    ``resize_mode``: the evaluation resize kernel (default: the checkpoint's).

    Returns ``{"num_images", "dim", "layer", "out", "seconds", "images_per_s"}``."""
    out = Path(out)
    if out.suffix not in EMBED_SUFFIXES:
        raise ConfigError(f"out: {out} must end in {' or '.join(EMBED_SUFFIXES)} (the output format)")
    images = collect_images(paths, strict=strict)  # cheap header checks first: bad input fails fast
    model = load_model(checkpoint, resize_mode=resize_mode)
    if layer not in model.output_names() or layer == "logits":
        names = [n for n in model.output_names() if n != "logits"]
        raise ConfigError(f"layer: {layer!r} is not a layer of this network; choose one of {', '.join(names)}")
    rt = make_runtime(device, precision)
    model = model.to(rt.device)
    chunks: list[torch.Tensor] = []
    positions: list[int] = []
    start = time.perf_counter()
    for _, rows, vectors in iter_outputs(model, images, rt, output=layer, batch_size=batch_size, strict=strict,
                                         progress=progress):
        chunks.append(vectors)
        positions += rows
    seconds = time.perf_counter() - start
    if not chunks:
        raise ConfigError("none of the given images could be read")
    embeddings = torch.cat(chunks)
    files = [str(images.files[i]) for i in positions]
    labels = None if images.labels is None else [images.labels[i] for i in positions]
    info = {"layer": layer, "checkpoint": str(model.source), "arch": str(model.meta["arch"]),
            "input_contract": model.input_contract, "resize_mode": model.resize_mode}
    _write(out, embeddings, files, labels, images.classes if labels is not None else [], info)
    rate = len(files) / seconds if seconds > 0 else float("inf")
    print(f"embedded {len(files)} images ({layer}, dim {embeddings.shape[1]}) in {seconds:.2f} s, "
          f"{rate:.1f} images/s -> {out}", file=sys.stderr)
    return {"num_images": len(files), "dim": int(embeddings.shape[1]), "layer": layer, "out": str(out),
            "seconds": seconds, "images_per_s": rate}


def load_embeddings(path: str | Path) -> dict[str, Any]:
    """Read a file written by :func:`embed_files`: ``embeddings``, ``paths``, ``labels`` (or None),
    ``classes`` and ``layer``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        return {"embeddings": tensors["embeddings"], "labels": tensors.get("labels"),
                "paths": json.loads(meta.get("paths", "[]")), "classes": json.loads(meta.get("classes", "[]")),
                "layer": meta.get("layer")}
    with np.load(path, allow_pickle=False) as data:
        return {"embeddings": torch.from_numpy(data["embeddings"]),
                "labels": torch.from_numpy(data["labels"]) if "labels" in data else None,
                "paths": [str(p) for p in data["paths"]],
                "classes": [str(c) for c in data["classes"]] if "classes" in data else [],
                "layer": str(data["layer"]) if "layer" in data else None}
