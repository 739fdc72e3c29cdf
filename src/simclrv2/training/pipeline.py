"""``simclrv2 pipeline`` and ``simclrv2 demo``: every stage in one resumable run directory.

Order (paper §2): pretrain once -> for each label fraction: fine-tune from head layer 1,
self-distil the fine-tuned teacher on all training images (and, with ``--student-arch``,
distil the self-distilled model into the smaller student, the paper's best recipe for small
models), the supervised baseline on the same labels, and linear evaluation. Each stage writes
its own sub-directory; a stage whose ``results.json`` exists is skipped on a re-run, and an
interrupted stage resumes from its last checkpoint. The report (``results.json`` shaped
``{method: {label_fraction: {top1, top5}}}``, ``report.md`` and PNG plots) is written at the end.

Stage-specific settings come from the pipeline's ``--*-epochs`` options and from optional
sections of the YAML file named after the stages (``pretrain:``, ``finetune:``,
``supervised:``, ``linear_eval:``, ``distill:``), e.g.::

    data: cifar10
    arch: r18_1x_sk0
    label_fractions: [0.01, 0.1]
    pretrain: {epochs: 100, batch_size: 512}
    finetune: {epochs: 60}
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from simclrv2.config import Config, build_config
from simclrv2.training.report import write_report
from simclrv2.utils.checkpoint import atomic_write_text

STAGE_SECTIONS = ("pretrain", "finetune", "supervised", "linear_eval", "distill")

# Settings every stage inherits from the pipeline's own options.
SHARED_FIELDS = ("data", "data_root", "download", "image_size", "max_per_class", "num_workers", "strict", "seed",
                 "device", "precision", "channels_last", "compile", "eval_batch_size", "progress", "log_every",
                 "checkpoint_every", "global_bn", "flip", "crop_method", "crop_min_area", "dist_timeout")


def fraction_key(fraction: float) -> str:
    """Label fractions as report keys: 0.01 -> "0.01", 1.0 -> "1.0"."""
    return repr(float(fraction))


def _stage_config(pipe: Config, stage: str, section: str, overrides: dict[str, Any]) -> Config:
    shared = {name: getattr(pipe, name) for name in SHARED_FIELDS}
    values = {**shared, **overrides, **(pipe.stage_overrides or {}).get(section, {})}
    return build_config(stage, None, values)


STAGE_SECONDS_FILE = "stage_seconds.json"
"""Wall-clock seconds of every finished stage, kept in the pipeline's run directory so that a
re-run that skips finished stages still reports what each one cost."""


def load_stage_seconds(root: Path) -> dict[str, float]:
    """The stage timings a pipeline run directory has recorded so far ({} if none)."""
    path = root / STAGE_SECONDS_FILE
    if not path.is_file():
        return {}
    try:
        return {str(k): float(v) for k, v in json.loads(path.read_text()).items()}
    except (ValueError, AttributeError):
        return {}   # a damaged file only loses the timing table, never a run


def _run_stage(name: str, run_dir: Path, cfg: Config, runner: Callable[[Config], dict[str, Any]],
               timings: dict[str, float], is_main: bool) -> dict[str, Any]:
    results_file = run_dir / "results.json"
    if results_file.is_file():
        if is_main:
            print(f"[pipeline] {name}: done already, skipping ({results_file})")
        return json.loads(results_file.read_text())
    if is_main:
        print(f"\n[pipeline] {name} -> {run_dir}")
    start = time.perf_counter()
    results = runner(cfg.replace(out=str(run_dir), resume=True))
    timings[name] = round(time.perf_counter() - start, 1)
    if is_main:
        atomic_write_text(run_dir.parent / STAGE_SECONDS_FILE, json.dumps(timings, indent=2))
    return results


def run_pipeline(pipe: Config) -> dict[str, Any]:
    """Run every stage; returns ``{method: {fraction: {top1, top5}}}``."""
    from simclrv2.training.distill import distill
    from simclrv2.training.finetune import finetune, supervised
    from simclrv2.training.linear_eval import linear_eval
    from simclrv2.training.pretrain import pretrain
    from simclrv2.training.rundir import RunDirectory
    from simclrv2.utils.distributed import get_rank

    is_main = get_rank() == 0
    run = RunDirectory.create(pipe, "pipeline", is_main)
    root = run.path
    fractions = pipe.label_fractions or [0.01, 0.1]
    timings = load_stage_seconds(root)
    table: dict[str, dict[str, dict[str, float]]] = {}

    def record(method: str, fraction: float, results: dict[str, Any]) -> None:
        if "top1" in results:
            table.setdefault(method, {})[fraction_key(fraction)] = {"top1": results["top1"], "top5": results["top5"]}

    pre_cfg = _stage_config(pipe, "pretrain", "pretrain", dict(
        arch=pipe.arch, epochs=pipe.pretrain_epochs or pipe.epochs, batch_size=pipe.batch_size,
        learning_rate=pipe.learning_rate, learning_rate_scaling=pipe.learning_rate_scaling,
        weight_decay=pipe.weight_decay, temperature=pipe.temperature, num_proj_layers=pipe.num_proj_layers,
        proj_out_dim=pipe.proj_out_dim, color_jitter_strength=pipe.color_jitter_strength, use_blur=pipe.use_blur,
        memory_size=pipe.memory_size, ema_decay=pipe.ema_decay, memory_keys_fraction=pipe.memory_keys_fraction,
        max_steps=pipe.max_steps, linear_probe=pipe.linear_probe,
        label_fraction=min(fractions)))
    pre_dir = root / "pretrain"
    _run_stage("pretrain", pre_dir, pre_cfg, pretrain, timings, is_main)

    for fraction in fractions:
        tag = fraction_key(fraction)
        label = dict(label_fraction=fraction if fraction < 1.0 else None)
        ft_dir = root / f"finetune_{tag}"
        ft_cfg = _stage_config(pipe, "finetune", "finetune", dict(
            checkpoint=str(pre_dir), epochs=pipe.finetune_epochs, ft_proj_selector=pipe.ft_proj_selector,
            **label))
        record("finetune", fraction, _run_stage(f"finetune {tag}", ft_dir, ft_cfg, finetune, timings, is_main))

        dist_dir = root / f"distill_{tag}"
        init = str(pre_dir) if pipe.init_student == "pretrained" else pipe.init_student
        dist_cfg = _stage_config(pipe, "distill", "distill", dict(
            teacher=str(ft_dir), arch=pipe.arch, epochs=pipe.distill_epochs, init_student=init, **label))
        record("distill", fraction, _run_stage(f"distill {tag}", dist_dir, dist_cfg, distill, timings, is_main))

        if pipe.student_arch:
            small_dir = root / f"distill_{pipe.student_arch}_{tag}"
            small_cfg = _stage_config(pipe, "distill", "distill", dict(
                teacher=str(dist_dir), arch=pipe.student_arch, epochs=pipe.distill_epochs, **label))
            record(f"distill_{pipe.student_arch}", fraction,
                   _run_stage(f"distill into {pipe.student_arch} {tag}", small_dir, small_cfg, distill, timings,
                              is_main))

        sup_dir = root / f"supervised_{tag}"
        # Without --supervised-epochs the baseline gets fine-tuning's epochs at this fraction: both
        # see the same labelled images equally often (paper Table 2 compares at equal labels).
        sup_cfg = _stage_config(pipe, "supervised", "supervised", dict(
            arch=pipe.arch, epochs=pipe.supervised_epochs or ft_cfg.epochs, **label))
        record("supervised", fraction, _run_stage(f"supervised {tag}", sup_dir, sup_cfg, supervised, timings,
                                                  is_main))

        lin_dir = root / f"linear_eval_{tag}"
        lin_cfg = _stage_config(pipe, "linear-eval", "linear_eval", dict(checkpoint=str(pre_dir), **label))
        record("linear_eval", fraction, _run_stage(f"linear-eval {tag}", lin_dir, lin_cfg, linear_eval, timings,
                                                   is_main))

    if is_main:
        run.write_results(table)
        write_report(root, table, timings=timings, arch=pipe.arch, data=pipe.data)
        print("\n" + format_table(table))
        print(f"\nreport: {root / 'report.md'}")
    run.close()
    return table


def format_table(table: dict[str, dict[str, dict[str, float]]]) -> str:
    """Top-1 (top-5) in percent, one row per method, one column per label fraction."""
    fractions = sorted({f for rows in table.values() for f in rows}, key=float)
    header = f"{'method':<24}" + "".join("{:>22}".format(f"{float(f) * 100:g}% labels") for f in fractions)
    lines = [header, "-" * len(header)]
    for method, rows in table.items():
        cells = ""
        for f in fractions:
            cell = rows.get(f)
            text = "{:.1f} ({:.1f})".format(cell["top1"] * 100, cell["top5"] * 100) if cell else "-"
            cells += f"{text:>22}"
        lines.append(f"{method:<24}{cells}")
    lines.append("top-1 (top-5) accuracy in % on the test split")
    return "\n".join(lines)


# The demo: digits are 8x8 (upsampled to 32), so it trains at 16 px, crops at least a quarter of
# the image and does not mirror (a mirrored digit can be another digit); a few epochs fit the
# 5-minute budget on 2 CPU cores. The self-distillation student starts from the pretrained encoder.
DEMO_SETTINGS: dict[str, Any] = dict(
    data="digits", arch="r18_1x_sk0", image_size=16, label_fractions=[0.02, 0.1],
    pretrain_epochs=10, finetune_epochs=40, distill_epochs=6, supervised_epochs=40,
    batch_size=256, learning_rate=0.1, learning_rate_scaling="sqrt", temperature=0.2,
    crop_min_area=0.25, flip=False, init_student="pretrained",
    stage_overrides={"distill": {"batch_size": 128}, "linear_eval": {"epochs": 100}},
)


def run_demo(cfg: Config) -> dict[str, Any]:
    """``simclrv2 demo``: the pipeline on the embedded digits data (offline, a few minutes on 2 cores)."""
    values = {k: getattr(cfg, k) for k in ("out", "seed", "device", "precision", "progress", "resume")}
    values["out"] = values["out"] or "runs/demo"
    pipe = build_config("pipeline", None, {**DEMO_SETTINGS, **values})
    return run_pipeline(pipe)
