"""``simclrv2 predict``: classify image files and folders with a trained classifier.

One row per readable image: ``path``, ``label`` (the class name stored in the checkpoint), ``prob``
(its softmax probability) and the ``top_k`` best classes, most likely first, as CSV columns
``label_1, prob_1, ..., label_k, prob_k`` or, with ``fmt="jsonl"``, as the lists ``labels`` and
``probs`` of one JSON object per line. Unreadable files are listed on stderr and skipped
(``strict``: exit 2 instead). Checkpoints without a classifier -- pretraining runs, whose online
linear probe is a training monitor -- are refused (fine-tune first, or use ``embed``).
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from simclrv2.errors import ConfigError, TrainingError
from simclrv2.inference.images import collect_images
from simclrv2.inference.model import load_model, top_k_rows
from simclrv2.inference.runner import iter_outputs, make_runtime

__all__ = ["FORMATS", "predict_files", "csv_header"]

FORMATS = ("csv", "jsonl")


def csv_header(top_k: int) -> list[str]:
    cols = ["path", "label", "prob"]
    for j in range(1, top_k + 1):
        cols += [f"label_{j}", f"prob_{j}"]
    return cols


def _write_rows(handle: TextIO, fmt: str, rows: list[dict[str, Any]], writer: Any) -> None:
    for row in rows:
        if fmt == "jsonl":
            handle.write(json.dumps(row) + "\n")
        else:
            flat = [row["path"], row["label"], f"{row['prob']:.6f}"]
            for label, prob in zip(row["labels"], row["probs"]):
                flat += [label, f"{prob:.6f}"]
            writer.writerow(flat)


def predict_files(checkpoint: str | Path, paths: Sequence[str | Path], *, out: str | Path | None = None,
                  fmt: str = "csv", top_k: int = 5, batch_size: int = 256, device: str = "auto",
                  precision: str = "auto", strict: bool = False, progress: bool = True,
                  resize_mode: str | None = None) -> dict[str, Any]:
    """Classify ``paths`` (files or folders, recursive) and write the rows to ``out`` (stdout if None).

    ``resize_mode``: the evaluation resize kernel (default: the checkpoint's, see
    :func:`simclrv2.training.evaluate.eval_resize_mode`).

    Returns ``{"num_images", "skipped", "seconds", "images_per_s", "out"}``."""
    if fmt not in FORMATS:
        raise ConfigError(f"format: must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if top_k < 1:
        raise ConfigError(f"top-k: must be >= 1; got {top_k}")
    images = collect_images(paths, strict=strict)  # cheap header checks first: bad input fails fast
    model = load_model(checkpoint, resize_mode=resize_mode)
    model.require_classifier("predict")
    k = min(top_k, len(model.classes))
    rt = make_runtime(device, precision)
    model = model.to(rt.device)

    target = Path(out) if out is not None else None
    tmp = None if target is None else target.with_name(target.name + ".partial")
    handle: TextIO
    try:
        handle = sys.stdout if tmp is None else open(tmp, "w", newline="", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"out: cannot write {target} ({exc.strerror or exc})") from exc
    writer = csv.writer(handle) if fmt == "csv" else None
    if writer is not None:
        writer.writerow(csv_header(k))
    count = 0
    start = time.perf_counter()
    try:
        for files, _, logits in iter_outputs(model, images, rt, output="logits", batch_size=batch_size,
                                             strict=strict, progress=progress):
            rows = top_k_rows(logits, model.classes, k)
            for row, file in zip(rows, files):
                row["path"] = str(file)
            _write_rows(handle, fmt, [{"path": r["path"], **{x: r[x] for x in ("label", "prob", "labels", "probs")}}
                                      for r in rows], writer)
            count += len(rows)
        seconds = time.perf_counter() - start
        handle.flush()
        if tmp is not None:
            handle.close()
            os.replace(tmp, target)
    except OSError as exc:
        raise TrainingError(f"out: could not write {target or 'stdout'} ({exc.strerror or exc})") from exc
    finally:
        if tmp is not None:
            if not handle.closed:
                handle.close()
            if tmp.exists():
                tmp.unlink()
    skipped = len(images.skipped) + (len(images.files) - count)
    rate = count / seconds if seconds > 0 else float("inf")
    print(f"predicted {count} images ({skipped} skipped) in {seconds:.2f} s, {rate:.1f} images/s"
          f"{'' if target is None else f' -> {target}'}", file=sys.stderr)
    return {"num_images": count, "skipped": skipped, "seconds": seconds, "images_per_s": rate,
            "out": None if target is None else str(target)}
