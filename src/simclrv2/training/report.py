"""The pipeline report: ``report.md`` with the accuracy table (laid out like the paper's Tables 2-3)
and PNG plots: training curves of every stage and top-1 against label fraction per method."""

from __future__ import annotations

from pathlib import Path

from simclrv2.training.rundir import read_metrics

METHOD_NAMES = {
    "supervised": "Supervised baseline (same labels, from scratch)",
    "linear_eval": "SimCLRv2 linear evaluation (frozen encoder)",
    "finetune": "SimCLRv2 fine-tuned (from head layer 1)",
    "distill": "SimCLRv2 self-distilled (unlabelled data)",
}


def _method_title(method: str) -> str:
    if method.startswith("distill_"):
        return f"SimCLRv2 distilled into {method[len('distill_'):]}"
    return METHOD_NAMES.get(method, method)


def plot_training_curves(root: Path, out: Path) -> Path | None:
    """One panel per stage directory: its training loss against step (the contrastive loss for
    pretraining, with the kNN monitor on a second axis)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = sorted(p for p in root.iterdir() if p.is_dir() and (p / "logs" / "metrics.jsonl").is_file())
    curves = []
    for stage_dir in stages:
        records = [r for r in read_metrics(stage_dir) if "train/loss" in r]
        key = "train/contrast_loss" if records and "train/contrast_loss" in records[0] else "train/loss"
        if records:
            curves.append((stage_dir.name, [r["step"] for r in records], [r[key] for r in records],
                           [(r["step"], r["monitor/knn_top1"]) for r in read_metrics(stage_dir)
                            if "monitor/knn_top1" in r]))
    if not curves:
        return None
    cols = min(3, len(curves))
    rows = (len(curves) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, steps, losses, knn) in zip(axes.flat, curves):
        ax.plot(steps, losses, color="tab:blue", label="train loss")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if knn:
            ax2 = ax.twinx()
            ax2.plot([s for s, _ in knn], [v * 100 for _, v in knn], color="tab:orange", marker="o",
                     label="kNN top-1 %")
            ax2.set_ylabel("kNN top-1 (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_accuracy_vs_fraction(table: dict[str, dict[str, dict[str, float]]], out: Path) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not table:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, rows in table.items():
        fractions = sorted(rows, key=float)
        ax.plot([float(f) * 100 for f in fractions], [rows[f]["top1"] * 100 for f in fractions], marker="o",
                label=_method_title(method))
    ax.set_xscale("log")
    ax.set_xlabel("labelled fraction of the training set (%)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Label efficiency")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(root: str | Path, table: dict[str, dict[str, dict[str, float]]], *,
                 timings: dict[str, float] | None = None, arch: str = "", data: str = "") -> Path:
    root = Path(root)
    fractions = sorted({f for rows in table.values() for f in rows}, key=float)
    lines = [f"# SimCLRv2 report: {arch} on {data}", "",
             "Top-1 / top-5 accuracy (%) on the test split, by fraction of labelled training images "
             "(cf. the paper's Tables 2-3).", ""]
    head = "| method | " + " | ".join(f"{float(f) * 100:g}% top-1 | {float(f) * 100:g}% top-5" for f in fractions)
    lines += [head + " |", "|---|" + "---|---|" * len(fractions)]
    for method, rows in table.items():
        cells = []
        for f in fractions:
            cell = rows.get(f)
            cells += [f"{cell['top1'] * 100:.1f}", f"{cell['top5'] * 100:.1f}"] if cell else ["-", "-"]
        lines.append(f"| {_method_title(method)} | " + " | ".join(cells) + " |")
    lines.append("")
    if "finetune" in table and "supervised" in table:
        lines.append("Gains over the supervised baseline (top-1 points):")
        lines.append("")
        for f in fractions:
            base = table["supervised"].get(f)
            if not base:
                continue
            gains = [f"{m} {(rows[f]['top1'] - base['top1']) * 100:+.1f}" for m, rows in table.items()
                     if m != "supervised" and f in rows]
            lines.append(f"- {float(f) * 100:g}% labels: " + ", ".join(gains))
        lines.append("")
    curves = plot_training_curves(root, root / "training_curves.png")
    frac_plot = plot_accuracy_vs_fraction(table, root / "accuracy_vs_label_fraction.png")
    if frac_plot:
        lines += ["![top-1 against label fraction](accuracy_vs_label_fraction.png)", ""]
    if curves:
        lines += ["![training curves](training_curves.png)", ""]
    if timings:
        lines += ["Stage wall-clock times (s): " + ", ".join(f"{k} {v:g}" for k, v in timings.items()), ""]
    lines += ["Each stage's configuration, logs (`logs/metrics.jsonl`, TensorBoard) and `results.json` are in "
              "its sub-directory.", ""]
    path = root / "report.md"
    path.write_text("\n".join(lines))
    return path

