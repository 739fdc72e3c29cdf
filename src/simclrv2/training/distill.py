"""Step 3: distillation with unlabelled data (paper §2 Eq. 2-3, SPEC §0, §5).

The fine-tuned (or already distilled) teacher is fixed and in eval mode; the student (``--arch``:
the teacher's architecture = self-distillation, a smaller one = big-to-small) has no projection
head and learns from the teacher's temperature softmax on every training image, the unlabelled
pool included. ``--alpha`` < 1 mixes in the labelled cross-entropy (Eq. 3). Temperature defaults
to 0.1 for self-distillation and 1.0 for a different student, as in the paper. Same schedule,
weight decay and batch size as pretraining; random crop + flip only.

Deviations, stated: the distillation term is scaled by tau^2 by default, as the reference's
distillation colab does (``--no-temperature-squared`` gives Eq. 2 as written); without it the
gradients of the parameters LARS leaves unadapted (biases, BatchNorm) grow as 1/tau and the
student's logits diverge at tau = 0.1. The teacher sees the student's augmented view (standard practice; the paper
does not say whether teacher and student share the view). The student's classifier starts at
zero, as the reference's fine-tuning head does: a random one, read at temperature 0.1, starts
from confident wrong answers (on the demo data: 50.8% -> 82.5% top-1 after the same 59 steps).
"""

from __future__ import annotations

import copy
from typing import Any

from simclrv2.config import Config
from simclrv2.errors import ConfigError
from simclrv2.models import create_model
from simclrv2.recipes import INIT_SCRATCH, INIT_TEACHER
from simclrv2.training.classifier import train_and_evaluate
from simclrv2.training.data_setup import RunData, inherited_label_spec, labeled_indices_for, prepare_data
from simclrv2.training.model_io import load_checkpoint, load_network, load_state_into, model_meta
from simclrv2.training.rundir import RunDirectory
from simclrv2.training.runtime import setup_runtime

SELF_DISTILLATION_TEMPERATURE = 0.1
BIG_TO_SMALL_TEMPERATURE = 1.0


def init_student_encoder(student, path: str, arch: str) -> None:
    """Copy the encoder weights of the checkpoint at ``path`` into the student (option
    ``--init-student``; the paper trains students from scratch, this saves compute)."""
    state, meta, file = load_checkpoint(path)
    if meta["arch"] != arch:
        raise ConfigError(f"init_student: {file} holds a {meta['arch']} network, the student is {arch}")
    encoder_state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    load_state_into(student.encoder, encoder_state, source=str(file), expected_arch=arch, source_arch=meta["arch"])


def student_from_teacher(teacher, arch: str, teacher_meta: dict[str, Any]):
    """``--init-student teacher``: the student is a copy of the (already loaded) teacher network:
    encoder, the head layers it kept and its classifier, so distillation continues from the teacher's
    function instead of rebuilding it (recipe auto on a short budget, see :mod:`simclrv2.recipes`)."""
    if teacher_meta["arch"] != arch:
        raise ConfigError(f"init_student: 'teacher' copies the teacher, a {teacher_meta['arch']} network, but the "
                          f"student is {arch}; give --arch {teacher_meta['arch']} or --init-student scratch")
    meta = model_meta(arch=teacher_meta["arch"], image_size=teacher_meta["image_size"],
                      num_proj_layers=teacher_meta["num_proj_layers"],
                      proj_out_dim=teacher_meta.get("proj_out_dim", 128), num_classes=teacher_meta["num_classes"],
                      ft_proj_selector=teacher_meta.get("ft_proj_selector", 0),
                      head_layers_kept=teacher_meta.get("head_layers_kept"), classes=teacher_meta.get("classes"),
                      stage="distill")
    return copy.deepcopy(teacher), meta


def describe_init(cfg: Config) -> str:
    """The plan line's account of where the student starts and why (recipe auto or the user)."""
    if cfg.init_student == INIT_TEACHER:
        return (f"as a copy of its teacher (init_student teacher; recipe {cfg.recipe}: {cfg.epochs:g} epochs is "
                f"a short budget next to the paper's 400; --init-student scratch trains it from scratch), lr "
                f"{cfg.learning_rate:g}, weight decay {cfg.weight_decay:g}, BatchNorm statistics {cfg.bn_stats}")
    if cfg.init_student and cfg.init_student != INIT_SCRATCH:
        return f"from the encoder of {cfg.init_student}"
    return "from scratch (the paper's choice)"


def distill(cfg: Config) -> dict[str, Any]:
    """``simclrv2 distill``."""
    rt = setup_runtime(cfg)
    teacher, teacher_meta = load_network(cfg.teacher)
    if not teacher_meta.get("num_classes") or teacher_meta.get("stage") == "pretrain":
        raise ConfigError(f"teacher: {cfg.teacher} is a pretraining checkpoint (its classifier, if any, is the "
                          "online probe, a monitor), not a fine-tuned classifier; fine-tune it first "
                          "(simclrv2 finetune --checkpoint ...) and distil from that run")
    if cfg.image_size and cfg.image_size != teacher_meta["image_size"]:
        raise ConfigError(f"image_size: the teacher was trained at {teacher_meta['image_size']} px, got "
                          f"--image-size {cfg.image_size}")
    cfg = cfg.replace(image_size=teacher_meta["image_size"])
    temperature = cfg.temperature
    if temperature is None:
        temperature = (SELF_DISTILLATION_TEMPERATURE if cfg.arch == teacher_meta["arch"]
                       else BIG_TO_SMALL_TEMPERATURE)
        cfg = cfg.replace(temperature=temperature)
    run = RunDirectory.create(cfg, "distill", rt.is_main)
    teacher_set = teacher_meta.get("labeled_set")
    data = prepare_data(cfg, need_test=True, label_spec=inherited_label_spec(cfg, teacher_set, "teacher"))
    if teacher_meta.get("classes") and list(teacher_meta["classes"]) != data.classes:
        # Protects the one thing a student needs: the teacher's outputs mean this data set's classes.
        raise ConfigError(f"data: the teacher {cfg.teacher} was fine-tuned on the classes "
                          f"{_names(teacher_meta['classes'])}, this data has {_names(data.classes)}; distil on "
                          "the teacher's labelled data (the default when --data is not given)")
    warnings = check_labels_against_teacher(cfg, data, teacher_set)
    if cfg.init_student == INIT_TEACHER:
        student, meta = student_from_teacher(teacher, cfg.arch, teacher_meta)
    else:
        meta = model_meta(arch=cfg.arch, image_size=data.image_size, num_proj_layers=0,
                          num_classes=data.num_classes, classes=data.classes, stage="distill")
        student = create_model(cfg.arch, image_size=data.image_size, num_proj_layers=0,
                               num_classes=data.num_classes, zero_init_classifier=True)
        if cfg.init_student and cfg.init_student != INIT_SCRATCH:
            init_student_encoder(student, cfg.init_student, cfg.arch)
    if rt.is_main:
        print(f"distill: student {cfg.arch} starts {describe_init(cfg)}", flush=True)
    return train_and_evaluate("distill", cfg, rt, run, data, None, student, meta, teacher=teacher,
                              temperature=temperature, alpha=cfg.alpha,
                              temperature_squared=cfg.temperature_squared, warnings=warnings,
                              extra_results={"teacher": str(cfg.teacher), "teacher_arch": teacher_meta["arch"],
                                             "temperature": temperature, "alpha": cfg.alpha,
                                             "init_student": cfg.init_student,
                                             "bn_stats": cfg.bn_stats,
                                             "label_fraction": data.label_spec.fraction})


def _names(classes: list[str], limit: int = 5) -> str:
    shown = ", ".join(map(str, classes[:limit]))
    return shown + (f", ... ({len(classes)} in all)" if len(classes) > limit else "")


def check_labels_against_teacher(cfg: Config, data: RunData, teacher_set: dict[str, Any] | None) -> list[str]:
    """No label leakage (paper §2: the student sees only the teacher's labels): a student's labelled
    set must lie inside the teacher's, unless ``--more-labels-than-teacher`` says otherwise, and then
    the results carry a warning. Returns the warnings for results.json."""
    warnings: list[str] = []
    if not isinstance(teacher_set, dict) or teacher_set.get("kind") not in ("all", "fraction", "list", "none"):
        if data.label_spec.explicit or cfg.alpha < 1.0:
            warnings.append("the teacher records no labelled set (an older checkpoint): cannot check that the "
                            f"student's {len(data.labeled_indices)} labelled images are among the teacher's")
        return warnings
    if teacher_set["kind"] == "all":
        return warnings
    if teacher_set["kind"] == "none":
        teacher_idx = set()
    else:
        teacher_spec = type(data.label_spec).from_record(teacher_set, "teacher")
        try:
            teacher_idx = set(labeled_indices_for(data.train, teacher_spec).tolist())
        except Exception as exc:  # noqa: BLE001 - e.g. the teacher's list file is gone
            raise ConfigError(f"label_fraction: the teacher's labelled set cannot be rebuilt on this data "
                              f"({exc}); give the same --data as the teacher") from exc
    extra = [i for i in data.labeled_indices.tolist() if i not in teacher_idx]
    if not extra:
        return warnings
    message = (f"the student's labelled set has {len(extra)} labelled images the teacher was not fine-tuned on "
               f"(student {len(data.labeled_indices)}, teacher {teacher_set.get('num_labeled')} labelled images)")
    if not cfg.more_labels_than_teacher:
        raise ConfigError(f"label_fraction: {message}: that leaks labels into a semi-supervised result. Leave "
                          "--label-fraction/--labeled-list out to use the teacher's labelled set, or pass "
                          "--more-labels-than-teacher to allow it (the results then carry a warning)")
    warnings.append(message + " (--more-labels-than-teacher)")
    return warnings
