"""Pretraining throughput on this machine: our SimCLRv2 step vs lightly's SimCLR, augmentation
vs torchvision, matrix-product peaks (roofline), peak memory, momentum-memory overhead.

A benchmark, not a test: it prints a table and writes JSON (``--out``); nothing is asserted.

What is measured, in ONE run on the same machine, same batch and the same number of steps:

* **ours**: the default pretraining step built the way ``pretrain()`` / ``PretrainTrainer`` build
  it -- ``setup_runtime`` (device, ``--precision auto``: fp32 on CPUs without native bf16, else
  bf16 autocast or fp32, whichever ``simclrv2.utils.precision_probe`` measures faster at this shape,
  recorded as ``precision_probe`` in the JSON; CPU allocator setting), ``create_model('r18_1x_sk0',
  image_size=32, num_proj_layers=3)`` (ResNet-18, CIFAR stem), ``Runtime.prepare_model``
  (channels_last), ``build_optimizer`` (LARS, pretrain defaults, sqrt-scaled lr for CIFAR-10),
  ``PretrainStep`` (both views in ONE forward, NT-Xent tau 0.1).  Timed on pre-made views (made
  once by our augmentation); the augmentation is timed separately (``two_views`` + layout at the
  same thread count, as ``PretrainTrainer.train_step`` runs it) and added for "incl. aug".
  No online probe (``num_classes=0``), like the peer.
* **ours compiled** (``ours_compiled``; ``--no-compiled`` leaves it out, and it is left out where no
  C++ compiler is found): the same step with the network wrapped in ``torch.compile``, as
  ``--compile`` runs it. Its first warm-up round pays the compilation (``first_warmup_round_s``);
  ``speedup_vs_eager`` is what ``--compile auto`` (``simclrv2.training.runtime.choose_compile``) is
  decided from.
* **ours + memory**: the same with ``--memory-size 4096``: EMA copy (decay 0.999), a forward of
  the EMA network on the default key views (``--memory-keys-fraction 0.25``: the second view of a
  quarter of the images), FIFO queue of 4096 negatives -- pre-filled, so the loss sees the
  steady-state 4096 extra columns from the first timed step.
* **ours, oneDNN convolutions** (``ours_native_conv``, on unless ``--no-ablate-conv-matmul``):
  our step with ``SIMCLRV2_CONV_MATMUL=native``, i.e. without the matrix-product convolution passes
  of :mod:`simclrv2.models.conv_matmul`. ``ours_speedup_from_matmul_conv`` is what those rules buy
  on the machine at hand (bf16 and fp32 on CPU; 1.0 where they do not apply). Result files written
  before the rename hold ``ours_native_weight_grad`` instead (weight gradients only).
* **lightly** (peer reference; ``pip install lightly``, reported as unavailable otherwise):
  torchvision ``resnet18`` with the same CIFAR stem (conv1 3x3/s1, maxpool and fc = Identity),
  lightly's ``SimCLRProjectionHead(512, 512, 128, num_layers=3)`` (our head's depth/width),
  ``NTXentLoss(temperature=0.1)``, fp32, default (NCHW) layout, one forward per view and
  SGD(lr 0.06, momentum 0.9, weight decay 5e-4) as in lightly's SimCLR examples/benchmarks.
* **lightly at its best** (``lightly_best``): the same, as a lightly user tunes it on a CPU:
  channels_last, plus bf16 autocast (Lightning's ``precision="bf16-mixed"``) where the CPU has
  native bf16; fp32 + channels_last where it does not (emulated bf16 is ~10x slower than fp32 on an
  AVX2 CPU). ``--peer-best`` forces either. ``pretrain_speedup_vs_lightly_best`` compares with the
  faster of the two lightly workers.

Each variant runs in its OWN worker process (so allocator state, caches and peak memory are its
own), all driven in lockstep by this process: one step at a time, never two at once.  After
``--warmup`` untimed rounds come ``--steps`` timed rounds; each round runs one step of every
variant, the augmentation and the matrix-product probes, in a rotating order, so that on a shared
machine all of them see the same background load.  Background load only ever ADDS time, so the
headline figures use the fastest round of each (``min``, as ``timeit`` recommends); medians and
every raw time are in the JSON.

Two phases. The main rounds time ``ours``, ``ours_memory``, both lightly workers, the augmentation
and the probes: the headline figures and every target. Then the ablations (``ours_compiled``,
``ours_native_conv``, the malloc variants) run one at a time, each in its own worker interleaved
round by round with ``ours`` alone, and each ratio is taken against ``ours`` in those same rounds
(``ours_beside_it``). Why not all at once: with six workers of about 3.5 GB alive on the 24-GB
``intel-avx512`` host, our step ran 8.13 s (fastest of 2 rounds) where it ran 6.94 s with four
(``--no-compiled --no-ablate-conv-matmul``), while lightly's steps were unchanged (11.28 vs 11.06 s):
a machine near its memory limit slowed one variant and not the other.

Roofline: FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one full step of
each network (its first warm-up step): forward + backward convolutions and matrix products;
BatchNorm, activations, the optimiser and other elementwise work are NOT counted (the usual
"model FLOPs"), on a step with every convolution oneDNN's plain one (``SIMCLRV2_CONV_MATMUL=native``
for that step), so the count does not depend on the algorithm. Where our step runs a 3x3
convolution by Winograd's F(4x4, 3x3) (:mod:`simclrv2.models.conv_winograd`) it executes a quarter
of its multiplications, plus the transforms'; a second counted step gives the FLOPs executed (``executed_gflop_per_step``,
``roofline.executed_fraction_of_best_kernel``), so the model-FLOP rate can exceed a kernel's rate
and the JSON says by how much. The im2col passes count the same FLOPs as oneDNN's
(``tests/test_conv_matmul.py``: the counter skips in-place ``addmm_``, so they use ``addmm(out=)``).
Kernel probes, timed in the same rounds:
``torch.mm`` on square matrices (2048, 4096; B row- and column-major) and forward 3x3 convolutions shaped like the network's four stages
(``CONV_PROBES``, channels_last), in bf16 (only where it is native) and fp32.
``roofline_fraction`` = our step's FLOP/s / the best rate of any probe (the best kernel the
machine showed in this run); ``theoretical_peak_fraction`` = our FLOP/s / (cores x clock x
FLOP/cycle of the ISA oneDNN uses: AVX2, AVX-512, AVX-512-BF16, AMX), see ``theoretical_peaks``.

Host: the JSON records CPU model/family/flags, threads, oneDNN version, ISA and the kernels it
picks (``amx_in_use``), torch version, the load average before and after, and the CPU time the
hypervisor stole from this virtual machine in each phase (``cpu_steal``). A run is marked BUSY
when other processes used more than 25% of the CPUs in the 3 s before it (``machine_busy_before``):
absolute times inflated, interleaved ratios less so. Results go
to ``results/throughput-<host kind>[-quick].json``, one file per host kind.

``--stages`` / ``--stages-only``: fine-tuning, distillation (teacher + student), evaluation and
prediction steps vs a plain fp32 PyTorch loop on the same network (``stage_benchmarks``).

Peak memory: each worker records its RSS after imports and input creation, resets the kernel's
high-water mark (``/proc/self/clear_refs``; ``ru_maxrss`` where that is not possible) and reports
the high-water mark after all its steps; the figure compared is the GROWTH over that baseline
(model, optimiser state, activations, allocator caches and fragmentation), so import sizes do
not count.

Usage::

    python benchmarks/throughput.py                 # batch 256, 6 timed rounds (several minutes)
    python benchmarks/throughput.py --quick         # batch 256, 2 timed rounds (minutes; more on AVX2)
    python benchmarks/throughput.py --stages-only --quick
    python benchmarks/throughput.py --batch-size 128 --steps 5 --warmup 1 --out /tmp/t.json
    python benchmarks/throughput.py --ablate-malloc # + our step with glibc's default malloc policy
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from augment_speed import format_case, measure_case  # noqa: E402  (sibling benchmark script)

from simclrv2.augment import AugmentConfig, SimCLRAugmentation  # noqa: E402
from simclrv2.config import build_config  # noqa: E402
from simclrv2.errors import ConfigError, SimCLRv2Error, TrainingError  # noqa: E402
from simclrv2.losses import NegativeQueue  # noqa: E402
from simclrv2.models import create_model  # noqa: E402
from simclrv2.models.conv_matmul import ENV_VAR as CONV_MATMUL_ENV  # noqa: E402
from simclrv2.training.pretrain import PretrainStep  # noqa: E402
from simclrv2.training.runtime import (available_memory, choose_precision, cpp_compiler, probe_shape,  # noqa: E402
                                       setup_runtime)
from simclrv2.training.trainer import build_optimizer, plan_steps  # noqa: E402
from simclrv2.utils.allocator import ENV_VAR as ALLOCATOR_ENV  # noqa: E402
from simclrv2.utils.allocator import allocator_in_use, preload_env  # noqa: E402
from simclrv2.utils.ema import ModelEMA  # noqa: E402

ARCH = "r18_1x_sk0"
IMAGE_SIZE = 32
QUEUE_SIZE = 4096
CIFAR_TRAIN_SIZE = 50_000  # only sets the (sqrt-scaled) learning rate, as a CIFAR-10 run would
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPLY = "@@"  # prefix of worker replies on stdout (anything else a library prints is ignored)

TARGETS = {
    "pretrain_speedup_vs_lightly": (">=", 3.0),
    "pretrain_speedup_vs_lightly_best": (">=", 1.5),
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


def our_config(memory_size: int = 0, batch: int | None = None):
    """A ``simclrv2 pretrain`` config at the benchmark's shape (so ``--precision auto`` sees it, as a run does)."""
    flags = {"arch": ARCH, "device": "cpu", "memory_size": memory_size, "image_size": IMAGE_SIZE}
    return build_config("pretrain", flag_values={**flags, **({"batch_size": batch} if batch else {})})


class OursAugment:
    """Our augmentation as ``PretrainTrainer.train_step`` runs it: two views, then the layout."""

    def __init__(self, batch: int, seed: int = 0) -> None:
        cfg = our_config(batch=batch)
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

    def __init__(self, batch: int, views: torch.Tensor, memory_size: int = 0, seed: int = 0,
                 compiled: bool = False) -> None:
        cfg = our_config(memory_size, batch)
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
        # ``compiled``: the network wrapped in torch.compile after the optimiser is built, as
        # ``Trainer.compile_if_chosen`` does (``--compile``); the first warm-up round pays the compilation.
        model = torch.compile(net) if compiled else net
        self.step_fn = PretrainStep(model, self.optimizer, rt, temperature=cfg.temperature,
                                    weight_decay=cfg.weight_decay or 0.0, ema=ema, queue=queue,
                                    memory_keys_fraction=cfg.memory_keys_fraction)
        self.views = rt.layout(views.to(device))
        self.labels = torch.full((batch,), -1, dtype=torch.long, device=device)

    def step(self) -> float:
        return float(self.step_fn(self.views, self.labels)["loss"])


class Lightly:
    """lightly's SimCLR on torchvision resnet18 with the CIFAR stem (see the module docstring)."""

    def __init__(self, batch: int, views: torch.Tensor, seed: int = 0, best: str | None = None) -> None:
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
        # "best": what a lightly user tunes on a CPU -- channels_last (one ``.to(memory_format=...)``)
        # and, where bf16 is native, bf16 autocast (Lightning's ``precision="bf16-mixed"``).
        fmt = torch.channels_last if best else torch.contiguous_format
        self.model = self.model.to(memory_format=fmt)
        self.autocast_dtype = torch.bfloat16 if best == "bf16" else None
        self.x0 = views[:batch].contiguous(memory_format=fmt)
        self.x1 = views[batch:].contiguous(memory_format=fmt)

    def step(self) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast_dtype is not None):
            z0 = self.model(self.x0)
            z1 = self.model(self.x1)
        loss = self.criterion(z0.float(), z1.float())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return float(loss.detach())


# ---- worker processes (one per variant) ----------------------------------------------------------

def _proc_status_kib(pid: int | str = "self") -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of a process (a worker's own, or the parent reading a worker's), in KiB."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
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


@contextlib.contextmanager
def _conv_matmul_env(value: str | None) -> Iterator[None]:
    """``SIMCLRV2_CONV_MATMUL`` set to ``value`` for the block (None: left as it is); the rules read it per call."""
    old = os.environ.get(CONV_MATMUL_ENV)
    if value is not None:
        os.environ[CONV_MATMUL_ENV] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(CONV_MATMUL_ENV, None)
        else:
            os.environ[CONV_MATMUL_ENV] = old


def worker_main(variant: str, batch: int, peer_best: str = "bf16") -> None:
    """Serve ``step`` / ``flops`` / ``quit`` requests on stdin for one variant; reply on stdout."""
    import gc

    def reply(obj: dict[str, Any]) -> None:
        try:
            sys.stdout.write(REPLY + json.dumps(obj) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:  # the parent has gone (it reports why): nothing is left to answer
            os._exit(1)

    peer = variant.startswith("lightly")
    if peer:
        import lightly  # noqa: F401  (imported before the memory baseline)
        import torchvision  # noqa: F401
    # The same views in every worker: our augmentation of the same seeded images.
    views = OursAugment(batch)() if not peer else None
    if views is None:  # lightly's worker makes them without touching our runtime settings
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (batch, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8, generator=gen)
        aug = SimCLRAugmentation(AugmentConfig.for_pretraining(IMAGE_SIZE))
        views = aug.two_views(images, torch.Generator().manual_seed(0))
    gc.collect()
    base_kib = _proc_status_kib().get("VmRSS")
    reset = _reset_peak_rss()
    if peer:
        runner: Ours | Lightly = Lightly(batch, views, best=peer_best if variant == "lightly_best" else None)
    else:
        runner = Ours(batch, views, memory_size=QUEUE_SIZE if variant == "ours_memory" else 0,
                      compiled=variant == "ours_compiled")
    allocator = runner.rt.allocator if isinstance(runner, Ours) else allocator_in_use()
    reply({"ready": True, "threads": torch.get_num_threads(), "allocator": allocator})
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            start = time.perf_counter()
            loss = runner.step()
            reply({"seconds": time.perf_counter() - start, "loss": loss})
        elif cmd == "flops":
            from torch.utils.flop_counter import FlopCounterMode

            # "flops", the model FLOPs: a step with every convolution oneDNN's plain one, so that an
            # algorithm doing fewer multiplications (Winograd, simclrv2.models.conv_winograd) does not
            # change the count; then, for our variants, "executed_flops": the step as it runs.
            counts: dict[str, int] = {}
            for key, native in (("flops", True),) + ((("executed_flops", False),) if not peer else ()):
                start = time.perf_counter()
                with _conv_matmul_env("native" if native else None), FlopCounterMode(display=False) as counter:
                    loss = runner.step()
                counts[key] = int(counter.get_total_flops())
            reply({"seconds": time.perf_counter() - start, "loss": loss, **counts})
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


#: Ablation workers: our step with the environment variables that undo one of our settings.
ABLATIONS = {
    # glibc's default malloc policy: no tcmalloc, freed blocks not kept
    "ours_glibc": {ALLOCATOR_ENV: "glibc", "SIMCLRV2_MALLOC_TUNING": "0"},
    # glibc keeping freed blocks (runtime.keep_freed_cpu_memory): what runs where tcmalloc is not installed
    "ours_glibc_kept": {ALLOCATOR_ENV: "glibc"},
    "ours_native_conv": {CONV_MATMUL_ENV: "native"},  # oneDNN for every pass of every convolution
}


class WorkerDied(TrainingError):
    """A worker process ended before answering (``main`` reports it in one line, exit code 1)."""


class Worker:
    """Parent-side handle of a worker process."""

    def __init__(self, variant: str, batch: int, threads: int | None, peer_best: str = "bf16") -> None:
        env = {**os.environ, **ABLATIONS.get(variant, {})}  # an ablation: one of our settings undone
        if not variant.startswith("lightly"):
            # our workers start as the ``simclrv2`` command does: under tcmalloc where it is installed
            env = preload_env(env) or env
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "ours" if variant in ABLATIONS else variant,
               "--batch-size", str(batch), "--peer-best", peer_best]
        if threads:
            cmd += ["--threads", str(threads)]
        self.variant = variant
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                     env=env)
        self.flops: int | None = None
        self.executed_flops: int | None = None
        self.last_loss = math.nan
        self.info: dict[str, Any] = {}

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
        code = self.proc.wait()
        why = (f"killed by signal {-code}" + (" (SIGKILL: most often the kernel's out-of-memory killer; "
                                              "see dmesg, and try a smaller --batch-size)" if code == -9 else "")
               if code < 0 else f"exited with code {code} (see its stderr above)")
        raise WorkerDied(f"worker {self.variant!r} {why}")

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
            self.executed_flops = out.get("executed_flops", out["flops"])
        return out

    def step(self) -> float:
        return self.request("step")["seconds"]

    def rss_mb(self) -> dict[str, float]:
        """This worker's current and peak resident memory (``VmRSS``, ``VmHWM``), read by the parent."""
        return {k: v / 1024 for k, v in _proc_status_kib(self.proc.pid).items()}

    def stop(self) -> None:
        """End the worker without its memory report (a variant left out for lack of memory)."""
        self.proc.kill()
        self.proc.wait(timeout=60)

    def step_counting_flops(self) -> float:
        return self.request("flops")["seconds"]

    def finish(self) -> dict[str, Any]:
        out = self.request("quit")
        self.proc.wait(timeout=60)
        return out


# ---- memory: leave out what does not fit before anything is killed -----------------------------

#: Variants a target needs, in the order they are kept; the others are left out first, last first.
REQUIRED_VARIANTS = ("ours", "lightly", "lightly_best", "ours_memory")
#: Each other worker is assumed to grow by this multiple of the first step's growth of ``ours``
#: (``ours_compiled`` grew 1.13x, ``ours_memory`` 1.06x on the amd-avx2 host at batch 256, fp32).
GROWTH_MARGIN = 1.15
#: Memory kept free for this process, the probes and the page cache.
RESERVE_MB = 768


def memory_needed_mb(first_growth_mb: float, workers: int) -> float:
    """What ``workers`` more workers need, each growing by about ``GROWTH_MARGIN`` x ours, plus the reserve."""
    return GROWTH_MARGIN * first_growth_mb * workers + RESERVE_MB


def plan_memory(first_growth_mb: float, others: list[str], available_mb: float,
                baseline_mb: dict[str, float]) -> tuple[list[str], list[str], float, float]:
    """Which of ``others`` (workers not yet stepped) fit in ``available_mb`` once each grows by about
    ``GROWTH_MARGIN`` x ``first_growth_mb``; optional variants are left out (last first) until they
    fit, and a left-out worker also gives back its baseline. Returns (kept, left out, MB needed, MB
    free once the left-out workers are gone); the required variants do not fit where needed > free."""
    kept = list(others)
    left_out: list[str] = []

    free = available_mb
    while memory_needed_mb(first_growth_mb, len(kept)) > free:
        optional = [n for n in kept if n not in REQUIRED_VARIANTS]
        if not optional:
            break
        kept.remove(optional[-1])
        left_out.append(optional[-1])
        free += baseline_mb.get(optional[-1], 0.0)
    return kept, left_out, memory_needed_mb(first_growth_mb, len(kept)), free


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


#: Convolution probes shaped like the network's own 3x3 convolutions (ResNet-18, CIFAR stem, 32 px):
#: (name, batch, channels, side). Batches are kept small enough for a probe to take ~0.05-0.3 s.
CONV_PROBES = (("layer1_64x32", 64, 64, 32), ("layer2_128x16", 64, 128, 16),
               ("layer3_256x8", 256, 256, 8), ("layer4_512x4", 256, 512, 4))


def conv_probe(batch: int, channels: int, side: int, dtype: torch.dtype) -> tuple[Callable[[], None], int]:
    """Forward 3x3 convolution, stride 1, channels_last (the layout our step uses); returns (fn, FLOPs)."""
    gen = torch.Generator().manual_seed(channels)
    x = torch.randn(batch, channels, side, side, generator=gen).to(dtype).contiguous(
        memory_format=torch.channels_last)
    w = torch.randn(channels, channels, 3, 3, generator=gen).to(dtype).contiguous(
        memory_format=torch.channels_last)
    return (lambda: F.conv2d(x, w, padding=1)), 2 * batch * channels * channels * 9 * side * side


def interleaved(fns: dict[str, Callable[[], float]], warmup: int, rounds: int,
                log: Callable[[str], None] | None = None,
                first_call: dict[str, Callable[[], float]] | None = None,
                warmup_times: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Seconds of each function per round (each returns its own time), rotating the order.

    ``first_call[name]`` replaces the very first call of ``name`` (its first warm-up call; used
    to count FLOPs on a call that is not timed anyway). ``warmup_times``, when given, receives the
    untimed rounds' seconds (a compiled variant's first round is its compilation)."""
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
            elif warmup_times is not None:
                warmup_times.setdefault(name, []).append(last[name])
        if log is not None:
            done = ", ".join(f"{n} {last[n]:.2f}s" for n in names if not n.startswith(("mm_", "conv_")))
            log(f"  round {r + 1}/{warmup + rounds}{' (warm-up)' if r < warmup else ''}: {done}")
    return times


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[i] / den[i] (adjacent measurements share the background load)."""
    return statistics.median(a / b for a, b in zip(num, den))


def stats(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


# ---- the other stages (fine-tune, distil, evaluate, predict) vs a plain PyTorch fp32 loop ----------

def stage_benchmarks(batch: int, rounds: int) -> dict[str, Any]:
    """Images/s of one step (or one inference batch) of each later stage, built from the same pieces
    the stage uses (``setup_runtime``/``make_runtime``, ``prepare_model``, ``build_optimizer``,
    autocast, ``optimizer_step``, ``mixed_distillation_loss``), against a plain PyTorch loop on the
    same network: fp32, NCHW, ``torch.optim.SGD``, ``F.cross_entropy`` and PyTorch's own convolutions
    (``SIMCLRV2_CONV_MATMUL=native`` for its steps: our layers' matrix-product and Winograd passes are
    part of what is compared). Pre-made inputs (no data
    loading or augmentation); interleaved round by round in this process; fastest round.
    Prediction uses ``simclrv2.inference.runner.make_runtime`` (what ``simclrv2 predict`` runs);
    its model forward is the network's eval forward, as here."""
    from simclrv2.inference.runner import make_runtime
    from simclrv2.losses import mixed_distillation_loss
    from simclrv2.training.runtime import eval_mode
    from simclrv2.training.trainer import optimizer_step

    def stage_config(stage: str):
        # The stage's own defaults; the paths are placeholders, never opened (check_paths=False).
        return build_config(stage, flag_values={"arch": ARCH, "device": "cpu", "data": "digits",
                                                "checkpoint": "unused", "teacher": "unused"}, check_paths=False)

    classes = 10
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    y = torch.randint(0, classes, (batch,), generator=gen)

    def net(proj: int = 0) -> nn.Module:
        torch.manual_seed(0)
        return create_model(ARCH, image_size=IMAGE_SIZE, num_proj_layers=proj, num_classes=classes)

    def ours_train(stage: str, distill: bool) -> Callable[[], None]:
        cfg = stage_config(stage)
        rt = setup_runtime(cfg)
        student = rt.prepare_model(net(0 if distill else cfg.num_proj_layers))
        opt = build_optimizer(cfg, student, 0.1)
        scaler = rt.grad_scaler()
        teacher = rt.prepare_model(net(3)).eval().requires_grad_(False) if distill else None
        xin = rt.layout(x)

        def step() -> None:
            with rt.autocast():
                logits = student(xin)["logits"]
                if teacher is not None:
                    with torch.no_grad():
                        t_logits = teacher(xin)["logits"]
            loss = (mixed_distillation_loss(logits, t_logits, y, 0.1, 1.0) if teacher is not None
                    else F.cross_entropy(logits.float(), y))
            optimizer_step(loss, opt, scaler)
        return step

    def plain_train(distill: bool) -> Callable[[], None]:
        student = net(0 if distill else 3)
        opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
        teacher = net(3).eval().requires_grad_(False) if distill else None

        def step() -> None:
            with _conv_matmul_env("native"):   # PyTorch's own convolutions (our network's layers would not be)
                logits = student(x)["logits"]
                if teacher is not None:
                    with torch.no_grad():
                        target = F.softmax(teacher(x)["logits"] / 0.1, dim=1)
                    loss = -(target * F.log_softmax(logits / 0.1, dim=1)).sum(1).mean()
                else:
                    loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return step

    def ours_infer(rt) -> Callable[[], None]:
        model = rt.prepare_model(net(3))
        xin = rt.layout(x)

        def forward() -> None:
            with eval_mode(model), torch.no_grad(), rt.autocast():
                model(xin)["logits"].float()
        return forward

    def plain_infer() -> Callable[[], None]:
        model = net(3).eval()

        def forward() -> None:
            with torch.no_grad(), _conv_matmul_env("native"):
                model(x)["logits"]
        return forward

    eval_rt = setup_runtime(stage_config("evaluate"))
    fns = {"finetune_ours": timed(ours_train("finetune", False)), "finetune_plain": timed(plain_train(False)),
           "distill_ours": timed(ours_train("distill", True)), "distill_plain": timed(plain_train(True)),
           "evaluate_ours": timed(ours_infer(eval_rt)), "evaluate_plain": timed(plain_infer()),
           "predict_ours": timed(ours_infer(make_runtime("cpu", "auto"))), "predict_plain": timed(plain_infer())}
    times = interleaved(fns, 1, rounds)
    out: dict[str, Any] = {"batch": batch, "rounds": rounds, "image_size": IMAGE_SIZE, "arch": ARCH,
                           "precision": eval_rt.precision,
                           "plain": "fp32, NCHW, SGD, F.cross_entropy, oneDNN convolutions (SIMCLRV2_CONV_MATMUL=native)",
                           "statistic": "min over rounds"}
    for stage in ("finetune", "distill", "evaluate", "predict"):
        ours, plain = min(times[f"{stage}_ours"]), min(times[f"{stage}_plain"])
        out[stage] = {"ours_images_per_s": batch / ours, "plain_fp32_images_per_s": batch / plain,
                      "speedup": plain / ours, "paired_median_speedup":
                      paired_ratio(times[f"{stage}_plain"], times[f"{stage}_ours"])}
    return out


# ---- environment ------------------------------------------------------------------------------

def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_name() -> str:
    return _cpuinfo().get("model name") or platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    flags = set(_cpuinfo().get("flags", "").split())
    return sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2", "avx512_vnni"})


def onednn_isa() -> dict[str, Any]:
    """What oneDNN reports and which kernels it picks for a bf16 and an fp32 convolution and matmul,
    read from ``ONEDNN_VERBOSE=1`` in a fresh process (so this process's settings are untouched).
    ``amx_in_use`` is True only when a kernel name contains ``amx``."""
    code = ("import torch, torch.nn.functional as F\n"
            "for dt in (torch.float32, torch.bfloat16):\n"
            "    x = torch.randn(4, 64, 8, 8).to(dt).contiguous(memory_format=torch.channels_last)\n"
            "    w = torch.randn(64, 64, 3, 3).to(dt).contiguous(memory_format=torch.channels_last)\n"
            "    F.conv2d(x, w, padding=1)\n"
            "    a = torch.randn(64, 64).to(dt); torch.mm(a, a)\n")
    env = {**os.environ, "ONEDNN_VERBOSE": "1"}
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             timeout=120).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": str(exc)}
    isa = re.search(r"cpu,isa:([^\n]+)", out)
    version = re.search(r"info,(oneDNN v[\d.]+)", out)
    kernels: dict[str, set[str]] = {}
    for m in re.finditer(r"primitive,exec,cpu,(convolution|matmul|inner_product),([^,]+),[^,]*,src:(\w+)", out):
        kernels.setdefault(f"{m.group(1)}_{m.group(3)}", set()).add(m.group(2))
    impl = {k: sorted(v) for k, v in kernels.items()}
    return {"isa": isa.group(1).strip() if isa else None, "version": version.group(1) if version else None,
            "kernels": impl, "amx_in_use": any("amx" in k for v in impl.values() for k in v),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkldnn_available": torch.backends.mkldnn.is_available()}


def theoretical_peaks(info: dict[str, str], flags: list[str], threads: int, amx: bool) -> dict[str, Any]:
    """cores x clock x FLOP/cycle/core for fp32 FMA and the best bf16 path, where ISA and clock are known.

    FLOP/cycle/core (two FMA pipes): AVX2 32 fp32; AVX-512 64 fp32 (Intel), 32 on AMD Zen 4 (512-bit
    ops split in two); AVX-512-BF16 ``vdpbf16ps`` twice the fp32 rate; AMX-BF16 1024 (Intel's figure
    for Sapphire Rapids). The clock is /proc/cpuinfo's ``cpu MHz`` -- under a hypervisor that is the
    nominal clock; turbo may run higher, so the fractions can exceed what the silicon can sustain."""
    mhz = float(info.get("cpu MHz", "nan") or "nan")
    vendor = info.get("vendor_id", "")
    family = int(info.get("cpu family", "0") or 0)
    if "avx512f" in flags:
        fp32 = 32 if (vendor == "AuthenticAMD" and family == 25) else 64
    elif "avx2" in flags:
        fp32 = 32
    else:
        fp32 = None
    bf16 = 1024 if amx else (2 * fp32 if fp32 and "avx512_bf16" in flags else None)
    ghz = mhz / 1000 if mhz == mhz else None
    peak = (lambda per: threads * ghz * per if per and ghz else None)
    return {"clock_ghz": ghz, "clock_source": "/proc/cpuinfo cpu MHz", "cores_used": threads,
            "fp32_flop_per_cycle": fp32, "bf16_flop_per_cycle": bf16,
            "fp32_peak_gflops": peak(fp32), "bf16_peak_gflops": peak(bf16),
            "bf16_note": None if bf16 else "no native bf16 (bf16 is emulated via fp32 and slower)"}


def amx_permission() -> dict[str, Any]:
    """Whether Linux lets this process use the AMX tile registers, and what could stop oneDNN from
    using AMX (issue 17: a host with AMX flags where oneDNN reported AVX-512). Since Linux 5.16 a
    process must ask for the tile-data state with ``arch_prctl(ARCH_REQ_XCOMP_PERM, 18)``; oneDNN asks
    itself, and falls back to AVX-512 when the kernel (or a hypervisor hiding XFD) refuses.
    ``ONEDNN_MAX_CPU_ISA`` / ``DNNL_MAX_CPU_ISA`` cap the ISA too."""
    caps = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA") if k in os.environ}
    if platform.machine() != "x86_64" or not sys.platform.startswith("linux"):
        return {"granted": None, "isa_cap_env": caps, "note": "not x86-64 Linux"}
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata = 158, 0x1023, 18  # <asm/prctl.h>
        rc = libc.syscall(sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata)
        errno = ctypes.get_errno()
    except (OSError, AttributeError) as exc:
        return {"granted": None, "isa_cap_env": caps, "note": f"could not ask: {exc}"}
    return {"granted": rc == 0, "errno": None if rc == 0 else errno, "isa_cap_env": caps,
            "note": "arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) " + ("granted" if rc == 0 else
                                                                     f"refused (errno {errno})")}


def host_info(threads: int) -> dict[str, Any]:
    info = _cpuinfo()
    flags = cpu_flags()
    dnn = onednn_isa()
    vendor = {"AuthenticAMD": "amd", "GenuineIntel": "intel"}.get(info.get("vendor_id", ""), "cpu")
    if dnn.get("amx_in_use"):
        isa_kind = "amx"
    elif "avx512_bf16" in flags:
        isa_kind = "avx512bf16" + ("-amx-unused" if "amx_bf16" in flags else "")
    elif "avx512f" in flags:
        isa_kind = "avx512"
    else:
        isa_kind = "avx2" if "avx2" in flags else "generic"
    return {"host_kind": f"{vendor}-{isa_kind}", "cpu": cpu_name(), "vendor": info.get("vendor_id"),
            "cpu_family": info.get("cpu family"), "cpu_model_number": info.get("model"),
            "cpu_count": os.cpu_count(), "threads": threads, "cpu_flags": flags, "onednn": dnn,
            "amx_permission": amx_permission() if "amx_tile" in flags else None,
            "native_bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
            "theoretical": theoretical_peaks(info, flags, threads, bool(dnn.get("amx_in_use")))}


def _proc_stat_cpu() -> list[int] | None:
    """The jiffies of ``/proc/stat``'s all-CPU line (user, nice, system, idle, iowait, irq, softirq,
    steal, ...); None off Linux."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies over all CPUs from ``/proc/stat`` (None off Linux)."""
    fields = _proc_stat_cpu()
    if fields is None:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def cpu_steal_ticks() -> tuple[int, int] | None:
    """(steal, total) jiffies over all CPUs from ``/proc/stat``: on a virtual machine, the time the
    hypervisor ran something else on this guest's CPUs (None off Linux or where not reported)."""
    fields = _proc_stat_cpu()
    return (fields[7], sum(fields)) if fields is not None and len(fields) > 7 else None


def steal_fraction(start: tuple[int, int] | None, end: tuple[int, int] | None) -> float | None:
    """The fraction of CPU time stolen by the hypervisor between two :func:`cpu_steal_ticks` readings."""
    if start is None or end is None or end[1] <= start[1]:
        return None
    return round((end[0] - start[0]) / (end[1] - start[1]), 4)


def other_cpu_use(seconds: float = 3.0) -> float | None:
    """The fraction of all CPUs busy while this process sleeps for ``seconds``: what other processes
    use right before a benchmark starts. The 1-minute load average lags by minutes (a benchmark that
    just ended still shows as load), so the busy verdict (``machine_busy_before``) comes from this."""
    start = _cpu_ticks()
    time.sleep(seconds)
    end = _cpu_ticks()
    if start is None or end is None or end[1] <= start[1]:
        return None
    return round((end[0] - start[0]) / (end[1] - start[1]), 3)


#: Other processes using more than this fraction of all CPUs before a run make it BUSY.
BUSY_CPU_FRACTION = 0.25


def machine_busy_before(load_before: list[float] | None) -> tuple[bool, float | None, str]:
    """(busy, measured fraction, how decided): from :func:`other_cpu_use` where ``/proc/stat`` exists,
    else from the 1-minute load average above half the CPU count."""
    used = other_cpu_use()
    if used is not None:
        return used > BUSY_CPU_FRACTION, used, (f"other processes used {100 * used:.0f}% of the CPUs in the 3 s "
                                                f"before the run (BUSY above {100 * BUSY_CPU_FRACTION:.0f}%)")
    busy = bool(load_before and load_before[0] > 0.5 * (os.cpu_count() or 1))
    return busy, None, "1-minute load average before the run (BUSY above half the CPU count)"


def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


# ---- main -------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.verbose else (lambda msg: None)
    batch = args.batch_size
    load_before = load_average()
    busy, cpu_used_before, busy_rule = machine_busy_before(load_before)
    threads_now = args.threads or torch.get_num_threads()
    host = host_info(threads_now)
    native_bf16 = host["native_bf16"]
    # The peer at its best: bf16 autocast + channels_last where bf16 is native; elsewhere bf16 is
    # emulated (~10x slower than fp32 on an AVX2 CPU), so its best is fp32 + channels_last.
    peer_best = args.peer_best if args.peer_best != "auto" else ("bf16" if native_bf16 else "fp32")
    peer_version = lightly_version()
    # What --precision auto picks for this shape (a short probe only where bf16 is native; it is cached,
    # so the workers below find the same answer instead of probing at the same time).
    probe_cfg = our_config(batch=batch)
    probe = choose_precision(probe_cfg.precision, torch.device("cpu"), probe_shape(probe_cfg))
    say(f"precision auto: {probe.describe()}")
    variants = ["ours", "ours_memory"] + (["lightly", "lightly_best"] if peer_version else [])
    compiled = args.compiled if args.compiled is not None else cpp_compiler() is not None
    # The ablations run after the main rounds, one at a time beside ``ours`` (module docstring: two phases).
    ablations = (["ours_compiled"] if compiled else []) + (["ours_native_conv"] if args.ablate_conv_matmul else []) \
        + (["ours_glibc_kept", "ours_glibc"] if args.ablate_malloc else [])
    say(f"starting workers: {', '.join(variants)} (batch {batch}) ...")
    workers = {v: Worker(v, batch, args.threads, peer_best) for v in variants}
    augment = OursAugment(batch)  # this process gets the same runtime settings as our worker
    threads = torch.get_num_threads()
    for w in workers.values():
        w.ready()
    phases: dict[str, float] = {"start": time.perf_counter() - t_start}

    fns: dict[str, Callable[[], float]] = {name: w.step for name, w in workers.items()}
    fns["augment"] = timed(augment)
    mm_sizes = [2048] if args.quick else [2048, 4096]
    # Kernel probes in every precision that can be fast here (bf16 only where it is native: emulated
    # bf16 matmuls run at < 1 GFLOP/s on an AVX2 CPU and would take minutes per probe).
    probe_dtypes = ((torch.bfloat16, "bf16"), (torch.float32, "fp32")) if native_bf16 else \
        ((torch.float32, "fp32"),)
    probe_flops: dict[str, int] = {}
    for dt, tag in probe_dtypes:
        for n in mm_sizes:
            for col in (False, True):
                name = f"mm_{tag}_{n}_{'nt' if col else 'nn'}"
                fns[name] = timed(matmul_probe(n, dt, col))
                probe_flops[name] = 2 * n**3
        for label, pb, pc, ps in CONV_PROBES:
            fn, flops = conv_probe(pb, pc, ps, dt)
            fns[f"conv_{tag}_{label}"] = timed(fn)
            probe_flops[f"conv_{tag}_{label}"] = flops
    emulated_bf16 = None
    if not native_bf16:  # one small probe, once, to show why bf16 is not used here
        fn, flops = conv_probe(16, 256, 8, torch.bfloat16)
        fn()
        emulated_bf16 = {"shape": "layer3_256x8 at batch 16, fwd, channels_last",
                         "gflops": flops / min(timed(fn)() for _ in range(2)) / 1e9}

    # Our first step (untimed, counting FLOPs) shows how much a worker grows at this batch; the
    # variants that would not fit in the memory left are left out before any of them is stepped
    # (six fp32 workers at batch 256 need ~30 GB: the kernel would kill one mid-run).
    base_rss = {name: w.rss_mb().get("VmRSS", 0.0) for name, w in workers.items()}
    workers["ours"].step_counting_flops()
    first_growth = workers["ours"].rss_mb().get("VmHWM", 0.0) - base_rss["ours"]
    available_bytes = available_memory(torch.device("cpu"))
    left_out: dict[str, str] = {}
    if available_bytes is not None:
        available = available_bytes / 2**20
        others = [n for n in workers if n != "ours"]
        kept, dropped, needed, free = plan_memory(first_growth, others, available, base_rss)
        why = (f"left out for memory: our first step grew its worker by {first_growth:.0f} MB; "
               f"{len(others)} more workers would need about {memory_needed_mb(first_growth, len(others)):.0f} MB, "
               f"{available:.0f} MB was available ({needed:.0f} MB once the {len(dropped)} left out are gone)")
        for name in dropped:
            workers.pop(name).stop()
            fns.pop(name)
            left_out[name] = why
            say(f"{name} {why}")
        if needed > free:
            for w in workers.values():
                w.stop()
            raise ConfigError(
                f"batch {batch}: our first step grew its worker by {first_growth:.0f} MB, so the "
                f"{len(kept)} other workers needed ({', '.join(kept)}) would take about {needed:.0f} MB and "
                f"{available:.0f} MB is available; use a smaller --batch-size (memory grows about "
                "linearly with it)")
    # FLOPs are counted on the first (warm-up) step of each network; separately when --warmup 0.
    counting = {name: w.step_counting_flops for name, w in workers.items() if name == "lightly"}
    t_phase = time.perf_counter()
    say(f"{args.warmup} warm-up + {args.steps} timed rounds of {', '.join(fns)} ...")
    warmup_times: dict[str, list[float]] = {}
    steal_start = cpu_steal_ticks()
    times = interleaved(fns, args.warmup, args.steps, log=say, first_call=counting if args.warmup else None,
                        warmup_times=warmup_times)
    steal = {"main_rounds": steal_fraction(steal_start, cpu_steal_ticks())}
    phases["rounds"] = time.perf_counter() - t_phase
    for name, w in workers.items():
        if name in counting and w.flops is None:
            w.step_counting_flops()
    memory = {name: w.finish() for name, w in workers.items() if name != "ours"}
    losses = {name: w.last_loss for name, w in workers.items()}
    peer = "lightly" in workers

    # Ablation phase: each ablation in its own worker, interleaved round by round with ``ours`` alone,
    # once the main rounds' other workers have ended (module docstring: two phases).
    t_phase = time.perf_counter()
    steal_start = cpu_steal_ticks()
    ablation_times: dict[str, dict[str, list[float]]] = {}
    for name in ablations:
        available_bytes = available_memory(torch.device("cpu"))
        needed = memory_needed_mb(first_growth, 1)
        if available_bytes is not None and needed > available_bytes / 2**20:
            left_out[name] = (f"left out for memory: its worker would need about {needed:.0f} MB beside ours, "
                              f"{available_bytes / 2**20:.0f} MB was available")
            say(f"{name} {left_out[name]}")
            continue
        say(f"ablation {name}: {args.warmup} warm-up + {args.steps} timed rounds beside ours ...")
        worker = Worker(name, batch, args.threads, peer_best)
        worker.ready()
        pair_warmup: dict[str, list[float]] = {}
        ablation_times[name] = interleaved({"ours": workers["ours"].step, name: worker.step}, args.warmup,
                                           args.steps, log=say, warmup_times=pair_warmup)
        warmup_times[name] = pair_warmup.get(name, [])
        memory[name] = worker.finish()
        losses[name] = worker.last_loss
        workers[name] = worker
    phases["ablations"] = time.perf_counter() - t_phase
    steal["ablations"] = steal_fraction(steal_start, cpu_steal_ticks()) if ablations else None
    memory["ours"] = workers["ours"].finish()
    losses["ours"] = workers["ours"].last_loss

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
    rates = {name: [probe_flops[name] / t / 1e9 for t in times[name]] for name in probe_flops}
    probes = {name: {"best_gflops": max(r), "median_gflops": statistics.median(r)} for name, r in rates.items()}
    best_kernel: dict[str, Any] = {}
    for _, tag in probe_dtypes:
        mine = {k: v for k, v in probes.items() if k.split("_")[1] == tag}
        top = max(mine, key=lambda k: mine[k]["best_gflops"])
        best_kernel[tag] = {"gflops": mine[top]["best_gflops"], "at": top,
                            "median_gflops": max(v["median_gflops"] for v in mine.values())}
    top_tag = max(best_kernel, key=lambda t: best_kernel[t]["gflops"])
    best_rate = best_kernel[top_tag]["gflops"]
    achieved = flops_ours / best["ours"] / 1e9
    achieved_median = flops_ours / med["ours"] / 1e9
    executed_ours = workers["ours"].executed_flops or flops_ours
    achieved_executed = executed_ours / best["ours"] / 1e9
    roofline = achieved / best_rate
    theo = host["theoretical"]
    theo_peak = theo["bf16_peak_gflops"] if augment.rt.precision == "bf16" else theo["fp32_peak_gflops"]
    peer_names = [n for n in ("lightly", "lightly_best") if n in workers]
    peer_fastest = min(peer_names, key=lambda n: best[n]) if peer_names else None
    load_after = load_average()

    results: dict[str, Any] = {
        "pretrain_speedup_vs_lightly": best["lightly"] / best["ours"] if peer else None,
        "pretrain_speedup_vs_lightly_best": best[peer_fastest] / best["ours"] if peer else None,
        "roofline_fraction": roofline,
        "theoretical_peak_fraction": achieved / theo_peak if theo_peak else None,
        "augment_speedup_224": aug224["speedup"],
        "augment_speedup_32": aug32["speedup"],
        "peak_memory_ratio_vs_lightly": (memory["ours"]["growth_mb"] / memory["lightly"]["growth_mb"]
                                         if peer else None),
        "peak_memory_ratio_vs_lightly_best": (memory["ours"]["growth_mb"] / memory["lightly_best"]["growth_mb"]
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
        "pretrain_speedup_best_paired_median": (paired_ratio(times[peer_fastest], times["ours"])
                                                if peer else None),
        "memory_queue_overhead_ratio_of_medians": med["ours_memory"] / med["ours"] - 1.0,
        "memory_queue_overhead_paired_median": paired_ratio(times["ours_memory"], times["ours"]) - 1.0,
        "roofline_fraction_medians": achieved_median / best_kernel[top_tag]["median_gflops"],
    }
    cfg = our_config()
    results["config"] = {
        "arch": ARCH, "image_size": IMAGE_SIZE, "batch_size": batch, "views_per_step": 2 * batch,
        "steps": args.steps, "warmup": args.warmup, "quick": args.quick, "threads": threads,
        "precision": augment.rt.precision, "channels_last": augment.rt.channels_last,
        "allocator": workers["ours"].info.get("allocator"),
        "allocators": {name: w.info.get("allocator") for name, w in workers.items()},
        "optimizer": cfg.optimizer, "temperature": cfg.temperature, "queue_size": QUEUE_SIZE,
        "ema_decay": cfg.ema_decay, "statistic": "min over timed rounds",
        "peer_best": f"lightly {peer_best} {'autocast ' if peer_best == 'bf16' else ''}+ channels_last",
    }
    results["environment"] = {
        "torch": torch.__version__, "python": platform.python_version(), "cpu": host["cpu"],
        "cpu_count": os.cpu_count(), "cpu_flags": host["cpu_flags"], "lightly": peer_version,
        "host_kind": host["host_kind"], "host": host,
        "load_average": load_after, "load_average_before": load_before, "load_average_after": load_after,
        "machine_busy": busy, "other_cpu_use_before": cpu_used_before, "busy_rule": busy_rule,
        "cpu_steal": {**steal, "note": "fraction of CPU time the hypervisor gave to other guests during each "
                                       "phase (/proc/stat steal); it slows whatever ran then"},
        "note": (f"BUSY machine: {busy_rule}; load average before {load_before}, after {load_after} on "
                 f"{os.cpu_count()} CPUs; variants were interleaved round by round so ratios stay comparable, "
                 "absolute times are inflated") if busy else
                f"quiet machine ({busy_rule}; the load average after the run counts this run's own workers)",
    }
    step_aug = best["augment"]
    results["pretrain"] = {
        "ours": {**stats(times["ours"]), "images_per_s": batch / best["ours"], "gflop_per_step": flops_ours / 1e9,
                 "achieved_gflops": achieved, "achieved_gflops_median": achieved_median,
                 "executed_gflop_per_step": executed_ours / 1e9, "executed_gflops": achieved_executed},
        "ours_memory": {**stats(times["ours_memory"]), "images_per_s": batch / best["ours_memory"]},
        "lightly": None if not peer else {
            **stats(times["lightly"]), "images_per_s": batch / best["lightly"], "gflop_per_step": flops_peer / 1e9,
            "achieved_gflops": flops_peer / best["lightly"] / 1e9},
        "lightly_best": None if not peer else {
            **stats(times["lightly_best"]), "images_per_s": batch / best["lightly_best"],
            "config": results_peer_config(peer_best), "gflop_per_step": flops_peer / 1e9,
            "achieved_gflops": flops_peer / best["lightly_best"] / 1e9},
        "augment_two_views": {**stats(times["augment"]), "images_per_s": batch / step_aug,
                              "fraction_of_step": step_aug / best["ours"]},
        "ours_incl_augment": {"seconds_per_step": best["ours"] + step_aug,
                              "images_per_s": batch / (best["ours"] + step_aug)},
        "final_loss": losses,
        "raw_seconds": {**times, **{f"{name} (ablation phase)": t for name, t in ablation_times.items()}},
    }
    def ablation(variant: str) -> tuple[dict[str, Any], float, float]:
        """An ablation's stats, and our step over its own rounds (min ratio, paired median ratio)."""
        t = ablation_times[variant]
        return ({**stats(t[variant]), "images_per_s": batch / min(t[variant]),
                 "ours_beside_it": stats(t["ours"])},
                min(t[variant]) / min(t["ours"]), paired_ratio(t[variant], t["ours"]))

    if "ours_compiled" in ablation_times:
        entry, slower, paired = ablation("ours_compiled")
        results["pretrain"]["ours_compiled"] = {
            **entry, "speedup_vs_eager": 1.0 / slower, "speedup_vs_eager_paired_median": 1.0 / paired,
            "first_warmup_round_s": (warmup_times.get("ours_compiled") or [None])[0],
            "note": "torch.compile(net) as --compile does; the first warm-up round includes the compilation"}
    if "ours_native_conv" in ablation_times:
        entry, slower, paired = ablation("ours_native_conv")
        results["pretrain"]["ours_native_conv"] = {
            **entry, "ours_speedup_from_matmul_conv": slower, "ours_speedup_from_matmul_conv_paired_median": paired,
            "note": f"{CONV_MATMUL_ENV}=native: oneDNN for every pass of every convolution "
                    "(see simclrv2.models.conv_matmul)"}
    for variant, key in (("ours_glibc", "ours_glibc_malloc"), ("ours_glibc_kept", "ours_glibc_kept_malloc")):
        if variant in ablation_times:
            entry, slower, paired = ablation(variant)
            results["pretrain"][key] = {
                **entry, "allocator": workers[variant].info.get("allocator"),
                "ours_speedup_from_malloc_setting": slower,
                "ours_speedup_from_malloc_setting_paired_median": paired}
    results["kernel_probes"] = {"probes": probes, "best_per_precision": best_kernel,
                                "bf16_emulated_probe": emulated_bf16,
                                "conv_shapes": [dict(zip(("name", "batch", "channels", "side"), c))
                                                for c in CONV_PROBES]}
    results["roofline"] = {
        "flop_counter": "torch.utils.flop_counter.FlopCounterMode on one full step (forward + backward "
                        "convolutions and matrix products; BN/elementwise/optimiser not counted), with every "
                        "convolution oneDNN's plain one: the model FLOPs, whatever algorithm runs",
        "achieved_gflops": achieved,
        "executed_gflop_per_step": executed_ours / 1e9,
        "executed_fraction_of_best_kernel": achieved_executed / best_rate,
        "executed_note": "the FLOPs our step executes (Winograd's F(4x4, 3x3) does a quarter of a 3x3 "
                         "convolution's multiplications where it runs, plus its transforms), over the same time "
                         "and best kernel",
        "step_precision": augment.rt.precision,
        "best_kernel_gflops": best_rate, "best_kernel": best_kernel[top_tag]["at"],
        "definition": "roofline_fraction = achieved / max over the square-matmul and layer-shaped convolution "
                      "probes of every precision timed in this run",
        "fraction_of_best_kernel": roofline,
        **{f"fraction_of_best_{t}_kernel": achieved / v["gflops"] for t, v in best_kernel.items()},
        "theoretical": theo, "fraction_of_theoretical_peak": results["theoretical_peak_fraction"],
        "lightly_fraction_of_best_kernel": flops_peer / best["lightly"] / 1e9 / best_rate if peer else None,
    }
    results["augment"] = {"32px": aug32, "224px": aug224}
    shape = probe_shape(probe_cfg)
    results["precision_probe"] = {**probe.as_json(), "step_precision": augment.rt.precision,
                                  "shape": {**asdict(shape), "feature_side": shape.feature_side,
                                            "probe_batch": shape.probe_batch}}
    if args.stages:
        say("other stages vs a plain fp32 loop ...")
        t_phase = time.perf_counter()
        results["stages"] = stage_benchmarks(args.stage_batch, args.steps)
        phases["stages"] = time.perf_counter() - t_phase
    results["memory"] = memory
    results["left_out"] = left_out
    results["phase_seconds"] = phases
    results["wall_seconds"] = time.perf_counter() - t_start
    return results


def results_peer_config(peer_best: str) -> str:
    return ("bf16 autocast + channels_last (Lightning precision='bf16-mixed' + .to(memory_format))"
            if peer_best == "bf16" else "fp32 + channels_last (bf16 is not native on this CPU)")


def _fmt(value: float | None, spec: str, missing: str = "n/a") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def render_table(r: dict[str, Any]) -> str:
    c, env, p = r["config"], r["environment"], r["pretrain"]
    lines = [
        f"SimCLRv2 throughput -- host kind {env['host_kind']}: {env['cpu']} ({env['cpu_count']} CPUs, "
        f"{', '.join(env['cpu_flags'])}; oneDNN ISA {env['host']['onednn'].get('isa')}, "
        f"AMX {'in use' if env['host']['onednn'].get('amx_in_use') else 'not used'}"
        + (f"; {env['host']['amx_permission']['note']}" if env["host"].get("amx_permission") else "") + "), "
        f"torch {env['torch']}, {c['threads']} threads, lightly {env['lightly'] or 'not installed'}",
        f"load average before {env['load_average_before']}, after {env['load_average_after']}: {env['note']}"
        + "".join(f"; CPU time stolen by the hypervisor in the {k.replace('_', ' ')}: {100 * v:.1f}%"
                  for k, v in (env.get("cpu_steal") or {}).items() if k != "note" and v is not None),
        f"--precision auto: {r['precision_probe']['precision']} ({r['precision_probe']['reason']}"
        + "".join(f", {k} {v:.1f} img/s" for k, v in r["precision_probe"]["images_per_s"].items()) + ")",
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

    o, lt, lb = p["ours"], p["lightly"], p["lightly_best"]
    lines.append(row(f"ours ({c['precision']}, channels_last, {c['optimizer']}, {c.get('allocator') or 'glibc'})", o,
                     o["gflop_per_step"], o["achieved_gflops"]))
    if "ours_native_conv" in p:
        q = p["ours_native_conv"]
        lines.append(row(f"ours, oneDNN convolutions ({CONV_MATMUL_ENV}=native; ours "
                         f"{q['ours_speedup_from_matmul_conv']:.2f}x, paired median "
                         f"{q['ours_speedup_from_matmul_conv_paired_median']:.2f}x)", q,
                         o["gflop_per_step"], o["gflop_per_step"] / q["min"]))
    for key, label in (("ours_glibc_kept_malloc", "ours with glibc keeping freed blocks (no tcmalloc)"),
                       ("ours_glibc_malloc", "ours with glibc's default malloc (SIMCLRV2_MALLOC_TUNING=0)")):
        if key in p:
            lines.append(row(label, p[key], o["gflop_per_step"], o["gflop_per_step"] / p[key]["min"]))
    if "ours_compiled" in p:
        oc = p["ours_compiled"]
        lines.append(row(f"ours under torch.compile ({oc['speedup_vs_eager']:.2f}x eager; paired median "
                         f"{oc['speedup_vs_eager_paired_median']:.2f}x)", oc,
                         o["gflop_per_step"], o["gflop_per_step"] / oc["min"]))
    lines.append(row(f"ours + memory (queue {c['queue_size']}, EMA {c['ema_decay']})", p["ours_memory"]))
    lines.append(row("lightly SimCLR (fp32, NCHW, SGD, 2 fwd of N)", lt,
                     lt["gflop_per_step"] if lt else None, lt["achieved_gflops"] if lt else None))
    lines.append(row(f"lightly at its best ({c['peer_best'].replace('lightly ', '')})", lb,
                     lb["gflop_per_step"] if lb else None, lb["achieved_gflops"] if lb else None))
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
    kp = r["kernel_probes"]
    lines.append("kernel probes (square torch.mm; 3x3 convs shaped like the network's layers, fwd, channels_last): "
                 "GFLOP/s best [median]")
    for name, v in kp["probes"].items():
        lines.append(f"  {name:<28s}{v['best_gflops']:8.0f} [{v['median_gflops']:.0f}]")
    if kp["bf16_emulated_probe"]:
        e = kp["bf16_emulated_probe"]
        lines.append(f"  bf16 (not native here) conv {e['shape']}: {e['gflops']:.1f} GFLOP/s -> bf16 not used")
    ro = r["roofline"]
    th = ro["theoretical"]
    lines.append(f"our step ({ro['step_precision']}): {ro['achieved_gflops']:.0f} GFLOP/s (FlopCounterMode: fwd+bwd "
                 f"convs and matmuls) = {100 * ro['fraction_of_best_kernel']:.1f}% of the best kernel measured "
                 f"({ro['best_kernel']}: {ro['best_kernel_gflops']:.0f})")
    if ro.get("executed_gflop_per_step") and ro["executed_gflop_per_step"] < r["pretrain"]["ours"]["gflop_per_step"]:
        lines.append(f"  model FLOPs (every conv counted as oneDNN's); executed: {ro['executed_gflop_per_step']:.0f} "
                     f"GFLOP/step (Winograd) = {100 * ro['executed_fraction_of_best_kernel']:.1f}% of the best kernel")
    peak = th["bf16_peak_gflops"] if ro["step_precision"] == "bf16" else th["fp32_peak_gflops"]
    if peak:
        lines.append(f"  theoretical {ro['step_precision']} peak {th['cores_used']} cores x {th['clock_ghz']:.2f} GHz x "
                     f"{th['bf16_flop_per_cycle'] if ro['step_precision'] == 'bf16' else th['fp32_flop_per_cycle']}"
                     f" FLOP/cycle = {peak:.0f} GFLOP/s -> {100 * ro['fraction_of_theoretical_peak']:.1f}%")
    if ro["lightly_fraction_of_best_kernel"] is not None:
        lines.append(f"lightly fp32: {lt['achieved_gflops']:.0f} GFLOP/s = "
                     f"{100 * ro['lightly_fraction_of_best_kernel']:.1f}% of the best kernel; at its best "
                     f"{lb['achieved_gflops']:.0f} GFLOP/s")
    lines.append("")
    lines.append("peak memory (own process per variant; growth of the RSS high-water mark over its baseline)")
    for name, m in r["memory"].items():
        lines.append(f"  {name:<12s} +{m['growth_mb']:7.0f} MB  (peak RSS {m['peak_rss_mb']:.0f} MB, "
                     f"baseline {m['baseline_rss_mb']:.0f} MB, {m['method']})")
    for name, why in (r.get("left_out") or {}).items():
        lines.append(f"  {name}: {why}")
    lines.append("")
    lines.append("targets")
    labels = {
        "pretrain_speedup_vs_lightly": "pretraining step vs lightly fp32 (x)",
        "pretrain_speedup_vs_lightly_best": "pretraining step vs lightly at its best (x)",
        "roofline_fraction": "fraction of the best kernel measured",
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


def render_stages(st: dict[str, Any]) -> str:
    lines = [f"other stages, batch {st['batch']}, {st['image_size']} px, ours {st['precision']} vs plain "
             f"{st['plain']} (images/s, fastest of {st['rounds']} rounds)"]
    for stage in ("finetune", "distill", "evaluate", "predict"):
        d = st[stage]
        lines.append(f"  {stage:<10s} ours {d['ours_images_per_s']:8.1f}  plain {d['plain_fp32_images_per_s']:8.1f}  "
                     f"{d['speedup']:.2f}x (paired median {d['paired_median_speedup']:.2f}x)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=None, help="source images per step (default 256, "
                        "--quick included: the targets are set at batch 256); each image gives two views")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds (default 6; 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 1)")
    parser.add_argument("--quick", action="store_true", help="few rounds, small augmentation batches (< 2 minutes)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default benchmarks/results/"
                        "throughput-<host kind>.json, -quick.json with --quick: one file per host kind)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--aug-seconds", type=float, default=None, help="timing budget per augmentation variant")
    parser.add_argument("--aug-repeats", type=int, default=None, help="interleaved windows per variant (median)")
    parser.add_argument("--aug-batch-32", type=int, default=None, help="default 256 (128 with --quick)")
    parser.add_argument("--aug-batch-224", type=int, default=None, help="default 64 (16 with --quick)")
    parser.add_argument("--ablate-malloc", action="store_true", help="also time our step with glibc's default "
                        "malloc policy (SIMCLRV2_MALLOC_TUNING=0, see simclrv2.training.runtime)")
    parser.add_argument("--ablate-conv-matmul", action=argparse.BooleanOptionalAction, default=True,
                        help="also time our step with oneDNN for every pass of every convolution "
                        f"({CONV_MATMUL_ENV}=native, see simclrv2.models.conv_matmul); on by default")
    parser.add_argument("--verbose", "-v", action="store_true", help="progress on stderr")
    parser.add_argument("--stages", action="store_true", help="also time fine-tuning, distillation "
                        "(teacher + student), evaluation and prediction against a plain fp32 PyTorch loop")
    parser.add_argument("--stages-only", action="store_true", help="only the --stages comparison (no workers)")
    parser.add_argument("--stage-batch", type=int, default=64, help="batch of the --stages comparison")
    parser.add_argument("--peer-best", choices=("auto", "bf16", "fp32"), default="auto",
                        help="the tuned peer: bf16 autocast + channels_last, or fp32 + channels_last "
                        "(auto: bf16 where the CPU has native bf16, else fp32)")
    parser.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=None,
                        help="also time our step under torch.compile (what --compile does), as its own worker; "
                        "its first warm-up round pays the compilation (default: on where a C++ compiler is found)")
    parser.add_argument("--worker", choices=("ours", "ours_compiled", "ours_memory", "lightly", "lightly_best"),
                        help=argparse.SUPPRESS)
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


def run_record(argv: list[str] | None, script: str = "benchmarks/throughput.py") -> dict[str, str]:
    """The command line and the UTC start time of a benchmark's run (the README's tables quote them)."""
    words = sys.argv[1:] if argv is None else argv
    return {"command": " ".join([f"python {script}", *words]),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    record = run_record(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker_main(args.worker, args.batch_size, args.peer_best)
        return
    if args.stages_only:
        before = load_average()
        busy, cpu_used_before, busy_rule = machine_busy_before(before)
        host = host_info(torch.get_num_threads())
        results = {"run": record, "stages": stage_benchmarks(args.stage_batch, args.steps), "host": host,
                   "torch": torch.__version__, "load_average_before": before, "load_average_after": load_average(),
                   "machine_busy": busy, "other_cpu_use_before": cpu_used_before, "busy_rule": busy_rule}
        results["machine_note"] = f"{'BUSY' if busy else 'quiet'} machine ({busy_rule})"
        print(render_stages(results["stages"]))
        args.out = args.out or RESULTS_DIR / f"stages-{host['host_kind']}{'-quick' if args.quick else ''}.json"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
        return
    try:
        results = {"run": record, **run(args)}
    except SimCLRv2Error as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    print(render_table(results))
    if "stages" in results:
        print(render_stages(results["stages"]))
    if args.out is None:
        kind = results["environment"]["host_kind"]
        args.out = RESULTS_DIR / f"throughput-{kind}{'-quick' if args.quick else ''}.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
