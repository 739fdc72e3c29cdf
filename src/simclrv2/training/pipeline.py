"""``simclrv2 pipeline`` and ``simclrv2 demo``: every stage in one resumable run directory.

Order (paper §2): pretrain once -> for each labelled set (each of ``label_fractions``, or the one
``--label-fraction`` / ``--labeled-list``) and each seed: fine-tune from a head layer, self-distil the
fine-tuned teacher on all training images (and, with ``--student-arch``, distil the self-distilled
model into the smaller student, the paper's best recipe for small models), the supervised baseline
on the same labels, and linear evaluation. ``--seeds N`` repeats every stage after pretraining with
the seeds ``--seed`` .. ``--seed+N-1`` (pretraining too with ``--pretrain-each-seed``), so that the
report can tell a gain from seed-to-seed noise.

Every stage's settings are built and validated before any stage runs. Each stage writes its own
sub-directory; the settings it ran with are recorded in ``pipeline_stages.json``. On a re-run
(``--resume``, the default) a stage whose record matches is kept, an interrupted one resumes from
its last checkpoint, and one whose settings changed (or whose input stage ran again, or that
``--force`` names) runs again from scratch, saying why: a report never mixes old results with new
settings. ``--no-resume`` on a directory that holds results is an error.

The report (``results.json`` shaped ``{method: {label_set: {top1, top5, top1_std, top5_std, seeds}}}``,
``report.md``, ``report.html`` and PNG plots, see :mod:`simclrv2.training.report`) is written at the
end, with every claim of the paper the run tests and every stage that made things worse.

Stage-specific settings come from the pipeline's ``--*-epochs`` options and from optional
sections of the YAML file named after the stages (``pretrain:``, ``finetune:``,
``supervised:``, ``linear_eval:``, ``distill:``), e.g.::

    data: cifar10
    arch: r18_1x_sk0
    label_fractions: [0.01, 0.1]
    seeds: 3
    pretrain: {epochs: 100, batch_size: 512}
    finetune: {epochs: 60}
"""

from __future__ import annotations

import json
import math
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from simclrv2.config import Config, build_config, fields_for_stage
from simclrv2.errors import ConfigError
from simclrv2.training.report import aggregate_seeds, compare_methods, format_table, write_report
from simclrv2.training.rundir import NOT_TRAINING
from simclrv2.utils.checkpoint import atomic_write_text

STAGE_SECTIONS = ("pretrain", "finetune", "supervised", "linear_eval", "distill")
STAGE_KINDS = ("pretrain", "finetune", "distill", "supervised", "linear_eval")
"""What ``--force`` accepts (besides ``all``): a stage kind re-runs every stage of that kind."""

# Settings every stage inherits from the pipeline's own options.
SHARED_FIELDS = ("data", "data_root", "download", "image_size", "max_per_class", "num_workers", "strict", "seed",
                 "device", "precision", "channels_last", "compile", "eval_batch_size", "progress", "log_every",
                 "checkpoint_every", "global_bn", "flip", "crop_method", "crop_min_area", "dist_timeout",
                 "unlabeled", "labels", "recipe")

NOT_COMPARED = set(NOT_TRAINING) - {"device", "precision", "max_steps"}
"""Settings that change how a stage reports, how fast or where it runs, not what it computes: a change
of these keeps a finished stage and resumes an interrupted one. The fields a single stage's ``--resume``
may change (``rundir.NOT_TRAINING``: ``compile`` and ``channels_last`` give the same network and
numerically close steps, tests/test_compile.py), except those that make a finished result another one:
``device`` and ``precision`` (bf16 and fp32 runs are not interchangeable results) and ``max_steps``
(a stage stopped early). Before ``compile`` was excluded here, adding ``--compile`` to a pipeline
restarted its interrupted pretraining from step 0."""

STAGE_RECORDS = "pipeline_stages.json"
"""In the pipeline directory, one entry per stage directory: the settings the stage ran with, the tokens
of the stages it started from and its own token (new each time it runs), so that a re-run can tell stale
results from current ones. (Kept outside the stage directories: a stage's run directory holds only
what the stage itself writes.)"""

LIST_KEY = "list"
"""The report key of the labelled set given by ``--labeled-list``."""

EVALS_PER_STAGE = 8
"""Periodic evaluations per classifier stage in a pipeline when ``--eval-every`` is not given."""


def fraction_key(fraction: float) -> str:
    """Label fractions as report keys: 0.01 -> "0.01", 1.0 -> "1.0"."""
    return repr(float(fraction))


STAGE_SECONDS_FILE = "stage_seconds.json"
"""Wall-clock seconds of every finished stage, kept in the pipeline's run directory so that a
re-run that skips finished stages still reports what each one cost. A stage that stopped (SIGTERM,
Ctrl-C, an error) leaves the seconds it ran; resuming it adds the new invocation's (a process killed
outright, SIGKILL, leaves nothing to add)."""


def load_stage_seconds(root: Path) -> dict[str, float]:
    """The stage timings a pipeline run directory has recorded so far ({} if none)."""
    path = Path(root) / STAGE_SECONDS_FILE
    if not path.is_file():
        return {}
    try:
        return {str(k): float(v) for k, v in json.loads(path.read_text()).items()}
    except (ValueError, AttributeError):
        return {}   # a damaged file only loses the timing table, never a run


@dataclass
class StagePlan:
    """One stage of the pipeline: what it is, where it writes, the settings it is built from."""

    name: str                      # shown and used in stage_seconds.json: "finetune 0.1", "finetune 0.1 seed 1"
    kind: str                      # one of STAGE_KINDS
    command: str                   # the Config stage: pretrain, finetune, distill, supervised, linear-eval
    section: str                   # its YAML section
    path: Path
    overrides: dict[str, Any]
    method: str | None = None      # its row in the results table (None: pretraining)
    label_key: str | None = None
    seed: int = 0
    inputs: list[str] = field(default_factory=list)   # names of the stages it starts from
    config: Config | None = None   # validated settings (checkpoint paths not checked yet)


def _stage_config(pipe: Config, stage: str, section: str, overrides: dict[str, Any], *,
                  check_paths: bool = True) -> Config:
    shared = {name: getattr(pipe, name) for name in SHARED_FIELDS if name in _fields_of(stage)}
    values = {**shared, **overrides, **(pipe.stage_overrides or {}).get(section, {})}
    try:
        return build_config(stage, None, values, check_paths=check_paths)
    except ConfigError as exc:
        where = f"section {section!r}" if section in (pipe.stage_overrides or {}) else "pipeline"
        raise ConfigError(f"{stage} stage ({where}): {exc}") from exc


def _fields_of(stage: str) -> set[str]:
    return {f.name for f in fields_for_stage(stage)}


def label_sets(pipe: Config) -> list[tuple[str, dict[str, Any]]]:
    """``(report key, stage options)`` of every labelled set the pipeline trains on.

    ``--labeled-list`` gives one set (key "list"); ``--label-fraction F`` is ``label_fractions: [F]``;
    both with ``label_fractions`` is an error (which one would win is not obvious)."""
    if pipe.labeled_list is not None:
        if pipe.label_fractions is not None or pipe.label_fraction is not None:
            raise ConfigError("labeled_list: give either --labeled-list or label fractions (--label-fraction / "
                              "label_fractions), not both")
        return [(LIST_KEY, dict(labeled_list=pipe.labeled_list))]
    if pipe.label_fraction is not None:
        if pipe.label_fractions is not None and list(pipe.label_fractions) != [pipe.label_fraction]:
            raise ConfigError(f"label_fraction: {pipe.label_fraction:g} and label_fractions "
                              f"{pipe.label_fractions} both given; a pipeline takes the list label_fractions "
                              "(--label-fractions F1 F2 ...), --label-fraction F is short for one fraction")
        fractions = [pipe.label_fraction]
    else:
        fractions = pipe.label_fractions or [0.01, 0.1]
    if len(set(fractions)) != len(fractions):
        raise ConfigError(f"label_fractions: each fraction once, got {fractions}")
    return [(fraction_key(f), dict(label_fraction=f if f < 1.0 else None)) for f in fractions]


def seeds_of(pipe: Config) -> list[int]:
    return [pipe.seed + i for i in range(pipe.seeds)]


def plan_pipeline(pipe: Config, root: Path) -> list[StagePlan]:
    """Every stage in running order, each with its settings built and validated (exit 2 on any error
    before any stage has run; checkpoints that earlier stages will write are not checked yet)."""
    sets = label_sets(pipe)
    seeds = seeds_of(pipe)
    plans: list[StagePlan] = []

    def suffix(seed: int) -> tuple[str, str]:
        return ("", "") if seed == pipe.seed else (f"_seed{seed}", f" seed {seed}")

    pre_values = dict(
        arch=pipe.arch, epochs=pipe.pretrain_epochs or pipe.epochs, batch_size=pipe.batch_size,
        learning_rate=pipe.learning_rate, learning_rate_scaling=pipe.learning_rate_scaling,
        weight_decay=pipe.weight_decay, temperature=pipe.temperature, num_proj_layers=pipe.num_proj_layers,
        proj_out_dim=pipe.proj_out_dim, color_jitter_strength=pipe.color_jitter_strength, use_blur=pipe.use_blur,
        memory_size=pipe.memory_size, ema_decay=pipe.ema_decay, memory_keys_fraction=pipe.memory_keys_fraction,
        max_steps=pipe.max_steps, linear_probe=pipe.linear_probe)
    if sets[0][0] == LIST_KEY:
        pre_values["labeled_list"] = pipe.labeled_list   # the probe and kNN monitor use these labels
    else:
        pre_values["label_fraction"] = min(float(k) for k, _ in sets)
        if pre_values["label_fraction"] >= 1.0:
            pre_values["label_fraction"] = None
    pretrain_of: dict[int, StagePlan] = {}
    for seed in (seeds if pipe.pretrain_each_seed else [pipe.seed]):
        dir_tag, name_tag = suffix(seed)
        plan = StagePlan(f"pretrain{name_tag}", "pretrain", "pretrain", "pretrain", root / f"pretrain{dir_tag}",
                         {**pre_values, "seed": seed}, seed=seed)
        plans.append(plan)
        pretrain_of[seed] = plan

    for key, label in sets:
        for seed in seeds:
            dir_tag, name_tag = suffix(seed)
            pre = pretrain_of.get(seed, pretrain_of[pipe.seed])
            common = {**label, "seed": seed}
            ft = StagePlan(f"finetune {key}{name_tag}", "finetune", "finetune", "finetune",
                           root / f"finetune_{key}{dir_tag}",
                           dict(checkpoint=str(pre.path), epochs=pipe.finetune_epochs,
                                ft_proj_selector=pipe.ft_proj_selector, classifier_init=pipe.classifier_init,
                                bn_stats=pipe.bn_stats, **common),
                           method="finetune", label_key=key, seed=seed, inputs=[pre.name])
            dist_inputs = [ft.name]
            init = pipe.init_student
            if init == "pretrained":
                init = str(pre.path)
                dist_inputs.append(pre.name)
            dist = StagePlan(f"distill {key}{name_tag}", "distill", "distill", "distill",
                             root / f"distill_{key}{dir_tag}",
                             dict(teacher=str(ft.path), arch=pipe.arch, epochs=pipe.distill_epochs,
                                  init_student=init, bn_stats=pipe.bn_stats, **common),
                             method="distill", label_key=key, seed=seed, inputs=dist_inputs)
            plans += [ft, dist]
            if pipe.student_arch:
                plans.append(StagePlan(
                    f"distill into {pipe.student_arch} {key}{name_tag}", "distill", "distill", "distill",
                    root / f"distill_{pipe.student_arch}_{key}{dir_tag}",
                    dict(teacher=str(dist.path), arch=pipe.student_arch, epochs=pipe.distill_epochs, **common),
                    method=f"distill_{pipe.student_arch}", label_key=key, seed=seed, inputs=[dist.name]))
            # Without --supervised-epochs the baseline gets fine-tuning's epochs on this labelled set:
            # both see the same labelled images equally often (paper Table 2 compares at equal labels).
            plans.append(StagePlan(f"supervised {key}{name_tag}", "supervised", "supervised", "supervised",
                                   root / f"supervised_{key}{dir_tag}",
                                   dict(arch=pipe.arch, epochs=pipe.supervised_epochs, **common),
                                   method="supervised", label_key=key, seed=seed))
            plans.append(StagePlan(f"linear-eval {key}{name_tag}", "linear_eval", "linear-eval", "linear_eval",
                                   root / f"linear_eval_{key}{dir_tag}", dict(checkpoint=str(pre.path), **common),
                                   method="linear_eval", label_key=key, seed=seed, inputs=[pre.name]))

    by_name = {p.name: p for p in plans}
    for plan in plans:
        if plan.kind == "supervised" and plan.overrides.get("epochs") is None:
            ft = by_name[plan.name.replace("supervised", "finetune", 1)]
            plan.overrides["epochs"] = ft.config.epochs if ft.config else None
        plan.config = _stage_config(pipe, plan.command, plan.section, plan.overrides, check_paths=False)
        if plan.command in ("finetune", "supervised", "distill"):
            if pipe.eval_every is None and plan.config.epochs is None:  # recipe auto: epochs known at plan time
                plan.overrides["evals_per_stage"] = EVALS_PER_STAGE
            else:
                plan.overrides["eval_every"] = _eval_every(pipe, plan.config)
    return plans


def _eval_every(pipe: Config, cfg: Config) -> int:
    """``--eval-every`` for a classifier stage: the pipeline's value, else about
    :data:`EVALS_PER_STAGE` evaluations over the stage's epochs."""
    if pipe.eval_every is not None:
        return int(pipe.eval_every)
    return max(1, int(math.ceil(float(cfg.epochs or 1) / EVALS_PER_STAGE)))


def check_force(pipe: Config) -> set[str]:
    """The stage kinds ``--force`` names (``all`` = every kind); a ConfigError for anything else."""
    names = set()
    for name in pipe.force or []:
        name = name.strip().replace("-", "_")
        if name == "all":
            return set(STAGE_KINDS)
        if name not in STAGE_KINDS:
            import difflib
            close = difflib.get_close_matches(name, STAGE_KINDS + ("all",), n=1, cutoff=0.6)
            raise ConfigError(f"force: {name!r} is not a stage; use all or one of {', '.join(STAGE_KINDS)}"
                              + (f" (did you mean {close[0]}?)" if close else ""))
        names.add(name)
    return names


def settings_record(cfg: Config, command: str, root: Path) -> dict[str, Any]:
    """What a stage computes from: every option the stage takes except run control and logging, with
    paths inside the pipeline directory written relative to it (the directory may move)."""
    values: dict[str, Any] = {}
    root_text = str(root.resolve())
    for f in fields_for_stage(command):
        if f.name in NOT_COMPARED:
            continue
        value = getattr(cfg, f.name)
        if f.name in ("checkpoint", "teacher", "init_student") and isinstance(value, str):
            resolved = str(Path(value).resolve())
            if resolved.startswith(root_text):
                value = "<pipeline>" + resolved[len(root_text):]
        values[f.name] = value
    return json.loads(json.dumps(values, default=str))


def read_stage_records(root: Path) -> dict[str, Any]:
    try:
        records = json.loads((Path(root) / STAGE_RECORDS).read_text())
    except (OSError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}


def read_stage_record(root: Path, name: str) -> dict[str, Any] | None:
    """The record of stage directory ``name`` (e.g. "finetune_0.1"), None when there is none."""
    record = read_stage_records(root).get(name)
    return record if isinstance(record, dict) else None


def _diff(old: dict[str, Any], new: dict[str, Any], limit: int = 4) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    shown = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:limit]]
    return ", ".join(shown) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def decide(plan: StagePlan, settings: dict[str, Any], inputs: dict[str, str], forced: bool
           ) -> tuple[str, str]:
    """("skip" | "resume" | "fresh", why) for a stage about to run with ``settings``."""
    path = plan.path
    if forced:
        return "fresh", "--force"
    if not path.exists() or not any(path.iterdir()):
        return "fresh", ""
    record = read_stage_record(path.parent, path.name)
    if record is None:
        return "fresh", f"{path} holds no record of the settings it ran with (an older version); running it again"
    if record.get("settings") != settings:
        return "fresh", "its settings changed: " + _diff(record.get("settings") or {}, settings)
    if record.get("inputs") != inputs:
        changed = [name for name in inputs if (record.get("inputs") or {}).get(name) != inputs[name]]
        return "fresh", f"the stage it starts from ran again ({', '.join(changed) or 'inputs changed'})"
    if record.get("complete") and (path / "results.json").is_file():
        return "skip", ""
    return "resume", "interrupted earlier"


def _write_record(plan: StagePlan, settings: dict[str, Any], inputs: dict[str, str], *, complete: bool,
                  token: str, seconds: float | None = None) -> None:
    root = plan.path.parent
    records = read_stage_records(root)
    records[plan.path.name] = {"stage": plan.name, "settings": settings, "inputs": inputs, "complete": complete,
                               "token": token, "seconds": seconds}
    atomic_write_text(root / STAGE_RECORDS, json.dumps(records, indent=2))


def _runners() -> dict[str, Callable[[Config], dict[str, Any]]]:
    from simclrv2.training.distill import distill
    from simclrv2.training.finetune import finetune, supervised
    from simclrv2.training.linear_eval import linear_eval
    from simclrv2.training.pretrain import pretrain
    return {"pretrain": pretrain, "finetune": finetune, "distill": distill, "supervised": supervised,
            "linear-eval": linear_eval}


def holds_results(root: Path) -> bool:
    return (root / "results.json").is_file() or (root / STAGE_RECORDS).is_file() or \
        any(root.glob("*/results.json"))


def run_pipeline(pipe: Config) -> dict[str, Any]:
    """Run every stage; returns the results table ``{method: {label_set: {top1, top5, ...}}}``."""
    from simclrv2.training.rundir import RunDirectory, default_run_dir
    from simclrv2.utils.distributed import get_rank

    is_main = get_rank() == 0
    root = Path(pipe.out) if pipe.out else default_run_dir("pipeline")
    forced = check_force(pipe)
    plans = plan_pipeline(pipe, root)   # every stage's settings, validated before any work
    if not pipe.resume and root.is_dir() and holds_results(root):
        raise ConfigError(f"resume: {root} already holds the results of a pipeline run and --no-resume does not "
                          "say what to do with them. Leave --no-resume out (--resume, the default, keeps every "
                          "finished stage whose settings are unchanged and runs the others again), add "
                          "--force STAGE|all to run stages again, or choose a new --out")
    run = RunDirectory.create(pipe.replace(out=str(root)), "pipeline", is_main)
    runners = _runners()
    timings = {k: v for k, v in load_stage_seconds(root).items() if k in {p.name for p in plans}}
    tokens: dict[str, str] = {}
    per_seed: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    start = time.perf_counter()
    ran: list[str] = []

    for plan in plans:
        cfg = _stage_config(pipe, plan.command, plan.section, plan.overrides)   # paths exist now
        settings = settings_record(cfg, plan.command, root)
        inputs = {name: tokens[name] for name in plan.inputs}
        action, why = decide(plan, settings, inputs, plan.kind in forced)
        if action == "skip":
            record = read_stage_record(root, plan.path.name) or {}
            tokens[plan.name] = str(record.get("token"))
            results = json.loads((plan.path / "results.json").read_text())
            if is_main:
                print(f"[pipeline] {plan.name}: done already with the same settings, kept ({plan.path})")
        else:
            if is_main:
                print(f"\n[pipeline] {plan.name} -> {plan.path}" + (f" (running again: {why})" if why and
                                                                     action == "fresh" else
                                                                     f" ({why})" if why else ""))
                if action == "fresh" and plan.path.exists():
                    shutil.rmtree(plan.path)   # stale results and checkpoints of other settings
            token = uuid.uuid4().hex
            if is_main:
                _write_record(plan, settings, inputs, complete=False, token=token)
            t0 = time.perf_counter()
            # A resumed stage adds to the seconds its interrupted invocations spent (kept when they stopped).
            earlier = timings.pop(plan.name, 0.0)
            if action != "resume":
                earlier = 0.0
            try:
                results = runners[plan.command](cfg.replace(out=str(plan.path), resume=action == "resume"))
            except BaseException:   # SIGTERM (exit 143), Ctrl-C, an error: keep what the stage cost so far
                if is_main:
                    timings[plan.name] = round(earlier + time.perf_counter() - t0, 1)
                    atomic_write_text(root / STAGE_SECONDS_FILE, json.dumps(timings, indent=2))
                raise
            seconds = round(earlier + time.perf_counter() - t0, 1)
            timings[plan.name] = seconds
            tokens[plan.name] = token
            ran.append(plan.name)
            if is_main:
                _write_record(plan, settings, inputs, complete=True, token=token, seconds=seconds)
                atomic_write_text(root / STAGE_SECONDS_FILE, json.dumps(timings, indent=2))
        if plan.method and "top1" in results:
            per_seed.setdefault(plan.method, {}).setdefault(plan.label_key, {})[str(plan.seed)] = {
                "top1": results["top1"], "top5": results["top5"], "num_images": results.get("num_images")}

    table = aggregate_seeds(per_seed)
    if is_main:
        run.write_results(table)
        stages = [{"name": p.name, "kind": p.kind, "method": p.method, "label_key": p.label_key, "seed": p.seed,
                   "dir": p.path.name, "seconds": timings.get(p.name)} for p in plans]
        comparisons = compare_methods(per_seed, student_arch=pipe.student_arch)
        write_report(root, table, stages=stages, comparisons=comparisons, pipe=pipe,
                     wall_seconds=time.perf_counter() - start)
        print("\n" + format_table(table, label_names=_label_names(pipe)))
        for comparison in comparisons:
            print(comparison.sentence())
        for comparison in comparisons:
            if comparison.regression:
                print(f"warning: {comparison.regression_text(root, stages)}")
        print(f"\nreport: {root / 'report.md'} and {root / 'report.html'}")
    run.close()
    return table


def _label_names(pipe: Config) -> dict[str, str]:
    return {LIST_KEY: Path(pipe.labeled_list).name} if pipe.labeled_list else {}


# The demo: digits are 8x8 (upsampled to 32), so it trains at 16 px, crops at least a quarter of
# the image and does not mirror (a mirrored digit can be another digit). The budget: a half-width
# ResNet-18 (4x fewer FLOPs than r18_1x), 10 pretraining epochs and 6 distillation epochs; everything
# else is the pipeline's default (recipe auto: fine-tuning and the baseline run 300 steps, the short
# distillation starts the student as a copy of its teacher).
DEMO_SETTINGS: dict[str, Any] = dict(
    data="digits", arch="r18_0.5x_sk0", image_size=16, label_fractions=[0.02, 0.1],
    pretrain_epochs=10, distill_epochs=6,
    batch_size=256, learning_rate=0.1, learning_rate_scaling="sqrt", temperature=0.2,
    crop_min_area=0.25, flip=False,
    stage_overrides={"linear_eval": {"epochs": 100}},
)
DEMO_OPTIONS = ("out", "seed", "device", "precision", "progress", "resume", "seeds", "force")
"""The demo's own options; everything else is fixed by :data:`DEMO_SETTINGS`."""


def run_demo(cfg: Config) -> dict[str, Any]:
    """``simclrv2 demo``: the pipeline on the embedded digits data (offline; measured 12 minutes on 2 cores
    with 3 seeds, 5 with one: README "Two commands on a fresh machine")."""
    values = {k: getattr(cfg, k) for k in DEMO_OPTIONS}
    values["out"] = values["out"] or "runs/demo"   # seeds: 3 unless --seeds (config.stage_defaults)
    pipe = build_config("pipeline", None, {**DEMO_SETTINGS, **values})
    return run_pipeline(pipe)
