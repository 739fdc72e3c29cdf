"""The run configuration: one dataclass, its per-stage defaults, YAML loading and validation.

Every command-line option of every training subcommand is generated from the fields of
:class:`Config` (see :mod:`simclrv2.cli.main`), so the help text, the allowed values and the
validation live in one place. Option names follow the reference flags of SPEC §7 where one
exists (``learning_rate`` -> ``--learning-rate`` ...).

Precedence: stage defaults < ``--config FILE.yaml`` < command-line flags. ``None`` in a
stage default means "derived from other fields" (for example the fine-tuning learning rate
depends on the architecture, SPEC §0); :func:`resolve` fills those in.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from simclrv2.errors import ConfigError

STAGES = ("pretrain", "finetune", "linear-eval", "supervised", "distill", "evaluate", "pipeline", "demo")
TRAIN_STAGES = ("pretrain", "finetune", "linear-eval", "supervised", "distill")
DATASET_NAMES = ("digits", "cifar10", "cifar100", "stl10")




def _opt(default: Any, help: str, stages: tuple[str, ...] | str = TRAIN_STAGES + ("pipeline",),
         **extra: Any) -> Any:
    if isinstance(stages, str):
        stages = (stages,)
    return field(default=default, metadata={"help": help, "stages": stages, **extra})


ALL = STAGES
DATA_STAGES = TRAIN_STAGES + ("evaluate", "pipeline")
AUG_STAGES = ("pretrain", "pipeline")


@dataclass
class Config:
    """Every setting of a run. Field docs are the ``--help`` texts."""

    # ---- data --------------------------------------------------------------------------
    data: str = _opt("digits", "Image-folder root (ROOT/train/<class>/*, ROOT/val|test/<class>/*) or a dataset "
                     "name: digits (embedded, offline), cifar10, cifar100, stl10.", DATA_STAGES)
    data_root: str | None = _opt(None, "Where torchvision keeps cifar10/cifar100/stl10 files "
                                 "(default ~/.cache/simclrv2/datasets).", DATA_STAGES)
    download: bool = _opt(False, "Download cifar10/cifar100/stl10 if missing (needs the network).", DATA_STAGES)
    image_size: int | None = _opt(None, "Training image side in pixels; <= 32 selects the CIFAR stem and the "
                                  "CIFAR augmentation preset (SPEC §1.2, §6). Default: native size of named "
                                  "datasets (32 for digits/CIFAR, 96 for STL-10), 224 for image folders.",
                                  DATA_STAGES)
    label_fraction: float | None = _opt(None, "Fraction of training labels used, class-balanced with at least "
                                        "one image per class, deterministic given --seed (e.g. 0.01, 0.1). "
                                        "Default: all labels.", DATA_STAGES)
    labeled_list: str | None = _opt(None, "File listing the labelled training images, one path per line "
                                    "relative to the train root (like the reference's 1percent.txt). "
                                    "Overrides --label-fraction.", DATA_STAGES)
    max_per_class: int | None = _opt(None, "Use at most this many training images per class (a quick "
                                     "subsample for smoke runs).", DATA_STAGES)
    num_workers: int = _opt(2, "Decoding worker processes for image folders too large for the memory cache.",
                            DATA_STAGES)
    strict: bool = _opt(False, "Stop before training when the data scan finds unreadable images "
                        "(default: skip them with a warning).", DATA_STAGES)

    # ---- run ---------------------------------------------------------------------------
    out: str | None = _opt(None, "Run directory (config, logs, checkpoints, results.json). "
                           "Default: runs/<stage>-<time>.", ALL)
    seed: int = _opt(0, "Random seed for subsets, initialisation, batch order and augmentations.", ALL)
    device: str = _opt("auto", "Where to train: cpu, cuda or auto (cuda when available).", ALL,
                       choices=("auto", "cpu", "cuda"))
    precision: str = _opt("auto", "Numeric precision: auto (bf16 autocast on CPUs with bf16 and on CUDA "
                          "GPUs that support it, else fp32), bf16, fp16 (CUDA, with gradient scaling), fp32.",
                          ALL, choices=("auto", "bf16", "fp16", "fp32"))
    channels_last: bool = _opt(True, "Use the channels_last memory layout (faster convolutions).", ALL)
    compile: bool = _opt(False, "torch.compile the model (CUDA; slower start, faster steps).", TRAIN_STAGES)
    resume: bool = _opt(False, "Continue from the last checkpoint in --out.", TRAIN_STAGES + ("pipeline",))
    dist_timeout: float = _opt(600.0, "Seconds a process waits for the others (start-up and each collective "
                               "operation) before it stops with an error, when several processes train "
                               "together (torchrun); a crashed or hung peer then ends the run instead of "
                               "hanging it.", ALL)

    # ---- model -------------------------------------------------------------------------
    arch: str = _opt("r18_1x_sk0", "Architecture r{depth}_{width}x_sk{0|1}, e.g. r18_1x_sk0, r50_2x_sk1 "
                     "(see `simclrv2 models`). For distill: the student.", ("pretrain", "supervised",
                                                                            "distill", "pipeline"))
    num_proj_layers: int = _opt(3, "Projection-head depth (SPEC §2.1; SimCLRv2 uses 3).",
                                ("pretrain", "pipeline"))
    proj_out_dim: int = _opt(128, "Projection output width (SPEC §2.1).", ("pretrain", "pipeline"))
    ft_proj_selector: int | None = _opt(None, "Head layer the classifier reads: 0 = head input, k = output of "
                                        "layer k, -1 = last. Default: 1 when fine-tuning on a label fraction "
                                        "below 1, else 0 (SPEC §2.1).", ("pretrain", "finetune", "pipeline"))
    checkpoint: str | None = _opt(None, "Checkpoint to start from (a run directory or a .safetensors file).",
                                  ("finetune", "linear-eval", "evaluate"))
    teacher: str | None = _opt(None, "Fine-tuned (or distilled) teacher checkpoint.", "distill")

    # ---- optimisation (SPEC §4, §5, §7) ------------------------------------------------
    epochs: float | None = _opt(None, "Training epochs (stage default: pretrain 100, finetune 60 at <=1%% "
                                "labels else 30, linear-eval 90, supervised 90, distill 400).", TRAIN_STAGES)
    max_steps: int | None = _opt(None, "Stop after this many optimiser steps (smoke runs); the schedule "
                                 "still follows --epochs unless --schedule-steps is set.", TRAIN_STAGES)
    batch_size: int | None = _opt(None, "Global batch size (stage default: pretrain/distill 512, "
                                  "finetune 1024, linear-eval/supervised 256; capped at the labelled set).",
                                  TRAIN_STAGES)
    eval_batch_size: int = _opt(256, "Batch size for evaluation and feature extraction.", ALL)
    optimizer: str | None = _opt(None, "lars (SPEC §4) or momentum (Nesterov SGD with L2 loss). Default: lars, "
                                 "momentum for linear-eval and supervised.", TRAIN_STAGES,
                                 choices=("lars", "momentum"))
    learning_rate: float | None = _opt(None, "Base learning rate, scaled by --learning-rate-scaling (defaults: "
                                       "pretrain/distill 0.1 sqrt, finetune 0.005 sqrt (0.002 for width>1 or "
                                       "SK), linear-eval/supervised 0.1 linear).", TRAIN_STAGES)
    learning_rate_scaling: str | None = _opt(None, "linear: lr*B/256; sqrt: lr*sqrt(B) (SPEC §5).",
                                             TRAIN_STAGES, choices=("linear", "sqrt"))
    warmup_epochs: float | None = _opt(None, "Linear warmup length in epochs (default: 5%% of --epochs for "
                                       "pretrain/distill, 0 otherwise).", TRAIN_STAGES)
    weight_decay: float | None = _opt(None, "Weight decay (pretrain/distill 1e-4, finetune 0, linear-eval 1e-6, "
                                      "supervised 1e-4).", TRAIN_STAGES)
    momentum: float = _opt(0.9, "Optimiser momentum.", TRAIN_STAGES)
    schedule_steps: int | None = _opt(None, "Total steps of the cosine schedule (default from --epochs).",
                                      TRAIN_STAGES)

    # ---- contrastive pretraining (SPEC §3, §6, paper §2) --------------------------------
    temperature: float | None = _opt(None, "Softmax temperature: NT-Xent tau for pretrain (default 0.1), "
                                     "distillation tau for distill (0.1 self, 1.0 into a smaller student).",
                                     ("pretrain", "distill", "pipeline"))
    color_jitter_strength: float | None = _opt(None, "Colour distortion strength s (default 1.0; 0.5 for "
                                               "images <= 32 px).", AUG_STAGES)
    use_blur: bool | None = _opt(None, "Gaussian blur in pretraining (default on; off for images <= 32 px).",
                                 AUG_STAGES)
    crop_method: str = _opt("reference", "Random crop sampler: reference (TF sample_distorted_bounding_box) or "
                            "torchvision (RandomResizedCrop).", TRAIN_STAGES + ("pipeline",),
                            choices=("reference", "torchvision"))
    crop_min_area: float = _opt(0.08, "Smallest crop area as a fraction of the image (SPEC §6 area_range; "
                                "the reference's 0.08; every training stage's crops). Raise it for tiny images "
                                "such as 8x8 digits.", TRAIN_STAGES + ("pipeline",))
    flip: bool = _opt(True, "Random horizontal flips (SPEC §6); turn off for data where mirroring changes the "
                      "class (digits, text).", TRAIN_STAGES + ("pipeline",))
    memory_size: int = _opt(0, "Momentum-memory queue length (extra negatives from an EMA encoder; 0 = off; "
                            "65536 in the ImageNet recipe).", ("pretrain", "pipeline"))
    ema_decay: float = _opt(0.999, "EMA decay of the momentum encoder.", ("pretrain", "pipeline"))
    memory_keys_fraction: float = _opt(0.25, "Share of each batch's images whose momentum-encoder projection "
                                       "(second view) is queued per step; 1.0 = MoCo's one key per image. "
                                       "0.25 keeps the momentum forward near 1/24 of a step's work.",
                                       ("pretrain", "pipeline"))
    global_bn: bool = _opt(True, "SyncBatchNorm across processes when distributed (SPEC §1.6).", TRAIN_STAGES)
    linear_probe: bool = _opt(True, "Train an online linear probe on stop-gradient features while "
                              "pretraining (TF2 lineareval_while_pretraining) when labels exist.",
                              ("pretrain", "pipeline"))
    knn_every: int = _opt(0, "Evaluate kNN accuracy on the test split every N steps (0 = at each epoch end "
                          "when a test split exists); at most 5000 labelled training and 2000 test images.",
                          ("pretrain",))
    knn_k: int = _opt(20, "Neighbours for the kNN monitor.", ("pretrain",))

    # ---- distillation (paper §2 Eq. 2-3) -------------------------------------------------
    alpha: float = _opt(1.0, "Weight of the distillation term; 1 - alpha weights the labelled cross-entropy "
                        "(paper Eq. 3). 1.0 = distillation only (the paper's default).", "distill")

    temperature_squared: bool = _opt(True, "Scale the distillation term by tau^2 as the reference's distillation "
                                     "colab does (keeps gradients of biases and BatchNorm parameters, which "
                                     "LARS does not adapt, bounded at small tau); off = the paper's Eq. 2 as "
                                     "written.", ("distill",))
    init_student: str | None = _opt(None, "Initialise the student's encoder from this checkpoint (e.g. the "
                                    "pretraining run) instead of from scratch (the paper's choice); must have "
                                    "the student's architecture. In a pipeline, 'pretrained' means the "
                                    "pipeline's own pretraining run (self-distillation only).",
                                    ("distill", "pipeline"))

    # ---- logging / checkpoints ---------------------------------------------------------
    log_every: int = _opt(10, "Write a log line every N steps.", TRAIN_STAGES)
    checkpoint_every: int = _opt(500, "Save a checkpoint every N steps (and always at the end).", TRAIN_STAGES)
    progress: bool = _opt(True, "Show progress bars.", ALL)

    # ---- pipeline -----------------------------------------------------------------------
    label_fractions: list[float] | None = _opt(None, "Label fractions of the pipeline (default 0.01 0.1).",
                                               ("pipeline",), nargs="+", type=float)
    student_arch: str | None = _opt(None, "Smaller student for big-to-small distillation in the pipeline "
                                    "(none = self-distillation only).", ("pipeline",))
    pretrain_epochs: float | None = _opt(None, "Pipeline: pretraining epochs.", ("pipeline",))
    finetune_epochs: float | None = _opt(None, "Pipeline: fine-tuning epochs.", ("pipeline",))
    distill_epochs: float | None = _opt(None, "Pipeline: distillation epochs.", ("pipeline",))
    supervised_epochs: float | None = _opt(None, "Pipeline: supervised-baseline epochs (default: the fine-tuning "
                                           "epochs at each label fraction).", ("pipeline",))
    stage_overrides: dict[str, dict[str, Any]] | None = _opt(
        None, "Pipeline: per-stage settings, from the YAML sections pretrain/finetune/supervised/linear_eval/"
        "distill (no command-line flag).", ())

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELD_NAMES = {f.name for f in fields(Config)}


def fields_for_stage(stage: str) -> list[dataclasses.Field]:
    return [f for f in fields(Config) if stage in f.metadata.get("stages", ())]


def is_dataset_name(data: str) -> bool:
    return data in DATASET_NAMES


def parse_arch_cheap(arch: str, field_name: str = "arch") -> tuple[int, int, bool]:
    """(depth, width, sk) from an architecture name, validated against the model registry."""
    from simclrv2.models import parse_arch
    try:
        spec = parse_arch(arch)
    except ValueError as exc:
        raise ConfigError(f"{field_name}: {exc}") from exc
    return spec.depth, spec.width, spec.sk


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config; keys may use dashes or underscores. Unknown keys are errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping of option: value")
    out: dict[str, Any] = {}
    sections = {"pretrain", "finetune", "supervised", "linear_eval", "distill"}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"config: section {key!r} in {path} must be a mapping of option: value")
            for sub in value:
                if str(sub).replace("-", "_") not in FIELD_NAMES:
                    raise ConfigError(f"config: unknown option {sub!r} in section {key!r} of {path}")
            out.setdefault("stage_overrides", {})[name] = {str(k).replace("-", "_"): v for k, v in value.items()}
            continue
        if name not in FIELD_NAMES:
            raise ConfigError(f"config: unknown option {key!r} in {path}; allowed: "
                              + ", ".join(sorted(FIELD_NAMES)))
        out[name] = value
    return out


def stage_defaults(stage: str) -> dict[str, Any]:
    """Defaults that differ by stage (SPEC §0 and §5 recipes)."""
    if stage in ("pretrain", "pipeline", "demo"):
        return dict(epochs=100, batch_size=512, optimizer="lars", learning_rate=0.1,
                    learning_rate_scaling="sqrt", weight_decay=1e-4, temperature=0.1)
    if stage == "finetune":
        return dict(batch_size=1024, optimizer="lars", learning_rate_scaling="sqrt", weight_decay=0.0,
                    warmup_epochs=0.0)
    if stage == "linear-eval":
        return dict(epochs=90, batch_size=256, optimizer="momentum", learning_rate=0.1,
                    learning_rate_scaling="linear", weight_decay=1e-6, warmup_epochs=0.0)
    if stage == "supervised":
        return dict(epochs=90, batch_size=256, optimizer="momentum", learning_rate=0.1,
                    learning_rate_scaling="linear", weight_decay=1e-4, warmup_epochs=0.0)
    if stage == "distill":
        return dict(epochs=400, batch_size=512, optimizer="lars", learning_rate=0.1,
                    learning_rate_scaling="sqrt", weight_decay=1e-4)
    return {}


def build_config(stage: str, file_values: dict[str, Any] | None = None,
                 flag_values: dict[str, Any] | None = None) -> Config:
    """Merge stage defaults, file values and flags, then resolve derived defaults and validate."""
    merged: dict[str, Any] = dict(stage_defaults(stage))
    for source in (file_values or {}, flag_values or {}):
        for key, value in source.items():
            if key not in FIELD_NAMES:
                raise ConfigError(f"{key}: unknown option")
            merged[key] = value
    try:
        cfg = Config(**merged)
    except TypeError as exc:  # pragma: no cover - guarded by FIELD_NAMES
        raise ConfigError(str(exc)) from exc
    cfg = resolve(stage, cfg)
    validate(stage, cfg)
    return cfg


def resolve(stage: str, cfg: Config) -> Config:
    """Fill the defaults that depend on other fields (SPEC §0, §2.1, §5, §6)."""
    changes: dict[str, Any] = {}
    fraction = 1.0 if cfg.label_fraction is None and cfg.labeled_list is None else (cfg.label_fraction or 0.0)
    if stage == "finetune":
        if cfg.epochs is None:
            changes["epochs"] = 60 if fraction <= 0.01 else 30
        if cfg.learning_rate is None:
            try:  # the network being fine-tuned is the checkpoint's, not --arch's default
                _, width, sk = parse_arch_cheap(_checkpoint_arch(cfg.checkpoint) or cfg.arch)
            except ConfigError:
                width, sk = 1, False
            changes["learning_rate"] = 0.002 if (width > 1 or sk) else 0.005
    if cfg.ft_proj_selector is None and stage == "finetune":
        changes["ft_proj_selector"] = 1 if (cfg.labeled_list is not None or fraction < 1.0) else 0
    if cfg.warmup_epochs is None:
        epochs = changes.get("epochs", cfg.epochs)
        changes["warmup_epochs"] = 0.05 * epochs if (stage in ("pretrain", "distill", "pipeline", "demo")
                                                     and epochs) else 0.0
    return cfg.replace(**changes) if changes else cfg


def _checkpoint_arch(checkpoint: str | None) -> str | None:
    """The architecture recorded in a checkpoint's safetensors metadata (None if unreadable;
    validation reports a missing checkpoint)."""
    if not checkpoint:
        return None
    try:
        import json

        from safetensors import safe_open

        from simclrv2.utils.checkpoint import META_KEY, find_weights
        with safe_open(str(find_weights(checkpoint)), framework="pt") as handle:
            arch = json.loads((handle.metadata() or {}).get(META_KEY, "{}")).get("arch")
    except Exception:  # noqa: BLE001 - any unreadable checkpoint: fall back to --arch
        return None
    return arch if isinstance(arch, str) else None


def _positive(cfg: Config, name: str, allow_none: bool = True) -> None:
    value = getattr(cfg, name)
    if value is None and allow_none:
        return
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(
            value) or value <= 0:
        raise ConfigError(f"{name}: must be a positive number, got {value!r}")


def validate(stage: str, cfg: Config) -> None:
    """Reject invalid settings before any work starts (exit code 2 in the CLI)."""
    for name in ("learning_rate", "batch_size", "epochs", "max_steps", "image_size", "eval_batch_size",
                 "log_every", "checkpoint_every", "schedule_steps", "max_per_class", "dist_timeout"):
        _positive(cfg, name)
    if cfg.temperature is not None:
        _positive(cfg, "temperature")
    for name in ("batch_size", "max_steps", "image_size", "eval_batch_size", "max_per_class"):
        value = getattr(cfg, name)
        if value is not None and int(value) != value:
            raise ConfigError(f"{name}: must be a whole number, got {value!r}")
    if cfg.label_fraction is not None and not (0.0 < cfg.label_fraction <= 1.0):
        raise ConfigError(f"label_fraction: must be in (0, 1], got {cfg.label_fraction!r}")
    if cfg.label_fractions is not None:
        for value in cfg.label_fractions:
            if not (0.0 < value <= 1.0):
                raise ConfigError(f"label_fractions: each must be in (0, 1], got {value!r}")
    for name in ("weight_decay", "warmup_epochs"):
        value = getattr(cfg, name)
        if value is not None and (not math.isfinite(value) or value < 0):
            raise ConfigError(f"{name}: must be >= 0, got {value!r}")
    if not (0.0 <= cfg.momentum < 1.0):
        raise ConfigError(f"momentum: must be in [0, 1), got {cfg.momentum!r}")
    if not (0.0 <= cfg.ema_decay < 1.0):
        raise ConfigError(f"ema_decay: must be in [0, 1), got {cfg.ema_decay!r}")
    if not (0.0 <= cfg.alpha <= 1.0):
        raise ConfigError(f"alpha: must be in [0, 1], got {cfg.alpha!r}")
    if not (0.0 < cfg.crop_min_area <= 1.0):
        raise ConfigError(f"crop_min_area: must be in (0, 1], got {cfg.crop_min_area!r}")
    if not (0.0 < cfg.memory_keys_fraction <= 1.0):
        raise ConfigError(f"memory_keys_fraction: must be in (0, 1], got {cfg.memory_keys_fraction!r}")
    if cfg.memory_size < 0:
        raise ConfigError(f"memory_size: must be >= 0, got {cfg.memory_size!r}")
    if cfg.color_jitter_strength is not None and cfg.color_jitter_strength < 0:
        raise ConfigError(f"color_jitter_strength: must be >= 0, got {cfg.color_jitter_strength!r}")
    if stage in ("pretrain", "pipeline") and cfg.num_proj_layers == 0:
        raise ConfigError("num_proj_layers: pretraining needs a projection head, use 2..4 (SimCLRv2: 3)")
    if not (2 <= cfg.num_proj_layers <= 4) and cfg.num_proj_layers != 0:
        raise ConfigError(f"num_proj_layers: must be 0 or 2..4, got {cfg.num_proj_layers!r}")
    head_known = stage in fields_stage_of("num_proj_layers")  # finetune: the checkpoint's head decides
    if cfg.ft_proj_selector is not None and cfg.ft_proj_selector != -1 and not (
            0 <= cfg.ft_proj_selector <= (cfg.num_proj_layers if head_known else cfg.ft_proj_selector)):
        raise ConfigError(f"ft_proj_selector: must be -1 or between 0 and num_proj_layers="
                          f"{cfg.num_proj_layers}, got {cfg.ft_proj_selector!r}")
    for name in ("arch", "student_arch"):
        value = getattr(cfg, name)
        if value is not None and stage in fields_stage_of(name):
            parse_arch_cheap(value, name)
    for name, meta_field in ((f.name, f) for f in fields(Config)):
        choices = meta_field.metadata.get("choices")
        value = getattr(cfg, name)
        if choices and value is not None and value not in choices:
            raise ConfigError(f"{name}: must be one of {', '.join(choices)}, got {value!r}")
    if stage == "distill" and cfg.init_student and not Path(cfg.init_student).exists():
        raise ConfigError(f"init_student: {cfg.init_student!r} does not exist")
    if cfg.labeled_list is not None and not Path(cfg.labeled_list).is_file():
        raise ConfigError(f"labeled_list: file {cfg.labeled_list!r} does not exist")
    if stage in DATA_STAGES and not is_dataset_name(cfg.data):
        root = Path(cfg.data)
        if not root.is_dir():
            raise ConfigError(f"data: {cfg.data!r} is neither a dataset name ({', '.join(DATASET_NAMES)}) "
                              "nor an existing folder")
    if stage in ("finetune", "linear-eval", "evaluate") and not cfg.checkpoint:
        raise ConfigError(f"checkpoint: {stage} needs --checkpoint PATH (a run directory or weights file)")
    if stage in ("finetune", "linear-eval", "evaluate") and cfg.checkpoint and not Path(cfg.checkpoint).exists():
        raise ConfigError(f"checkpoint: {cfg.checkpoint!r} does not exist")
    if stage == "distill":
        if not cfg.teacher:
            raise ConfigError("teacher: distill needs --teacher PATH (a fine-tuned run directory or weights file)")
        if not Path(cfg.teacher).exists():
            raise ConfigError(f"teacher: {cfg.teacher!r} does not exist")
    if cfg.precision == "fp16" and cfg.device == "cpu":
        raise ConfigError("precision: fp16 needs a CUDA device; use bf16 or fp32 on the CPU")


def fields_stage_of(name: str) -> tuple[str, ...]:
    for f in fields(Config):
        if f.name == name:
            return f.metadata.get("stages", ())
    return ()


def save_config(cfg: Config, path: str | Path, stage: str) -> None:
    data = {"stage": stage, **cfg.to_dict()}
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
