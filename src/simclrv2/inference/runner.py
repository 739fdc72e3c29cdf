"""Batched inference over image files on the fast path of ``simclrv2 evaluate``.

Same device handling as evaluation (:class:`simclrv2.training.runtime.Runtime`: bf16 autocast on
CPUs with native bf16 and on CUDA, channels_last) and the same preprocessing: each file becomes its
network input through :class:`~simclrv2.data.sources.EvalImageSource` (full resolution, centre crop
of 0.875 and one resize above 32 px with the model's :class:`~simclrv2.augment.EvalTransform`,
SPEC §6). Images are decoded one batch at a time, so a file that turns out to be unreadable only
while decoding (e.g. a truncated JPEG whose header is intact) is reported and skipped, or stops the
run with ``strict``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from simclrv2.errors import DataError
from simclrv2.inference.images import ImageList
from simclrv2.inference.model import InferenceModel
from simclrv2.training.runtime import Runtime, resolve_device, resolve_precision

__all__ = ["make_runtime", "iter_outputs"]


def make_runtime(device: str = "auto", precision: str = "auto", channels_last: bool = True) -> Runtime:
    """A single-process :class:`Runtime` (the options mean what they mean for ``evaluate``)."""
    dev = resolve_device(device)
    return Runtime(device=dev, precision=resolve_precision(precision, dev), channels_last=channels_last)


@torch.no_grad()
def iter_outputs(model: InferenceModel, images: ImageList, rt: Runtime, *, output: str = "logits",
                 batch_size: int = 256, strict: bool = False, progress: bool = True
                 ) -> Iterator[tuple[list[Path], list[int], torch.Tensor]]:
    """Yield ``(files, positions in images.files, fp32 CPU outputs)`` batch by batch."""
    if batch_size < 1:
        raise DataError(f"batch_size: must be >= 1; got {batch_size}")
    view = rt.prepare_model(model.output_view(output))
    view.eval()
    source = images.source(model.transform)
    n = len(images.files)
    s = model.image_size
    with tqdm(total=n, desc=output if output != "logits" else "predict", unit="img", disable=not progress,
              leave=False, file=sys.stderr) as bar:
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            rows: list[int] = []
            batch = torch.empty((stop - start, 3, s, s), dtype=torch.float32)
            for i in range(start, stop):
                try:
                    batch[len(rows)] = source.load(i)
                except DataError as exc:
                    if strict:
                        raise DataError(f"unreadable image (--strict): {exc}") from exc
                    print(f"skipped unreadable image: {exc}", file=sys.stderr)
                    continue
                rows.append(i)
            if not rows:
                bar.update(stop - start)
                continue
            x = rt.layout(rt.to_input(batch[: len(rows)]))
            with rt.autocast():
                out = view(x)
            bar.update(stop - start)
            yield [images.files[i] for i in rows], rows, out.float().cpu()
