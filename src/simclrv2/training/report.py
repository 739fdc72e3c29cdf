"""The pipeline report: ``report.md`` and ``report.html`` (the same text; the HTML embeds its plots).

It says what a newcomer needs to read the numbers: the accuracy table as mean ± standard deviation
over the seeds (laid out like the paper's Tables 2-3), one sentence per claim of the paper this run
tests (pretraining + fine-tuning vs the supervised baseline, distillation vs its teacher, a small
student vs its teacher) with whether the gain exceeds the seed-to-seed spread, every stage that made
things worse than the stage it should improve with the likely cause and the option to change, how
many labelled and test images there were and the chance level, per-class accuracy and the
confusion matrix of the best model, and the time of every stage on which hardware.

Gains are paired by seed (each seed has its own labelled subset, initialisation and batch order):
``gain_s = A_s - B_s``; the report gives mean ± sample standard deviation of ``gain_s`` and calls a
gain "more than the spread" when ``|mean| > std``. One seed measures no spread, and the report says so.
"""

from __future__ import annotations

import base64
import json
import math
import os
import platform
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simclrv2.training.rundir import read_metrics

ONE_SEED_REGRESSION_POINTS = 1.0
"""With one seed there is no spread: a drop of more than this many top-1 points is reported."""

MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate_seeds(per_seed: dict[str, dict[str, dict[str, dict[str, float]]]]) -> dict[str, Any]:
    """``{method: {label_key: {seed: {top1, top5}}}}`` -> ``{method: {label_key: {top1, top5, top1_std,
    top5_std, num_seeds, seeds}}}`` (means, sample standard deviations, every seed's figures)."""
    table: dict[str, Any] = {}
    for method, sets in per_seed.items():
        for key, seeds in sets.items():
            cell: dict[str, Any] = {}
            for metric in ("top1", "top5"):
                mean, std = _mean_std([float(v[metric]) for v in seeds.values()])
                cell[metric], cell[f"{metric}_std"] = mean, std
            cell["num_seeds"] = len(seeds)
            cell["seeds"] = {s: dict(v) for s, v in seeds.items()}
            table.setdefault(method, {})[key] = cell
    return table


def label_text(key: str, names: dict[str, str] | None = None) -> str:
    """A label-set key as a column title: "0.02" -> "2% labels", "list" -> the list's file name."""
    if names and key in names:
        return names[key]
    try:
        return f"{float(key) * 100:g}% labels"
    except ValueError:
        return key


def _cell(cell: dict[str, Any] | None, metric: str) -> str:
    if not cell:
        return "-"
    text = f"{cell[metric] * 100:.1f}"
    if cell.get("num_seeds", 1) > 1:
        text += f" ± {cell.get(metric + '_std', 0.0) * 100:.1f}"
    return text


def ordered_methods(methods: Any) -> list[str]:
    rank = {"finetune": 0, "distill": 1, "supervised": 3, "linear_eval": 4}
    return sorted(methods, key=lambda m: (rank.get(m, 2 if m.startswith("distill_") else 5), m))


def _keys(table: dict[str, Any]) -> list[str]:
    keys = {k for rows in table.values() for k in rows}

    def order(k: str) -> tuple[int, float, str]:
        try:
            return (0, float(k), k)
        except ValueError:
            return (1, 0.0, k)
    return sorted(keys, key=order)


def format_table(table: dict[str, Any], label_names: dict[str, str] | None = None) -> str:
    """Top-1 (top-5) in percent, mean ± std over seeds, one row per method, one column per label set."""
    keys = _keys(table)
    width = 26
    header = f"{'method':<24}" + "".join(f"{label_text(k, label_names):>{width}}" for k in keys)
    lines = [header, "-" * len(header)]
    seeds = 1
    for method in ordered_methods(table):
        rows = table[method]
        cells = ""
        for k in keys:
            cell = rows.get(k)
            seeds = max(seeds, cell.get("num_seeds", 1) if cell else 1)
            text = f"{_cell(cell, 'top1')} ({cell['top5'] * 100:.1f})" if cell else "-"
            cells += f"{text:>{width}}"
        lines.append(f"{method:<24}{cells}")
    lines.append("top-1 (top-5) accuracy in % on the test split"
                 + (f", mean ± std over {seeds} seeds" if seeds > 1 else ", one seed"))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- claims
@dataclass
class Comparison:
    """Method ``a`` against method ``b`` on one labelled set, paired by seed."""

    a: str
    b: str
    label_key: str
    subject: str
    against: str
    gains: list[float]        # top-1 points, one per common seed
    should_improve: bool      # a stage meant to improve on b: a drop is a regression
    test_images: int | None = None   # size of the test split both were scored on, when known

    @property
    def resolution(self) -> float:
        """Top-1 points one test image is worth (100 / test images); 0 when the size is unknown."""
        return 100.0 / self.test_images if self.test_images else 0.0

    @property
    def below_resolution(self) -> bool:
        """The mean gain is smaller than one test image: no test set of this size can show it."""
        return abs(self.mean) < self.resolution

    @property
    def mean(self) -> float:
        return _mean_std(self.gains)[0]

    @property
    def std(self) -> float:
        return _mean_std(self.gains)[1]

    @property
    def beyond_spread(self) -> bool:
        """More than the seed-to-seed spread (|mean| > std) and at least one test image (issue 18: 0.2
        points on 297 test images is two thirds of an image, not a measured difference)."""
        return len(self.gains) > 1 and abs(self.mean) > self.std and not self.below_resolution

    @property
    def regression(self) -> bool:
        if not self.should_improve or self.mean >= 0:
            return False
        if len(self.gains) == 1:
            return self.mean < -ONE_SEED_REGRESSION_POINTS
        return self.beyond_spread

    def sentence(self, names: dict[str, str] | None = None) -> str:
        where = label_text(self.label_key, names)
        n = len(self.gains)
        if n == 1:
            return (f"{self.subject.capitalize()} vs {self.against} at {where}: {self.mean:+.1f} points top-1 "
                    "(one seed, so no spread is measured; --seeds 3 tells a gain from noise).")
        spread = f"{self.mean:.1f} ± {self.std:.1f}" if self.mean >= 0 else f"{-self.mean:.1f} ± {self.std:.1f}"
        if self.below_resolution and abs(self.mean) > self.std:
            return (f"{self.subject.capitalize()} changes top-1 by {self.mean:+.1f} ± {self.std:.1f} points against "
                    f"{self.against} at {where} ({n} seeds): less than one of the {self.test_images} test images "
                    f"({self.resolution:.2f} points), so no measurable difference.")
        if self.beyond_spread and self.mean > 0:
            return (f"{self.subject.capitalize()} beats {self.against} by {spread} points at {where} "
                    f"({n} seeds): more than the seed-to-seed spread.")
        if self.beyond_spread:
            return (f"{self.subject.capitalize()} is below {self.against} by {spread} points at {where} "
                    f"({n} seeds): more than the spread.")
        return (f"{self.subject.capitalize()} changes top-1 by {self.mean:+.1f} ± {self.std:.1f} points against "
                f"{self.against} at {where} ({n} seeds): within the noise.")

    def regression_text(self, root: Path, stages: list[dict[str, Any]], names: dict[str, str] | None = None
                        ) -> str:
        where = label_text(self.label_key, names)
        drop = f"{-self.mean:.1f}" + (f" ± {self.std:.1f}" if len(self.gains) > 1 else "")
        head = f"regression: {self.a} is {drop} points top-1 below {self.b} at {where}."
        stage = _first_stage(stages, self.a, self.label_key)
        return head + " " + likely_cause(self.a, root / stage["dir"] if stage else None)


def compare_methods(per_seed: dict[str, dict[str, dict[str, dict[str, float]]]], *,
                    student_arch: str | None = None) -> list[Comparison]:
    """The paper's claims this run tests, and the checks that a stage improves on the one before."""
    pairs = [("finetune", "supervised", "pretraining + fine-tuning", "the supervised baseline", True),
             ("finetune", "linear_eval", "fine-tuning", "linear evaluation", True),
             ("distill", "finetune", "self-distillation", "its teacher (the fine-tuned network)", True)]
    if student_arch:
        pairs.append((f"distill_{student_arch}", "distill", f"the {student_arch} student",
                      "its teacher (the self-distilled network)", False))
    out = []
    for a, b, subject, against, improve in pairs:
        for key in sorted(set(per_seed.get(a, {})) & set(per_seed.get(b, {})), key=_key_order):
            seeds = sorted(set(per_seed[a][key]) & set(per_seed[b][key]), key=int)
            if seeds:
                gains = [(per_seed[a][key][s]["top1"] - per_seed[b][key][s]["top1"]) * 100 for s in seeds]
                sizes = [int(per_seed[m][key][s]["num_images"]) for m in (a, b) for s in seeds
                         if per_seed[m][key][s].get("num_images")]
                out.append(Comparison(a, b, key, subject, against, gains, improve,
                                      test_images=min(sizes) if sizes else None))
    return out


def _key_order(key: str) -> tuple[int, float]:
    try:
        return (0, float(key))
    except ValueError:
        return (1, 0.0)


def _first_stage(stages: list[dict[str, Any]], method: str, key: str | None) -> dict[str, Any] | None:
    for stage in stages:
        if stage.get("method") == method and stage.get("label_key") == key:
            return stage
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _stage_settings(stage_dir: Path) -> dict[str, Any]:
    import yaml
    try:
        value = yaml.safe_load((stage_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return value if isinstance(value, dict) else {}


def _peak_lr(stage_dir: Path) -> float | None:
    lrs = [r["train/lr"] for r in read_metrics(stage_dir) if isinstance(r.get("train/lr"), (int, float))]
    return max(lrs) if lrs else None


def likely_cause(method: str, stage_dir: Path | None) -> str:
    """The likely cause of a regression (steps, learning rate, budget) and the option to change,
    read from the stage's own results, settings and log."""
    if stage_dir is None:
        return ""
    results, cfg = _read_json(stage_dir / "results.json"), _stage_settings(stage_dir)
    steps = results.get("steps")
    # What the stage ran with: results.json (recipe auto sizes batch and epochs at plan time), else config.yaml
    epochs = results.get("epochs", cfg.get("epochs"))
    batch = results.get("batch_size", cfg.get("batch_size"))
    images = results.get("train_images")
    peak = _peak_lr(stage_dir)
    used = min(int(batch), int(images)) if isinstance(batch, int) and isinstance(images, int) else batch
    details = []
    if isinstance(epochs, (int, float)):
        details.append(f"{epochs:g} epochs")
    if images is not None:
        details.append(f"{images} images" + (f" at batch {used}" if used is not None else ""))
    if peak is not None:
        details.append(f"peak learning rate {peak:.3g}")
    facts = f"it ran {steps} optimiser steps" + (f" ({', '.join(details)})" if details else "")
    if method == "finetune":
        if isinstance(steps, int) and steps < 200:
            return (f"Likely cause: too few optimiser steps: {facts}. Change: raise --finetune-epochs, or set "
                    "`finetune: {batch_size: ...}` smaller for more steps per epoch.")
        selector = results.get("ft_proj_selector", cfg.get("ft_proj_selector"))
        start = results.get("classifier_init", cfg.get("classifier_init"))
        changes = ["lower `finetune: {learning_rate: ...}`"]
        if selector not in (0, None):
            changes.append(f"fine-tune from the head input (--ft-proj-selector 0; it read head layer {selector})")
        if start != "probe":
            changes.append("start from a linear probe (--classifier-init probe, the default of --recipe auto)")
        return (f"Likely cause: the learning rate or the fine-tuning start: {facts}, head layer {selector}, "
                f"classifier start {start or 'zero'}. Change: " + ", or ".join(changes) + ".")
    if method.startswith("distill"):
        init = cfg.get("init_student", results.get("init_student"))
        alpha = cfg.get("alpha", results.get("alpha"))
        start = {None: "from scratch (the paper's choice, for 400 epochs)", "scratch": "from scratch (the paper's "
                 "choice, for 400 epochs)", "teacher": "as a copy of its teacher"}.get(init, "from the encoder of "
                                                                                    f"{init}")
        changes = ["raise --distill-epochs"]
        if init != "teacher":
            changes.append("start the student from its teacher (--init-student teacher, the default of "
                           "--recipe auto below 100 epochs)")
        changes.append("mix in the labels with `distill: {alpha: 0.5}` (paper Eq. 3)" if alpha == 1.0 else
                       "change how much of the labels is mixed in (`distill: {alpha: ...}`, paper Eq. 3)")
        return (f"Likely cause: the distillation budget: {facts}, the student starting {start}, alpha {alpha}. "
                "Change: " + ", or ".join(changes) + ".")
    return f"{facts}."


# ---------------------------------------------------------------------------------------------- context
def method_titles(root: Path, stages: list[dict[str, Any]]) -> dict[str, str]:
    """Method titles from the settings each method ran with (selector, student architecture, alpha)."""
    titles: dict[str, str] = {}
    for stage in stages:
        method = stage.get("method")
        if not method or method in titles:
            continue
        results = _read_json(root / stage["dir"] / "results.json")
        cfg = _stage_settings(root / stage["dir"])
        arch = results.get("arch") or cfg.get("arch") or "?"
        if method == "finetune":
            start = {"probe": ", classifier from a linear probe", "zero": ", zero classifier"}.get(
                results.get("classifier_init") or cfg.get("classifier_init"), "")
            titles[method] = (f"SimCLRv2 fine-tuned from head layer {results.get('ft_proj_selector', '?')} "
                              f"({arch}{start})")
        elif method == "distill" or method.startswith("distill_"):
            alpha = results.get("alpha", cfg.get("alpha"))
            source = results.get("init_student") or cfg.get("init_student")
            init = {None: "student from scratch", "scratch": "student from scratch",
                    "teacher": "student from a copy of its teacher"}.get(source, "student from the pretrained encoder")
            labels = "distillation only" if alpha == 1.0 else f"alpha {alpha}: labels mixed in"
            what = "self-distilled" if method == "distill" else f"distilled into {arch}"
            titles[method] = f"SimCLRv2 {what} ({labels}, {init})"
        elif method == "supervised":
            titles[method] = f"Supervised baseline ({arch} from scratch, same labels)"
        elif method == "linear_eval":
            titles[method] = f"Linear evaluation (frozen {arch} encoder)"
    return titles


def hardware() -> dict[str, Any]:
    """CPU model, logical CPUs, torch threads and GPU (when present) of this machine."""
    import torch
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu or "unknown", "logical_cpus": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def recipe_lines(root: Path, stages: list[dict[str, Any]]) -> list[str]:
    """What the recipe (``--recipe auto`` by default, simclrv2/recipes.py) set that the user did not:
    each stage's batch, epochs and steps, and the notes it printed in its plan line."""
    rows, recipe = [], None
    for stage in stages:
        results = _read_json(root / stage["dir"] / "results.json") if stage.get("dir") else {}
        if "recipe" not in results:
            continue
        recipe = recipe or results["recipe"]
        notes = list(results.get("recipe_notes") or [])
        if results.get("init_student") == "teacher":
            notes.append("the student starts as a copy of its teacher (--init-student teacher: the recipe's "
                         "choice below 100 distillation epochs, unless set by the user)")
        rows.append([stage["name"], str(results.get("batch_size", "")), f"{results.get('epochs', 0):g}",
                     str(results.get("steps", "")), "; ".join(notes) or "-"])
    if not rows:
        return []
    return ["## Recipe", "",
            f"Recipe {recipe} (`--recipe`; `reference` = SPEC §5 exactly). What each classifier stage ran with; "
            "the notes name every value the recipe changed from the reference:", "",
            *_md_table(["stage", "batch", "epochs", "steps", "recipe notes"], rows)]


def _precision_used(root: Path, stages: list[dict[str, Any]], pipe: Any) -> str:
    """The precision the stages recorded in their results.json (``--precision auto`` may probe and
    choose per machine), else what the pipeline's setting resolves to here."""
    used = sorted({f"{r['precision']} on {r.get('device', '?')}" for r in
                   (_read_json(root / s["dir"] / "results.json") for s in stages if s.get("dir"))
                   if isinstance(r.get("precision"), str)})
    return ", ".join(used) if used else _resolved_precision(pipe)


def _resolved_precision(pipe: Any) -> str:
    try:
        from simclrv2.training.runtime import resolve_device, resolve_precision
        device = resolve_device(pipe.device)
        return f"{resolve_precision(pipe.precision, device)} on {device.type}"
    except Exception:  # noqa: BLE001 - the report still states the requested setting
        return f"{pipe.precision} (requested) on {pipe.device}"


# ---------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_accuracy_vs_fraction(table: dict[str, Any], out: Path, *, titles: dict[str, str] | None = None,
                              chance: float | None = None) -> Path | None:
    """Top-1 against label fraction: percent ticks at the fractions run, one marker per method and a small
    horizontal offset so that equal curves stay visible, error bars = std over seeds, y from chance to 100."""
    numeric = [k for k in _keys(table) if _key_order(k)[0] == 0]
    if not numeric:
        return None
    plt = _plt()
    from matplotlib.ticker import FixedLocator, NullLocator
    fig, ax = plt.subplots(figsize=(7, 5.2))
    methods = ordered_methods(table)
    for i, method in enumerate(methods):
        keys = [k for k in numeric if k in table[method]]
        if not keys:
            continue
        shift = 1.0 + 0.035 * (i - (len(methods) - 1) / 2)
        xs = [float(k) * 100 * shift for k in keys]
        ys = [table[method][k]["top1"] * 100 for k in keys]
        errs = [table[method][k].get("top1_std", 0.0) * 100 for k in keys]
        ax.errorbar(xs, ys, yerr=errs, marker=MARKERS[i % len(MARKERS)], markersize=7, capsize=3,
                    linestyle="-" if len(keys) > 1 else "none", label=(titles or {}).get(method, method))
    ax.set_xscale("log")
    ticks = [float(k) * 100 for k in numeric]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{t:g}%" for t in ticks])
    ax.set_xlim(min(ticks) / 1.5, max(ticks) * 1.5)
    low = 0.0
    if chance:
        low = max(0.0, math.floor(chance * 100 / 10) * 10)
        ax.axhline(chance * 100, color="grey", linestyle=":", linewidth=1, label=f"chance ({chance * 100:.0f}%)")
    ax.set_ylim(low, 100)
    ax.set_xlabel("labelled fraction of the training set")
    ax.set_ylabel("top-1 accuracy on the test split (%)")
    ax.set_title("Label efficiency (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _curve_panels(root: Path, stages: list[dict[str, Any]], seed: int) -> list[tuple[str, Path]]:
    """Stage directories of one seed, in running order (pretraining first), that logged something."""
    order = {"pretrain": 0, "finetune": 1, "distill": 2, "supervised": 3, "linear_eval": 4}
    chosen = [s for s in stages if s.get("seed") == seed]
    chosen.sort(key=lambda s: (0 if s["kind"] == "pretrain" else 1, _key_order(s.get("label_key") or "0"),
                               order.get(s["kind"], 9), s["dir"]))
    return [(s["name"], root / s["dir"]) for s in chosen if read_metrics(root / s["dir"])]


def plot_training_curves(root: Path, stages: list[dict[str, Any]], seed: int, out: Path) -> Path | None:
    """One panel per stage of seed ``seed``, in running order: training loss against step (left axis)
    and evaluation top-1 (right axis: the kNN monitor for pretraining, periodic and final test top-1
    for the classifier stages). Every logged point is drawn with a marker."""
    panels = _curve_panels(root, stages, seed)
    if not panels:
        return None
    plt = _plt()
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, stage_dir) in zip(axes.flat, panels):
        records = read_metrics(stage_dir)
        key = "train/contrast_loss" if any("train/contrast_loss" in r for r in records) else "train/loss"
        loss = [(r["step"], r[key]) for r in records if key in r]
        if loss:
            ax.plot(*zip(*loss), color="tab:blue", marker=".", markersize=4, label="training loss")
        ax.set_ylabel("loss", color="tab:blue")
        ax.set_xlabel("optimiser step")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        acc_key = "monitor/knn_top1" if any("monitor/knn_top1" in r for r in records) else "eval/top1"
        acc = [(r["step"], r[acc_key] * 100) for r in records if isinstance(r.get(acc_key), (int, float))]
        if acc:
            ax2 = ax.twinx()
            label = "kNN top-1 (%)" if acc_key.startswith("monitor") else "test top-1 (%)"
            ax2.plot(*zip(*acc), color="tab:orange", marker="o", markersize=4, label=label)
            ax2.set_ylabel(label, color="tab:orange")
            ax2.set_ylim(0, 100)
    for ax in list(axes.flat)[len(panels):]:
        fig.delaxes(ax)
    fig.suptitle(f"Training curves (seed {seed}): loss (blue) and evaluation accuracy (orange)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_knn_monitor(root: Path, stages: list[dict[str, Any]], out: Path) -> Path | None:
    """kNN top-1 of the pretraining encoder on the test split at each epoch end."""
    pre = [s for s in stages if s["kind"] == "pretrain"]
    series = []
    for stage in pre:
        points = [(r["step"], r["monitor/knn_top1"] * 100) for r in read_metrics(root / stage["dir"])
                  if isinstance(r.get("monitor/knn_top1"), (int, float))]
        if points:
            series.append((stage["name"], points))
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for i, (name, points) in enumerate(series):
        ax.plot(*zip(*points), marker=MARKERS[i % len(MARKERS)], label=name)
    ax.set_ylim(0, 100)
    ax.set_xlabel("pretraining step")
    ax.set_ylabel("kNN top-1 (%)")
    ax.set_title("kNN monitor during pretraining (no labels used for training)")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_confusion(results: dict[str, Any], title: str, out: Path) -> Path | None:
    confusion, classes = results.get("confusion"), results.get("classes")
    if not confusion or not classes:
        return None
    plt = _plt()
    import numpy as np
    matrix = np.asarray(confusion, dtype=float)
    share = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    n = len(classes)
    fig, (ax, bar) = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [1.1, 1]})
    image = ax.imshow(share * 100, cmap="Blues", vmin=0, vmax=100)
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    short = [str(c)[:12] for c in classes]
    ax.set_xticklabels(short, rotation=60, ha="right", fontsize=7 if n > 12 else 8)
    ax.set_yticklabels(short, fontsize=7 if n > 12 else 8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center", fontsize=6.5,
                            color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, label="% of the true class")
    per_class = results.get("per_class_top1") or {}
    values = [per_class.get(c, float("nan")) * 100 for c in classes]
    bar.barh(range(n), values, color="tab:blue")
    bar.set_yticks(range(n))
    bar.set_yticklabels(short, fontsize=7 if n > 12 else 8)
    bar.invert_yaxis()
    bar.set_xlim(0, 100)
    bar.set_xlabel("per-class top-1 (%)")
    bar.grid(alpha=0.3, axis="x")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------- report
def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def _dataset_facts(root: Path, stages: list[dict[str, Any]]) -> dict[str, Any]:
    facts: dict[str, Any] = {"labeled": {}}
    for stage in stages:
        results = _read_json(root / stage["dir"] / "results.json")
        if stage["kind"] == "pretrain":
            facts.setdefault("train_images", results.get("train_images"))
        if results.get("num_images") and "test_images" not in facts:
            facts["test_images"] = results["num_images"]
        if results.get("classes") and "classes" not in facts:
            facts["classes"] = results["classes"]
        if stage["kind"] == "finetune" and stage.get("label_key") not in facts["labeled"]:
            facts["labeled"][stage["label_key"]] = results.get("num_labeled")
    return facts


def build_report(root: Path, table: dict[str, Any], *, stages: list[dict[str, Any]],
                 comparisons: list[Comparison], pipe: Any, wall_seconds: float | None = None) -> list[str]:
    """The markdown lines of the report (also written as report.html); plots are written next to it."""
    names = {"list": Path(pipe.labeled_list).name} if getattr(pipe, "labeled_list", None) else {}
    titles = method_titles(root, stages)
    facts = _dataset_facts(root, stages)
    classes = facts.get("classes") or []
    chance = 1.0 / len(classes) if classes else None
    keys = _keys(table)
    seeds = sorted({s.get("seed") for s in stages if s.get("method")})
    lines = [f"# SimCLRv2 report: {pipe.arch} on {pipe.data or 'the given images'}", ""]

    data_bits = []
    if facts.get("train_images"):
        data_bits.append(f"{facts['train_images']:,} training images (all used, without labels, for pretraining "
                         "and distillation)")
    if facts["labeled"]:
        data_bits.append("labelled subsets: " + ", ".join(
            f"{label_text(k, names)} = {v} labelled images" for k, v in sorted(
                facts["labeled"].items(), key=lambda kv: _key_order(kv[0])) if v is not None))
    if facts.get("test_images"):
        data_bits.append(f"{facts['test_images']:,} test images")
    if classes:
        data_bits.append(f"{len(classes)} classes, so chance is {100 / len(classes):.1f}% top-1")
    lines += ["**Data.** " + "; ".join(data_bits) + ".", ""]
    lines += [f"**Seeds.** {len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))}) "
              "for every stage after pretraining"
              + (" and for pretraining" if getattr(pipe, "pretrain_each_seed", False) else
                 "; pretraining ran once (seed {})".format(pipe.seed))
              + ". A seed sets the labelled subset, the initialisation, the batch order and the augmentations.",
              ""]

    lines += ["## Results", "",
              "Top-1 and top-5 accuracy (%) on the test split"
              + (", mean ± standard deviation over the seeds" if len(seeds) > 1 else "")
              + " (cf. the paper's Tables 2-3).", ""]
    header = ["method"] + [f"{label_text(k, names)} {m}" for k in keys for m in ("top-1", "top-5")]
    rows = [[titles.get(m, m)] + [_cell(table[m].get(k), metric) for k in keys for metric in ("top1", "top5")]
            for m in ordered_methods(table)]
    lines += _md_table(header, rows)
    if len(seeds) > 1:
        header = ["method", "label set"] + [f"seed {s}" for s in seeds]
        rows = []
        for m in ordered_methods(table):
            for k in keys:
                cell = table[m].get(k)
                if cell:
                    rows.append([m, label_text(k, names)] + [
                        f"{cell['seeds'][str(s)]['top1'] * 100:.1f}" if str(s) in cell["seeds"] else "-"
                        for s in seeds])
        lines += ["Top-1 (%) of every seed:", ""] + _md_table(header, rows)

    lines += ["## What this run shows", "",
              "Each gain is paired by seed; \"more than the spread\" means |mean gain| > its standard deviation "
              "over seeds.", ""]
    claims = [c for c in comparisons if not (c.a == "finetune" and c.b == "linear_eval")]
    checks = [c for c in comparisons if c.a == "finetune" and c.b == "linear_eval"]
    lines += [f"- {c.sentence(names)}" for c in claims] or ["- (no pair of methods to compare)"]
    lines += [f"- Check: {c.sentence(names)}" for c in checks]
    lines.append("")
    regressions = [c for c in comparisons if c.regression]
    lines += ["## Stages that made things worse", ""]
    if regressions:
        lines += [f"- **{c.regression_text(root, stages, names)}**" for c in regressions]
    else:
        lines.append("None: no stage fell below the stage it should improve (fine-tuning vs linear evaluation "
                     "and the supervised baseline, distillation vs its teacher) by more than the spread"
                     + (f" (one seed: by more than {ONE_SEED_REGRESSION_POINTS:g} point)" if len(seeds) == 1
                        else "") + ".")
    lines.append("")
    lines += recipe_lines(root, stages)

    lines += ["## Plots", ""]
    if plot_accuracy_vs_fraction(table, root / "accuracy_vs_label_fraction.png", titles=titles, chance=chance):
        lines += ["![top-1 accuracy against label fraction](accuracy_vs_label_fraction.png)", ""]
    if plot_knn_monitor(root, stages, root / "knn_monitor.png"):
        lines += ["![kNN monitor during pretraining](knn_monitor.png)", ""]
    if seeds and plot_training_curves(root, stages, seeds[0], root / "training_curves.png"):
        lines += ["![training curves of every stage](training_curves.png)", ""]

    best = _best_model(table, stages, keys)
    if best:
        method, key, stage = best
        results = _read_json(root / stage["dir"] / "results.json")
        title = f"{titles.get(method, method)}, {label_text(key, names)}, seed {stage['seed']}: " \
                f"top-1 {results.get('top1', float('nan')) * 100:.1f}%"
        if plot_confusion(results, title, root / "confusion_matrix.png"):
            lines += [f"## Best model: {titles.get(method, method)} at {label_text(key, names)}", "",
                      f"Seed {stage['seed']} (`{stage['dir']}/`). Confusion matrix (rows: true class, counts; "
                      "colour: share of the true class) and per-class top-1:", "",
                      "![confusion matrix and per-class accuracy](confusion_matrix.png)", ""]
            per_class = results.get("per_class_top1") or {}
            lines += _md_table(["class", "top-1 (%)", "test images"], [
                [str(c), f"{per_class.get(c, float('nan')) * 100:.1f}", str(sum(row))]
                for c, row in zip(results.get("classes") or [], results.get("confusion") or [])])

    lines += ["## Time and hardware", ""]
    timed = [(s["name"], s["seconds"]) for s in stages if isinstance(s.get("seconds"), (int, float))]
    if timed:
        lines += _md_table(["stage", "seconds"], [[n, f"{t:.1f}"] for n, t in timed])
        total = sum(t for _, t in timed)
        lines.append(f"Total of the stages: {total:.0f} s ({total / 60:.1f} min)"
                     + (f"; wall clock of the invocation that wrote this report: {wall_seconds:.0f} s (stages "
                        "kept from an earlier invocation take no time in it)" if wall_seconds is not None else "")
                     + ".")
        lines.append("")
    hw = hardware()
    lines += [f"Hardware: {hw['cpu']}, {hw['logical_cpus']} logical CPUs, {hw['torch_threads']} torch threads"
              + (f", GPU {hw['gpu']}" if hw.get("gpu") else "") + f"; precision {_precision_used(root, stages, pipe)}; "
              f"torch {hw['torch']}.", ""]
    lines += ["Each stage's settings (`config.yaml`; the pipeline compares them through `pipeline_stages.json`), logs (`logs/metrics.jsonl`, "
              "TensorBoard) and `results.json` are in its sub-directory; `results.json` here holds every seed's "
              "figures, their mean and standard deviation.", ""]
    return lines


def _best_model(table: dict[str, Any], stages: list[dict[str, Any]], keys: list[str]
                ) -> tuple[str, str, dict[str, Any]] | None:
    best = None
    for key in reversed(keys):   # the largest labelled set first
        for method in ordered_methods(table):
            cell = table[method].get(key)
            if cell and (best is None or cell["top1"] > best[0]):
                best = (cell["top1"], method, key)
        if best:
            break
    if not best:
        return None
    stage = _first_stage(stages, best[1], best[2])
    return (best[1], best[2], stage) if stage else None


def markdown_to_html(text: str, root: Path, title: str) -> str:
    """The report's markdown as one self-contained HTML page, its PNGs embedded as base64."""
    import markdown
    body = markdown.markdown(text, extensions=["tables"])

    def embed(match: re.Match) -> str:
        path = root / match.group(1)
        if not path.is_file():
            return match.group(0)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'src="data:image/png;base64,{data}"'
    body = re.sub(r'src="([^":]+\.png)"', embed, body)
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
             "line-height:1.45;color:#222}table{border-collapse:collapse;margin:1em 0;font-size:0.92em}"
             "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th:first-child,td:first-child"
             "{text-align:left}th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}")
    from html import escape
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
            f"<style>{style}</style></head><body>\n{body}\n</body></html>\n")


def write_report(root: str | Path, table: dict[str, Any], *, stages: list[dict[str, Any]],
                 comparisons: list[Comparison], pipe: Any, wall_seconds: float | None = None) -> Path:
    """Write ``report.md``, ``report.html`` and the plots into ``root``; returns the markdown path."""
    from simclrv2.utils.checkpoint import atomic_write_text
    root = Path(root)
    lines = build_report(root, table, stages=stages, comparisons=comparisons, pipe=pipe,
                         wall_seconds=wall_seconds)
    text = "\n".join(lines)
    path = root / "report.md"
    atomic_write_text(path, text)
    atomic_write_text(root / "report.html", markdown_to_html(text, root, lines[0].lstrip("# ")))
    return path
