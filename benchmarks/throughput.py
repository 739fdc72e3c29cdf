"""Pretraining throughput on this machine: our SimCLRv2 step vs lightly's SimCLR, augmentation
vs torchvision, matrix-product peaks (roofline), peak memory, momentum-memory overhead.

A benchmark, not a test: it prints a table and writes JSON (``--out``); nothing is asserted.

What is measured, in ONE run on the same machine, same batch and the same number of steps:

* **ours**: the default pretraining step built the way ``pretrain()`` / ``PretrainTrainer`` build
  it -- ``setup_runtime`` (device, ``--precision auto`` = bf16 autocast on CPUs with
  AVX-512-BF16/AMX, fp32 elsewhere; CPU allocator setting), ``create_model('r18_1x_sk0',
  image_size=32, num_proj_layers=3)`` (ResNet-18, CIFAR stem), ``Runtime.prepare_model``
  (channels_last), ``build_optimizer`` (LARS, pretrain defaults, sqrt-scaled lr for CIFAR-10),
  ``PretrainStep`` (both views in ONE forward, NT-Xent tau 0.1).  Timed on pre-made views (made
  once by our augmentation); the augmentation is timed separately (``two_views`` + layout at the
  same thread count, as ``PretrainTrainer.train_step`` runs it) and added for "incl. aug".
  No online probe (``num_classes=0``), like the peer.
* **ours + memory**: the same with ``--memory-size 4096``: EMA copy (decay 0.999), a forward of
  the EMA network on the default key views (``--memory-keys-fraction 0.25``: the second view of a
  quarter of the images), FIFO queue of 4096 negatives -- pre-filled, so the loss sees the
  steady-state 4096 extra columns from the first timed step.
* **lightly** (peer reference; ``pip install lightly``, reported as unavailable otherwise):
  torchvision ``resnet18`` with the same CIFAR stem (conv1 3x3/s1, maxpool and fc = Identity),
  lightly's ``SimCLRProjectionHead(512, 512, 128, num_layers=3)`` (our head's depth/width),
  ``NTXentLoss(temperature=0.1)``, fp32, default (NCHW) layout, one forward per view and
  SGD(lr 0.06, momentum 0.9, weight decay 5e-4) as in lightly's SimCLR examples/benchmarks.

Each variant runs in its OWN worker process (so allocator state, caches and peak memory are its
own), all driven in lockstep by this process: one step at a time, never two at once.  After
``--warmup`` untimed rounds come ``--steps`` timed rounds; each round runs one step of every
variant, the augmentation and the matrix-product probes, in a rotating order, so that on a shared
machine all of them see the same background load.  Background load only ever ADDS time, so the
headline figures use the fastest round of each (``min``, as ``timeit`` recommends); medians and
every raw time are in the JSON.

Roofline: FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one full step of
each network (its first warm-up step): forward + backward convolutions and matrix products;
BatchNorm, activations, the optimiser and other elementwise work are NOT counted (the usual
"model FLOPs").  Peaks: ``torch.mm`` on square matrices (2048, 4096; B row- and column-major),
bf16 and fp32, best over sizes/layouts/rounds.  ``roofline_fraction`` = our step's FLOP/s / bf16
matmul peak.  For context a bf16 3x3 convolution probe is timed too: on the 2-core AVX-512-BF16
CPU we measured, oneDNN's convolutions ran ~1.4x faster than its square matrix products, so
"fraction of the conv probe" is the stricter figure.

Peak memory: each worker records its RSS after imports and input creation, resets the kernel's
high-water mark (``/proc/self/clear_refs``; ``ru_maxrss`` where that is not possible) and reports
the high-water mark after all its steps; the figure compared is the GROWTH over that baseline
(model, optimiser state, activations, allocator caches and fragmentation), so import sizes do
not count.

Usage::

    python benchmarks/throughput.py                 # batch 256, 6 timed rounds (several minutes)
    python benchmarks/throughput.py --quick         # batch 256, 2 timed rounds (< 2 minutes)
    python benchmarks/throughput.py --batch-size 128 --steps 5 --warmup 1 --out /tmp/t.json
    python benchmarks/throughput.py --ablate-malloc # + our step with glibc's default malloc policy
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
from simclrv2.training.runtime import setup_runtime  # noqa: E402
from simclrv2.training.trainer import build_optimizer, plan_steps  # noqa: E402
from simclrv2.utils.ema import ModelEMA  # noqa: E402

ARCH = "r18_1x_sk0"
IMAGE_SIZE = 32
QUEUE_SIZE = 4096
CIFAR_TRAIN_SIZE = 50_000  # only sets the (sqrt-scaled) learning rate, as a CIFAR-10 run would
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "throughput.json"
REPLY = "@@"  # prefix of worker replies on stdout (anything else a library prints is ignored)

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


def our_config(memory_size: int = 0):
    return build_config("pretrain", flag_values={"arch": ARCH, "device": "cpu", "memory_size": memory_size})


class OursAugment:
    """Our augmentation as ``PretrainTrainer.train_step`` runs it: two views, then the layout."""

    def __init__(self, batch: int, seed: int = 0) -> None:
        cfg = our_config()
        self.rt = setup_runtime(cfg)
        aug_cfg = AugmentConfig.for_pretraining(IMAGE_SIZE, color_jitter_strength=cfg.color_jitter_strength,
                                                use_blur=cfg.use_blur)
        self.augment = SimCLRAugmentation(aug_cfg)
        self.generator = torch.Generator().manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (batch, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8, generator=gen)

    def __call__(self) -> torch.Tensor:
        return self.rt.layout(self.augment.two_views(self.images, self.generator))


class Ours:
    """Our default pretraining step (see the module docstring)."""

    def __init__(self, batch: int, views: torch.Tensor, memory_size: int = 0, seed: int = 0) -> None:
        cfg = our_config(memory_size)
        self.cfg = cfg
        self.rt = rt = setup_runtime(cfg)  # seeds torch with cfg.seed
        device = rt.device
        plan = plan_steps(cfg, CIFAR_TRAIN_SIZE, batch)
        net = rt.prepare_model(create_model(ARCH, image_size=IMAGE_SIZE, num_proj_layers=cfg.num_proj_layers,
                                            proj_out_dim=cfg.proj_out_dim))
        self.optimizer = build_optimizer(cfg, net, plan.peak_lr)
        ema = ModelEMA(net, decay=cfg.ema_decay) if memory_size > 0 else None
        queue = None
        if memory_size > 0:
            queue = NegativeQueue(memory_size, cfg.proj_out_dim).to(device)
            fill = torch.randn(memory_size, cfg.proj_out_dim, generator=torch.Generator().manual_seed(seed + 1))
            queue.enqueue(F.normalize(fill, dim=1))  # steady state: memory_size extra negatives every step
        self.step_fn = PretrainStep(net, self.optimizer, rt, temperature=cfg.temperature,
                                    weight_decay=cfg.weight_decay or 0.0, ema=ema, queue=queue,
                                    memory_keys_fraction=cfg.memory_keys_fraction)
        self.views = rt.layout(views.to(device))
        self.labels = torch.full((batch,), -1, dtype=torch.long, device=device)

    def step(self) -> float:
        return float(self.step_fn(self.views, self.labels)["loss"])


class Lightly:
    """lightly's SimCLR on torchvision resnet18 with the CIFAR stem (see the module docstring)."""

    def __init__(self, batch: int, views: torch.Tensor, seed: int = 0) -> None:
        import torchvision
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        torch.manual_seed(seed)
        resnet = torchvision.models.resnet18()
        resnet.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        resnet.maxpool = nn.Identity()
        resnet.fc = nn.Identity()
        self.model = nn.Sequential(resnet, SimCLRProjectionHead(512, 512, 128, num_layers=3))
        self.criterion = NTXentLoss(temperature=0.1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
        self.x0 = views[:batch].contiguous()
        self.x1 = views[batch:].contiguous()

    def step(self) -> float:
        z0 = self.model(self.x0)
        z1 = self.model(self.x1)
        loss = self.criterion(z0, z1)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return float(loss.detach())


# ---- worker processes (one per variant) ----------------------------------------------------------

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


def worker_main(variant: str, batch: int) -> None:
    """Serve ``step`` / ``flops`` / ``quit`` requests on stdin for one variant; reply on stdout."""
    import gc

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(REPLY + json.dumps(obj) + "\n")
        sys.stdout.flush()

    if variant == "lightly":
        import lightly  # noqa: F401  (imported before the memory baseline)
        import torchvision  # noqa: F401
    # The same views in every worker: our augmentation of the same seeded images.
    views = OursAugment(batch)() if variant != "lightly" else None
    if views is None:  # lightly's worker makes them without touching our runtime settings
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (batch, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8, generator=gen)
        aug = SimCLRAugmentation(AugmentConfig.for_pretraining(IMAGE_SIZE))
        views = aug.two_views(images, torch.Generator().manual_seed(0))
    gc.collect()
    base_kib = _proc_status_kib().get("VmRSS")
    reset = _reset_peak_rss()
    if variant == "lightly":
        runner: Ours | Lightly = Lightly(batch, views)
    else:
        runner = Ours(batch, views, memory_size=QUEUE_SIZE if variant == "ours_memory" else 0)
    reply({"ready": True, "threads": torch.get_num_threads()})
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            start = time.perf_counter()
            loss = runner.step()
            reply({"seconds": time.perf_counter() - start, "loss": loss})
        elif cmd == "flops":
            from torch.utils.flop_counter import FlopCounterMode

            start = time.perf_counter()
            with FlopCounterMode(display=False) as counter:
                loss = runner.step()
            reply({"seconds": time.perf_counter() - start, "loss": loss, "flops": int(counter.get_total_flops())})
        else:
            break
    status = _proc_status_kib()
    if reset and "VmHWM" in status and base_kib is not None:
        peak_kib, method = status["VmHWM"], "VmHWM after clear_refs"
    else:  # ru_maxrss: also counts import-time peaks, so growth is a lower bound here
        peak_kib, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
        base_kib = base_kib or 0
    reply({"baseline_rss_mb": base_kib / 1024, "peak_rss_mb": peak_kib / 1024,
           "growth_mb": (peak_kib - base_kib) / 1024, "method": method})


class Worker:
    """Parent-side handle of a worker process."""

    def __init__(self, variant: str, batch: int, threads: int | None) -> None:
        env = dict(os.environ)
        if variant == "ours_glibc":  # ablation: our step with glibc's default malloc policy
            env["SIMCLRV2_MALLOC_TUNING"] = "0"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant.replace("_glibc", ""),
               "--batch-size", str(batch)]
        if threads:
            cmd += ["--threads", str(threads)]
        self.variant = variant
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                     env=env)
        self.flops: int | None = None
        self.last_loss = math.nan
        self.info: dict[str, Any] = {}

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
        raise RuntimeError(f"worker {self.variant!r} exited with code {self.proc.wait()} (see its stderr above)")

    def ready(self) -> None:
        self.info = self._read()

    def request(self, cmd: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        out = self._read()
        self.last_loss = out.get("loss", self.last_loss)
        if "flops" in out:
            self.flops = out["flops"]
        return out

    def step(self) -> float:
        return self.request("step")["seconds"]

    def step_counting_flops(self) -> float:
        return self.request("flops")["seconds"]

    def finish(self) -> dict[str, Any]:
        out = self.request("quit")
        self.proc.wait(timeout=60)
        return out


# ---- timing -------------------------------------------------------------------------------

def timed(fn: Callable[[], Any]) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return run


def matmul_probe(n: int, dtype: torch.dtype, b_col_major: bool) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(n)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    if b_col_major:
        b = b.t().contiguous().t()
    c = torch.empty(n, n, dtype=dtype)
    return lambda: torch.mm(a, b, out=c)


CONV_PROBE = (256, 512, 4, 3)  # batch, channels, side, kernel: a group-4 3x3 conv of ResNet-18 at 32 px
# (the fastest bf16 convolution shape we found on a 2-core AVX-512-BF16 CPU: ~1.4x the bf16 matmul peak)


def conv_probe() -> tuple[Callable[[], None], int]:
    n, c, s, k = CONV_PROBE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, s, s, generator=gen).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, c, k, k, generator=gen).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    return (lambda: F.conv2d(x, w, padding=k // 2)), 2 * n * c * c * k * k * s * s


def interleaved(fns: dict[str, Callable[[], float]], warmup: int, rounds: int,
                log: Callable[[str], None] | None = None,
                first_call: dict[str, Callable[[], float]] | None = None) -> dict[str, list[float]]:
    """Seconds of each function per round (each returns its own time), rotating the order.

    ``first_call[name]`` replaces the very first call of ``name`` (its first warm-up call; used
    to count FLOPs on a call that is not timed anyway)."""
    names = list(fns)
    first_call = dict(first_call or {})
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        last = {}
        for name in order:
            fn = first_call.pop(name, None) or fns[name]
            last[name] = fn()
            if r >= warmup:
                times[name].append(last[name])
        if log is not None:
            done = ", ".join(f"{n} {last[n]:.2f}s" for n in names if not n.startswith(("mm_", "conv_")))
            log(f"  round {r + 1}/{warmup + rounds}{' (warm-up)' if r < warmup else ''}: {done}")
    return times


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[i] / den[i] (adjacent measurements share the background load)."""
    return statistics.median(a / b for a, b in zip(num, den))


def stats(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


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
    return sorted(set(re.findall(r"\b(avx512_bf16|amx_bf16|avx512f|avx2)\b", text)))


# ---- main -------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.verbose else (lambda msg: None)
    batch = args.batch_size
    peer_version = lightly_version()
    variants = ["ours", "ours_memory"] + (["lightly"] if peer_version else [])
    if args.ablate_malloc:
        variants.insert(1, "ours_glibc")
    say(f"starting workers: {', '.join(variants)} (batch {batch}) ...")
    workers = {v: Worker(v, batch, args.threads) for v in variants}
    augment = OursAugment(batch)  # this process gets the same runtime settings as our worker
    threads = torch.get_num_threads()
    for w in workers.values():
        w.ready()
    phases: dict[str, float] = {"start": time.perf_counter() - t_start}

    fns: dict[str, Callable[[], float]] = {name: w.step for name, w in workers.items()}
    fns["augment"] = timed(augment)
    mm_sizes = [2048] if args.quick else [2048, 4096]
    for n in mm_sizes:
        for dt, tag in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            for col in (False, True):
                fns[f"mm_{tag}_{n}_{'nt' if col else 'nn'}"] = timed(matmul_probe(n, dt, col))
    conv_fn, conv_flops = conv_probe()
    fns["conv_bf16"] = timed(conv_fn)

    # FLOPs are counted on the first (warm-up) step of each network; separately when --warmup 0.
    counting = {name: w.step_counting_flops for name, w in workers.items() if name in ("ours", "lightly")}
    t_phase = time.perf_counter()
    say(f"{args.warmup} warm-up + {args.steps} timed rounds of {', '.join(fns)} ...")
    times = interleaved(fns, args.warmup, args.steps, log=say, first_call=counting if args.warmup else None)
    phases["rounds"] = time.perf_counter() - t_phase
    for name, w in workers.items():
        if name in counting and w.flops is None:
            w.step_counting_flops()
    memory = {name: w.finish() for name, w in workers.items()}
    losses = {name: w.last_loss for name, w in workers.items()}
    peer = "lightly" in workers

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

    # ---- derived numbers (min = least-disturbed round; see the module docstring)
    best = {name: min(values) for name, values in times.items()}
    med = {name: statistics.median(values) for name, values in times.items()}
    flops_ours = workers["ours"].flops
    flops_peer = workers["lightly"].flops if peer else None
    peaks: dict[str, dict[str, Any]] = {}
    for tag in ("bf16", "fp32"):
        probes = {}
        for n in mm_sizes:
            for layout in ("nn", "nt"):
                rates = [2 * n**3 / t / 1e9 for t in times[f"mm_{tag}_{n}_{layout}"]]
                probes[f"{n}_{layout}"] = {"best_gflops": max(rates), "median_gflops": statistics.median(rates)}
        top = max(probes, key=lambda k: probes[k]["best_gflops"])
        peaks[tag] = {"peak_gflops": probes[top]["best_gflops"], "at": top,
                      "median_peak_gflops": max(p["median_gflops"] for p in probes.values()), "probes": probes}
    conv_rates = [conv_flops / t / 1e9 for t in times["conv_bf16"]]
    achieved = flops_ours / best["ours"] / 1e9
    achieved_median = flops_ours / med["ours"] / 1e9
    roofline = achieved / peaks["bf16"]["peak_gflops"]

    results: dict[str, Any] = {
        "pretrain_speedup_vs_lightly": best["lightly"] / best["ours"] if peer else None,
        "roofline_fraction": roofline,
        "augment_speedup_224": aug224["speedup"],
        "augment_speedup_32": aug32["speedup"],
        "peak_memory_ratio_vs_lightly": (memory["ours"]["growth_mb"] / memory["lightly"]["growth_mb"]
                                         if peer else None),
        "memory_queue_overhead": best["ours_memory"] / best["ours"] - 1.0,
    }
    results["targets"] = {}
    for key, (op, bound) in TARGETS.items():
        value = results[key]
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        results["targets"][key] = {"target": f"{op} {bound:g}", "value": value, "met": met}
    results["alternative_estimates"] = {
        "note": "the headline keys use each variant's fastest round; these use medians / paired ratios",
        "pretrain_speedup_ratio_of_medians": med["lightly"] / med["ours"] if peer else None,
        "pretrain_speedup_paired_median": paired_ratio(times["lightly"], times["ours"]) if peer else None,
        "memory_queue_overhead_ratio_of_medians": med["ours_memory"] / med["ours"] - 1.0,
        "memory_queue_overhead_paired_median": paired_ratio(times["ours_memory"], times["ours"]) - 1.0,
        "roofline_fraction_medians": achieved_median / peaks["bf16"]["median_peak_gflops"],
    }
    cfg = our_config()
    results["config"] = {
        "arch": ARCH, "image_size": IMAGE_SIZE, "batch_size": batch, "views_per_step": 2 * batch,
        "steps": args.steps, "warmup": args.warmup, "quick": args.quick, "threads": threads,
        "precision": augment.rt.precision, "channels_last": augment.rt.channels_last,
        "optimizer": cfg.optimizer, "temperature": cfg.temperature, "queue_size": QUEUE_SIZE,
        "ema_decay": cfg.ema_decay, "statistic": "min over timed rounds",
    }
    results["environment"] = {
        "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_name(),
        "cpu_count": os.cpu_count(), "cpu_flags": cpu_flags(), "lightly": peer_version,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    step_aug = best["augment"]
    results["pretrain"] = {
        "ours": {**stats(times["ours"]), "images_per_s": batch / best["ours"], "gflop_per_step": flops_ours / 1e9,
                 "achieved_gflops": achieved, "achieved_gflops_median": achieved_median},
        "ours_memory": {**stats(times["ours_memory"]), "images_per_s": batch / best["ours_memory"]},
        "lightly": None if not peer else {
            **stats(times["lightly"]), "images_per_s": batch / best["lightly"], "gflop_per_step": flops_peer / 1e9,
            "achieved_gflops": flops_peer / best["lightly"] / 1e9},
        "augment_two_views": {**stats(times["augment"]), "images_per_s": batch / step_aug,
                              "fraction_of_step": step_aug / best["ours"]},
        "ours_incl_augment": {"seconds_per_step": best["ours"] + step_aug,
                              "images_per_s": batch / (best["ours"] + step_aug)},
        "final_loss": losses,
        "raw_seconds": times,
    }
    if "ours_glibc" in workers:
        results["pretrain"]["ours_glibc_malloc"] = {
            **stats(times["ours_glibc"]), "images_per_s": batch / best["ours_glibc"],
            "ours_speedup_from_malloc_setting": best["ours_glibc"] / best["ours"],
            "ours_speedup_from_malloc_setting_paired_median": paired_ratio(times["ours_glibc"], times["ours"])}
    results["matmul_peaks"] = peaks
    results["conv_probe_bf16"] = {"shape": "x [%d,%d,%d,%d] channels_last, 3x3 weight, fwd" % (
        CONV_PROBE[0], CONV_PROBE[1], CONV_PROBE[2], CONV_PROBE[2]),
        "best_gflops": max(conv_rates), "median_gflops": statistics.median(conv_rates)}
    results["roofline"] = {
        "flop_counter": "torch.utils.flop_counter.FlopCounterMode on one full step (forward + backward "
                        "convolutions and matrix products; BN/elementwise/optimiser not counted)",
        "achieved_gflops": achieved, "bf16_peak_gflops": peaks["bf16"]["peak_gflops"],
        "fraction_of_bf16_peak": roofline,
        "fraction_of_bf16_conv_probe": achieved / max(conv_rates),
        "fraction_of_fp32_peak": achieved / peaks["fp32"]["peak_gflops"],
        "lightly_fraction_of_fp32_peak": (flops_peer / best["lightly"] / 1e9 / peaks["fp32"]["peak_gflops"]
                                          if peer else None),
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
        f"{c['arch']} CIFAR stem, {c['image_size']} px, batch {c['batch_size']} ({c['views_per_step']} views); "
        f"{c['steps']} timed rounds after {c['warmup']} warm-up, lockstep-interleaved, one process per variant"
        + (" [--quick]" if c["quick"] else ""),
        "",
        f"{'pretraining step (fastest round [median])':<56s}{'s/step':>17s}{'img/s':>9s}{'GFLOP':>8s}{'GFLOP/s':>9s}",
    ]

    def row(label: str, d: dict | None, gflop: float | None = None, gflops: float | None = None) -> str:
        if d is None:
            return f"{label:<56s}{'unavailable (pip install lightly)':>43s}"
        s = f"{d['min']:.3f} [{d['median']:.3f}]"
        return (f"{label:<56s}{s:>17s}{d['images_per_s']:>9.1f}{_fmt(gflop, '.0f', ''):>8s}"
                f"{_fmt(gflops, '.0f', ''):>9s}")

    o, lt = p["ours"], p["lightly"]
    lines.append(row(f"ours ({c['precision']} autocast, channels_last, {c['optimizer']}, 1 fwd of 2N)", o,
                     o["gflop_per_step"], o["achieved_gflops"]))
    if "ours_glibc_malloc" in p:
        lines.append(row("ours with glibc's default malloc (SIMCLRV2_MALLOC_TUNING=0)", p["ours_glibc_malloc"],
                         o["gflop_per_step"], o["gflop_per_step"] / p["ours_glibc_malloc"]["min"]))
    lines.append(row(f"ours + memory (queue {c['queue_size']}, EMA {c['ema_decay']})", p["ours_memory"]))
    lines.append(row("lightly SimCLR (fp32, NCHW, SGD, 2 fwd of N)", lt,
                     lt["gflop_per_step"] if lt else None, lt["achieved_gflops"] if lt else None))
    a = p["augment_two_views"]
    s = f"{a['min']:.3f} [{a['median']:.3f}]"
    lines.append(f"{'our augmentation (two_views + layout, same threads)':<56s}{s:>17s}"
                 f"{a['images_per_s']:>9.0f}   ({100 * a['fraction_of_step']:.1f}% of a step)")
    lines.append(f"{'ours incl. augmentation':<56s}{p['ours_incl_augment']['seconds_per_step']:>17.3f}"
                 f"{p['ours_incl_augment']['images_per_s']:>9.1f}")
    lines.append("")
    lines.append("augmentation vs torchvision PIL (1 thread = per core, images/s, one view per image)")
    lines.append("  " + format_case(r["augment"]["32px"]))
    lines.append("  " + format_case(r["augment"]["224px"]))
    lines.append("")
    lines.append("matrix-product peaks, torch.mm square, B row-major (nn) / column-major (nt): "
                 "GFLOP/s best [median]")
    for tag in ("bf16", "fp32"):
        mp = r["matmul_peaks"][tag]
        per = "  ".join(f"{k}: {v['best_gflops']:.0f} [{v['median_gflops']:.0f}]" for k, v in mp["probes"].items())
        lines.append(f"  {tag}: {per}  -> peak {mp['peak_gflops']:.0f}")
    cp = r["conv_probe_bf16"]
    lines.append(f"  bf16 3x3 conv probe ({cp['shape']}): {cp['best_gflops']:.0f} [{cp['median_gflops']:.0f}]")
    ro = r["roofline"]
    lines.append(f"our step: {ro['achieved_gflops']:.0f} GFLOP/s (FlopCounterMode: fwd+bwd convs and matmuls) = "
                 f"{100 * ro['fraction_of_bf16_peak']:.1f}% of the bf16 matmul peak, "
                 f"{100 * ro['fraction_of_bf16_conv_probe']:.1f}% of the conv probe")
    if ro["lightly_fraction_of_fp32_peak"] is not None:
        lines.append(f"lightly: {lt['achieved_gflops']:.0f} GFLOP/s = "
                     f"{100 * ro['lightly_fraction_of_fp32_peak']:.1f}% of the fp32 matmul peak")
    lines.append("")
    lines.append("peak memory (own process per variant; growth of the RSS high-water mark over its baseline)")
    for name, m in r["memory"].items():
        lines.append(f"  {name:<12s} +{m['growth_mb']:7.0f} MB  (peak RSS {m['peak_rss_mb']:.0f} MB, "
                     f"baseline {m['baseline_rss_mb']:.0f} MB, {m['method']})")
    lines.append("")
    lines.append("targets")
    labels = {
        "pretrain_speedup_vs_lightly": "pretraining step vs lightly (x)",
        "roofline_fraction": "fraction of the bf16 matmul peak",
        "augment_speedup_224": "augmentation vs torchvision at 224 px (x)",
        "peak_memory_ratio_vs_lightly": "peak memory growth / lightly's",
        "memory_queue_overhead": "momentum memory + EMA overhead (fraction of step)",
    }
    for key, t in r["targets"].items():
        verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        lines.append(f"  {labels[key]:<52s}{_fmt(t['value'], '.3f'):>9s}   target {t['target']:<7s} {verdict}")
    load = env["load_average"] or []
    lines.append(f"(wall time {r['wall_seconds']:.0f} s; load average at the end "
                 f"{', '.join(f'{x:.1f}' for x in load)} on {env['cpu_count']} CPUs)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=None, help="source images per step (default 256, "
                        "--quick included: the targets are set at batch 256); each image gives two views")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds (default 6; 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 1)")
    parser.add_argument("--quick", action="store_true", help="few rounds, small augmentation batches (< 2 minutes)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--aug-seconds", type=float, default=None, help="timing budget per augmentation variant")
    parser.add_argument("--aug-repeats", type=int, default=None, help="interleaved windows per variant (median)")
    parser.add_argument("--aug-batch-32", type=int, default=None, help="default 256 (128 with --quick)")
    parser.add_argument("--aug-batch-224", type=int, default=None, help="default 64 (16 with --quick)")
    parser.add_argument("--ablate-malloc", action="store_true", help="also time our step with glibc's default "
                        "malloc policy (SIMCLRV2_MALLOC_TUNING=0, see simclrv2.training.runtime)")
    parser.add_argument("--verbose", "-v", action="store_true", help="progress on stderr")
    parser.add_argument("--worker", choices=("ours", "ours_memory", "lightly"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = dict(batch_size=256, steps=2 if quick else 6, warmup=1,
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
    if args.worker:
        worker_main(args.worker, args.batch_size)
        return
    results = run(args)
    print(render_table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
