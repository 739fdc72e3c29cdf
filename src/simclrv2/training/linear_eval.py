"""Linear evaluation: a linear classifier on frozen head-INPUT features (paper §0, SPEC §2.1, §5).

Fast path: because the encoder is frozen and runs in inference mode (the reference's
``fine_tune_after_block=4`` runs BN in inference mode), the features of the labelled training
images are extracted once with the evaluation preprocessing and the linear layer is trained on
the cached features (Nesterov momentum, lr 0.1·B/256, wd 1e-6, cosine, SPEC §5). Deviation,
stated: the reference trains the linear layer on crop+flip augmented images; the cached-feature
path uses centre-cropped images only, which is the usual fast protocol.

NaN/Inf guard (as in every training stage): each step records a non-finite loss, and the first step
where it happened, in device tensors (no host synchronisation per step); they are read at each log
point and at the end, before the test split is evaluated and before anything is exported. A
diverged run therefore stops with a :class:`~simclrv2.errors.TrainingError` (exit 1) naming the step
and ``--learning-rate``, and leaves neither ``model.safetensors`` nor a top-1 figure behind.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from simclrv2.config import Config
from simclrv2.errors import ConfigError, TrainingError
from simclrv2.models import LinearClassifier
from simclrv2.optim import WarmupCosineSchedule, scale_learning_rate, steps_for
from simclrv2.training.data_setup import inherited_label_spec, prepare_data
from simclrv2.training.eval_log import log_final_logits
from simclrv2.training.evaluate import run_inference
from simclrv2.training.model_io import export_model, load_network, model_meta
from simclrv2.training.rundir import RunDirectory
from simclrv2.training.runtime import setup_runtime


def train_linear_classifier(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, epochs: float,
                            batch_size: int, learning_rate: float, scaling: str, weight_decay: float,
                            momentum: float = 0.9, seed: int = 0, progress: bool = False,
                            log=None) -> LinearClassifier:
    """Train a zero-initialised linear layer on fixed features with Nesterov SGD + cosine decay."""
    n = len(features)
    batch_size = min(batch_size, n)
    classifier = LinearClassifier(features.shape[1], num_classes, zero_init=True)
    peak = scale_learning_rate(learning_rate, batch_size, scaling)
    total = steps_for(n, epochs, batch_size)
    schedule = WarmupCosineSchedule(peak, 0, total)
    optimizer = torch.optim.SGD([{"params": [classifier.weight], "weight_decay": weight_decay},
                                 {"params": [classifier.bias], "weight_decay": 0.0}],
                                lr=peak, momentum=momentum, nesterov=True)
    gen = torch.Generator().manual_seed(seed)
    step = 0
    steps_per_epoch = max(1, n // batch_size)
    # first step (1-based) whose loss was NaN/Inf, 0 while none was: updated on the device, read rarely
    first_bad = torch.zeros((), dtype=torch.long, device=features.device)
    with tqdm(total=total, desc="linear-eval", unit="step", disable=not progress, leave=False) as pbar:
        while step < total:
            order = torch.randperm(n, generator=gen)
            for b in range(steps_per_epoch):
                if step >= total:
                    break
                idx = order[b * batch_size:(b + 1) * batch_size]
                schedule.apply(optimizer, step)
                loss = F.cross_entropy(classifier(features[idx]), labels[idx])
                bad = ~torch.isfinite(loss.detach())
                first_bad = torch.where(bad & (first_bad == 0), step + 1, first_bad)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                pbar.update(1)
                if log is not None and (step % 50 == 0 or step == total):
                    _check_finite(first_bad, classifier, step, learning_rate)
                    log(step, {"loss": float(loss.detach()), "lr": schedule.lr_at(step - 1)})
    _check_finite(first_bad, classifier, step, learning_rate)
    _check_converged(classifier, features, labels, num_classes, step, learning_rate)
    return classifier


def _check_finite(first_bad: torch.Tensor, classifier: LinearClassifier, step: int, learning_rate: float) -> None:
    """Raise :class:`TrainingError` (exit 1) when a loss so far, or the weights now, are NaN/Inf."""
    bad_step = int(first_bad)
    if bad_step == 0 and all(bool(torch.isfinite(p).all()) for p in classifier.parameters()):
        return
    where = f"at step {bad_step}" if bad_step else f"in the weights at or before step {step}"
    raise TrainingError(f"the linear classifier diverged (NaN or Inf {where}); no model.safetensors and no "
                        f"accuracy were written. Lower --learning-rate (it was {learning_rate:g})")


#: A trained classifier whose loss on its own training features exceeds this multiple of the untrained
#: (zero) classifier's loss, ln(num_classes), has diverged: the problem is convex and the cosine schedule
#: ends at learning rate 0, so a healthy run ends below ln(num_classes).
DIVERGED_LOSS_FACTOR = 2.0


def _check_converged(classifier: LinearClassifier, features: torch.Tensor, labels: torch.Tensor,
                     num_classes: int, step: int, learning_rate: float) -> None:
    """Raise :class:`TrainingError` when the final classifier is far worse than the untrained one on the
    images it was trained on (a learning rate so large that the weights blow up while staying finite)."""
    if num_classes < 2:
        return
    with torch.no_grad():
        loss = float(F.cross_entropy(classifier(features), labels))
    untrained = math.log(num_classes)
    if loss > DIVERGED_LOSS_FACTOR * untrained:
        raise TrainingError(f"the linear classifier diverged: after step {step} its loss on its own training "
                            f"images is {loss:.4g}, over {DIVERGED_LOSS_FACTOR:g}x the {untrained:.3g} of the "
                            "untrained classifier; no model.safetensors and no accuracy were written. Lower "
                            f"--learning-rate (it was {learning_rate:g})")


def linear_eval(cfg: Config) -> dict[str, Any]:
    """``simclrv2 linear-eval``."""
    rt = setup_runtime(cfg)
    net, src_meta = load_network(cfg.checkpoint)
    cfg = cfg.replace(image_size=cfg.image_size or src_meta["image_size"])
    if cfg.image_size != src_meta["image_size"]:
        raise ConfigError(f"image_size: the checkpoint was trained at {src_meta['image_size']} px")
    run = RunDirectory.create(cfg, "linear-eval", rt.is_main)
    data = prepare_data(cfg, need_test=True, with_pool=False,
                        label_spec=inherited_label_spec(cfg, _usable_record(src_meta, cfg), "checkpoint"))
    if not len(data.labeled_indices):
        from simclrv2.errors import DataError
        raise DataError("linear-eval: no labelled training images; give labelled images with --data ROOT or "
                        "--labels FILE.csv")
    if rt.is_main:
        print(f"linear-eval: {len(data.labeled_indices)} labelled images, {cfg.epochs:g} epochs; "
              + data.describe(), flush=True)
    net = rt.prepare_model(net)
    size = data.image_size
    train_out, train_labels = run_inference(net, data.train, rt, image_size=size, indices=data.labeled_indices,
                                            batch_size=cfg.eval_batch_size, keys=("features",),
                                            progress=cfg.progress, desc="features (train)")
    classifier = train_linear_classifier(
        train_out["features"], train_labels, data.num_classes, epochs=float(cfg.epochs),
        batch_size=int(cfg.batch_size), learning_rate=cfg.learning_rate, scaling=cfg.learning_rate_scaling,
        weight_decay=cfg.weight_decay or 0.0, momentum=cfg.momentum, seed=cfg.seed, progress=cfg.progress,
        log=run.log)
    results: dict[str, Any] = {"stage": "linear-eval", "arch": src_meta["arch"], "checkpoint": str(cfg.checkpoint),
                               "num_labeled": int(len(data.labeled_indices)),
                               "label_fraction": data.label_spec.fraction, "image_size": size,
                               "labeled_set": data.labeled_record()}
    # Export encoder (head dropped: ft_proj_selector 0) + the trained linear layer as one network.
    meta = model_meta(arch=src_meta["arch"], image_size=size, num_proj_layers=src_meta["num_proj_layers"],
                      proj_out_dim=src_meta.get("proj_out_dim", 128), num_classes=data.num_classes,
                      ft_proj_selector=0, head_layers_kept=0, classes=data.classes, stage="linear-eval")
    meta.update(data.record)
    from simclrv2.training.model_io import build_from_meta
    exported = build_from_meta(meta)
    own = exported.state_dict()
    state = {k: v for k, v in net.state_dict().items() if k in own and not k.startswith("classifier.")}
    state.update({f"classifier.{k}": v for k, v in classifier.state_dict().items()})
    exported.load_state_dict(state, strict=False)
    if data.test is not None:
        test_out, test_labels = run_inference(net, data.test, rt, image_size=size, batch_size=cfg.eval_batch_size,
                                              keys=("features",), progress=cfg.progress, desc="features (test)")
        with torch.no_grad():
            logits = classifier(test_out["features"])
        last_step = steps_for(len(train_labels), float(cfg.epochs), min(int(cfg.batch_size), len(train_labels)))
        results.update(log_final_logits(run, last_step, logits, test_labels, data.classes))  # eval_log.py
        results["num_images"] = int(len(test_labels))
    if rt.is_main:
        export_model(exported, run.path / "model.safetensors", meta)
        if "top1" in results and not math.isnan(results["top1"]):
            print(f"linear-eval: top-1 {results['top1']:.4f}  top-5 {results['top5']:.4f} -> {run.path}")
    run.write_results(results)
    run.close()
    return results


def _usable_record(src_meta: dict[str, Any], cfg: Config) -> dict[str, Any] | None:
    """The checkpoint's labelled set, when it was chosen on the data this run uses (a network pretrained
    on other data, or without labels, says nothing about this data's labels)."""
    record = src_meta.get("labeled_set")
    if not isinstance(record, dict) or record.get("kind") == "none":
        return None
    data = src_meta.get("data")
    from pathlib import Path

    from simclrv2.config import is_dataset_name
    current = cfg.data if cfg.data is None or is_dataset_name(cfg.data) else str(Path(cfg.data).expanduser().resolve())
    return record if data == current else None
