"""The supervised-style training loop shared by fine-tuning, the supervised baseline and distillation.

All three train a network whose ``logits`` come from a linear classifier, on random crop +
horizontal flip only (SPEC §0, §6). They differ in the network they start from and the loss:
cross-entropy on labels (fine-tune, supervised), or the distillation loss of paper Eq. 2-3
against a fixed teacher that sees the same augmented view (distill).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from simclrv2.augment import AugmentConfig, SimCLRAugmentation
from simclrv2.config import Config, label_fraction_of
from simclrv2.losses import mixed_distillation_loss
from simclrv2.optim import l2_penalty
from simclrv2.models.batchnorm import batchnorm_layers
from simclrv2.recipes import BN_FROZEN, INIT_TEACHER, Schedule, stage_schedule
from simclrv2.training.data_setup import RunData
from simclrv2.training.eval_log import final_evaluation, periodic_evaluation
from simclrv2.training.model_io import export_model
from simclrv2.training.global_bn import convert_global_bn
from simclrv2.training.rundir import RunDirectory
from simclrv2.training.runtime import Runtime
from simclrv2.training.trainer import StepPlan, Trainer, build_optimizer, crop_and_flip, describe_plan, plan_steps


CLASSIFIER_BASE_LR = 0.1


class ClassifierTrainer(Trainer):
    """Train ``net`` (a SimCLRNet with a classifier) on ``indices`` of the training images."""

    def __init__(self, stage: str, cfg: Config, rt: Runtime, run: RunDirectory, data: RunData,
                 indices: torch.Tensor | None, plan: StepPlan, net: nn.Module, meta: dict[str, Any], *,
                 teacher: nn.Module | None = None, temperature: float = 1.0, alpha: float = 1.0,
                 temperature_squared: bool = False) -> None:
        super().__init__(cfg, rt, run, data.train, indices, plan)
        self.temperature_squared = temperature_squared
        self.stage = stage
        self.data, self.meta = data, meta
        self.labels = data.labels_for_training()
        if rt.distributed and cfg.global_bn:
            net = convert_global_bn(net, rt.device)  # SyncBatchNorm on CUDA, own CPU version
        self.net = rt.prepare_model(net)
        self.model = self.net
        if rt.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                self.net, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)
        self.compile_if_chosen(plan.global_batch)
        classifier_scale = None
        if teacher is not None and cfg.optimizer == "lars" and cfg.init_student != INIT_TEACHER:
            # A distillation student's classifier is excluded from LARS adaptation (as the reference's
            # head_supervised) but trained at the linear-probe rate 0.1·B/256 instead of the
            # pretraining-like peak lr, at which a plain SGD linear layer diverges. The reference has
            # no distillation training code (SPEC §9); deviation, stated. A student that starts as a copy
            # of its teacher (recipe auto) keeps training its classifier as fine-tuning did, at the peak lr.
            classifier_scale = (CLASSIFIER_BASE_LR * plan.global_batch / 256) / plan.peak_lr
        self.optimizer = build_optimizer(cfg, self.net, plan.peak_lr, classifier_lr_scale=classifier_scale)
        self.teacher = None
        if teacher is not None:
            self.teacher = rt.prepare_model(teacher).eval().requires_grad_(False)
        self.temperature, self.alpha = temperature, alpha
        self.augment = SimCLRAugmentation(AugmentConfig.for_finetuning(data.image_size, **crop_and_flip(cfg)))
        self.classifier_l2 = cfg.optimizer == "lars" and bool(cfg.weight_decay) and teacher is None
        # --bn-stats frozen (recipes.bn_stats): BN layers normalise with their running statistics and do not
        # update them; set at every step because periodic evaluation restores the whole network's train mode.
        self.frozen_bn = batchnorm_layers(self.net) if cfg.bn_stats == BN_FROZEN else []

    def train_step(self, batch) -> dict[str, torch.Tensor]:
        for layer in self.frozen_bn:
            layer.eval()
        images = self.rt.to_input(batch.images)
        x = self.rt.layout(self.augment(images, self.generators["augment"], sizes=batch.sizes.to(self.rt.device)))
        labels = self.labels[batch.indices].to(self.rt.device)
        with self.rt.autocast():
            logits = self.model(x)["logits"]
            teacher_logits = None
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_logits = self.teacher(x)["logits"]
        metrics: dict[str, torch.Tensor] = {}
        if teacher_logits is not None:
            loss = mixed_distillation_loss(logits, teacher_logits, labels, self.temperature, self.alpha,
                                           scale_by_temperature_squared=self.temperature_squared)
            metrics["agreement"] = (logits.argmax(1) == teacher_logits.argmax(1)).float().mean()
        else:
            loss = F.cross_entropy(logits.float(), labels)
        if self.classifier_l2:
            loss = loss + l2_penalty(self.net.classifier, self.cfg.weight_decay)
        self.backward_and_step(loss)
        valid = labels >= 0
        metrics["acc"] = ((logits.argmax(1) == labels) & valid).sum() / valid.sum().clamp(min=1)
        metrics["loss"] = loss.detach()
        return metrics

    def model_meta(self) -> dict[str, Any]:
        return self.meta

    def on_epoch_end(self, epoch: int) -> None:
        periodic_evaluation(self, epoch)  # --eval-every (eval_log.py)


def apply_recipe(stage: str, cfg: Config, num_examples: int) -> tuple[Config, Schedule]:
    """The stage's batch size and epochs on ``num_examples`` training images (SPEC §5 or recipe auto,
    :func:`simclrv2.recipes.stage_schedule`), and ``--evals-per-stage`` turned into ``--eval-every``
    once the epochs are known."""
    schedule = stage_schedule(stage, cfg.recipe, num_examples, batch_size=cfg.batch_size, epochs=cfg.epochs,
                              label_fraction=label_fraction_of(cfg))
    changes: dict[str, Any] = dict(batch_size=schedule.batch_size, epochs=schedule.epochs)
    if cfg.eval_every is None and cfg.evals_per_stage:
        changes["eval_every"] = max(1, math.ceil(schedule.epochs / cfg.evals_per_stage))
    return cfg.replace(**changes), schedule


def train_and_evaluate(stage: str, cfg: Config, rt: Runtime, run: RunDirectory, data: RunData,
                       indices: torch.Tensor | None, net: nn.Module, meta: dict[str, Any], *,
                       teacher: nn.Module | None = None, temperature: float = 1.0, alpha: float = 1.0,
                       temperature_squared: bool = False,
                       extra_results: dict[str, Any] | None = None,
                       warnings: list[str] | None = None) -> dict[str, Any]:
    """Plan, train, export ``model.safetensors``, evaluate top-1/top-5 and write results.json.

    The model metadata (checkpoints and ``model.safetensors``) and results.json record the data and
    the labelled set (:func:`~simclrv2.training.data_setup.data_record`), which later stages inherit;
    ``warnings`` (e.g. a student given more labels than its teacher) are printed and kept in the results."""
    num_examples = len(indices) if indices is not None else len(data.train)
    if num_examples == 0:
        from simclrv2.errors import DataError
        raise DataError(f"{stage}: no labelled training images (the labelled set is empty); give labelled "
                        "images with --data ROOT (class folders) or --labels FILE.csv")
    meta = {**meta, **data.record}
    cfg, schedule = apply_recipe(stage, cfg, num_examples)
    plan = plan_steps(cfg, num_examples, cfg.batch_size)
    if rt.is_main:
        print(describe_plan(stage, plan, num_examples, rt) + "; " + data.describe())
        for note in schedule.notes:
            print(f"{stage}: {note}", flush=True)
        for warning in warnings or []:
            print(f"warning: {warning}", flush=True)
    trainer = ClassifierTrainer(stage, cfg, rt, run, data, indices, plan, net, meta, teacher=teacher,
                                temperature=temperature, alpha=alpha, temperature_squared=temperature_squared)
    final = trainer.fit()
    results: dict[str, Any] = {"stage": stage, "arch": meta["arch"], "steps": trainer.step,
                               "num_labeled": int(len(data.labeled_indices)), "train_images": num_examples,
                               "image_size": data.image_size, "labeled_set": data.labeled_record(),
                               "recipe": cfg.recipe, "batch_size": plan.global_batch, "epochs": cfg.epochs,
                               "peak_lr": plan.peak_lr, "recipe_notes": list(schedule.notes),
                               "precision": rt.precision, "device": rt.device.type, "compiled": trainer.compiled, "allocator": rt.allocator,
                               "final": final, **(extra_results or {})}
    if warnings:
        results["warnings"] = list(warnings)
    if rt.is_main:
        export_model(trainer.net, run.path / "model.safetensors", meta)
        if data.test is not None:
            metrics = final_evaluation(run, trainer.step, trainer.net, data.test, rt, image_size=data.image_size,
                                       classes=data.classes, batch_size=cfg.eval_batch_size, progress=cfg.progress)
            results.update(metrics)
            print(f"{stage}: top-1 {metrics['top1']:.4f}  top-5 {metrics['top5']:.4f} -> {run.path}")
    run.write_results(results)
    run.close()
    return results
