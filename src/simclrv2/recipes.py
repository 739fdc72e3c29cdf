"""Training recipes: the reference one (SPEC §5, exactly) and ``auto``, the default, which transfers.

The reference recipe is written for ImageNet-scale splits: fine-tuning at batch 1024 for 60 epochs
(1% labels, 12,811 images: 12 steps per epoch, 720 steps) or 30 epochs (10%: 3,750 steps); the
supervised baseline at batch 256 for 90 epochs; distillation at batch 512 for 400 epochs with the
student trained from scratch. On a small labelled set the same numbers mean something else: 950
labelled images clip the batch of 1024 to the whole set, so 30 epochs are 31 optimiser steps, and a
from-scratch student given 4 epochs cannot converge (issue #19: fine-tuning fell 7.5 points below
the supervised baseline, distillation 12.5 below its teacher).

``auto`` keeps the reference's intent rather than its numbers. For a stage whose batch size or
epochs the user did not set:

* **batch** = ``min(reference batch, max(MIN_BATCH, N // MIN_STEPS_PER_EPOCH))`` (never above N):
  at least :data:`MIN_STEPS_PER_EPOCH` steps per epoch, so an epoch is several updates, not one;
* **epochs** = the reference epochs, raised until the run has :data:`MIN_STEPS` optimiser steps;
* **learning rate** follows the batch actually used, by the stage's scaling rule (sqrt or linear,
  SPEC §5), as it always did;
* **fine-tuning starts from the linear-evaluation classifier**: the classifier reads the head input
  (``ft_proj_selector`` 0, what linear evaluation reads; the reference reads head layer 1 on label
  fractions below 1) and is first fitted as a linear probe on the frozen features of the labelled images
  (:data:`CLASSIFIER_PROBE`, the linear-evaluation recipe), then the whole network is fine-tuned from it
  (LP-FT, Kumar et al. 2022) instead of from a zero classifier (SPEC §2.2). Measured on a 10-class
  CIFAR-10 subsample at 16 px, 10% labels (200 images), one seed: linear evaluation 33.1% top-1;
  fine-tuning from head layer 1 with a zero classifier (the reference) 27.6%, with a probe 26.8%; from
  the head input with a zero classifier 31.9%, with a probe 33.2% (issue #19; 3 seeds in
  ``benchmarks/results/transfer_check``). ``--ft-proj-selector 1 --classifier-init zero`` (or
  ``--recipe reference``) gives the reference's fine-tuning;
* **a quarter of the fine-tuning learning rate** from a probe classifier (:data:`PROBE_FINETUNE_LR_FACTOR`,
  0.00125·sqrt(B); LP-FT fine-tunes from the probe at a small rate so as to keep what the probe
  found): on the same subsample, seed 1, frozen statistics: 31.4% at 0.005, 31.3% at 0.0025, 34.2% at
  0.00125 (linear evaluation 35.0%). An explicit ``--learning-rate`` is kept;
* **BatchNorm statistics stay the pretrained ones** while fine-tuning (``--bn-stats frozen``; gamma and
  beta still train), and while distilling into a copy of the teacher. Under LARS (trust coefficient
  1e-3) the convolution weights barely move in a few hundred steps; what moved were the running
  statistics, re-estimated from batches of 32 heavily cropped images of a few hundred labelled ones,
  which the test images (centre crops) do not match. Measured as above, at 4x the fine-tuning
  learning rate: 30.7% with statistics re-estimated, 34.0% frozen. ``--bn-stats train`` is the
  reference's;
* **distillation on a short budget** (fewer than :data:`SHORT_DISTILL_EPOCHS` epochs, the paper
  uses 400): a student of the teacher's architecture starts as a copy of the teacher (encoder, head
  layers and classifier) and continues at the rate auto fine-tuned it at (a quarter of SPEC §5's) with
  no weight decay and no warmup, instead of from scratch at the pretraining rate. ``--init-student scratch`` (or
  ``--recipe reference``) gives the paper's from-scratch student. A smaller student still starts
  from scratch (the pipeline has no pretrained encoder of its architecture).

On ImageNet-scale splits the batch and epoch rule changes nothing: 12,811 images at batch 1024 already
give 12 steps per epoch and 720 steps. The fine-tuning start (head input, probe classifier, frozen
BatchNorm statistics) does differ from the reference there: use ``--recipe reference`` to reproduce the
paper's ImageNet fine-tuning. Every value the rule changes is printed in the stage's plan line, with
the reference value beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

RECIPES = ("auto", "reference")

MIN_STEPS_PER_EPOCH = 10
"""Steps per epoch the auto batch leaves (ImageNet 1% at batch 1024 has 12.5)."""
MIN_BATCH = 32
"""Smallest auto batch (BatchNorm statistics need a few dozen images); never above the set itself."""
MIN_STEPS = 300
"""Optimiser steps the auto epochs reach at least (ImageNet 1% fine-tuning has 720; the issue-#19 failure had 31)."""
SHORT_DISTILL_EPOCHS = 100
"""Below this many distillation epochs (the paper trains students for 400) the auto recipe starts a
same-architecture student from its teacher."""

REFERENCE_BATCH = {"finetune": 1024, "supervised": 256, "distill": 512}
"""SPEC §5 batch sizes of the stages the auto rule sizes."""
SCHEDULED_STAGES = tuple(REFERENCE_BATCH)

CLASSIFIER_ZERO = "zero"
CLASSIFIER_PROBE = "probe"
PROBE_FINETUNE_LR_FACTOR = 0.25
"""Fine-tuning from a probe classifier runs at this fraction of the SPEC §5 rate (0.005 or 0.002, x sqrt(B))."""

INIT_TEACHER = "teacher"
INIT_SCRATCH = "scratch"


def reference_epochs(stage: str, label_fraction: float | None) -> float:
    """SPEC §5 epochs: fine-tuning 60 at <= 1% labels, else 30; supervised 90; distillation 400.

    The auto recipe gives the supervised baseline the fine-tuning epochs on a label fraction below 1
    (paper Table 2 compares at equal labels, and the pipeline did so already), 90 on all labels."""
    fraction = 1.0 if label_fraction is None else float(label_fraction)
    if stage == "finetune":
        return 60.0 if fraction <= 0.01 else 30.0
    if stage == "supervised":
        return 90.0
    if stage == "distill":
        return 400.0
    raise ValueError(f"no reference epochs for stage {stage!r}")


def base_epochs(stage: str, recipe: str, label_fraction: float | None) -> float:
    """The epochs a stage starts from before the auto step rule (see :func:`reference_epochs`)."""
    if recipe == "auto" and stage == "supervised" and label_fraction is not None and label_fraction < 1.0:
        return reference_epochs("finetune", label_fraction)
    return reference_epochs(stage, label_fraction)


@dataclass
class Schedule:
    """Batch and epochs of one stage, and what the recipe changed (for the plan line)."""

    batch_size: int
    epochs: float
    notes: list[str] = field(default_factory=list)


def stage_schedule(stage: str, recipe: str, num_examples: int, *, batch_size: int | None,
                   epochs: float | None, label_fraction: float | None) -> Schedule:
    """Batch size and epochs of ``stage`` on ``num_examples`` training images.

    ``batch_size`` / ``epochs`` are the user's values (None = not set): a value the user set is
    never changed. ``reference`` uses SPEC §5's numbers; ``auto`` applies the rule of this module."""
    notes: list[str] = []
    reference_batch = REFERENCE_BATCH[stage]
    if batch_size is None:
        batch = reference_batch
        if recipe == "auto":
            batch = min(reference_batch, max(MIN_BATCH, num_examples // MIN_STEPS_PER_EPOCH))
            batch = max(1, min(batch, num_examples))
            if batch != min(reference_batch, num_examples):
                notes.append(f"batch {batch} (recipe auto: >= {MIN_STEPS_PER_EPOCH} steps per epoch on "
                             f"{num_examples} images; reference {reference_batch})")
    else:
        batch = int(batch_size)
    if epochs is None:
        start = base_epochs(stage, recipe, label_fraction)
        if recipe == "auto" and stage == "supervised" and label_fraction is not None and label_fraction < 1.0:
            # The baseline trains at least as many epochs as fine-tuning does on the same labelled set
            # (paper Table 2 compares at equal labels; never a weaker baseline than the rule gives ours).
            start = max(start, stage_schedule("finetune", recipe, num_examples, batch_size=None, epochs=None,
                                              label_fraction=label_fraction).epochs)
        chosen = start
        if recipe == "auto":
            per_epoch = max(1, num_examples // max(1, min(batch, num_examples)))
            needed = math.ceil(MIN_STEPS / per_epoch)
            if needed > start:
                chosen = float(needed)
                notes.append(f"{chosen:g} epochs (recipe auto: >= {MIN_STEPS} steps at {per_epoch} per epoch; "
                             f"reference {reference_epochs(stage, label_fraction):g})")
            elif start != reference_epochs(stage, label_fraction):
                notes.append(f"{start:g} epochs (recipe auto: the fine-tuning epochs on this labelled set; "
                             f"reference {reference_epochs(stage, label_fraction):g})")
    else:
        chosen = float(epochs)
    return Schedule(batch, chosen, notes)


def distill_student_init(recipe: str, init_student: str | None, epochs: float | None, student_arch: str,
                         teacher_arch: str | None) -> str | None:
    """Where the student starts: ``"teacher"`` (a copy of the teacher), a checkpoint path, or None
    (from scratch, the paper's choice). An explicit ``init_student`` wins (``"scratch"`` = None)."""
    if init_student == INIT_SCRATCH:
        return None
    if init_student is not None:
        return init_student
    if recipe != "auto" or teacher_arch is None or student_arch != teacher_arch:
        return None
    total = reference_epochs("distill", None) if epochs is None else float(epochs)
    return INIT_TEACHER if total < SHORT_DISTILL_EPOCHS else None


def classifier_init(recipe: str) -> str:
    """How fine-tuning starts its classifier: a fitted linear probe (auto) or zeros (reference, SPEC §2.2)."""
    return CLASSIFIER_PROBE if recipe == "auto" else CLASSIFIER_ZERO


def finetune_selector(recipe: str, few_labels: bool) -> int:
    """The head layer fine-tuning reads: 0 (the head input) with ``auto``; with ``reference`` 1 on a label
    fraction below 1 (``few_labels``) and 0 on all labels (SPEC §2.1)."""
    if recipe == "auto":
        return 0
    return 1 if few_labels else 0


BN_TRAIN = "train"
BN_FROZEN = "frozen"


def bn_stats(recipe: str, stage: str, init_student: str | None) -> str:
    """BatchNorm statistics of a fine-tuning (or distillation) run: frozen under ``auto`` for fine-tuning
    and for a student that is a copy of its teacher; re-estimated (``train``) under ``reference`` and for
    a student that starts from scratch or from an encoder (its classifier has no statistics to keep)."""
    if recipe != "auto":
        return BN_TRAIN
    if stage == "distill" and init_student != INIT_TEACHER:
        return BN_TRAIN
    return BN_FROZEN


def finetune_lr_factor(classifier_start: str | None) -> float:
    """Factor on the SPEC §5 fine-tuning base rate: :data:`PROBE_FINETUNE_LR_FACTOR` from a probe, else 1."""
    return PROBE_FINETUNE_LR_FACTOR if classifier_start == CLASSIFIER_PROBE else 1.0
