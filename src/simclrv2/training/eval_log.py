"""Evaluations that every classifier stage logs: the final one (top-1, top-5, per-class accuracy and
the confusion matrix) and, with ``--eval-every N``, a cheap periodic one during training.

Both go to the run's ``logs/metrics.jsonl`` and TensorBoard under the ``eval/`` prefix (through
:meth:`~simclrv2.training.rundir.RunDirectory.log`), so that the pipeline report can draw accuracy
curves next to the loss and explain the best model per class. The stages only call
:func:`final_evaluation` and :func:`periodic_evaluation`; the measuring lives here.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from simclrv2.data import ImageSource
from simclrv2.training.evaluate import run_inference, topk_accuracy
from simclrv2.training.rundir import RunDirectory
from simclrv2.training.runtime import Runtime

PERIODIC_EVAL_IMAGES = 1000
"""Test images a periodic evaluation scores (a fixed, seeded subset): cheap enough to run several
times per stage, enough to show the trend. The final evaluation scores the whole split."""


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """Top-1/top-5, per-class top-1 (recall) and the confusion matrix (rows: true class, columns:
    predicted class) of ``logits`` against ``labels``; unlabelled rows (-1) are ignored."""
    metrics: dict[str, Any] = {**topk_accuracy(logits, labels), "num_images": int(len(labels))}
    valid = labels >= 0
    num_classes = max(len(classes), int(logits.shape[1]))
    pred = logits[valid].argmax(1)
    true = labels[valid]
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((true, pred), torch.ones_like(true), accumulate=True)
    counts = confusion.sum(1)
    per_class = {}
    for i in range(num_classes):
        name = classes[i] if i < len(classes) else str(i)
        per_class[name] = float(confusion[i, i] / counts[i]) if counts[i] else float("nan")
    metrics["per_class_top1"] = per_class
    metrics["confusion"] = confusion.tolist()
    metrics["classes"] = [classes[i] if i < len(classes) else str(i) for i in range(num_classes)]
    return metrics


def _scalar_name(index: int, name: str) -> str:
    return f"{index:02d}_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))[:40]


def log_evaluation(run: RunDirectory, step: int, metrics: dict[str, Any], *, final: bool) -> None:
    """``eval/top1``, ``eval/top5`` (and, for the final evaluation, ``eval/class_top1/<class>``) at ``step``."""
    scalars = {k: float(metrics[k]) for k in ("top1", "top5") if k in metrics}
    if final:
        scalars["final"] = 1.0
        for i, (name, acc) in enumerate((metrics.get("per_class_top1") or {}).items()):
            scalars[f"class_top1/{_scalar_name(i, name)}"] = float(acc)
    run.log(step, scalars, prefix="eval")


def final_evaluation(run: RunDirectory, step: int, net: nn.Module, source: ImageSource, rt: Runtime, *,
                     image_size: int, classes: list[str], batch_size: int = 256,
                     progress: bool = False) -> dict[str, Any]:
    """Score ``net`` on the whole evaluation split, log it and return the metrics for results.json."""
    out, labels = run_inference(net, source, rt, image_size=image_size, batch_size=batch_size,
                                progress=progress, desc="evaluate")
    metrics = classification_metrics(out["logits"], labels, classes)
    log_evaluation(run, step, metrics, final=True)
    return metrics


def log_final_logits(run: RunDirectory, step: int, logits: torch.Tensor, labels: torch.Tensor,
                     classes: list[str]) -> dict[str, Any]:
    """:func:`final_evaluation` for a stage that computed its test logits itself (linear evaluation)."""
    metrics = classification_metrics(logits, labels, classes)
    log_evaluation(run, step, metrics, final=True)
    return metrics


def periodic_evaluation(trainer: Any, epoch: int) -> float | None:
    """Called at each epoch end of a classifier stage: every ``cfg.eval_every`` epochs (not at the last
    one, which the final evaluation covers) score up to :data:`PERIODIC_EVAL_IMAGES` test images and
    log ``eval/top1`` at the current step. Returns the accuracy, or None when not due."""
    every = trainer.cfg.eval_every
    data = trainer.data
    if not every or epoch % every or data.test is None or not trainer.rt.is_main:
        return None
    if trainer.step >= trainer.plan.run_steps:
        return None
    subset = getattr(trainer, "_eval_subset", None)
    if subset is None:
        n = len(data.test)
        gen = torch.Generator().manual_seed(trainer.cfg.seed)
        subset = torch.randperm(n, generator=gen)[:PERIODIC_EVAL_IMAGES].sort().values
        trainer._eval_subset = subset
    out, labels = run_inference(trainer.net, data.test, trainer.rt, image_size=data.image_size, indices=subset,
                                batch_size=trainer.cfg.eval_batch_size)
    acc = topk_accuracy(out["logits"], labels)
    trainer.run.log(trainer.step, {**acc, "epoch": float(epoch), "images": float(len(labels))}, prefix="eval")
    return acc["top1"]
