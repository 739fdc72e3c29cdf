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

from typing import Any

from simclrv2.config import Config
from simclrv2.errors import ConfigError
from simclrv2.models import create_model
from simclrv2.training.classifier import train_and_evaluate
from simclrv2.training.data_setup import prepare_data
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


def distill(cfg: Config) -> dict[str, Any]:
    """``simclrv2 distill``."""
    rt = setup_runtime(cfg)
    teacher, teacher_meta = load_network(cfg.teacher)
    if not teacher_meta.get("num_classes"):
        raise ConfigError(f"teacher: {cfg.teacher} has no classifier (a pretraining checkpoint?); fine-tune it "
                          "first")
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
    data = prepare_data(cfg, need_test=True)
    if teacher_meta.get("classes") and list(teacher_meta["classes"]) != data.classes:
        raise ConfigError("data: the teacher's classes differ from this data set's classes")
    meta = model_meta(arch=cfg.arch, image_size=data.image_size, num_proj_layers=0,
                      num_classes=data.num_classes, classes=data.classes, stage="distill")
    student = create_model(cfg.arch, image_size=data.image_size, num_proj_layers=0,
                           num_classes=data.num_classes, zero_init_classifier=True)
    if cfg.init_student:
        init_student_encoder(student, cfg.init_student, cfg.arch)
    return train_and_evaluate("distill", cfg, rt, run, data, None, student, meta, teacher=teacher,
                              temperature=temperature, alpha=cfg.alpha,
                              temperature_squared=cfg.temperature_squared,
                              extra_results={"teacher": str(cfg.teacher), "teacher_arch": teacher_meta["arch"],
                                             "temperature": temperature, "alpha": cfg.alpha,
                                             "init_student": cfg.init_student,
                                             "label_fraction": cfg.label_fraction})
