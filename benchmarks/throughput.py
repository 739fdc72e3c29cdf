"""Pretraining throughput on this machine: our SimCLRv2 step vs lightly's SimCLR, augmentation
vs torchvision, matrix-product peaks (roofline), peak memory, momentum-memory overhead.

A benchmark, not a test: it prints a table and writes JSON (``--out``); nothing is asserted.

What is measured, in ONE run on the same machine and the same number of steps:

* **ours**: the default pretraining step built the way ``PretrainTrainer`` builds it --
  ``create_model('r18_1x_sk0', image_size=32, num_proj_layers=3)`` (ResNet-18, CIFAR stem),
  ``Runtime.prepare_model`` (channels_last), ``build_optimizer`` (LARS, pretrain defaults),
  ``PretrainStep`` (both views in ONE forward, NT-Xent tau 0.1, ``--precision auto`` = bf16
  autocast on CPUs with AVX-512-BF16/AMX, fp32 elsewhere).  Timed on pre-made views (made once
  by our augmentation); the augmentation is timed separately (``two_views`` + layout at the
  process's thread count, as ``PretrainTrainer.train_step`` runs it) and added for "incl. aug".
  No online probe (``num_classes=0``), like the peer.
* **ours + memory**: the same with ``--memory-size 4096`` (EMA copy, decay 0.999, forward of
  the EMA network on the views, FIFO queue of 4096 negatives, pre-filled so the loss sees the
  steady-state 4096 extra columns from the first timed step).
* **lightly** (peer reference, ``pip install lightly``; reported as unavailable otherwise):
  torchvision ``resnet18`` with the same CIFAR stem (conv1 3x3/s1, maxpool and fc = Identity),
  lightly's ``SimCLRProjectionHead(512, 512, 128, num_layers=3)`` (same depth/width as ours),
  ``NTXentLoss(temperature=0.1)``, fp32, contiguous (NCHW) tensors, SGD(lr 0.06, momentum 0.9,
  weight decay 5e-4) as in lightly's SimCLR examples/benchmarks, one forward per view.

Timing: after ``--warmup`` untimed rounds, ``--steps`` rounds; every round times one step of
each variant, the augmentation and one matrix product per size/dtype, in a rotating order, so
that on a shared machine all variants see the same background load.  Step times are medians
over rounds; ratios ("x lightly", memory overhead) are medians of the per-round ratios of
adjacent measurements (robust to load changing between rounds).

Roofline: FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one full step
(forward + backward: convolutions and matrix products; BatchNorm, activations, the optimiser
and other elementwise work are NOT counted, so this is the useful "model FLOPs" figure).  The
bf16 / fp32 peaks are the best size's median GFLOP/s of ``torch.mm`` on square matrices
(2048 .. 4096) measured in the same rounds; ``roofline_fraction`` = our step's FLOP/s / bf16 peak.

Peak memory: one fresh subprocess per variant (same batch, same thread count; started together,
while this process runs its untimed warm-up) records its RSS after imports and input creation, resets the kernel's high-water mark (``/proc/self/clear_refs``
5; ``ru_maxrss`` where that is not possible), runs ``--memory-steps`` steps and reports the
high-water mark; the figure compared is the growth over that baseline (model, optimiser state,
activations, allocator caches), so import sizes do not count.

Usage::

    python benchmarks/throughput.py                 # batch 256, 8 timed steps (several minutes)
    python benchmarks/throughput.py --quick         # batch 32, 2 timed steps (< 2 minutes)
    python benchmarks/throughput.py --batch-size 128 --steps 5 --warmup 1 --out /tmp/t.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from augment_speed import format_case, measure_case  # noqa: E402  (sibling benchmark script)

from simclrv2.augment import AugmentConfig, SimCLRAugmentation  # noqa: E402
from simclrv2.config import build_config  # noqa: E402
from simclrv2.losses import NegativeQueue  # noqa: E402
from simclrv2.models import create_model  # noqa: E402
from simclrv2.training.pretrain import PretrainStep  # noqa: E402
from simclrv2.training.runtime import Runtime, resolve_precision  # noqa: E402
from simclrv2.training.trainer import build_optimizer, plan_steps  # noqa: E402
from simclrv2.utils.ema import ModelEMA  # noqa: E402

ARCH = "r18_1x_sk0"
IMAGE_SIZE = 32
QUEUE_SIZE = 4096
CIFAR_TRAIN_SIZE = 50_000  # only sets the (sqrt-scaled) learning rate, as a CIFAR-10 run would
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "throughput.json"

TARGETS = {
    "pretrain_speedup_vs_lightly": (">=", 3.0),
    "roofline_fraction": (">=", 0.70),
    "augment_speedup_224": (">=", 2.0),
    "peak_memory_ratio_vs_lightly": ("<=", 1.0),
    "memory_queue_overhead": ("<=", 0.10),
}


# ---- the variants -------------------------------------------------------------------------

def lightly_version() -> str | None:
    try:
        import lightly
    except Exception:  # noqa: BLE001 - any import failure means "peer unavailable"
        return None
    return getattr(lightly, "__version__", "unknown")


def make_images(batch: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8, generator=gen)


class Ours:
    """Our default pretraining step (see the module docstring)."""

    def __init__(self, batch: int, memory_size: int = 0, seed: int = 0, views: torch.Tensor | None = None) -> None:
        torch.manual_seed(seed)
        cfg = build_config("pretrain", flag_values={"arch": ARCH, "device": "cpu", "memory_size": memory_size})
        device = torch.device("cpu")
        self.rt = rt = Runtime(device=device, precision=resolve_precision(cfg.precision, device),
                               channels_last=cfg.channels_last)
        plan = plan_steps(cfg, CIFAR_TRAIN_SIZE, batch)
        net = rt.prepare_model(create_model(ARCH, image_size=IMAGE_SIZE, num_proj_layers=cfg.num_proj_layers,
                                            proj_out_dim=cfg.proj_out_dim))
        self.net = net
        self.optimizer = build_optimizer(cfg, net, plan.peak_lr)
        self.ema = ModelEMA(net, decay=cfg.ema_decay) if memory_size > 0 else None
        self.queue = None
        if memory_size > 0:
            self.queue = NegativeQueue(memory_size, cfg.proj_out_dim).to(device)
            fill = F.normalize(torch.randn(memory_size, cfg.proj_out_dim, generator=torch.Generator().manual_seed(1)),
                               dim=1)
            self.queue.enqueue(fill)  # steady state: every step sees memory_size extra negatives
        self.step_fn = PretrainStep(net, self.optimizer, rt, temperature=cfg.temperature,
                                    weight_decay=cfg.weight_decay or 0.0, ema=self.ema, queue=self.queue)
        aug_cfg = AugmentConfig.for_pretraining(IMAGE_SIZE, color_jitter_strength=cfg.color_jitter_strength,
                                                use_blur=cfg.use_blur)
        self.augment = SimCLRAugmentation(aug_cfg)
        self.generator = torch.Generator().manual_seed(seed)
        self.images = make_images(batch, seed) if views is None else None
        self.views = self.make_views() if views is None else rt.layout(views)
        self.labels = torch.full((batch,), -1, dtype=torch.long)
        self.cfg = cfg
        self.last_loss = math.nan

    def make_views(self) -> torch.Tensor:
        """What ``PretrainTrainer.train_step`` does before the step: two views, then the layout."""
        return self.rt.layout(self.augment.two_views(self.images, self.generator))

    def step(self) -> float:
        self.last_loss = float(self.step_fn(self.views, self.labels)["loss"])
        return self.last_loss


class Lightly:
    """lightly's SimCLR on torchvision resnet18 with the CIFAR stem (see the module docstring)."""

    def __init__(self, batch: int, views: torch.Tensor | None = None, seed: int = 0) -> None:
        import torchvision
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        torch.manual_seed(seed)
        resnet = torchvision.models.resnet18()
        resnet.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        resnet.maxpool = nn.Identity()
        resnet.fc = nn.Identity()
        self.backbone = resnet
        self.head = SimCLRProjectionHead(512, 512, 128, num_layers=3)
        self.model = nn.Sequential(self.backbone, self.head)
        self.criterion = NTXentLoss(temperature=0.1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
        if views is None:
            views = torch.rand(2 * batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))
        self.x0 = views[:batch].contiguous()
        self.x1 = views[batch:].contiguous()
        self.last_loss = math.nan

    def step(self) -> float:
        z0 = self.model(self.x0)
        z1 = self.model(self.x1)
        loss = self.criterion(z0, z1)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.last_loss = float(loss.detach())
        return self.last_loss


class FlopCount:
    """Wraps one call in ``FlopCounterMode`` and keeps the total (forward + backward FLOPs of
    convolutions and matrix products; elementwise work is not counted)."""

    def __init__(self) -> None:
        self.total: int | None = None

    def __call__(self, fn: Callable[[], Any]) -> Any:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            out = fn()
        self.total = int(counter.get_total_flops())
        return out


# ---- timing -------------------------------------------------------------------------------

def matmul_probe(n: int, dtype: torch.dtype) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(n)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    c = torch.empty(n, n, dtype=dtype)
    return lambda: torch.mm(a, b, out=c)


def interleaved(fns: dict[str, Callable[[], Any]], warmup: int, rounds: int,
                log: Callable[[str], None] | None = None,
                first_call: dict[str, Callable[[Callable[[], Any]], Any]] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function, one call of each per round, rotating the order.

    ``first_call[name](fn)`` replaces the very first (warm-up, untimed when ``warmup > 0``) call
    of ``fn``; used to count FLOPs on a call that would not be timed anyway."""
    names = list(fns)
    first_call = dict(first_call or {})
    times: dict[str, list[float]] = {name: [] for name in names}
    last: dict[str, float] = {}
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            wrap = first_call.pop(name, None)
            start = time.perf_counter()
            if wrap is not None:
                wrap(fns[name])
            else:
                fns[name]()
            elapsed = time.perf_counter() - start
            last[name] = elapsed
            if r >= warmup:
                times[name].append(elapsed)
        if log is not None:
            done = ", ".join(f"{n} {last[n]:.2f}s" for n in names if not n.startswith("mm_"))
            log(f"  round {r + 1}/{warmup + rounds}{' (warm-up)' if r < warmup else ''}: {done}")
    return times


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[i] / den[i] (adjacent measurements share the background load)."""
    return statistics.median(a / b for a, b in zip(num, den))


def stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "mean": statistics.fmean(values), "n": len(values)}


# ---- memory (subprocess per variant) ---------------------------------------------------------

def _proc_status_kib() -> dict[str, int]:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return {}
    return {k: int(v) for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, flags=re.M)}


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def memory_child(variant: str, batch: int, steps: int) -> dict[str, Any]:
    """Runs in a fresh process: RSS growth of ``steps`` steps of one variant."""
    import gc

    if variant == "lightly":
        import lightly  # noqa: F401  (imports before the baseline)
        import torchvision  # noqa: F401
    views = torch.rand(2 * batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    gc.collect()
    base = _proc_status_kib().get("VmRSS")
    reset = _reset_peak_rss()
    base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Both variants get the same random views; each makes its own layout copy (NCHW halves for
    # lightly, channels_last for ours), as it would in training.
    if variant == "lightly":
        runner: Ours | Lightly = Lightly(batch, views=views)
    else:
        runner = Ours(batch, memory_size=QUEUE_SIZE if variant == "ours_memory" else 0, views=views)
    losses = [runner.step() for _ in range(steps)]
    status = _proc_status_kib()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if reset and "VmHWM" in status and base is not None:
        peak_kib, method = status["VmHWM"], "VmHWM after clear_refs"
    else:
        peak_kib, method = maxrss, "ru_maxrss"
        base = base if base is not None else base_maxrss
    return {"variant": variant, "batch": batch, "steps": steps, "baseline_rss_mb": base / 1024,
            "peak_rss_mb": peak_kib / 1024, "growth_mb": (peak_kib - base) / 1024, "method": method,
            "threads": torch.get_num_threads(), "final_loss": losses[-1]}


def start_memory_children(variants: list[str], batch: int, steps: int,
                          threads: int | None) -> dict[str, subprocess.Popen]:
    """One fresh process per variant, started together (RSS is per process, so running them side
    by side -- and beside the untimed warm-up -- changes their speed, not their memory)."""
    procs = {}
    for variant in variants:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", variant,
               "--batch-size", str(batch), "--memory-steps", str(steps)]
        if threads:
            cmd += ["--threads", str(threads)]
        procs[variant] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return procs


def collect_memory_children(procs: dict[str, subprocess.Popen]) -> dict[str, Any]:
    results = {}
    for variant, proc in procs.items():
        out, err = proc.communicate(timeout=3600)
        if proc.returncode != 0:
            results[variant] = {"variant": variant, "error": (err or out).strip().splitlines()[-1:]}
        else:
            results[variant] = json.loads(out.strip().splitlines()[-1])
    return results


# ---- environment ------------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    found = set(re.findall(r"\b(avx512_bf16|amx_bf16|amx_tile|avx512f|avx2)\b", text))
    return sorted(found)


# ---- main -------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.verbose else (lambda msg: None)
    batch = args.batch_size
    threads = torch.get_num_threads()
    peer_version = lightly_version()
    mm_sizes = [2048] if args.quick else [2048, 4096]

    say(f"building ours (batch {batch}) ...")
    ours = Ours(batch)
    ours_mem = Ours(batch, memory_size=QUEUE_SIZE, views=ours.views)
    peer = Lightly(batch, views=ours.views) if peer_version else None

    fns: dict[str, Callable[[], Any]] = {"ours": ours.step, "ours_memory": ours_mem.step}
    if peer is not None:
        fns["lightly"] = peer.step
    fns["augment"] = ours.make_views
    for n in mm_sizes:
        fns[f"mm_bf16_{n}"] = matmul_probe(n, torch.bfloat16)
        fns[f"mm_fp32_{n}"] = matmul_probe(n, torch.float32)
    phases: dict[str, float] = {"build": time.perf_counter() - t_start}

    # Peak memory: fresh subprocesses, run while this process does its UNTIMED warm-up; the timed
    # rounds start only after they have finished.
    variants = ["ours"] + (["lightly"] if peer_version else []) + ([] if args.quick else ["ours_memory"])
    say(f"peak memory: subprocesses for {', '.join(variants)} (side by side with the warm-up) ...")
    t_phase = time.perf_counter()
    children = start_memory_children(variants, batch, args.memory_steps, args.threads)

    say(f"{args.warmup} warm-up round(s) of {', '.join(fns)} ...")
    # FLOPs are counted on the first (warm-up) step of each network; separately when --warmup 0.
    counters = {"ours": FlopCount(), "lightly": FlopCount()}
    first = {name: counters[name] for name in counters if name in fns} if args.warmup > 0 else None
    interleaved(fns, args.warmup, 0, log=say, first_call=first)
    memory = collect_memory_children(children)
    phases["warmup_and_memory"] = time.perf_counter() - t_phase

    say(f"{args.steps} timed round(s) ...")
    t_phase = time.perf_counter()
    times = interleaved(fns, 0, args.steps, log=say)
    phases["timed_rounds"] = time.perf_counter() - t_phase
    for name, counter in counters.items():
        if name in fns and counter.total is None:
            counter(fns[name])
    flops_ours = counters["ours"].total
    flops_peer = counters["lightly"].total

    # Augmentation vs torchvision, one thread ("per core"), via benchmarks/augment_speed.py.
    say("augmentation vs torchvision (1 thread) ...")
    t_phase = time.perf_counter()
    torch.set_num_threads(1)
    try:
        aug32 = measure_case(32, 32, args.aug_batch_32, blur=False, seconds=args.aug_seconds,
                             repeats=args.aug_repeats)
        aug224 = measure_case(224, 256, args.aug_batch_224, blur=True, seconds=args.aug_seconds,
                              repeats=args.aug_repeats)
    finally:
        torch.set_num_threads(threads)
    phases["augment_vs_torchvision"] = time.perf_counter() - t_phase

    # ---- derived numbers
    med = {name: statistics.median(values) for name, values in times.items()}
    step_ours, step_mem = med["ours"], med["ours_memory"]
    step_aug = med["augment"]
    peaks: dict[str, dict[str, float]] = {}
    for dt in ("bf16", "fp32"):
        per_size = {}
        for n in mm_sizes:
            rates = [2 * n**3 / t for t in times[f"mm_{dt}_{n}"]]
            per_size[str(n)] = {"median_gflops": statistics.median(rates) / 1e9, "best_gflops": max(rates) / 1e9}
        best_size = max(per_size, key=lambda k: per_size[k]["median_gflops"])
        peaks[dt] = {"peak_gflops": per_size[best_size]["median_gflops"], "size": int(best_size),
                     "best_gflops": max(v["best_gflops"] for v in per_size.values()), "by_size": per_size}
    achieved_gflops = flops_ours / step_ours / 1e9
    achieved_best_gflops = flops_ours / min(times["ours"]) / 1e9
    roofline = achieved_gflops / peaks["bf16"]["peak_gflops"]

    results: dict[str, Any] = {
        "pretrain_speedup_vs_lightly": paired_ratio(times["lightly"], times["ours"]) if peer else None,
        "roofline_fraction": roofline,
        "augment_speedup_224": aug224["speedup"],
        "augment_speedup_32": aug32["speedup"],
        "peak_memory_ratio_vs_lightly": None,
        "memory_queue_overhead": paired_ratio(times["ours_memory"], times["ours"]) - 1.0,
    }
    if "error" not in memory["ours"] and "lightly" in memory and "error" not in memory["lightly"]:
        results["peak_memory_ratio_vs_lightly"] = memory["ours"]["growth_mb"] / memory["lightly"]["growth_mb"]
    results["targets"] = {}
    for key, (op, bound) in TARGETS.items():
        value = results[key]
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        results["targets"][key] = {"target": f"{op} {bound:g}", "value": value, "met": met}

    results["config"] = {
        "arch": ARCH, "image_size": IMAGE_SIZE, "batch_size": batch, "views_per_step": 2 * batch,
        "steps": args.steps, "warmup": args.warmup, "quick": args.quick, "threads": threads,
        "precision": ours.rt.precision, "channels_last": ours.rt.channels_last,
        "optimizer": ours.cfg.optimizer, "temperature": ours.cfg.temperature, "queue_size": QUEUE_SIZE,
        "ema_decay": ours.cfg.ema_decay, "memory_steps": args.memory_steps,
    }
    results["environment"] = {
        "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_name(),
        "cpu_count": os.cpu_count(), "cpu_flags": cpu_flags(), "lightly": peer_version,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    results["pretrain"] = {
        "ours": {**stats(times["ours"]), "images_per_s": batch / step_ours, "gflop_per_step": flops_ours / 1e9,
                 "achieved_gflops": achieved_gflops, "achieved_best_gflops": achieved_best_gflops},
        "ours_memory": {**stats(times["ours_memory"]), "images_per_s": batch / step_mem},
        "ours_incl_augment": {"seconds_per_step": step_ours + step_aug,
                              "images_per_s": batch / (step_ours + step_aug)},
        "augment_two_views": {**stats(times["augment"]), "images_per_s": batch / step_aug,
                              "fraction_of_step": step_aug / step_ours},
        "lightly": None if peer is None else {
            **stats(times["lightly"]), "images_per_s": batch / med["lightly"], "gflop_per_step": flops_peer / 1e9,
            "achieved_gflops": flops_peer / med["lightly"] / 1e9},
        "speedup_ratio_of_medians": (med["lightly"] / step_ours) if peer else None,
        "memory_overhead_ratio_of_medians": step_mem / step_ours - 1.0,
        "final_loss": {"ours": ours.last_loss, "ours_memory": ours_mem.last_loss,
                       "lightly": peer.last_loss if peer is not None else None},
        "raw_seconds": times,
    }
    results["matmul_peaks"] = peaks
    results["roofline"] = {
        "flop_counter": "torch.utils.flop_counter.FlopCounterMode on one full step (forward + backward "
                        "convolutions and matrix products; BN/elementwise/optimiser not counted)",
        "achieved_gflops": achieved_gflops, "bf16_peak_gflops": peaks["bf16"]["peak_gflops"],
        "fraction_of_bf16_peak": roofline,
        "fraction_best_vs_best": achieved_best_gflops / peaks["bf16"]["best_gflops"],
        "fraction_of_fp32_peak": achieved_gflops / peaks["fp32"]["peak_gflops"],
    }
    results["augment"] = {"32px": aug32, "224px": aug224}
    results["memory"] = memory
    results["phase_seconds"] = phases
    results["wall_seconds"] = time.perf_counter() - t_start
    return results


def _fmt(value: float | None, spec: str, missing: str = "n/a") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def render_table(r: dict[str, Any]) -> str:
    c, env, p = r["config"], r["environment"], r["pretrain"]
    lines = [
        f"SimCLRv2 throughput -- {env['cpu']} ({env['cpu_count']} CPUs, {', '.join(env['cpu_flags'])}), "
        f"torch {env['torch']}, {c['threads']} threads, lightly {env['lightly'] or 'not installed'}",
        f"{c['arch']} CIFAR stem, {c['image_size']} px, batch {c['batch_size']} ({c['views_per_step']} views), "
        f"{c['steps']} timed rounds after {c['warmup']} warm-up, interleaved; median [min] per step"
        + (" [--quick]" if c["quick"] else ""),
        "",
        f"{'pretraining step':<58s}{'s/step':>16s}{'img/s':>9s}{'GFLOP':>8s}{'GFLOP/s':>9s}",
    ]

    def row(label: str, d: dict | None, gflop: float | None = None, gflops: float | None = None) -> str:
        if d is None:
            return f"{label:<58s}{'unavailable (pip install lightly)':>42s}"
        s = f"{d['median']:.3f} [{d['min']:.3f}]"
        return (f"{label:<58s}{s:>16s}{d['images_per_s']:>9.1f}{_fmt(gflop, '.0f', ''):>8s}"
                f"{_fmt(gflops, '.0f', ''):>9s}")

    o = p["ours"]
    lines.append(row(f"ours ({c['precision']} autocast, channels_last, {c['optimizer']}, 1 fwd of 2N)", o,
                     o["gflop_per_step"], o["achieved_gflops"]))
    lines.append(row(f"ours + memory (queue {c['queue_size']}, EMA {c['ema_decay']})", p["ours_memory"]))
    lines.append(row("lightly SimCLR (fp32, NCHW, SGD, 2 fwd of N)", p["lightly"],
                     p["lightly"]["gflop_per_step"] if p["lightly"] else None,
                     p["lightly"]["achieved_gflops"] if p["lightly"] else None))
    a = p["augment_two_views"]
    lines.append(f"{'our augmentation (two_views + layout, same threads)':<58s}"
                 f"{a['median']:>16.3f}{a['images_per_s']:>9.0f}   ({100 * a['fraction_of_step']:.1f}% of a step)")
    lines.append(f"{'ours incl. augmentation':<58s}{p['ours_incl_augment']['seconds_per_step']:>16.3f}"
                 f"{p['ours_incl_augment']['images_per_s']:>9.1f}")
    lines.append("")
    lines.append("augmentation vs torchvision PIL (1 thread = per core, images/s, one view per image)")
    lines.append("  " + format_case(r["augment"]["32px"]))
    lines.append("  " + format_case(r["augment"]["224px"]))
    lines.append("")
    mp = r["matmul_peaks"]
    sizes = sorted({int(n) for dt in mp.values() for n in dt["by_size"]})
    lines.append("matrix-product peaks, torch.mm square (GFLOP/s, median over rounds [best])")
    for dt in ("bf16", "fp32"):
        per = "  ".join(f"n={n}: {mp[dt]['by_size'][str(n)]['median_gflops']:.0f} "
                        f"[{mp[dt]['by_size'][str(n)]['best_gflops']:.0f}]" for n in sizes)
        lines.append(f"  {dt}: {per}   -> peak {mp[dt]['peak_gflops']:.0f}")
    ro = r["roofline"]
    lines.append(f"our step: {ro['achieved_gflops']:.0f} GFLOP/s (FlopCounterMode, fwd+bwd convs/matmuls) = "
                 f"{100 * ro['fraction_of_bf16_peak']:.1f}% of the bf16 peak "
                 f"({100 * ro['fraction_best_vs_best']:.1f}% best-vs-best; "
                 f"{100 * ro['fraction_of_fp32_peak']:.0f}% of the fp32 peak)")
    lines.append("")
    lines.append("peak memory (fresh subprocess per variant, growth of peak RSS over the post-import baseline)")
    for name, m in r["memory"].items():
        if "error" in m:
            lines.append(f"  {name:<12s} failed: {m['error']}")
        else:
            lines.append(f"  {name:<12s} +{m['growth_mb']:7.0f} MB  (peak RSS {m['peak_rss_mb']:.0f} MB, "
                         f"baseline {m['baseline_rss_mb']:.0f} MB, {m['steps']} steps, {m['method']})")
    lines.append("")
    lines.append("targets")
    labels = {
        "pretrain_speedup_vs_lightly": "pretraining step vs lightly (x, paired median)",
        "roofline_fraction": "fraction of the bf16 matmul peak",
        "augment_speedup_224": "augmentation vs torchvision at 224 px (x)",
        "peak_memory_ratio_vs_lightly": "peak memory growth / lightly's",
        "memory_queue_overhead": "momentum memory + EMA overhead (fraction of step)",
    }
    for key, t in r["targets"].items():
        verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        lines.append(f"  {labels[key]:<52s}{_fmt(t['value'], '.3f'):>9s}   target {t['target']:<7s} {verdict}")
    lines.append(f"(wall time {r['wall_seconds']:.0f} s; load average at the end "
                 f"{', '.join(f'{x:.1f}' for x in env['load_average'] or [])})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=None, help="source images per step (default 256; "
                        "32 with --quick); each image gives two views")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds (default 8; 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="small batch and few steps (< 2 minutes)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps per peak-memory subprocess")
    parser.add_argument("--aug-seconds", type=float, default=None, help="timing budget per augmentation variant")
    parser.add_argument("--aug-repeats", type=int, default=None, help="interleaved windows per variant (median)")
    parser.add_argument("--aug-batch-32", type=int, default=None, help="default 256 (128 with --quick)")
    parser.add_argument("--aug-batch-224", type=int, default=None, help="default 64 (16 with --quick)")
    parser.add_argument("--verbose", "-v", action="store_true", help="progress on stderr")
    parser.add_argument("--memory-child", choices=("ours", "ours_memory", "lightly"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = dict(batch_size=32 if quick else 256, steps=2 if quick else 8, warmup=1 if quick else 2,
                    aug_seconds=0.6 if quick else 6.0, aug_repeats=1 if quick else 3,
                    aug_batch_32=128 if quick else 256, aug_batch_224=16 if quick else 64)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.batch_size < 2 or args.steps < 1 or args.warmup < 0:
        parser.error("need --batch-size >= 2, --steps >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.batch_size, args.memory_steps)))
        return
    results = run(args)
    print(render_table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
