"""Step 1: task-agnostic SimCLRv2 pretraining (paper §2, SPEC §0, §3-§6).

Per step: two augmented views of every image of the batch (batched on the training device),
both views through encoder + 3-layer projection head in ONE forward (BatchNorm statistics shared
by the two views, SyncBatchNorm across processes = the reference's global BN), NT-Xent with
negatives gathered from every process, optionally extra negatives from a FIFO queue filled by an
EMA ("momentum") copy of the network (paper §2's MoCo-style memory, not in the public code,
SPEC §9), and LARS with linear warmup + cosine decay. An online linear probe on stop-gradient
features (TF2 ``lineareval_while_pretraining``) and a kNN monitor on the test split show the
representation improving while it trains.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from simclrv2.augment import AugmentConfig, SimCLRAugmentation
from simclrv2.config import Config
from simclrv2.losses import NegativeQueue, contrastive_loss
from simclrv2.models import create_model
from simclrv2.optim import l2_penalty
from simclrv2.training.data_setup import RunData, prepare_data
from simclrv2.training.evaluate import knn_accuracy, run_inference
from simclrv2.training.model_io import export_model, model_meta, unwrap
from simclrv2.training.global_bn import convert_global_bn
from simclrv2.training.rundir import RunDirectory
from simclrv2.training.runtime import Runtime, setup_runtime
from simclrv2.training.trainer import StepPlan, Trainer, build_optimizer, check_resume_compatible, crop_and_flip, \
    describe_plan, optimizer_step, plan_steps
from simclrv2.utils import distributed as dist_utils
from simclrv2.utils.checkpoint import CheckpointManager
from simclrv2.utils.ema import ModelEMA

PROBE_BASE_LR = 0.1
KNN_BANK_SIZE = 5000
KNN_TEST_SIZE = 2000
#: Share of the training time the default (epoch-end) kNN monitor may take (issue 17: <= 5% of an epoch).
KNN_TIME_BUDGET = 0.05
#: Before the first monitor has been timed, one monitored image is assumed to cost this share of one
#: training image (a no-grad forward of one view vs forward + backward of two views: ~1/6, plus the
#: decode both pay; 1/3 errs on the side of running the monitor less often).
KNN_IMAGE_COST_GUESS = 1 / 3


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean CE over rows with a label (>= 0) and their accuracy; 0 when none (no host sync)."""
    valid = labels >= 0
    count = valid.sum().clamp(min=1)
    safe = labels.clamp(min=0)
    ce = F.cross_entropy(logits.float(), safe, reduction="none")
    loss = (ce * valid).sum() / count
    acc = ((logits.argmax(1) == labels) & valid).sum() / count
    return loss, acc


class PretrainStep:
    """Loss + update for one batch of views; the unit the distributed-equivalence test drives.

    ``views`` is [2N, 3, S, S] (all first views, then all second views) on the device and
    ``labels`` [N] (-1 = unlabelled; used only by the online probe)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime, *,
                 temperature: float, weight_decay: float = 0.0, ema: ModelEMA | None = None,
                 queue: NegativeQueue | None = None, scaler: torch.amp.GradScaler | None = None,
                 memory_keys_fraction: float = Config.memory_keys_fraction) -> None:
        self.model, self.optimizer, self.rt = model, optimizer, rt
        self.temperature, self.weight_decay = temperature, weight_decay
        self.ema, self.queue = ema, queue
        self.memory_keys_fraction = memory_keys_fraction
        self.scaler = scaler or rt.grad_scaler()

    def loss(self, views: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with self.rt.autocast():
            out = self.model(views)
        z_a, z_b = out["projection"].chunk(2)
        negatives = self.queue.negatives() if self.queue is not None else None
        closs = contrastive_loss(z_a, z_b, self.temperature, queue=negatives)
        loss = closs.loss
        metrics = {"contrast_loss": closs.loss.detach(), "contrast_acc": closs.accuracy,
                   "contrast_entropy": closs.entropy}
        if out.get("logits") is not None:
            probe_labels = labels.repeat(2)
            probe_loss, probe_acc = masked_cross_entropy(out["logits"], probe_labels)
            # The probe's gradient is the CE summed over labelled rows / all rows, so that a batch
            # with few labels (1% fractions) takes a proportionally small step instead of a full-size
            # step from a handful of images (which made the probe diverge); probe_loss reports the
            # mean over labelled rows.
            labelled_share = (probe_labels >= 0).float().mean()
            loss = loss + probe_loss * labelled_share
            classifier = unwrap(self.model).classifier
            if self.weight_decay:
                loss = loss + l2_penalty(classifier, self.weight_decay)
            metrics.update(probe_loss=probe_loss.detach(), probe_acc=probe_acc.detach())
        metrics["loss"] = loss.detach()
        return loss, metrics

    def memory_keys(self, views: torch.Tensor) -> torch.Tensor:
        """The views the momentum encoder projects into the queue: the second view of the first
        ``memory_keys_fraction`` of this process's images (at least 2, for train-mode BatchNorm).

        MoCo (which the paper's memory follows; the public code has none, SPEC §9) queues one key
        per image. Queuing a random quarter (batches are shuffled) by default cuts the momentum
        forward from 1/6 to 1/24 of the work of a step (a training step is about 3 forwards of 2N
        views); deviation, stated. The queue then holds keys from the last
        ``memory_size / (fraction·N)`` steps, still far younger than the momentum encoder's
        ``1 / (1 - decay)``-step time constant (1000 steps at 0.999), so its negatives stay
        consistent; ``--memory-keys-fraction 1`` is MoCo's choice."""
        n = views.shape[0] // 2
        k = min(n, max(2, round(n * self.memory_keys_fraction)))
        return views[n:n + k]

    @torch.no_grad()
    def update_memory(self, views: torch.Tensor) -> None:
        """EMA update of the momentum network, then queue its projections of this batch's keys."""
        if self.ema is None:
            return
        self.ema.update(self.model)
        if self.queue is None:
            return
        with self.rt.autocast():
            z = self.ema.module(self.memory_keys(views))["projection"]
        z = F.normalize(z.float(), dim=1)
        self.queue.enqueue(dist_utils.gather_with_grad(z).detach())

    def __call__(self, views: torch.Tensor, labels: torch.Tensor, *, nonfinite: torch.Tensor | None = None
                 ) -> dict[str, torch.Tensor]:
        loss, metrics = self.loss(views, labels)
        optimizer_step(loss, self.optimizer, self.scaler, nonfinite=nonfinite)
        self.update_memory(views)
        return metrics


class PretrainTrainer(Trainer):
    stage = "pretrain"

    def __init__(self, cfg: Config, rt: Runtime, run: RunDirectory, data: RunData, plan: StepPlan) -> None:
        super().__init__(cfg, rt, run, data.train, None, plan)
        self.data = data
        self.labels = data.labels_for_training()
        has_labels = bool((self.labels >= 0).any())
        self.num_classes = data.num_classes if (cfg.linear_probe and has_labels) else 0
        selector = cfg.ft_proj_selector if cfg.ft_proj_selector is not None else 0
        net = create_model(cfg.arch, image_size=data.image_size, num_proj_layers=cfg.num_proj_layers,
                           proj_out_dim=cfg.proj_out_dim, num_classes=self.num_classes,
                           ft_proj_selector=selector, classifier_stop_grad=True)
        self.meta = model_meta(arch=cfg.arch, image_size=data.image_size, num_proj_layers=cfg.num_proj_layers,
                               proj_out_dim=cfg.proj_out_dim, num_classes=self.num_classes,
                               ft_proj_selector=selector, classes=data.classes, stage="pretrain")
        self.meta.update(data.record)  # data + labelled set (of the probe), inherited by later stages
        if rt.distributed and cfg.global_bn:
            net = convert_global_bn(net, rt.device)  # SyncBatchNorm on CUDA, own CPU version
        net = rt.prepare_model(net)
        self.net = net
        self.model = net
        if rt.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                net, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)
        self.compile_if_chosen(2 * plan.global_batch)
        # Online probe learning rate: 0.1·B/256 with the same warmup/cosine shape. Deviation, stated:
        # the TF2 reference gives the probe the contrastive peak lr without layer adaptation
        # (0.1·sqrt(B)), which makes the probe's cross-entropy diverge on small data; the probe
        # never affects the encoder (stop-gradient), so only the monitor changes.
        probe_scale = (PROBE_BASE_LR * plan.global_batch / 256) / plan.peak_lr
        self.optimizer = build_optimizer(cfg, net, plan.peak_lr, classifier_lr_scale=probe_scale)
        self.ema = ModelEMA(net, decay=cfg.ema_decay) if cfg.memory_size > 0 else None
        if cfg.memory_size > 0:  # float32 keys (+ the queue's copy on the device), checked before allocating
            from simclrv2.training.runtime import check_allocation
            check_allocation(2 * 4 * cfg.memory_size * cfg.proj_out_dim, f"memory_size: {cfg.memory_size} keys",
                             rt.device)
        self.queue = NegativeQueue(cfg.memory_size, cfg.proj_out_dim).to(rt.device) if cfg.memory_size > 0 else None
        self.step_fn = PretrainStep(self.model, self.optimizer, rt, temperature=cfg.temperature,
                                    weight_decay=cfg.weight_decay or 0.0, ema=self.ema, queue=self.queue,
                                    scaler=self.scaler, memory_keys_fraction=cfg.memory_keys_fraction)
        self.augment = SimCLRAugmentation(AugmentConfig.for_pretraining(
            data.image_size, color_jitter_strength=cfg.color_jitter_strength, use_blur=cfg.use_blur,
            **crop_and_flip(cfg)))
        self.knn_due = cfg.knn_every
        self.last_knn: float | None = None
        self.last_knn_step: int | None = None
        self.knn_seconds = 0.0  # wall time spent in the monitor so far
        self.knn_last_cost: float | None = None
        self._train_clock: float | None = None  # set at the first training step of this process
        self._steps_timed = 0

    def train_step(self, batch) -> dict[str, torch.Tensor]:
        if self._train_clock is None:
            self._train_clock = time.perf_counter()
        self._steps_timed += 1
        images = self.rt.to_input(batch.images)
        sizes = batch.sizes.to(self.rt.device)
        views = self.rt.layout(self.augment.two_views(images, self.generators["augment"], sizes=sizes))
        labels = self.labels[batch.indices].to(self.rt.device)
        metrics = self.step_fn(views, labels, nonfinite=self._nonfinite)
        if self.knn_due and (self.step + 1) % self.knn_due == 0:
            self.monitor_knn(self.step + 1)
        return metrics

    # ---- checkpoint contents -------------------------------------------------------------
    def checkpoint_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        weights = {"model": self.net.state_dict()}
        if self.ema is not None:
            weights["ema"] = self.ema.module.state_dict()
        return weights

    def extra_state(self) -> dict[str, Any]:
        return {"queue": self.queue.state_dict()} if self.queue is not None else {}

    def load_extra_state(self, state: dict[str, Any], weights: dict[str, dict[str, torch.Tensor]]) -> None:
        if self.ema is not None and "ema" in weights:
            self.ema.module.load_state_dict(weights["ema"])
        if self.queue is not None and "queue" in state:
            self.queue.load_state_dict(state["queue"])

    def model_meta(self) -> dict[str, Any]:
        return self.meta

    # ---- monitors ----------------------------------------------------------------------
    def on_epoch_end(self, epoch: int) -> None:
        if self.cfg.knn_every == 0 and self.data.test is not None and self.knn_fits_budget():
            self.monitor_knn(self.step)

    def knn_sizes(self) -> tuple[int, int]:
        return min(KNN_BANK_SIZE, len(self.data.labeled_indices)), min(KNN_TEST_SIZE, len(self.data.test))

    def knn_fits_budget(self) -> bool:
        """Whether the epoch-end monitor keeps the monitors' total within ``KNN_TIME_BUDGET`` of the
        training time so far (default ``--knn-every 0``).

        The monitor embeds up to 5000 bank + 2000 test images whatever the epoch's size: ~2% of a
        CIFAR-10 epoch, but more than a third of an epoch of 1,600 images. So it runs at the epoch
        ends where its cost -- the last measured one, or a guess from image counts before the
        first -- fits the budget; on small data sets that is every few epochs. The final kNN of
        ``pretrain`` (its result) is taken once per run in any case. Deviation from "every epoch
        end", stated in the ``--knn-every`` help."""
        if self._train_clock is None:
            return False
        train_seconds = max(time.perf_counter() - self._train_clock - self.knn_seconds, 0.0)
        cost = self.knn_last_cost
        if cost is None:
            per_image = train_seconds / max(self._steps_timed * self.plan.global_batch, 1)
            cost = sum(self.knn_sizes()) * per_image * KNN_IMAGE_COST_GUESS
        return self.knn_seconds + cost <= KNN_TIME_BUDGET * train_seconds

    def monitor_knn(self, step: int) -> float | None:
        """kNN top-1 of encoder features (labelled training images as the bank) on the test split."""
        if not self.rt.is_main or self.data.test is None or not len(self.data.labeled_indices):
            return None
        if self.last_knn_step == step:  # already measured at this step (e.g. the last epoch end)
            return self.last_knn
        started = time.perf_counter()
        labeled = self.data.labeled_indices
        gen = torch.Generator().manual_seed(self.cfg.seed)
        bank = labeled[torch.randperm(len(labeled), generator=gen)[:KNN_BANK_SIZE]].sort().values
        test_n = len(self.data.test)
        test_idx = torch.randperm(test_n, generator=gen)[:KNN_TEST_SIZE].sort().values
        size = self.data.image_size
        bank_out, bank_labels = run_inference(self.net, self.data.train, self.rt, image_size=size, indices=bank,
                                              batch_size=self.cfg.eval_batch_size, keys=("features",))
        test_out, test_labels = run_inference(self.net, self.data.test, self.rt, image_size=size,
                                              indices=test_idx, batch_size=self.cfg.eval_batch_size,
                                              keys=("features",))
        acc = knn_accuracy(bank_out["features"], bank_labels, test_out["features"], test_labels,
                           k=self.cfg.knn_k, num_classes=self.data.num_classes)
        cost = time.perf_counter() - started
        self.knn_seconds += cost
        self.knn_last_cost = cost
        self.run.log(step, {"knn_top1": acc, "knn_seconds": cost}, prefix="monitor")
        self.last_knn, self.last_knn_step = acc, step
        return acc


def pretrain(cfg: Config) -> dict[str, Any]:
    """``simclrv2 pretrain``: returns the results written to ``results.json``."""
    rt = setup_runtime(cfg)
    if cfg.resume and cfg.out:  # a checkpoint of another network fails now, before anything is written
        checkpoints = CheckpointManager(cfg.out)
        latest = checkpoints.latest()
        if latest is not None:
            check_resume_compatible(checkpoints.read_meta(latest),
                                    {"stage": "pretrain", "arch": cfg.arch, "num_proj_layers": cfg.num_proj_layers,
                                     "proj_out_dim": cfg.proj_out_dim}, latest)
    run = RunDirectory.create(cfg, "pretrain", rt.is_main)
    data = prepare_data(cfg, need_test=True)
    plan = plan_steps(cfg, len(data.train), cfg.batch_size)
    if rt.is_main:
        print(describe_plan("pretrain", plan, len(data.train), rt) + "; " + data.describe())
    trainer = PretrainTrainer(cfg, rt, run, data, plan)
    metrics = trainer.fit()
    results: dict[str, Any] = {"stage": "pretrain", "arch": cfg.arch, "steps": trainer.step,
                               "image_size": data.image_size, "train_images": len(data.train),
                               "labeled_set": data.labeled_record(), "final": metrics,
                               "precision": rt.precision, "device": rt.device.type, "compiled": trainer.compiled, "allocator": rt.allocator}
    if data.test is not None:
        knn = trainer.monitor_knn(trainer.step)
        if knn is not None:
            results["knn_top1"] = knn
    if rt.is_main:
        export_model(trainer.net, run.path / "model.safetensors", trainer.meta)
        if trainer.ema is not None:
            export_model(trainer.ema.module, run.path / "ema_model.safetensors", trainer.meta)
    run.write_results(results)
    run.close()
    if rt.is_main:
        summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k in ("loss", "contrast_acc"))
        print(f"pretrain done: {summary}" + (f", kNN top-1 {results['knn_top1']:.4f}" if "knn_top1" in results
                                             else "") + f" -> {run.path}")
    return results
