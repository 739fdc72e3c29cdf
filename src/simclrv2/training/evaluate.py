"""Measurements: top-1/top-5 accuracy, feature extraction and the kNN monitor, plus ``simclrv2 evaluate``.

Evaluation uses the preprocessing of SPEC §6 ('Eval preprocessing'): centre crop keeping 0.875
of the shorter side and bicubic resize for images larger than 32 px, the raw image otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from simclrv2.augment import EvalTransform
from simclrv2.config import Config
from simclrv2.data import BatchIterator, ImageSource
from simclrv2.training.runtime import Runtime, eval_mode


@torch.no_grad()
def run_inference(model: nn.Module, source: ImageSource, rt: Runtime, *, image_size: int,
                  indices: torch.Tensor | None = None, batch_size: int = 256, keys: tuple[str, ...] = ("logits",),
                  progress: bool = False, desc: str = "eval") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Run ``model`` in eval mode over ``source`` and collect the requested outputs (fp32, CPU)."""
    transform = EvalTransform(image_size)
    batches = BatchIterator(source, batch_size, shuffle=False, drop_last=False, seed=0, epoch=0, indices=indices)
    outputs: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    labels: list[torch.Tensor] = []
    with eval_mode(model):
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False, unit="batch"):
            images = rt.to_input(batch.images)
            x = rt.layout(transform(images, sizes=batch.sizes.to(rt.device)))
            with rt.autocast():
                out = model(x)
            for key in keys:
                outputs[key].append(out[key].float().cpu())
            labels.append(batch.labels)
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
                        batch_size: int = 256, progress: bool = False) -> dict[str, float]:
    logits, labels = run_inference(model, source, rt, image_size=image_size, batch_size=batch_size,
                                   progress=progress, desc="evaluate")
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
    from simclrv2.errors import ConfigError
    from simclrv2.training.data_setup import prepare_data
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
    run = RunDirectory.create(cfg, "evaluate", rt.is_main)
    data = prepare_data(cfg, need_test=True, need_train=False)
    if data.test is None:
        raise ConfigError(f"data: {cfg.data} has no test/val split to evaluate on")
    if meta.get("classes") and list(meta["classes"]) != data.classes:
        raise ConfigError(f"data: the checkpoint was trained on the classes {_names(meta['classes'])}, the "
                          f"evaluation data has {_names(data.classes)}")
    model = rt.prepare_model(model)
    metrics = evaluate_classifier(model, data.test, rt, image_size=data.image_size,
                                  batch_size=cfg.eval_batch_size, progress=cfg.progress)
    results = {"stage": "evaluate", "checkpoint": str(cfg.checkpoint), "arch": meta["arch"],
               "data": data.record["data"], "image_size": data.image_size, "classifier":
               "online probe (--use-probe)" if meta.get("stage") == "pretrain" else meta.get("stage") or "unknown",
               "checkpoint_labeled_set": meta.get("labeled_set"), **metrics}
    run.write_results(results)
    run.close()
    if rt.is_main:
        print(f"evaluate: {len(data.test)} images of {cfg.data}, image size {data.image_size} px", flush=True)
        print(f"top-1 {metrics['top1']:.4f}  top-5 {metrics['top5']:.4f}  ({metrics['num_images']} images)  "
              f"-> {run.path / 'results.json'}")
    return results


def _names(classes: list[str], limit: int = 5) -> str:
    shown = ", ".join(map(str, classes[:limit]))
    return shown + (f", ... ({len(classes)} in all)" if len(classes) > limit else "")
