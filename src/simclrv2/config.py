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
import difflib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from simclrv2 import recipes
from simclrv2.errors import ConfigError

STAGES = ("pretrain", "finetune", "linear-eval", "supervised", "distill", "evaluate", "pipeline", "demo")
TRAIN_STAGES = ("pretrain", "finetune", "linear-eval", "supervised", "distill")
DATASET_NAMES = ("digits", "cifar10", "cifar100", "stl10")
MAX_IMAGE_SIZE = 4096




def _opt(default: Any, help: str, stages: tuple[str, ...] | str = TRAIN_STAGES + ("pipeline",),
         **extra: Any) -> Any:
    if isinstance(stages, str):
        stages = (stages,)
    return field(default=default, metadata={"help": help, "stages": stages, **extra})


ALL = STAGES
NOT_DEMO = tuple(s for s in STAGES if s != "demo")  # the demo fixes everything but out/seed/device/precision
DATA_STAGES = TRAIN_STAGES + ("evaluate", "pipeline")
LABEL_STAGES = TRAIN_STAGES + ("pipeline",)  # evaluate scores the evaluation split, it uses no training labels
LINEAR_EVAL_IGNORES = ("optimizer", "warmup_epochs", "max_steps", "schedule_steps", "compile", "global_bn",
                       "log_every", "checkpoint_every", "crop_method", "crop_min_area", "flip")
"""linear-eval trains one linear layer on cached centre-crop features with Nesterov SGD: these options of
the other training stages have nothing to act on there, so it does not accept them."""
TRAINERS = tuple(s for s in TRAIN_STAGES if s != "linear-eval")
AUG_STAGES = ("pretrain", "pipeline")


@dataclass
class Config:
    """Every setting of a run. Field docs are the ``--help`` texts."""

    # ---- data --------------------------------------------------------------------------
    data: str | None = _opt(None, "Labelled data: an image-folder root (ROOT/train/<class>/*, "
                            "ROOT/val|test/<class>/*; evaluate needs only val/ or test/) or a dataset name: digits "
                            "(embedded, offline), cifar10, cifar100, stl10. Default: finetune, distill, linear-eval "
                            "and evaluate use the data recorded in --checkpoint/--teacher; pretrain and supervised "
                            "use digits unless --unlabeled or --labels is given.", DATA_STAGES)
    unlabeled: list[str] | None = _opt(None, "Folder of unlabelled images (repeatable): every image under it, "
                                       "recursively, in any structure; folder names are ignored. Pretraining "
                                       "and distillation train on these plus the labelled images.",
                                       ("pretrain", "distill", "pipeline"), action="append")
    labels: str | None = _opt(None, "CSV file of labelled training images, one 'path,label' row per image "
                              "(paths relative to the CSV's folder; a header row 'path,label' is allowed), "
                              "instead of class folders under --data ROOT/train.", LABEL_STAGES)
    data_root: str | None = _opt(None, "Where torchvision keeps cifar10/cifar100/stl10 files "
                                 "(default ~/.cache/simclrv2/datasets).", DATA_STAGES)
    download: bool = _opt(False, "Download cifar10/cifar100/stl10 if missing (needs the network).", DATA_STAGES)
    image_size: int | None = _opt(None, "Training image side in pixels; <= 32 selects the CIFAR stem and the "
                                  "CIFAR augmentation preset (SPEC §1.2, §6). Default: the checkpoint's size "
                                  "when starting from one; else 32 for digits/CIFAR, 96 for STL-10, and for "
                                  "image folders the median longest side of a sample of up to 64 images when "
                                  "that median is <= 32 px, else 224 (a note is printed when sizes are mixed). "
                                  "The size used is printed in the plan line.", DATA_STAGES)
    label_fraction: float | None = _opt(None, "Fraction of training labels used, class-balanced with at least "
                                        "one image per class, deterministic given --seed (e.g. 0.01, 0.1). "
                                        "Default: all labels; distill and linear-eval inherit the labelled set "
                                        "recorded in --teacher/--checkpoint.", LABEL_STAGES)
    labeled_list: str | None = _opt(None, "File listing the labelled training images, one path per line "
                                    "relative to the train root (like the reference's 1percent.txt). "
                                    "Overrides --label-fraction.", LABEL_STAGES)
    max_per_class: int | None = _opt(None, "Use at most this many training images per class (a quick "
                                     "subsample for smoke runs).", LABEL_STAGES)
    num_workers: int = _opt(2, "Decoding worker processes for image folders too large for the memory cache.",
                            DATA_STAGES)
    strict: bool = _opt(False, "Stop before training when the data scan finds unreadable images "
                        "(default: skip them with a warning).", DATA_STAGES)

    # ---- run ---------------------------------------------------------------------------
    out: str | None = _opt(None, "Run directory (config, logs, checkpoints, results.json). "
                           "Default: runs/<stage>-<time>.", ALL)
    seed: int = _opt(0, "Random seed for subsets, initialisation, batch order and augmentations.",
                     TRAIN_STAGES + ("pipeline", "demo"))
    device: str = _opt("auto", "Where to train: cpu, cuda or auto (cuda when available).", ALL,
                       choices=("auto", "cpu", "cuda"))
    precision: str = _opt("auto", "Numeric precision: auto (CUDA: bf16 where the GPU supports it, else fp16; "
                          "CPU: fp32 unless it has native bf16 (AVX-512-BF16 or AMX), then whichever of bf16 "
                          "autocast and fp32 a short probe at the run's image size and batch measures faster, "
                          "cached in ~/.cache/simclrv2/precision_probe.json), bf16, fp16 (CUDA, with gradient "
                          "scaling), fp32.",
                          ALL, choices=("auto", "bf16", "fp16", "fp32"))
    channels_last: bool = _opt(True, "Use the channels_last memory layout (faster convolutions).", NOT_DEMO)
    compile: bool | None = _opt(None, "torch.compile the training network (up to a minute of compiling, then "
                                "slightly faster fp32 steps, measured on a 2-core CPU; no gain measured in bf16). Unset: on "
                                "for fp32 CPU stages that train at least 300,000 images when a C++ compiler is "
                                "installed; off in bf16, for shorter stages and on CUDA.", TRAINERS + ("pipeline",))
    resume: bool = _opt(False, "Continue from the last checkpoint in --out. Pipeline and demo: on by default; "
                        "they keep every finished stage whose settings are unchanged and re-run the others, and "
                        "--no-resume refuses a run directory that already holds results.",
                        TRAIN_STAGES + ("pipeline", "demo"))
    resume_changed: bool = _opt(False, "With --resume: continue even though settings that change the training "
                                "differ from the run's (data, labels, batch, learning rate, schedule, seed, "
                                "augmentation, architecture...); the differences are recorded in simclrv2-run.json.",
                                TRAIN_STAGES)
    overwrite: bool = _opt(False, "Use --out even though it holds another run or other files: its old contents are "
                           "moved aside to OUT.old-<time> (never deleted) and a new run starts.", ALL)
    dist_timeout: float = _opt(600.0, "Seconds a process waits for the others (start-up and each collective "
                               "operation) before it stops with an error, when several processes train "
                               "together (torchrun); a crashed or hung peer then ends the run instead of "
                               "hanging it.", NOT_DEMO)

    # ---- model -------------------------------------------------------------------------
    arch: str = _opt("r18_1x_sk0", "Architecture r{depth}_{width}x_sk{0|1}, e.g. r18_1x_sk0, r50_2x_sk1 "
                     "(see `simclrv2 models`). For distill: the student.", ("pretrain", "supervised",
                                                                            "distill", "pipeline"))
    num_proj_layers: int = _opt(3, "Projection-head depth (SPEC §2.1; SimCLRv2 uses 3).",
                                ("pretrain", "pipeline"))
    proj_out_dim: int = _opt(128, "Projection output width (SPEC §2.1).", ("pretrain", "pipeline"))
    ft_proj_selector: int | None = _opt(None, "Head layer the classifier reads: 0 = head input, k = output of "
                                        "layer k, -1 = last. Default: 0 with --recipe auto (the layer linear "
                                        "evaluation reads); with --recipe reference 1 on a label fraction below 1, "
                                        "else 0 (SPEC §2.1).", ("pretrain", "finetune", "pipeline"))
    classifier_init: str | None = _opt(None, "How fine-tuning starts its classifier: zero (SPEC §2.2 "
                                       "zero_init_logits_layer, the reference) or probe (first fit a linear "
                                       "classifier on the frozen features of the labelled images, then fine-tune "
                                       "everything from it: LP-FT, Kumar et al. 2022). Default: probe with "
                                       "--recipe auto, zero with --recipe reference.", ("finetune", "pipeline"),
                                       choices=("zero", "probe"))
    bn_stats: str | None = _opt(None, "BatchNorm statistics while fine-tuning (and while distilling into a copy "
                                "of the teacher): train (re-estimate them from each training batch, the "
                                "reference) or frozen (keep the pretrained running statistics; gamma and beta "
                                "still train). Default: frozen with --recipe auto, train with --recipe "
                                "reference and for a student that starts from scratch or an encoder.",
                                ("finetune", "distill", "pipeline"), choices=("train", "frozen"))
    checkpoint: str | None = _opt(None, "Checkpoint to start from (a run directory or a .safetensors file).",
                                  ("finetune", "linear-eval", "evaluate"))
    teacher: str | None = _opt(None, "Fine-tuned (or distilled) teacher checkpoint (a run directory or "
                               "weights file); a pretraining checkpoint is refused.", "distill")
    use_probe: bool = _opt(False, "Evaluate a pretraining checkpoint through its online linear probe (refused "
                           "without this flag: the probe is a monitor, not a fine-tuned classifier).", "evaluate")
    more_labels_than_teacher: bool = _opt(False, "Allow --label-fraction/--labeled-list to give the student "
                                          "labelled images the teacher was not fine-tuned on (the results then "
                                          "carry a warning: the comparison with the teacher is no longer "
                                          "semi-supervised at the teacher's label count).", "distill")

    # ---- optimisation (SPEC §4, §5, §7) ------------------------------------------------
    recipe: str = _opt("auto", "Defaults of batch size, epochs and the distillation student (see "
                       "simclrv2/recipes.py): auto (default) sizes fine-tuning, supervised and distillation "
                       "batches to >= 10 steps per epoch and >= 300 steps in all, and on a short distillation "
                       "budget (< 100 epochs) starts a same-architecture student from its teacher; it fine-tunes "
                       "from the head input with a linear-probe classifier and frozen BatchNorm statistics; every "
                       "value it changes is printed in the plan line. reference = SPEC §5 exactly (batch "
                       "1024/256/512, head layer 1, zero classifier, from-scratch student); on ImageNet-scale "
                       "splits the two choose the same batch and epochs.",
                       ("finetune", "supervised", "distill", "pipeline"), choices=("auto", "reference"))
    epochs: float | None = _opt(None, "Training epochs (stage default: pretrain 100, finetune 60 at <=1%% "
                                "labels else 30, linear-eval 90, supervised 90 (recipe auto: the fine-tuning "
                                "epochs on a label fraction), distill 400; recipe auto raises finetune and "
                                "supervised epochs to reach 300 steps).", TRAIN_STAGES)
    max_steps: int | None = _opt(None, "Stop after this many optimiser steps (smoke runs); the schedule "
                                 "still follows --epochs unless --schedule-steps is set.", TRAIN_STAGES)
    batch_size: int | None = _opt(None, "Global batch size (stage default: pretrain/distill 512, "
                                  "finetune 1024, linear-eval/supervised 256; capped at the training set; "
                                  "recipe auto lowers finetune, supervised and distill batches to leave >= 10 "
                                  "steps per epoch, never below 32).", TRAIN_STAGES)
    eval_batch_size: int = _opt(256, "Batch size for evaluation and feature extraction.", NOT_DEMO)
    resize_mode: str | None = _opt(None, "Resize kernel of the evaluation centre crop (SPEC §6): bicubic (TF2), "
                                   "bicubic_legacy (TF1 resize_bicubic, the released checkpoints' code) or "
                                   "bilinear. Default: the checkpoint's recorded one (bicubic_legacy after "
                                   "import-tf), else bicubic.", "evaluate",
                                   choices=("bicubic", "bicubic_legacy", "bilinear"))
    optimizer: str | None = _opt(None, "lars (SPEC §4) or momentum (Nesterov SGD with L2 loss). Default: lars, "
                                 "momentum for linear-eval and supervised.", TRAIN_STAGES,
                                 choices=("lars", "momentum"))
    learning_rate: float | None = _opt(None, "Base learning rate, scaled by --learning-rate-scaling (defaults: "
                                       "pretrain/distill 0.1 sqrt, finetune 0.005 sqrt (0.002 for width>1 or "
                                       "SK), linear-eval/supervised 0.1 linear; a distillation student started "
                                       "from its teacher: the fine-tuning rate).", TRAIN_STAGES)
    learning_rate_scaling: str | None = _opt(None, "linear: lr*B/256; sqrt: lr*sqrt(B) (SPEC §5).",
                                             TRAIN_STAGES, choices=("linear", "sqrt"))
    warmup_epochs: float | None = _opt(None, "Linear warmup length in epochs (default: 5%% of --epochs for "
                                       "pretrain/distill, 0 otherwise).", TRAIN_STAGES)
    weight_decay: float | None = _opt(None, "Weight decay (pretrain/distill 1e-4, finetune 0, linear-eval 1e-6, "
                                      "supervised 1e-4; a distillation student started from its teacher: 0).",
                                      TRAIN_STAGES)
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
    knn_every: int = _opt(0, "Evaluate kNN accuracy on the test split every N steps (0 = at epoch ends, as "
                          "often as 5 percent of the training time allows, and once at the end, when a test split "
                          "exists); at most 5000 labelled training and 2000 test images.",
                          ("pretrain",))
    knn_k: int = _opt(20, "Neighbours for the kNN monitor.", ("pretrain",))

    # ---- distillation (paper §2 Eq. 2-3) -------------------------------------------------
    alpha: float = _opt(1.0, "Weight of the distillation term; 1 - alpha weights the labelled cross-entropy "
                        "(paper Eq. 3). 1.0 = distillation only (the paper's default).", "distill")

    temperature_squared: bool = _opt(True, "Scale the distillation term by tau^2 as the reference's distillation "
                                     "colab does (keeps gradients of biases and BatchNorm parameters, which "
                                     "LARS does not adapt, bounded at small tau); off = the paper's Eq. 2 as "
                                     "written.", ("distill",))
    init_student: str | None = _opt(None, "Where the student starts: scratch (the paper's choice), teacher (a "
                                    "copy of the teacher: encoder, head layers and classifier; same "
                                    "architecture only), or a checkpoint whose encoder is copied (e.g. the "
                                    "pretraining run; must have the student's architecture). In a pipeline, "
                                    "'pretrained' means the pipeline's own pretraining run (self-distillation "
                                    "only). Default: recipe auto starts a same-architecture student from the "
                                    "teacher when distillation runs fewer than 100 epochs, else from scratch.",
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
    seeds: int = _opt(1, "Pipeline/demo: run every stage after pretraining with this many seeds (--seed, "
                      "--seed+1, ...); results.json and the report give each seed's figures, their mean and "
                      "standard deviation. Pretraining runs once unless --pretrain-each-seed.", ("pipeline", "demo"))
    pretrain_each_seed: bool = _opt(False, "Pipeline: pretrain once per seed too (default: one pretraining run, "
                                    "shared by every seed's later stages).", ("pipeline",))
    force: list[str] | None = _opt(None, "Pipeline/demo: run these finished stages again: all, or stage names "
                                   "(pretrain, finetune, distill, supervised, linear_eval); the stages that start "
                                   "from them run again too.", ("pipeline", "demo"), nargs="+", type=str)
    eval_every: int | None = _opt(None, "Evaluate top-1 on up to 1,000 test images every N epochs while "
                                  "training, logged as eval/top1 (0 = only the final evaluation). Default: off "
                                  "for a single command (unless --evals-per-stage); about 8 evaluations per "
                                  "stage in a pipeline.", ("finetune", "supervised", "distill", "pipeline"))
    evals_per_stage: int = _opt(0, "Without --eval-every: evaluate about this many times over the stage's "
                                "epochs, whatever the epochs turn out to be (0 = off; a pipeline passes 8).",
                                ("finetune", "supervised", "distill"))

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


for _f in fields(Config):  # linear-eval accepts only the options it acts on
    if _f.name in LINEAR_EVAL_IGNORES:
        _f.metadata = type(_f.metadata)({**_f.metadata, "stages": tuple(
            s for s in _f.metadata["stages"] if s != "linear-eval")})

FIELD_NAMES = {f.name for f in fields(Config)}
FIELD_BY_NAME = {f.name: f for f in fields(Config)}


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


# ---- reading YAML files ----------------------------------------------------------------------
MAX_CONFIG_BYTES = 256 * 1024
"""A configuration file is a few hundred bytes; anything past 256 KiB is refused unread."""
MAX_CONFIG_DEPTH = 4
"""Deepest nesting a configuration needs: a section (``distill:``) holding a list."""
PIPELINE_SECTIONS = {"pretrain": "pretrain", "finetune": "finetune", "supervised": "supervised",
                     "linear_eval": "linear-eval", "distill": "distill"}
"""YAML sections of a pipeline file and the stage whose options each accepts."""
RUN_CONTROL_FIELDS = ("out", "resume", "resume_changed", "overwrite", "force")
"""Fields that say where and how to run, not what to compute: kept out of a saved config.yaml so the
file can be passed back with ``--config`` to repeat the run in a new directory."""

_FLOAT_RE = re.compile(r"^[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][-+]?\d+)?$")


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 numbers, no aliases, bounded nesting.

    * YAML 1.1 (PyYAML) reads ``1e-4`` as a string because it lacks a dot; YAML 1.2 and every
      user read it as a number, so floats follow 1.2 (``1e-4``, ``1.0e-4``, ``.5``, ``5.``).
    * Anchors and aliases let a 255-byte file expand to gigabytes ("billion laughs"); a
      configuration never needs them, so any alias is an error before it is expanded.
    * Nesting deeper than :data:`MAX_CONFIG_DEPTH` is an error while composing, so a deeply
      nested file cannot exhaust the stack.
    """

    def compose_node(self, parent, index):  # noqa: D401 - PyYAML hook
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"line {event.start_mark.line + 1}: YAML aliases (*name) are not allowed in a "
                              "configuration file; write the value out")
        depth = getattr(self, "_depth", 0)
        if depth > MAX_CONFIG_DEPTH:
            event = self.peek_event()
            raise ConfigError(f"line {event.start_mark.line + 1}: nested deeper than {MAX_CONFIG_DEPTH} levels; a "
                              "configuration holds option: value pairs and pipeline sections of them")
        self._depth = depth + 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth


_ConfigLoader.yaml_implicit_resolvers = {k: [r for r in v if r[0] != "tag:yaml.org,2002:float"]
                                         for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:\d[\d_]*)?\.[\d_]*(?:[eE][-+]?\d+)?
                |[-+]?\d[\d_]*[eE][-+]?\d+
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _read_config_text(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config: {path} is {size} bytes; a configuration file may hold at most "
                              f"{MAX_CONFIG_BYTES // 1024} KiB")
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path} ({exc.strerror or exc})") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config: {path} holds more than {MAX_CONFIG_BYTES // 1024} KiB")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config: {path} is not UTF-8 text (invalid byte at offset {exc.start}); save it as "
                          "UTF-8") from exc


def _option_name(key: Any, where: str) -> str:
    if not isinstance(key, str):
        raise ConfigError(f"config: {where}: option names must be words, got a {type(key).__name__}")
    return key.replace("-", "_")


def load_yaml(path: str | Path, stage: str | None = None) -> dict[str, Any]:
    """Read a YAML config into typed Config values; keys may use dashes or underscores.

    Unknown keys, keys of options ``stage`` does not use, wrong types and out-of-range
    values are :class:`ConfigError` naming the option (the CLI exits 2). A ``stage:`` key
    (written by :func:`save_config`) must name ``stage``. Sections named after stages
    (``pretrain:``, ``finetune:``, ``supervised:``, ``linear_eval:``, ``distill:``) are for
    ``pipeline`` files only and are checked against that stage's options."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: file {str(path)!r} does not exist")
    text = _read_config_text(path)
    try:
        data = yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError(f"config: {path} is not valid YAML{where}: {problem}") from exc
    except RecursionError as exc:  # pragma: no cover - the depth bound comes first
        raise ConfigError(f"config: {path} is nested too deeply") from exc
    except ConfigError as exc:
        raise ConfigError(f"config: {path}: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping of option: value")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = _option_name(key, str(path))
        if name == "stage":
            if stage is not None and value != stage:
                raise ConfigError(f"config: {path} is the configuration of a {value!r} run (stage: {value}); "
                                  f"use it with `simclrv2 {value} --config`, or delete the stage line")
            continue
        if name in PIPELINE_SECTIONS:
            if stage is not None and stage != "pipeline":
                raise ConfigError(f"config: section {key!r} in {path} applies only to `simclrv2 pipeline` "
                                  f"(a {stage} file sets options at the top level)")
            if not isinstance(value, dict):
                raise ConfigError(f"config: section {key!r} in {path} must be a mapping of option: value")
            section_stage = PIPELINE_SECTIONS[name]
            values = {}
            for sub, sub_value in value.items():
                sub_name = _option_name(sub, f"section {key!r}")
                check_applies(sub_name, section_stage, where=f"section {key!r} of {path}")
                values[sub_name] = coerce_value(sub_name, sub_value, where=f"{name}.")
            out.setdefault("stage_overrides", {})[name] = values
            continue
        if stage is not None:
            check_applies(name, stage, where=str(path))
        elif name not in FIELD_NAMES:
            raise ConfigError(f"config: unknown option {key!r} in {path}{_did_you_mean(name, FIELD_NAMES)}")
        out[name] = coerce_value(name, value)
    return out


def _did_you_mean(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.75)
    return "; did you mean " + " or ".join(close) + "?" if close else ""


def stages_of(name: str) -> tuple[str, ...]:
    """The commands that use option ``name``."""
    return FIELD_BY_NAME[name].metadata.get("stages", ()) if name in FIELD_BY_NAME else ()


def check_applies(name: str, stage: str, *, where: str = "", flag: bool = False) -> None:
    """ConfigError unless option ``name`` is one ``stage`` uses; with a "did you mean" for near misses
    and the commands that do use it. ``flag`` spells the option as ``--name``."""
    spell = (lambda n: "--" + n.replace("_", "-")) if flag else (lambda n: n)
    place = f" in {where}" if where else ""
    own = [f.name for f in fields_for_stage(stage)]
    if name in own:
        return
    probe = name[3:] if flag and name.startswith("no_") else name
    close = difflib.get_close_matches(probe, own, n=3, cutoff=0.75) or \
        difflib.get_close_matches(name, own, n=3, cutoff=0.75)
    hint = "; did you mean " + " or ".join(spell(c) for c in close) + "?" if close else ""
    users = stages_of(name)
    if users:
        hint = hint or f"; it is an option of {', '.join(users)}"
        raise ConfigError(f"{spell(name)}: does not apply to `simclrv2 {stage}`{place}, which would ignore it"
                          f"{hint}")
    if not hint:
        others = difflib.get_close_matches(probe, sorted(FIELD_NAMES), n=1, cutoff=0.75)
        if others:
            hint = f"; did you mean {spell(others[0])} (an option of {', '.join(stages_of(others[0]))})?"
    raise ConfigError(f"{spell(name)}: unknown option{place}{hint}")


# ---- types -------------------------------------------------------------------------------------
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def field_kind(name: str) -> tuple[str, bool]:
    """(kind, optional) of a Config field: kind is bool, int, float, str, list_float, list_str or dict."""
    annotation = str(FIELD_BY_NAME[name].type).replace(" ", "")
    optional = annotation.endswith("|None")
    base = annotation.removesuffix("|None")
    kind = {"bool": "bool", "int": "int", "float": "float", "str": "str", "list[float]": "list_float",
            "list[str]": "list_str"}.get(base, "dict")
    return kind, optional


def _describe(value: Any) -> str:
    shown = repr(value)
    return (shown if len(shown) <= 40 else shown[:37] + "...") + f" ({type(value).__name__})"


def coerce_value(name: str, value: Any, *, where: str = "") -> Any:
    """``value`` as the type of Config field ``name``, or a ConfigError naming the option and what is
    allowed. Numbers may be written as strings ("1e-4"); booleans only as true/false, yes/no, on/off."""
    kind, optional = field_kind(name)
    label = where + name
    if value is None:
        if optional or kind == "dict":
            return None
        raise ConfigError(f"{label}: needs a value ({_allowed(name, kind)}), got nothing (null)")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        raise ConfigError(f"{label}: must be true or false (also yes/no, on/off), got {_describe(value)}")
    if kind in ("int", "float"):
        number = _as_number(value)
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{label}: must be {_allowed(name, kind)}, got {_describe(value)}")
        if kind == "int":
            if int(number) != number:
                raise ConfigError(f"{label}: must be a whole number, got {_describe(value)}")
            return int(number)
        return float(number)
    if kind == "str":
        if isinstance(value, str) and value.strip():
            return value
        raise ConfigError(f"{label}: must be {_allowed(name, kind)}, got {_describe(value)}")
    if kind == "list_float":
        items = value if isinstance(value, (list, tuple)) else [value]
        if not items:
            raise ConfigError(f"{label}: must be a list of numbers, got an empty list")
        numbers = [_as_number(v) for v in items]
        if any(n is None or not math.isfinite(n) for n in numbers):
            raise ConfigError(f"{label}: must be a number or a list of numbers, got {_describe(value)}")
        return [float(n) for n in numbers]  # type: ignore[arg-type]
    if kind == "list_str":
        items = value if isinstance(value, (list, tuple)) else [value]
        if not items or not all(isinstance(v, str) and v.strip() for v in items):
            raise ConfigError(f"{label}: must be a path or a list of paths, got {_describe(value)}")
        return list(items)
    if not isinstance(value, dict):
        raise ConfigError(f"{label}: must be a mapping, got {_describe(value)}")
    return value


def _as_number(value: Any) -> float | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
        text = value.strip().replace("_", "")
        try:
            return int(text)
        except ValueError:
            return float(text)
    return None


def _allowed(name: str, kind: str) -> str:
    choices = FIELD_BY_NAME[name].metadata.get("choices")
    if choices:
        return "one of " + ", ".join(choices)
    return {"int": "a whole number", "float": "a number (e.g. 0.1, 1e-4)", "str": "a non-empty text (a name or "
            "path)", "bool": "true or false"}.get(kind, kind)


def stage_defaults(stage: str) -> dict[str, Any]:
    """Defaults that differ by stage (SPEC §0 and §5 recipes)."""
    if stage == "pipeline":  # resume: keep finished stages whose settings are unchanged (pipeline.py)
        return dict(pretrain_epochs=100, batch_size=512, optimizer="lars", learning_rate=0.1,
                    learning_rate_scaling="sqrt", weight_decay=1e-4, temperature=0.1, resume=True)
    if stage == "demo":  # the demo's own settings are pipeline.DEMO_SETTINGS; 3 seeds unless --seeds
        return dict(epochs=100, batch_size=512, optimizer="lars", learning_rate=0.1,
                    learning_rate_scaling="sqrt", weight_decay=1e-4, temperature=0.1, resume=True, seeds=3)
    if stage == "pretrain":
        return dict(epochs=100, batch_size=512, optimizer="lars", learning_rate=0.1,
                    learning_rate_scaling="sqrt", weight_decay=1e-4, temperature=0.1)
    if stage == "finetune":  # batch 1024 and 60/30 epochs: recipes.stage_schedule (recipe auto sizes them)
        return dict(optimizer="lars", learning_rate_scaling="sqrt", weight_decay=0.0, warmup_epochs=0.0)
    if stage == "linear-eval":
        return dict(epochs=90, batch_size=256, optimizer="momentum", learning_rate=0.1,
                    learning_rate_scaling="linear", weight_decay=1e-6, warmup_epochs=0.0)
    if stage == "supervised":  # batch 256 and 90 epochs: recipes.stage_schedule
        return dict(optimizer="momentum", learning_rate=0.1, learning_rate_scaling="linear", weight_decay=1e-4,
                    warmup_epochs=0.0)
    if stage == "distill":  # batch 512: recipes.stage_schedule; lr and wd: resolve (they follow the init)
        return dict(epochs=400, optimizer="lars", learning_rate_scaling="sqrt")
    return {}


def build_config(stage: str, file_values: dict[str, Any] | None = None,
                 flag_values: dict[str, Any] | None = None, *, check_paths: bool = True) -> Config:
    """Merge stage defaults, file values and flags, type every value like its Config field, then
    resolve derived defaults and validate.

    ``check_paths=False`` skips the existence checks of ``checkpoint``, ``teacher`` and
    ``init_student`` (and the defaults read from them): a pipeline validates every stage's settings
    before any stage has written the checkpoint the next one reads."""
    merged: dict[str, Any] = dict(stage_defaults(stage))
    for source in (file_values or {}, flag_values or {}):
        for key, value in source.items():
            if key not in FIELD_NAMES:
                raise ConfigError(f"{key}: unknown option{_did_you_mean(key, FIELD_NAMES)}")
            merged[key] = coerce_value(key, value)
    cfg = Config(**merged)
    cfg = resolve(stage, cfg, read_checkpoints=check_paths)
    validate(stage, cfg, check_paths=check_paths)
    return cfg


CHECKPOINT_SOURCE = {"finetune": "checkpoint", "linear-eval": "checkpoint", "evaluate": "checkpoint",
                     "distill": "teacher"}
"""The option naming the network a stage starts from: its recorded data and image size are the defaults."""


def resolve(stage: str, cfg: Config, *, read_checkpoints: bool = True) -> Config:
    """Fill the defaults that depend on other fields (SPEC §0, §2.1, §5, §6), so that the saved
    config.yaml is the effective configuration: data and image size (from the checkpoint a stage
    starts from, else from the data), the augmentation preset, epochs, learning rate, warmup."""
    changes: dict[str, Any] = {}
    source_field = CHECKPOINT_SOURCE.get(stage)
    record = checkpoint_record(getattr(cfg, source_field)) if (source_field and read_checkpoints) else {}
    if cfg.data is None and stage in DATA_STAGES:
        if source_field:
            if isinstance(record.get("data"), str):  # else validate asks for --data: never a silent digits
                changes["data"] = record["data"]
            if isinstance(record.get("labels_csv"), str) and cfg.labels is None \
                    and stage in fields_stage_of("labels"):
                changes["labels"] = record["labels_csv"]
        elif not cfg.unlabeled and not cfg.labels:
            changes["data"] = DEFAULT_DATA
    if cfg.image_size is None and stage in DATA_STAGES:
        if source_field:
            if isinstance(record.get("image_size"), int):
                changes["image_size"] = record["image_size"]
        else:
            size = _native_image_size(changes.get("data", cfg.data), cfg.unlabeled, cfg.labels)
            if size is not None:
                changes["image_size"] = size
    if stage in AUG_STAGES and (cfg.use_blur is None or cfg.color_jitter_strength is None):
        size = changes.get("image_size", cfg.image_size)
        if size:
            from simclrv2.augment import AugmentConfig
            preset = AugmentConfig.for_pretraining(int(size))
            if cfg.use_blur is None:
                changes["use_blur"] = bool(preset.use_blur)
            if cfg.color_jitter_strength is None:
                changes["color_jitter_strength"] = float(preset.color_jitter_strength)
    fraction = label_fraction_of(cfg)
    if stage in recipes.SCHEDULED_STAGES and cfg.recipe == "reference":
        # SPEC §5 numbers are static: written into config.yaml. Recipe auto leaves batch (and fine-tuning /
        # supervised epochs) unset here; recipes.stage_schedule sizes them on the training set at plan time.
        if cfg.batch_size is None:
            changes["batch_size"] = recipes.REFERENCE_BATCH[stage]
        if cfg.epochs is None:
            changes["epochs"] = recipes.reference_epochs(stage, fraction)
    if stage == "finetune":
        if cfg.classifier_init is None:
            changes["classifier_init"] = recipes.classifier_init(cfg.recipe)
        if cfg.learning_rate is None:  # the network being fine-tuned is the checkpoint's, not --arch's default
            changes["learning_rate"] = _finetune_learning_rate(record.get("arch"), cfg.arch) * \
                recipes.finetune_lr_factor(changes.get("classifier_init", cfg.classifier_init))
    if stage == "distill":
        if cfg.epochs is None:  # a pipeline passes distill_epochs=None for "the stage default"
            changes["epochs"] = recipes.reference_epochs("distill", None)
        teacher_arch = record.get("arch") if isinstance(record.get("arch"), str) else None
        if not read_checkpoints and teacher_arch is None:
            teacher_arch = cfg.arch  # a pipeline plans its self-distillation before the teacher exists
        init = recipes.distill_student_init(cfg.recipe, cfg.init_student, changes.get("epochs", cfg.epochs),
                                            cfg.arch, teacher_arch)
        if cfg.init_student is None and init is not None:
            changes["init_student"] = init
        from_teacher = init == recipes.INIT_TEACHER
        if cfg.learning_rate is None:
            # a copy of the teacher continues at the rate recipe auto fine-tunes at (a quarter of SPEC §5's)
            changes["learning_rate"] = (_finetune_learning_rate(teacher_arch, cfg.arch) * recipes.finetune_lr_factor(
                recipes.classifier_init(cfg.recipe)) if from_teacher else 0.1)
        if cfg.weight_decay is None:
            changes["weight_decay"] = 0.0 if from_teacher else 1e-4
        if cfg.warmup_epochs is None and from_teacher:
            changes["warmup_epochs"] = 0.0
    if cfg.bn_stats is None and stage in ("finetune", "distill"):
        changes["bn_stats"] = recipes.bn_stats(cfg.recipe, stage, changes.get("init_student", cfg.init_student))
    if cfg.ft_proj_selector is None and stage == "pretrain":
        changes["ft_proj_selector"] = 0  # the online probe reads the head input (SPEC §2.1)
    if cfg.ft_proj_selector is None and stage == "finetune":
        changes["ft_proj_selector"] = recipes.finetune_selector(cfg.recipe, few_labels(cfg))
    if cfg.warmup_epochs is None and "warmup_epochs" not in changes:
        epochs = changes.get("epochs", cfg.epochs)
        changes["warmup_epochs"] = 0.05 * epochs if (stage in ("pretrain", "distill", "pipeline", "demo")
                                                     and epochs) else 0.0
    return cfg.replace(**changes) if changes else cfg


DEFAULT_DATA = "digits"


def label_fraction_of(cfg: Config) -> float:
    """The labelled fraction the stage defaults follow: 1.0 for all labels; a ``--labeled-list`` of
    unknown size counts as a small fraction (0.0: the 1%-labels defaults)."""
    if cfg.label_fraction is None and cfg.labeled_list is None:
        return 1.0
    return cfg.label_fraction or 0.0


def few_labels(cfg: Config) -> bool:
    """Whether the stage trains on part of the labels (a ``--labeled-list``, or a fraction below 1): the
    SPEC §2.1 condition for the reference's fine-tuning from head layer 1."""
    return cfg.labeled_list is not None or label_fraction_of(cfg) < 1.0


def _finetune_learning_rate(arch: Any, fallback: str) -> float:
    """SPEC §5 fine-tuning base rate: 0.005 (0.002 for width > 1 or selective kernels), x sqrt(B)."""
    try:
        _, width, sk = parse_arch_cheap(arch if isinstance(arch, str) else fallback)
    except ConfigError:
        width, sk = 1, False
    return 0.002 if (width > 1 or sk) else 0.005


def _native_image_size(data: str | None, unlabeled: list[str] | None, labels: str | None) -> int | None:
    """The training size of the data (see :func:`simclrv2.data.native_image_size`); None when the data
    cannot be read (validation reports it)."""
    try:
        from simclrv2.data.imagesize import native_image_size
        return native_image_size(data, unlabeled=unlabeled, labels=labels).size
    except Exception:  # noqa: BLE001 - a missing or unreadable folder is reported by validate/the data scan
        return None


def checkpoint_record(checkpoint: str | None) -> dict[str, Any]:
    """The model description recorded in a checkpoint's safetensors metadata (arch, image_size, data,
    labeled_set, stage ...); {} when there is none or it cannot be read (validation and the stage then
    report a missing or unusable checkpoint)."""
    if not checkpoint:
        return {}
    try:
        import json

        from safetensors import safe_open

        from simclrv2.utils.checkpoint import META_KEY, find_weights
        with safe_open(str(find_weights(checkpoint)), framework="pt") as handle:
            text = (handle.metadata() or {}).get(META_KEY, "{}")
        if len(text) > 1_000_000:
            return {}
        record = json.loads(text)
    except Exception:  # noqa: BLE001 - any unreadable checkpoint: no recorded defaults
        return {}
    return record if isinstance(record, dict) else {}


def _checkpoint_arch(checkpoint: str | None) -> str | None:
    arch = checkpoint_record(checkpoint).get("arch")
    return arch if isinstance(arch, str) else None


def _positive(cfg: Config, name: str, allow_none: bool = True) -> None:
    value = getattr(cfg, name)
    if value is None and allow_none:
        return
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(
            value) or value <= 0:
        raise ConfigError(f"{name}: must be a positive number, got {value!r}")


def validate(stage: str, cfg: Config, *, check_paths: bool = True) -> None:
    """Reject invalid settings before any work starts (exit code 2 in the CLI); each message names the
    option and the values it allows."""
    for name in FIELD_NAMES:  # values set from Python (not YAML/flags) are typed here too
        coerce_value(name, getattr(cfg, name))
    if cfg.eval_every is not None and cfg.eval_every < 0:
        raise ConfigError(f"eval_every: must be a whole number >= 0 (epochs; 0 = off), got {cfg.eval_every!r}")
    if not 1 <= cfg.seeds <= 100:
        raise ConfigError(f"seeds: must be a whole number from 1 to 100, got {cfg.seeds!r}")
    if stage == "distill" and cfg.bn_stats == "frozen" and cfg.init_student != recipes.INIT_TEACHER:
        raise ConfigError("bn_stats: frozen keeps the running statistics the student starts with, which only a "
                          "student that is a copy of its teacher has (--init-student teacher); a student from "
                          f"{cfg.init_student or 'scratch'} needs --bn-stats train")
    for name in ("num_workers", "knn_every", "seed"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name}: must be a whole number >= 0, got {getattr(cfg, name)!r}")
    for name in ("knn_k", "proj_out_dim"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}: must be a whole number >= 1, got {getattr(cfg, name)!r}")
    if cfg.image_size is not None and cfg.image_size > MAX_IMAGE_SIZE:
        raise ConfigError(f"image_size: must be between 1 and {MAX_IMAGE_SIZE} px, got {cfg.image_size!r}")
    for name in ("pretrain_epochs", "finetune_epochs", "distill_epochs", "supervised_epochs"):
        _positive(cfg, name)
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
    if stage == "distill" and check_paths and cfg.init_student and cfg.init_student not in (
            recipes.INIT_TEACHER, recipes.INIT_SCRATCH) and not Path(cfg.init_student).exists():
        raise ConfigError(f"init_student: {cfg.init_student!r} does not exist")
    if cfg.labeled_list is not None and not Path(cfg.labeled_list).is_file():
        raise ConfigError(f"labeled_list: file {cfg.labeled_list!r} does not exist")
    for folder in cfg.unlabeled or []:
        if not Path(folder).is_dir():
            raise ConfigError(f"unlabeled: {folder!r} is not a folder (expected a folder of images, any layout)")
    if cfg.labels is not None and not Path(cfg.labels).is_file():
        raise ConfigError(f"labels: file {cfg.labels!r} does not exist (expected a CSV of path,label rows)")
    if cfg.labels is not None and cfg.data is not None and stage in TRAIN_STAGES + ("pipeline",) \
            and not is_dataset_name(cfg.data) and (Path(cfg.data) / "train").is_dir():
        raise ConfigError("labels: give the labelled images either as class folders (--data ROOT with "
                          "ROOT/train/<class>/) or as --labels FILE.csv, not both")
    source = getattr(cfg, CHECKPOINT_SOURCE[stage]) if stage in CHECKPOINT_SOURCE else None
    source_ok = stage not in CHECKPOINT_SOURCE or (check_paths and bool(source) and Path(source).exists())
    if stage in DATA_STAGES and cfg.data is None and not (cfg.unlabeled or cfg.labels) and source_ok:
        raise ConfigError(f"data: {stage} needs --data (a folder or one of {', '.join(DATASET_NAMES)})"
                          + (f"; {CHECKPOINT_SOURCE[stage]} records none" if stage in CHECKPOINT_SOURCE else ""))
    if stage in DATA_STAGES and cfg.data is not None and not is_dataset_name(cfg.data):
        root = Path(cfg.data)
        if not root.is_dir():
            raise ConfigError(f"data: {cfg.data!r} is neither a dataset name ({', '.join(DATASET_NAMES)}) "
                              "nor an existing folder")
    if stage in ("finetune", "linear-eval", "evaluate") and not cfg.checkpoint:
        raise ConfigError(f"checkpoint: {stage} needs --checkpoint PATH (a run directory or weights file)")
    if stage in ("finetune", "linear-eval", "evaluate") and check_paths and cfg.checkpoint \
            and not Path(cfg.checkpoint).exists():
        raise ConfigError(f"checkpoint: {cfg.checkpoint!r} does not exist")
    if stage == "distill":
        if not cfg.teacher:
            raise ConfigError("teacher: distill needs --teacher PATH (a fine-tuned run directory or weights file)")
        if check_paths and not Path(cfg.teacher).exists():
            raise ConfigError(f"teacher: {cfg.teacher!r} does not exist")
    if cfg.precision == "fp16" and cfg.device == "cpu":
        raise ConfigError("precision: fp16 needs a CUDA device; use bf16 or fp32 on the CPU")


def fields_stage_of(name: str) -> tuple[str, ...]:
    for f in fields(Config):
        if f.name == name:
            return f.metadata.get("stages", ())
    return ()


def config_to_yaml(cfg: Config, stage: str) -> str:
    """The effective configuration of a ``stage`` run as YAML: every option that stage accepts, with
    the values it resolved to (no ``null`` where a default was derived), so that
    ``simclrv2 STAGE --config config.yaml --out NEW`` repeats the run. Where the run went (``out``,
    ``resume``...) is a comment, not an option, so the file does not point the repeat at the old run."""
    values: dict[str, Any] = {"stage": stage}
    for f in fields_for_stage(stage):
        if f.name in RUN_CONTROL_FIELDS:
            continue
        values[f.name] = getattr(cfg, f.name)
    if stage == "pipeline":
        for section, overrides in (cfg.stage_overrides or {}).items():
            values[section] = dict(overrides)
    header = "# simclrv2 effective configuration; repeat with: simclrv2 " + stage + " --config THIS_FILE --out NEW_DIR\n"
    if cfg.out:
        header += f"# run directory: {cfg.out}\n"
    return header + yaml.safe_dump(values, sort_keys=False, allow_unicode=True)


def save_config(cfg: Config, path: str | Path, stage: str) -> None:
    """Write :func:`config_to_yaml` to ``path`` (atomically, never through a symlink)."""
    from simclrv2.utils.checkpoint import atomic_write_text
    atomic_write_text(Path(path), config_to_yaml(cfg, stage))
