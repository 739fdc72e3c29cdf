"""Measurements: top-1/top-5 accuracy, feature extraction and the kNN monitor, plus ``simclrv2 evaluate``.

Evaluation uses the preprocessing of SPEC §6 ('Eval preprocessing'): centre crop keeping 0.875
of the shorter side and bicubic resize for images larger than 32 px, the raw image otherwise.
``simclrv2 evaluate`` (and predict / embed / export, which build their transform with
:func:`eval_transform_for`) reads image folders above 32 px at full resolution
(:func:`simclrv2.data.datasets.load_eval_dataset`), so its crop is the reference's crop of the
original image, resized once. The resize kernel is the checkpoint's recorded
``eval_resize_mode`` (``bicubic_legacy`` for imported TF1 checkpoints, the code they were
evaluated with), else ``bicubic``; ``--resize-mode`` overrides it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from simclrv2.augment import EvalTransform
from simclrv2.augment.resize import RESIZE_MODES
from simclrv2.config import Config
from simclrv2.data import BatchIterator, ImageSource
from simclrv2.errors import ConfigError
from simclrv2.training.runtime import Runtime, eval_mode

#: Model-meta key naming the resize kernel a checkpoint is evaluated with (written by import-tf).
EVAL_RESIZE_MODE_KEY = "eval_resize_mode"
DEFAULT_EVAL_RESIZE_MODE = "bicubic"


def eval_resize_mode(meta: dict[str, Any], requested: str | None = None) -> str:
    """The resize kernel of evaluation: ``requested`` (``--resize-mode``), else the checkpoint's
    recorded :data:`EVAL_RESIZE_MODE_KEY`, else ``bicubic`` (the TF2 kernel our stages train with)."""
    if requested is not None:
        if requested not in RESIZE_MODES:
            raise ConfigError(f"resize_mode: must be one of {', '.join(RESIZE_MODES)}, got {requested!r}")
        return requested
    recorded = meta.get(EVAL_RESIZE_MODE_KEY)
    return recorded if recorded in RESIZE_MODES else DEFAULT_EVAL_RESIZE_MODE


def eval_transform_for(meta: dict[str, Any], image_size: int | None = None,
                       resize_mode: str | None = None) -> EvalTransform:
    """The one evaluation transform of a checkpoint (evaluate, predict, embed, export's contract):
    SPEC §6 centre crop above 32 px, at ``image_size`` (default: the checkpoint's) with
    :func:`eval_resize_mode`."""
    return EvalTransform(int(image_size or meta["image_size"]), resize_mode=eval_resize_mode(meta, resize_mode))


@torch.no_grad()
def run_inference(model: nn.Module, source: ImageSource, rt: Runtime, *, image_size: int,
                  indices: torch.Tensor | None = None, batch_size: int = 256, keys: tuple[str, ...] = ("logits",),
                  progress: bool = False, desc: str = "eval", transform: EvalTransform | None = None,
                  num_workers: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Run ``model`` in eval mode over ``source`` and collect the requested outputs (fp32, CPU).

    ``transform`` (default ``EvalTransform(image_size)``) turns canvases into network inputs; a
    source whose batches are already network inputs (``source.preprocessed``, the full-resolution
    :class:`~simclrv2.data.sources.EvalImageSource`, which applied the transform while decoding)
    is fed as it is. ``num_workers``: decoding processes for sources read from disk."""
    transform = transform or EvalTransform(image_size)
    if transform.image_size != image_size:
        raise ValueError(f"transform is for {transform.image_size} px, image_size is {image_size}")
    batches = BatchIterator(source, batch_size, shuffle=False, drop_last=False, seed=0, epoch=0, indices=indices,
                            num_workers=num_workers)
    outputs: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    labels: list[torch.Tensor] = []
    try:
        with eval_mode(model):
            for batch in tqdm(batches, desc=desc, disable=not progress, leave=False, unit="batch"):
                if not len(batch.labels):
                    continue  # every file of this batch turned out unreadable (reported by the source)
                images = rt.to_input(batch.images)
                if source.preprocessed:
                    x = rt.layout(images)
                else:
                    x = rt.layout(transform(images, sizes=batch.sizes.to(rt.device)))
                with rt.autocast():
                    out = model(x)
                for key in keys:
                    outputs[key].append(out[key].float().cpu())
                labels.append(batch.labels)
    finally:
        batches.close()
    if not labels:
        return {k: torch.empty(0) for k in keys}, torch.empty(0, dtype=torch.long)
    return {k: torch.cat(v) for k, v in outputs.items()}, torch.cat(labels)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Fraction of rows whose label is among the k largest logits, for each k (capped at #classes)."""
    result = {}
    valid = labels >= 0
    logits, labels = logits[valid], labels[valid]
    for k in ks:
        kk = min(k, logits.shape[1])
        top = logits.topk(kk, dim=1).indices
        hit = (top == labels[:, None]).any(dim=1).float()
        result[f"top{k}"] = float(hit.mean()) if len(hit) else float("nan")
    return result


def evaluate_classifier(model: nn.Module, source: ImageSource, rt: Runtime, *, image_size: int,
                        batch_size: int = 256, progress: bool = False, transform: EvalTransform | None = None,
                        num_workers: int = 0) -> dict[str, float]:
    logits, labels = run_inference(model, source, rt, image_size=image_size, batch_size=batch_size,
                                   progress=progress, desc="evaluate", transform=transform,
                                   num_workers=num_workers)
    if not len(labels):
        from simclrv2.errors import DataError
        raise DataError("none of the evaluation images could be decoded")
    return {**topk_accuracy(logits["logits"], labels), "num_images": int(len(labels))}


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, *, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None, chunk: int = 1024) -> float:
    """Weighted kNN classification on cosine similarity (the monitor of Wu et al. 2018 used by
    SimCLR/DINO-style codebases): each of the k nearest training features votes for its class
    with weight exp(sim / temperature)."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    train_n = F.normalize(train_features.float(), dim=1)
    test_n = F.normalize(test_features.float(), dim=1)
    k = min(k, len(train_n))
    correct = 0
    for start in range(0, len(test_n), chunk):
        sims = test_n[start:start + chunk] @ train_n.T
        top_sims, top_idx = sims.topk(k, dim=1)
        votes = torch.zeros(len(top_sims), num_classes)
        votes.scatter_add_(1, train_labels[top_idx], (top_sims / temperature).exp())
        correct += int((votes.argmax(1) == test_labels[start:start + chunk]).sum())
    return correct / max(1, len(test_n))


def evaluate_checkpoint(cfg: Config) -> dict[str, Any]:
    """``simclrv2 evaluate``: top-1/top-5 of a trained classifier on the evaluation split."""
    from simclrv2.data.datasets import load_eval_dataset
    from simclrv2.training.data_setup import prepare_data, print_scan_reports
    from simclrv2.training.model_io import load_network
    from simclrv2.training.rundir import RunDirectory
    from simclrv2.training.runtime import setup_runtime

    rt = setup_runtime(cfg)
    model, meta = load_network(cfg.checkpoint)
    if not meta.get("num_classes"):
        raise ConfigError(f"checkpoint: {cfg.checkpoint} has no classifier (a pretraining checkpoint); "
                          "fine-tune it or run linear-eval first")
    if meta.get("stage") == "pretrain" and not cfg.use_probe:
        raise ConfigError(f"checkpoint: {cfg.checkpoint} is a pretraining checkpoint: its classifier is the online "
                          "linear probe (a monitor trained on stop-gradient features), not a fine-tuned one. "
                          "Fine-tune it (simclrv2 finetune) or run linear-eval, or pass --use-probe to score "
                          "the probe anyway")
    cfg = cfg.replace(image_size=cfg.image_size or meta["image_size"])
    transform = eval_transform_for(meta, cfg.image_size, cfg.resize_mode)
    run = RunDirectory.create(cfg, "evaluate", rt.is_main)
    data = prepare_data(cfg, need_test=False, need_train=False)  # the data record and image size
    test = None
    if cfg.data is not None:
        try:
            test = load_eval_dataset(cfg.data, transform, data_root=cfg.data_root, download=cfg.download,
                                     num_workers=cfg.num_workers, progress=cfg.progress, strict=cfg.strict)
        except FileNotFoundError:
            test = None
    if test is None:
        raise ConfigError(f"data: {cfg.data} has no test/val split to evaluate on")
    print_scan_reports(test)
    if meta.get("classes") and list(meta["classes"]) != list(test.classes):
        raise ConfigError(f"data: the checkpoint was trained on the classes {_names(meta['classes'])}, the "
                          f"evaluation data has {_names(list(test.classes))}")
    model = rt.prepare_model(model)
    workers = cfg.num_workers if test.preprocessed else 0  # files read from disk: decode in parallel
    metrics = evaluate_classifier(model, test, rt, image_size=data.image_size, batch_size=cfg.eval_batch_size,
                                  progress=cfg.progress, transform=transform, num_workers=workers)
    results = {"stage": "evaluate", "checkpoint": str(cfg.checkpoint), "arch": meta["arch"],
               "data": data.record["data"], "image_size": data.image_size, "classifier":
               "online probe (--use-probe)" if meta.get("stage") == "pretrain" else meta.get("stage") or "unknown",
               "checkpoint_labeled_set": meta.get("labeled_set"),
               "preprocessing": {"resize_mode": transform.resize_mode, "center_crop": transform.center_crop,
                                 "crop_proportion": transform.crop_proportion if transform.center_crop else None,
                                 "full_resolution": bool(test.preprocessed)}, **metrics}
    run.write_results(results)
    run.close()
    if rt.is_main:
        how = (f"full resolution, centre crop {transform.crop_proportion}" if test.preprocessed
               else "centre crop" if transform.center_crop else "no crop")
        print(f"evaluate: {metrics['num_images']} images of {cfg.data}, image size {data.image_size} px "
              f"({how}, {transform.resize_mode} resize)", flush=True)
        print(f"top-1 {metrics['top1']:.4f}  top-5 {metrics['top5']:.4f}  ({metrics['num_images']} images)  "
              f"-> {run.path / 'results.json'}")
    return results


def _names(classes: list[str], limit: int = 5) -> str:
    shown = ", ".join(map(str, classes[:limit]))
    return shown + (f", ... ({len(classes)} in all)" if len(classes) > limit else "")
