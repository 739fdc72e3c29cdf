"""Generate the README's result tables from the committed result files, so that every figure in them
comes from a file in ``benchmarks/results/`` (tests/test_readme_tables.py checks that they match).

Each generated table sits between ``<!-- readme_tables: NAME -->`` and ``<!-- /readme_tables -->`` in
README.md. Tables:

- ``cifar10``: ``benchmarks/results/cifar10_label_efficiency.json`` (the CIFAR-10 benchmark).
- ``demo``: ``benchmarks/results/demo/results.json`` (a ``simclrv2 demo`` run), when it is committed.
- ``throughput``: every ``benchmarks/results/throughput-*.json`` (``benchmarks/throughput.py``), one row
  group per host kind, headed by the host it ran on (CPU, ISA, oneDNN kernels, threads, torch, precision,
  settings, command and date when recorded, load average and whether the machine was busy).
- ``stages``: every ``benchmarks/results/stages-*.json`` (``throughput.py --stages-only``).
- ``end_to_end``: every ``benchmarks/results/end_to_end*.json`` (``benchmarks/end_to_end.py``).

Every figure of the README's performance section is in one of these tables; the prose around them
states no number of its own.

    python benchmarks/readme_tables.py           # rewrite the tables in README.md
    python benchmarks/readme_tables.py --check   # exit 1 if README.md differs from the result files
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
README = REPO / "README.md"

ROW_NAMES = {"finetune": "SimCLRv2 fine-tuned (teacher)", "distill": "SimCLRv2 self-distilled",
             "supervised": "supervised baseline", "linear_eval": "linear evaluation"}
SECTION = re.compile(r"(<!-- readme_tables: (\w+) -->\n)(.*?)(<!-- /readme_tables -->)", re.S)


def _cell(cell: dict) -> str:
    text = f"{cell['top1'] * 100:.1f}"
    if cell.get("num_seeds", 1) > 1:
        text += f" ± {cell['top1_std'] * 100:.1f}"
    return text + f" ({cell['top5'] * 100:.1f})"


def accuracy_table(table: dict) -> str:
    """A results table ``{method: {fraction: {top1, top5[, top1_std, num_seeds]}}}`` as markdown."""
    keys = sorted({k for rows in table.values() for k in rows}, key=float)
    seeds = max((c.get("num_seeds", 1) for rows in table.values() for c in rows.values()), default=1)
    spread = " mean ± std" if seeds > 1 else ""
    lines = ["| method | " + " | ".join(f"{float(k) * 100:g}% labels top-1{spread} (top-5)" for k in keys) + " |",
             "|---|" + "---|" * len(keys)]
    for method in [m for m in ROW_NAMES if m in table] + [m for m in table if m not in ROW_NAMES]:
        name = ROW_NAMES.get(method, method.replace("distill_", "distilled into "))
        lines.append(f"| {name} | " + " | ".join(_cell(table[method][k]) if k in table[method] else "-"
                                                 for k in keys) + " |")
    lines.append("")
    lines.append(f"{'One seed' if seeds == 1 else f'{seeds} seeds'}; top-1 (top-5) accuracy in % on the test split.")
    return "\n".join(lines) + "\n"


# ---- performance tables ---------------------------------------------------------------------------

def _pct(x: float) -> str:
    return f"{x * 100:.0f}%"


#: how a target's bound is written: as a ratio (``1.5x``), a share (``70%``) or a change (``+10%``)
TARGET_UNITS = {"pretrain_speedup_vs_lightly": "x", "pretrain_speedup_vs_lightly_best": "x",
                "roofline_fraction": "%", "augment_speedup_224": "x", "peak_memory_ratio_vs_lightly": "",
                "memory_queue_overhead": "+%"}


def _target(key: str, spec: str | None, value: float | None) -> str:
    """``">= 1.5"`` and a value -> ``"≥ 1.5x: met"``; the verdict is recomputed from the value shown."""
    if not spec:
        return ""
    op, bound = spec.split()
    unit = TARGET_UNITS.get(key, "")
    shown = {"x": f"{float(bound):g}x", "%": _pct(float(bound)), "+%": f"+{_pct(float(bound))}"}.get(unit, bound)
    sign = {">=": "≥", "<=": "≤"}[op]
    if value is None:
        return f"{sign} {shown}: not measured"
    met = value >= float(bound) if op == ">=" else value <= float(bound)
    return f"{sign} {shown}: {'met' if met else '**not met**'}"


def _load_text(payload: dict, cpu_count: int | None) -> str:
    """The load average the result file recorded, and its own busy/quiet verdict when it has one."""
    env = payload.get("environment", {})
    before = env.get("load_average_before", payload.get("load_average_before"))
    after = env.get("load_average_after", payload.get("load_average_after"))
    if before is None and after is None and env.get("load_average"):
        return (f"load average {env['load_average'][0]:.2f} at the end of the run on {cpu_count} CPUs "
                "(not recorded before it)")
    verdict = env.get("machine_busy", payload.get("machine_busy"))
    note = payload.get("machine_note") or env.get("note", "")
    # ``machine_busy`` (from the load before the run) decides where recorded: the load after a run
    # counts the run's own processes, which older notes took for other users.
    busy = verdict if verdict is not None else note.startswith("BUSY")
    text = (f"load average {before[0]:.2f} before, {after[0]:.2f} after on {cpu_count} CPUs"
            if before and after else "load average not recorded")
    used = env.get("other_cpu_use_before", payload.get("other_cpu_use_before"))
    if used is not None:
        text = f"other processes used {100 * used:.0f}% of the CPUs just before the run; {text}"
    if busy:
        return f"**BUSY machine** ({text}: other processes shared the CPUs; absolute rates are low)"
    return f"quiet machine ({text})"


def _host_text(host: dict | None, env: dict, threads: int | None = None) -> str:
    """The host a result came from: CPU, ISA flags, oneDNN ISA and kernels, threads."""
    if not host:
        return (f"{env.get('cpu')}, {threads} threads on {env.get('cpu_count')} CPUs, flags "
                f"{', '.join(env.get('cpu_flags', []))}; CPU family, oneDNN ISA and kernels not recorded "
                "(earlier benchmark version)")
    dnn = host.get("onednn") or {}
    kernels = "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted((dnn.get("kernels") or {}).items()))
    return (f"{host.get('cpu')} ({host.get('vendor')}, family {host.get('cpu_family')} model "
            f"{host.get('cpu_model_number')}), {host.get('threads')} threads on {host.get('cpu_count')} CPUs, "
            f"flags {', '.join(host.get('cpu_flags') or []) or 'none of AVX2/AVX-512'}; "
            f"{dnn.get('version') or 'oneDNN'} ISA {dnn.get('isa')}, kernels {kernels or 'not recorded'}, "
            f"AMX {'in use' if dnn.get('amx_in_use') else 'not in use'}")


def _run_text(payload: dict, settings: str) -> str:
    run = payload.get("run") or {}
    if run.get("command"):
        return f"`{run['command']}` on {run.get('date_utc', 'an unrecorded date')}"
    return f"{settings}; command and date not recorded"


def _best_kernel(payload: dict) -> tuple[float, str]:
    """(GFLOP/s, name) of the fastest kernel probe the run timed (older files: matmul peaks + conv probe)."""
    roofline = payload["roofline"]
    if "best_kernel_gflops" in roofline:
        return roofline["best_kernel_gflops"], roofline["best_kernel"]
    rates = {f"mm_{tag}_{v['at']}": v["peak_gflops"] for tag, v in payload.get("matmul_peaks", {}).items()}
    if payload.get("conv_probe_bf16"):
        rates["bf16 3x3 conv probe"] = payload["conv_probe_bf16"]["best_gflops"]
    name = max(rates, key=rates.get)
    return rates[name], name


def throughput_section(path: Path) -> str:
    """The row group of one ``throughput-<host kind>.json``."""
    r = json.loads(path.read_text())
    env, c, p = r["environment"], r["config"], r["pretrain"]
    host = env.get("host")
    targets = {k: v["target"] for k, v in r.get("targets", {}).items()}
    alt = r.get("alternative_estimates", {})
    settings = (f"{'--quick, ' if c.get('quick') else 'full run, '}batch {c['batch_size']}, "
                f"{c['warmup']} warm-up + {c['steps']} timed rounds")
    lines = [f"**`{env.get('host_kind') or path.stem.removeprefix('throughput-').removesuffix('-quick')}`** "
             f"(`{path.name}`): {_host_text(host, env, c.get('threads'))}; torch {env.get('torch')}; our step in "
             f"{c['precision']}{', channels_last' if c.get('channels_last') else ''}"
             f"{', malloc: ' + c['allocator'] if c.get('allocator') else ''}; {_run_text(r, settings)}; "
             f"{_load_text(r, env.get('cpu_count'))}.", "",
             "| figure | value | target |", "|---|---|---|"]

    def row(label: str, text: str, key: str | None = None, value: float | None = None) -> None:
        lines.append(f"| {label} | {text} | {_target(key, targets.get(key), value) if key else ''} |")

    ours = p["ours"]
    row(f"our pretraining step ({c['arch']}, {c['image_size']} px)",
        f"{ours['images_per_s']:.1f} img/s, {ours['achieved_gflops']:.1f} GFLOP/s")
    compiled = p.get("ours_compiled")
    if compiled:
        first = compiled.get("first_warmup_round_s")
        row("our step under `torch.compile` (`--compile`)",
            f"{compiled['images_per_s']:.1f} img/s: {compiled['speedup_vs_eager']:.2f}x eager (paired median "
            f"{compiled['speedup_vs_eager_paired_median']:.2f}x)"
            + (f"; first round, compiling, {first:.0f} s" if first else ""))
    native_conv = p.get("ours_native_conv")
    if native_conv:
        row("our step with oneDNN for every convolution pass (`SIMCLRV2_CONV_MATMUL=native`)",
            f"{native_conv['images_per_s']:.1f} img/s: the matrix-product passes make our step "
            f"{native_conv['ours_speedup_from_matmul_conv']:.2f}x faster (paired median "
            f"{native_conv['ours_speedup_from_matmul_conv_paired_median']:.2f}x)")
    native_wgrad = p.get("ours_native_weight_grad")  # result files written before the rename
    if native_wgrad:
        row("our step with oneDNN's weight gradients (a run from before the forward and input gradient "
            "became products too)",
            f"{native_wgrad['images_per_s']:.1f} img/s: the shifted weight gradient makes our step "
            f"{native_wgrad['ours_speedup_from_shifted_weight_grad']:.2f}x faster (paired median "
            f"{native_wgrad['ours_speedup_from_shifted_weight_grad_paired_median']:.2f}x)")
    for name, why in (r.get("left_out") or {}).items():  # variants the run could not fit or had no use for
        row(f"`{name}`", f"not timed: {why}")
    ours_malloc = c.get("allocator") or "glibc, freed blocks kept"
    for key, variant, label in (
            ("ours_glibc_kept_malloc", "ours_glibc_kept",
             "our step with glibc keeping freed blocks, no tcmalloc (`SIMCLRV2_ALLOCATOR=glibc`)"),
            ("ours_glibc_malloc", "ours_glibc", "our step with glibc's default malloc (`SIMCLRV2_MALLOC_TUNING=0`)")):
        glibc = p.get(key)
        if glibc:
            grown = (r.get("memory") or {}).get(variant, {}).get("growth_mb")
            row(label, f"{glibc['images_per_s']:.1f} img/s"
                + (f", peak memory growth {grown:.0f} MB" if grown is not None else "")
                + f": our malloc setting ({ours_malloc}) makes our step "
                f"{glibc['ours_speedup_from_malloc_setting']:.2f}x faster (paired median "
                f"{glibc['ours_speedup_from_malloc_setting_paired_median']:.2f}x)")
    if p.get("lightly"):
        row("lightly as its examples run (fp32, NCHW)", f"{p['lightly']['images_per_s']:.1f} img/s")
    best_peer = p.get("lightly_best")
    if best_peer:
        row(f"lightly at its best: {best_peer.get('config', c.get('peer_best'))}",
            f"{best_peer['images_per_s']:.1f} img/s")
    value = r.get("pretrain_speedup_vs_lightly")
    if value is not None:
        paired = alt.get("pretrain_speedup_paired_median")
        row("speed-up vs lightly fp32", f"{value:.2f}x" + (f" (paired median {paired:.2f}x)" if paired else ""),
            "pretrain_speedup_vs_lightly", value)
    value = r.get("pretrain_speedup_vs_lightly_best")
    paired = alt.get("pretrain_speedup_best_paired_median")
    row("speed-up vs lightly at its best",
        f"{value:.2f}x" + (f" (paired median {paired:.2f}x)" if paired else "") if value is not None
        else "not measured (earlier benchmark version)", "pretrain_speedup_vs_lightly_best", value)
    best_rate, best_name = _best_kernel(r)
    achieved = r["roofline"]["achieved_gflops"]
    text = f"{_pct(achieved / best_rate)} ({achieved:.1f} of {best_rate:.1f} GFLOP/s, {best_name})"
    if "best_kernel_gflops" not in r["roofline"]:
        text += (f"; the file's own `roofline_fraction`, {r['roofline_fraction'] * 100:.1f}%, divided by the "
                 f"square-matmul peak ({r['roofline']['bf16_peak_gflops']:.1f} GFLOP/s), not the best kernel")
    executed = r["roofline"].get("executed_gflop_per_step")
    if executed and executed < r["pretrain"]["ours"]["gflop_per_step"]:
        text += (f"; model FLOPs (every convolution counted as oneDNN's). Executed: {executed:.0f} of "
                 f"{r['pretrain']['ours']['gflop_per_step']:.0f} GFLOP per step (Winograd), "
                 f"{_pct(r['roofline']['executed_fraction_of_best_kernel'])} of the best kernel")
    row("of the best kernel measured in the same run", text, "roofline_fraction", achieved / best_rate)
    theo = r["roofline"].get("theoretical")
    if theo and r.get("theoretical_peak_fraction") is not None:
        per = theo["bf16_flop_per_cycle"] if c["precision"] == "bf16" else theo["fp32_flop_per_cycle"]
        peak = theo["bf16_peak_gflops"] if c["precision"] == "bf16" else theo["fp32_peak_gflops"]
        caveat = ""
        if peak and best_rate > peak:   # a measured kernel beat the "peak": the nominal clock is too low
            caveat = (f"; not a bound: the best kernel ran {best_rate / peak:.2f}x faster than this peak, so the "
                      "clock the CPU reports is below the one it ran at")
        row("of the theoretical peak", f"{_pct(r['theoretical_peak_fraction'])} of {peak:.1f} GFLOP/s "
            f"({theo['cores_used']} cores × {theo['clock_ghz']:.2f} GHz × {per} {c['precision']} FLOP/cycle)"
            + caveat)
    else:
        row("of the theoretical peak", "not recorded")
    emulated = (r.get("kernel_probes") or {}).get("bf16_emulated_probe")
    if emulated:
        fp32 = r["kernel_probes"]["best_per_precision"]["fp32"]["gflops"]
        row("bf16 on this CPU (not native)", f"{emulated['gflops']:.1f} GFLOP/s ({emulated['shape']}) against "
            f"{fp32:.1f} GFLOP/s for the best fp32 kernel: `--precision auto` uses fp32")
    probe = r.get("precision_probe")
    if probe:
        rates = ", ".join(f"{k} {v:.1f} img/s" for k, v in (probe.get("images_per_s") or {}).items())
        row("`--precision auto` probe", f"{probe['precision']} ({probe['reason']}{'; ' + rates if rates else ''})")
    memory = r.get("memory", {})
    value = r.get("peak_memory_ratio_vs_lightly")
    if value is not None:
        row("peak memory growth / lightly fp32's", f"{value:.2f} ({memory['ours']['growth_mb']:.0f} vs "
            f"{memory['lightly']['growth_mb']:.0f} MB)", "peak_memory_ratio_vs_lightly", value)
    value = r.get("peak_memory_ratio_vs_lightly_best")
    if value is not None and "lightly_best" in memory:
        row("peak memory growth / lightly at its best's", f"{value:.2f} ({memory['ours']['growth_mb']:.0f} vs "
            f"{memory['lightly_best']['growth_mb']:.0f} MB)")
    value = r["memory_queue_overhead"]
    row("momentum memory + EMA (queue 4096) overhead", f"{value * 100:+.1f}% of a step "
        f"({p['ours_memory']['images_per_s']:.1f} img/s)", "memory_queue_overhead", value)
    value = r["augment_speedup_224"]
    row("our augmentation vs torchvision, 1 thread", f"{r['augment_speedup_32']:.1f}x at 32 px, {value:.1f}x "
        "at 224 px", "augment_speedup_224", value)
    verdicts = [_target(key, spec, row_value)
                for key, spec, row_value in ((k, targets.get(k), v) for k, v in (
                    ("pretrain_speedup_vs_lightly", r.get("pretrain_speedup_vs_lightly")),
                    ("pretrain_speedup_vs_lightly_best", r.get("pretrain_speedup_vs_lightly_best")),
                    ("roofline_fraction", achieved / best_rate),
                    ("peak_memory_ratio_vs_lightly", r.get("peak_memory_ratio_vs_lightly")),
                    ("memory_queue_overhead", r["memory_queue_overhead"]),
                    ("augment_speedup_224", r["augment_speedup_224"]))) if spec]
    met = sum(v.endswith(": met") for v in verdicts)
    measured = sum(not v.endswith("not measured") for v in verdicts)
    lines += ["", f"Targets met on this host: {met} of the {measured} measured"
              + (f" ({len(verdicts) - measured} not measured)." if measured < len(verdicts) else ".")]
    return "\n".join(lines) + "\n"


def stages_section(path: Path) -> str:
    """Other stages vs a plain fp32 loop, from one ``stages-<host kind>.json``."""
    r = json.loads(path.read_text())
    st, host = r["stages"], r.get("host")
    settings = (f"batch {st['batch']}, {st['image_size']} px, "
                f"{st['arch']}, fastest of {st['rounds']} interleaved rounds")
    lines = [f"**`{host.get('host_kind')}`** (`{path.name}`): {_host_text(host, {})}; torch {r.get('torch')}; "
             f"ours in {st['precision']}, the plain loop {st['plain']}; {_run_text(r, settings)}; "
             f"{_load_text(r, host.get('cpu_count'))}.", "",
             "| stage | ours img/s | plain PyTorch fp32 img/s | ours / plain (paired median) |", "|---|---|---|---|"]
    names = {"finetune": "fine-tuning", "distill": "distillation (teacher + student)", "evaluate": "evaluation",
             "predict": "prediction (`make_runtime`)"}
    for stage, label in names.items():
        if stage in st:
            d = st[stage]
            lines.append(f"| {label} | {d['ours_images_per_s']:.1f} | {d['plain_fp32_images_per_s']:.1f} | "
                         f"{d['speedup']:.2f}x ({d['paired_median_speedup']:.2f}x) |")
    return "\n".join(lines) + "\n"


E2E_CASES = {"cifar32": "CIFAR-10 JPEGs", "jpeg224_at64": "224-px JPEGs", "jpeg224_at224": "224-px JPEGs"}


def end_to_end_section(path: Path) -> str:
    """``simclrv2 pretrain`` end to end vs the isolated step, from one ``end_to_end*.json``."""
    r = json.loads(path.read_text())
    s, host = r["settings"], r.get("host")
    settings = (f"{'--quick, ' if s.get('quick') else ''}{s['train_per_class']} training and "
                f"{s['test_per_class']} test images per class, batch {s['batch_size']}, {s['epochs']} epochs, "
                f"{s['arch']}, {s['num_workers']} data workers")
    isolated = "; ".join(
        f"{case} {d['isolated']['before_runs']['images_per_s']:.1f} before and "
        f"{d['isolated']['after_runs']['images_per_s']:.1f} after" for case, d in r["cases"].items()
        if "before_runs" in d.get("isolated", {}))
    lines = [f"**`{host.get('host_kind')}`** (`{path.name}`): {_host_text(host, {})}; torch {r.get('torch')}; "
             f"{_run_text(r, settings)}; {_load_text(r, host.get('cpu_count'))}."
             + (f" The isolated step (img/s, median) measured {isolated} the runs." if isolated else ""), "",
             "| case | kNN monitor share of training: every epoch end (old) -> default | "
             "end to end / isolated step: old -> default | first step / later median (default) |",
             "|---|---|---|---|"]
    for case, d in r["cases"].items():
        runs = d["runs"]
        old, new = runs.get("every-epoch"), runs.get("default")

        def share(run: dict | None) -> str:
            return "-" if run is None else (f"{_pct(run['knn_share_of_training'])} "
                                            f"({_pct(run['epoch_end_knn_share_of_training'])} at epoch ends)")

        def ratio(run: dict | None) -> str:
            return "-" if run is None else _pct(run["e2e_vs_isolated"])

        warm = f"{new['warmup']['first_step_vs_later']:.2f}" if new else "-"
        lines.append(f"| {E2E_CASES.get(case, case)} at {d['image_size']} px | {share(old)} -> {share(new)} | "
                     f"{ratio(old)} -> {ratio(new)} | {warm} |")
    return "\n".join(lines) + "\n"


def _joined(pattern: str, section) -> str | None:
    files = sorted(RESULTS.glob(pattern))
    return "\n".join(section(path) for path in files) if files else None


def render(name: str) -> str | None:
    """The generated text of table ``name``, or None when its result file is not committed."""
    if name == "cifar10":
        path = RESULTS / "cifar10_label_efficiency.json"
        if not path.is_file():
            return None
        payload = json.loads(path.read_text())
        return accuracy_table(payload["table"]) + cifar10_summary(payload)
    if name == "demo":
        path = RESULTS / "demo" / "results.json"
        if not path.is_file():
            return None
        table = json.loads(path.read_text())
        seconds = json.loads((RESULTS / "demo" / "stage_seconds.json").read_text()) \
            if (RESULTS / "demo" / "stage_seconds.json").is_file() else {}
        return accuracy_table(table) + (f"All stages: {sum(seconds.values()) / 60:.1f} min.\n" if seconds else "")
    if name == "throughput":
        return _joined("throughput-*.json", throughput_section)
    if name == "stages":
        return _joined("stages-*.json", stages_section)
    if name == "end_to_end":
        return _joined("end_to_end*.json", end_to_end_section)
    raise KeyError(name)


def cifar10_summary(payload: dict) -> str:
    """Time per stage group, the host, and the report's sentence for each claim (with its spread)."""
    seconds = payload.get("stage_seconds") or {}
    total = payload.get("stage_seconds_total", sum(seconds.values())) / 60
    text = f"All stages: {total:.1f} min on {payload.get('cpu_count')} CPUs"
    if "pretrain" in seconds:
        text += f" (pretraining {seconds['pretrain'] / 60:.1f} min, the {len(seconds) - 1} later stages " \
                f"{(sum(seconds.values()) - seconds['pretrain']) / 60:.1f} min)"
        # The first seed's stages carry no " seed N" suffix (training.pipeline.plan_pipeline names them).
        one_seed = sum(v for k, v in seconds.items() if " seed " not in k) / 60
        text += f"; one seed, pretraining included: {one_seed:.1f} min"
    hw = payload.get("hardware") or {}
    if hw:
        text += f"; host: {hw.get('cpu') or hw.get('device') or 'not recorded'}" + \
            (f", {hw['logical_cpus']} logical CPUs" if hw.get("logical_cpus") else "") + \
            (f", precision {'/'.join(hw['precision'])}" if hw.get("precision") else "")
    lines = [text + "."]
    per_seed = {m: {k: cell["seeds"] for k, cell in rows.items() if "seeds" in cell}
                for m, rows in payload["table"].items()}
    if all(len(cells) for cells in per_seed.values()) and per_seed:
        from simclrv2.training.report import compare_methods

        lines.append("")
        lines += [f"- {c.sentence()}" for c in compare_methods(per_seed)]
    return "\n".join(lines) + "\n"


def update(text: str) -> str:
    """``text`` (README.md) with every generated table replaced by :func:`render`'s output."""
    def replace(match: re.Match) -> str:
        body = render(match.group(2))
        return match.group(0) if body is None else match.group(1) + body + match.group(4)
    return SECTION.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="Only compare; exit 1 when README.md differs.")
    args = parser.parse_args(argv)
    text = README.read_text()
    new = update(text)
    if args.check:
        if new != text:
            print("README.md tables differ from benchmarks/results; run python benchmarks/readme_tables.py",
                  file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
