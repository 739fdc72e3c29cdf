"""One readable training loop shared by every stage (in the spirit of the DINO / MoCo v3 loops).

A stage subclasses :class:`Trainer` and implements :meth:`Trainer.train_step` (one optimiser
step on one batch, returning detached metric tensors). The loop owns what every stage needs:
the learning-rate schedule (SPEC §5), distributed batch sharding, the progress bar (loss, rate,
ETA), JSON-lines + TensorBoard logs, periodic crash-safe checkpoints, ``--resume`` at the exact
batch where a run stopped, and the guard that stops on a NaN/Inf loss without overwriting the
last good checkpoint.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from simclrv2.config import Config
from simclrv2.errors import ConfigError
from simclrv2.data import BatchIterator, ImageSource
from simclrv2.optim import LARS, WarmupCosineSchedule, lars_param_groups, scale_learning_rate, steps_for, \
    warmup_steps_for
from simclrv2.errors import CheckpointError, DataError, Terminated, TrainingError
from simclrv2.training.rundir import RunDirectory
from simclrv2.training.runtime import Runtime, choose_compile, make_generator, restore_rng_state, rng_state
from simclrv2.utils import distributed as dist_utils


@dataclass
class StepPlan:
    """How many steps a stage runs (SPEC §5: total = N·E//B + 1, warmup = round(E_w·N//B))."""

    steps_per_epoch: int
    schedule_steps: int
    warmup_steps: int
    run_steps: int
    global_batch: int
    peak_lr: float


def plan_steps(cfg: Config, num_examples: int, global_batch: int) -> StepPlan:
    if num_examples < 1:
        raise ConfigError("data: no training images for this stage")
    global_batch = min(int(global_batch), num_examples)
    if global_batch < 2:
        raise DataError(f"data: this stage has {num_examples} training image(s) and a batch of {global_batch}; "
                        "training needs at least 2 images per batch (BatchNorm statistics, and contrastive "
                        "negatives, come from the other images of the batch). Give more (labelled) images")
    steps_per_epoch = max(1, num_examples // global_batch)
    schedule_steps = cfg.schedule_steps or steps_for(num_examples, float(cfg.epochs), global_batch)
    warmup = min(warmup_steps_for(float(cfg.warmup_epochs or 0.0), num_examples, global_batch), schedule_steps)
    run_steps = schedule_steps if cfg.max_steps is None else min(schedule_steps, int(cfg.max_steps))
    peak = scale_learning_rate(cfg.learning_rate, global_batch, cfg.learning_rate_scaling)
    return StepPlan(steps_per_epoch, schedule_steps, warmup, run_steps, global_batch, peak)


def crop_and_flip(cfg: Config) -> dict[str, Any]:
    """The configured random crop + flip, as :class:`~simclrv2.augment.AugmentConfig` overrides;
    every training stage takes them (SPEC §6), so the pipeline can share them."""
    return dict(crop_method=cfg.crop_method, area_range=(cfg.crop_min_area, 1.0), flip=cfg.flip)


def build_optimizer(cfg: Config, model: nn.Module, peak_lr: float,
                    classifier_lr_scale: float | None = None) -> torch.optim.Optimizer:
    """LARS with BN/bias/classifier exclusions (SPEC §4) or Nesterov momentum SGD with L2 on
    every non-BatchNorm parameter (the reference's ``momentum`` optimiser).

    ``classifier_lr_scale`` (LARS only) puts the classifier in its own excluded group whose learning
    rate is the schedule's times this factor (used by the online probe of pretraining, see
    pretrain.py, and by a distillation student's classifier, see classifier.py)."""
    if cfg.optimizer == "lars":
        groups = lars_param_groups(model, weight_decay=cfg.weight_decay or 0.0)
        if classifier_lr_scale is not None:
            probe = [p for name, p in model.named_parameters() if name.startswith("classifier.")]
            probe_ids = {id(p) for p in probe}
            for group in groups:
                group["params"] = [p for p in group["params"] if id(p) not in probe_ids]
            groups = [g for g in groups if g["params"]]
            if probe:
                groups.append({"params": probe, "weight_decay": 0.0, "exclude": True,
                               "lr_scale": classifier_lr_scale})
        return LARS(groups, lr=peak_lr, momentum=cfg.momentum)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_bn = param.ndim <= 1 and not name.endswith("bias")
        (no_decay if is_bn else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay or 0.0},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=peak_lr, momentum=cfg.momentum, nesterov=True)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, *,
                   nonfinite: torch.Tensor | None = None) -> None:
    """Backward of ``loss`` (scaled when fp16), one optimiser step, scaler update. With ``nonfinite``
    (a bool tensor on the device) a NaN/Inf loss is recorded in place, without a host sync."""
    if nonfinite is not None:
        nonfinite |= ~torch.isfinite(loss.detach())
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


class Trainer:
    """Base class: subclasses set ``self.model`` (possibly DDP-wrapped), ``self.optimizer`` and
    implement :meth:`train_step`; optionally :meth:`extra_state`, :meth:`load_extra_state`,
    :meth:`on_epoch_end`, :meth:`checkpoint_weights`."""

    stage = "train"

    def __init__(self, cfg: Config, rt: Runtime, run: RunDirectory, source: ImageSource,
                 indices: torch.Tensor | None, plan: StepPlan) -> None:
        self.cfg, self.rt, self.run, self.source, self.indices, self.plan = cfg, rt, run, source, indices, plan
        if plan.global_batch % rt.world_size:
            raise ConfigError(f"batch_size: the global batch {plan.global_batch} must divide evenly over "
                              f"{rt.world_size} processes")
        self.local_batch = plan.global_batch // rt.world_size
        self.schedule = WarmupCosineSchedule(plan.peak_lr, plan.warmup_steps, plan.schedule_steps)
        self.generators = {"augment": make_generator(rt.device, cfg.seed * 1000 + 17 + rt.rank)}
        self.step = 0
        self.model: nn.Module
        self.optimizer: torch.optim.Optimizer
        self.scaler = rt.grad_scaler()
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=rt.device)
        self.last_metrics: dict[str, float] = {}

    # ---- to implement ------------------------------------------------------------------
    def train_step(self, batch) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any], weights: dict[str, dict[str, torch.Tensor]]) -> None:
        pass

    def checkpoint_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        from simclrv2.training.model_io import unwrap
        return {"model": unwrap(self.model).state_dict()}

    def model_meta(self) -> dict[str, Any]:
        return {}

    def on_epoch_end(self, epoch: int) -> None:
        pass

    # ---- shared machinery --------------------------------------------------------------
    def compile_if_chosen(self, images_per_step: int) -> None:
        """Wrap ``self.model`` in ``torch.compile`` when ``--compile`` (or auto, for a long CPU stage:
        :func:`~simclrv2.training.runtime.choose_compile`) says so; ``self.compiled`` records it. Monitors
        and evaluations use the plain network, so they never trigger a recompilation."""
        choice = choose_compile(self.cfg.compile, self.rt.device, self.plan.run_steps, images_per_step,
                                self.rt.precision)
        self.compiled = choice.enabled
        if self.rt.is_main:
            print(f"{self.stage}: {choice.describe()}", flush=True)
        if choice.enabled:
            self.model = torch.compile(self.model)

    def backward_and_step(self, loss: torch.Tensor) -> None:
        """Backward with optional fp16 scaling, then an optimiser step; records non-finite losses
        on the device (checked at log/checkpoint time, so no per-step host sync)."""
        optimizer_step(loss, self.optimizer, self.scaler, nonfinite=self._nonfinite)

    def check_finite(self) -> None:
        flag = self._nonfinite
        if dist_utils.is_distributed():  # a NaN on any rank stops every rank at the same step
            flag = dist_utils.all_reduce_mean(flag.float()) > 0
        if bool(flag):
            raise TrainingError(
                f"the loss became NaN or Inf at or before step {self.step}; the run was stopped and the last "
                f"good checkpoint was kept ({self.run.checkpoints.latest() or 'none yet'}). Try a lower "
                "--learning-rate, --precision fp32, or check the input data.")

    def check_weights_finite(self, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        """Refuse to checkpoint weights holding NaN/Inf (an update can break them while the loss of
        that very step was still finite)."""
        tensors = [(f"{stem}.{key}", value) for stem, state in weights.items() for key, value in state.items()
                   if isinstance(value, torch.Tensor) and value.is_floating_point()]
        if not tensors or bool(torch.stack([torch.isfinite(v).all() for _, v in tensors]).all()):
            return
        bad = [name for name, v in tensors if not bool(torch.isfinite(v).all())]
        raise TrainingError(
            f"the weights became NaN or Inf at or before step {self.step} ({len(bad)} tensors, e.g. "
            f"{', '.join(bad[:3])}); the run was stopped without writing them and the last good checkpoint "
            f"was kept ({self.run.checkpoints.latest() or 'none yet'}). Try a lower --learning-rate or "
            "--precision fp32.")

    def save_checkpoint(self) -> None:
        """Write a checkpoint on rank 0; the other ranks wait for it with the I/O timeout (not
        ``--dist-timeout``: a slow disk is not a dead peer) and stop with rank 0 if the write failed."""
        self.check_finite()

        def write() -> None:
            weights = self.checkpoint_weights()
            self.check_weights_finite(weights)
            state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                     "scaler": self.scaler.state_dict(), "rng": rng_state(self.generators), **self.extra_state()}
            meta = {"stage": self.stage, **self.model_meta()}
            try:
                self.run.checkpoints.save(self.step, weights=weights, state=state, meta=meta)
            except OSError as exc:
                raise TrainingError(f"could not write a checkpoint to {self.run.checkpoints.root} "
                                    f"({exc.strerror or exc}); nothing half-written was left and the previous "
                                    f"checkpoint is intact ({self.run.checkpoints.latest() or 'none yet'}). Free "
                                    "disk space or choose another --out, then --resume") from exc

        dist_utils.share_outcome(write if self.rt.is_main else None)
        self._saved_step = self.step

    def _choose_resume_point(self) -> str | None:
        """Rank 0's choice: the checkpoint ``latest`` names if it is complete, else the newest complete
        one (with a message); None when the run has no checkpoint folder at all."""
        manager = self.run.checkpoints
        latest = manager.latest()
        if latest is None:
            folders = manager.step_folders()
            if folders:
                raise CheckpointError(
                    f"resume: none of the {len(folders)} checkpoint folders in {manager.root} is complete (e.g. "
                    f"{folders[-1].name}); nothing was changed. Move them away to start this run again from "
                    "step 0, or use a new --out")
            print(f"resume: {self.run.path} has no checkpoint yet; starting from step 0", flush=True)
            return None
        if manager.note:
            print(f"resume: {manager.note}", flush=True)
        return latest.name

    def maybe_resume(self) -> None:
        if not self.cfg.resume:
            return
        name = dist_utils.share_outcome(self._choose_resume_point if self.rt.is_main else None)
        if name is None:
            return
        latest = self.run.checkpoints.root / name
        # Every rank loads the checkpoint rank 0 chose and checks it is the same one (ranks without a
        # shared file system would otherwise continue from different points).
        visible = self.run.checkpoints.is_complete(latest)
        if not dist_utils.all_agree(visible):
            raise CheckpointError(f"resume: rank 0 resumes from {name}, but rank(s) cannot see a complete {latest}"
                                  f" (this is rank {self.rt.rank}: {'visible' if visible else 'missing'}); all "
                                  "processes need the same run directory (a shared file system)")
        mine = _fingerprint(latest)
        if not dist_utils.all_agree(dist_utils.broadcast_object(mine) == mine):
            raise CheckpointError(f"resume: the processes found different checkpoints named {name} (meta.json or "
                                  "file sizes differ between ranks); all processes need the same run directory")
        ckpt = self.run.checkpoints.load(latest)
        step = ckpt["meta"].get("step") if isinstance(ckpt["meta"].get("step"), int) else -1
        expected = {"stage": self.stage, **self.model_meta()}
        check_resume_compatible(ckpt["meta"], expected, latest)
        from simclrv2.training.model_io import load_state_into, unwrap
        if "model" not in ckpt["weights"]:
            raise CheckpointError(f"resume: {latest} holds no model.safetensors; it is not a complete checkpoint")
        arch = str(expected.get("arch", "requested"))
        load_state_into(unwrap(self.model), ckpt["weights"]["model"], source=str(latest), expected_arch=arch,
                        source_arch=str(ckpt["meta"].get("arch", "different")))
        state = ckpt["state"]
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            restore_rng_state(state["rng"], self.generators)
            self.load_extra_state(state, ckpt["weights"])
            self.step = int(state["step"])
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError, AttributeError) as exc:
            raise CheckpointError(f"resume: the optimiser/state of {latest} does not fit this run "
                                  f"({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}); "
                                  "use the options of the original run or a new --out") from exc
        if self.step != step:
            raise CheckpointError(f"resume: {latest} says step {step} in meta.json but {self.step} in state.pt; "
                                  "it is damaged, delete it (--resume then uses the newest complete one)")
        self._saved_step = self.step
        self.run.record(resumed_from=name, step=self.step)
        if self.rt.is_main:
            print(f"resume: continuing from step {self.step} ({latest})")

    def _terminate_requested(self) -> bool:
        """True on every rank once any rank received SIGTERM (ranks stop at the same step)."""
        flag = self._sigterm
        if dist_utils.is_distributed():
            flag = not dist_utils.all_agree(not flag)
        return flag

    def batches(self, epoch: int, start_batch: int) -> BatchIterator:
        """The batches of ``epoch`` from ``start_batch`` on; one iterator is kept so that decoding
        workers of disk-backed sources persist across epochs."""
        if getattr(self, "_batches", None) is None:
            self._batches = BatchIterator(
                self.source, self.local_batch, shuffle=True, drop_last=True, seed=self.cfg.seed, epoch=epoch,
                rank=self.rt.rank, world_size=self.rt.world_size, num_workers=self.cfg.num_workers,
                indices=self.indices, start_batch=start_batch, pin_memory=self.rt.device.type == "cuda")
        else:
            self._batches.set_epoch(epoch, start_batch)
        return self._batches

    def _log(self, metrics: dict[str, torch.Tensor], images_per_s: float, pbar: tqdm) -> None:
        values = {k: float(dist_utils.all_reduce_mean(v.detach().float())) for k, v in metrics.items()}
        self.check_finite()
        values["lr"] = self.schedule.lr_at(self.step - 1)
        values["images_per_s"] = images_per_s
        self.last_metrics = values
        self.run.log(self.step, values)
        shown = {k: f"{v:.3g}" for k, v in values.items() if k in ("loss", "contrast_acc", "acc", "lr")}
        shown["img/s"] = f"{images_per_s:.0f}"
        pbar.set_postfix(shown, refresh=False)

    def fit(self) -> dict[str, float]:
        """Run until ``plan.run_steps`` (or resume and finish); returns the last logged metrics.

        SIGTERM (a scheduler's pre-emption notice) is caught while training: the current step ends,
        a checkpoint is saved, and :class:`~simclrv2.errors.Terminated` (exit 143) is raised."""
        self._saved_step = None
        self._sigterm = False
        previous = self._catch_sigterm()
        try:
            self.maybe_resume()
            self._train()
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        if self._sigterm and previous is not None:  # came after the loop's last look: hand it on
            signal.raise_signal(signal.SIGTERM)
        return self.last_metrics

    def _catch_sigterm(self):
        if threading.current_thread() is not threading.main_thread():
            return None

        def on_sigterm(signum, frame):
            if self._sigterm:  # a second SIGTERM: stop now
                raise Terminated("received SIGTERM twice; stopped without a new checkpoint (the last complete "
                                 f"one is kept); continue with --resume --out {self.run.path}")
            self._sigterm = True

        return signal.signal(signal.SIGTERM, on_sigterm)

    def _train(self) -> None:
        plan = self.plan
        pbar = tqdm(total=plan.run_steps, initial=self.step, desc=self.stage, unit="step",
                    disable=not (self.cfg.progress and self.rt.is_main), dynamic_ncols=True)
        self.model.train()
        window_start, window_images = time.perf_counter(), 0
        try:
            while self.step < plan.run_steps:
                epoch, start_batch = divmod(self.step, plan.steps_per_epoch)
                for batch in self.batches(epoch, start_batch):
                    self.schedule.apply(self.optimizer, self.step)
                    metrics = self.train_step(batch)
                    self.step += 1
                    window_images += len(batch.labels) * self.rt.world_size
                    pbar.update(1)
                    last = self.step >= plan.run_steps
                    if self.step % self.cfg.log_every == 0 or last:
                        elapsed = time.perf_counter() - window_start
                        self._log(metrics, window_images / max(elapsed, 1e-9), pbar)
                        window_start, window_images = time.perf_counter(), 0
                    if self.step % self.cfg.checkpoint_every == 0 and not last:
                        self.save_checkpoint()
                    if self._terminate_requested():
                        if self._saved_step != self.step:
                            self.save_checkpoint()
                        raise Terminated(f"received SIGTERM; saved a checkpoint at step {self.step} "
                                         f"({self.run.checkpoints.root / f'step-{self.step:08d}'}); continue with "
                                         f"--resume --out {self.run.path}")
                    if last or self.step % plan.steps_per_epoch == 0:
                        break
                if self.step % plan.steps_per_epoch == 0:
                    self.on_epoch_end(self.step // plan.steps_per_epoch)
            if self._saved_step != self.step:  # a finished run resumed again writes nothing new
                self.save_checkpoint()
        except RuntimeError as exc:
            if not isinstance(exc, TrainingError) and "DataLoader worker" in str(exc):
                # a decoding worker killed (OOM killer, signal) or crashed: the loop cannot go on
                raise TrainingError(f"an image-decoding worker stopped ({str(exc).splitlines()[0][:200]}); the "
                                    f"last complete checkpoint is kept ({self.run.checkpoints.latest() or 'none yet'})."
                                    " Lower --num-workers or free memory, then --resume") from exc
            if (not isinstance(exc, TrainingError) and dist_utils.is_distributed()
                    and dist_utils.is_peer_failure(exc)):
                raise TrainingError(dist_utils.peer_failure_message(exc)) from exc
            raise
        finally:
            pbar.close()


def _fingerprint(folder) -> str:
    """meta.json's digest and every file's size: equal on ranks that see the same checkpoint."""
    import hashlib
    digest = hashlib.sha256((folder / "meta.json").read_bytes())
    for file in sorted(folder.iterdir()):
        digest.update(f"{file.name}:{file.stat().st_size};".encode())
    return digest.hexdigest()


RESUME_KEYS = ("stage", "arch", "image_size", "num_proj_layers", "proj_out_dim", "num_classes",
               "head_layers_kept", "classes")


def check_resume_compatible(found: dict[str, Any], expected: dict[str, Any], where: Any) -> None:
    """Raise :class:`CheckpointError` (exit code 2) when the checkpoint a resume would load was written
    for another network or data set; ``expected`` may hold only the keys known so far."""
    diffs = []
    for key in RESUME_KEYS:
        if key in found and key in expected and expected[key] is not None and found[key] is not None:
            a, b = found[key], expected[key]
            if (list(a) != list(b)) if isinstance(a, (list, tuple)) else a != b:
                shown_a = f"{len(a)} classes" if key == "classes" else repr(a)
                shown_b = f"{len(b)} classes" if key == "classes" else repr(b)
                diffs.append(f"{key} {shown_a} in the checkpoint, {shown_b} now")
    if diffs:
        raise CheckpointError(f"resume: the checkpoint {where} does not match the requested network/data ("
                              + "; ".join(diffs) + "); use the original options or a new --out")


def describe_plan(stage: str, plan: StepPlan, num_examples: int, rt: Runtime) -> str:
    return (f"{stage}: {num_examples} images, global batch {plan.global_batch}, {plan.run_steps} steps "
            f"(schedule {plan.schedule_steps}, warmup {plan.warmup_steps}, {plan.steps_per_epoch}/epoch), "
            f"peak lr {plan.peak_lr:.4g}, {rt.device.type} {rt.precision}"
            + (f", malloc: {rt.allocator}" if rt.device.type == "cpu" else "")
            + (f", {rt.world_size} processes" if rt.distributed else ""))
