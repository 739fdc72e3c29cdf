"""Where and how a run computes: device, precision, memory layout, processes, seeds.

``precision=auto`` picks bf16 autocast on CUDA GPUs with bf16 (fp16 on older ones) and fp32 on CPUs
without native bf16; on CPUs with AVX-512-BF16 or AMX it picks whichever of bf16 and fp32 a short
measured probe finds faster at the run's shape (``simclrv2.utils.precision_probe``, cached per host,
torch version and shape). bf16 keeps fp32's exponent range, so no loss scaling is needed; fp16
(CUDA only) uses a gradient scaler. Losses are computed in fp32 inside the loss functions either
way (SPEC §3 note on log-sum-exp).

``compile`` unset (auto) compiles the training network with ``torch.compile`` (inductor) on a CPU when
the stage is long enough to repay the compiler's warm-up, see :func:`choose_compile`.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import numpy as np
import torch

from simclrv2.config import Config, parse_arch_cheap
from simclrv2.errors import ConfigError, Terminated
from simclrv2.models.conv_matmul import ENV_VAR as CONV_MATMUL_ENV
from simclrv2.models.conv_matmul import matmul_enabled_by_env
from simclrv2.utils import distributed as dist_utils
from simclrv2.utils import precision_probe
from simclrv2.utils.allocator import allocator_choice, allocator_in_use


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises AVX-512-BF16 or AMX-BF16 (Linux /proc/cpuinfo)."""
    return precision_probe.has_native_bf16(precision_probe.cpu_flags())


#: glibc environment variables that mean the user already chose a malloc policy.
_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


@lru_cache(maxsize=1)
def keep_freed_cpu_memory() -> bool:
    """Make glibc malloc keep large freed blocks for reuse instead of unmapping them (CPU runs).

    glibc serves every allocation of 32 MB or more with a fresh ``mmap`` and unmaps it on
    ``free``, so each training step pays page faults and kernel page-zeroing again for every
    large activation and gradient (a batch-256 CIFAR step allocates dozens of 32-64 MB
    tensors): 12-25% of a bf16 ResNet-18 pretraining step on a 2-core AVX-512-BF16 CPU
    (``benchmarks/throughput.py --ablate-malloc``). ``M_MMAP_MAX=0`` + a large ``M_TRIM_THRESHOLD``
    make freed blocks reusable. Results are bit-identical; the cost is memory: the process keeps
    its high-water mark, and that mark is ~30-70% higher than with glibc's default because the
    heap fragments (fp32 step at batch 256 on an ``intel-avx512`` host: 4.3-4.9 GB against 2.9 GB).
    This is the fallback: the ``simclrv2`` command runs under tcmalloc where it is installed
    (:mod:`simclrv2.utils.allocator`): there it grew by 2.6 GB at a speed within about 6% of this
    policy's, either way, over three interleaved runs.

    Returns True when applied. A no-op (False) off Linux/glibc, when ``SIMCLRV2_MALLOC_TUNING=0``,
    or when the user set a glibc ``MALLOC_*_`` variable or ``LD_PRELOAD`` (e.g. jemalloc/tcmalloc).
    Process-wide and irreversible for blocks already freed; called once by :func:`setup_runtime`.
    """
    if os.environ.get("SIMCLRV2_MALLOC_TUNING", "1") == "0" or os.environ.get("LD_PRELOAD"):
        return False
    if any(name in os.environ for name in _MALLOC_ENV) or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


@dataclass
class Runtime:
    device: torch.device
    precision: str  # bf16 | fp16 | fp32 (resolved)
    channels_last: bool
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    #: CPU memory allocator of this process (``utils/allocator.py``): ``tcmalloc``, ``glibc, freed blocks
    #: kept`` (:func:`keep_freed_cpu_memory`), ``glibc`` ...; recorded in each stage's results.
    allocator: str = "glibc"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        """Move a uint8 batch to the device (non-blocking from pinned memory)."""
        return images.to(self.device, non_blocking=True)

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model


COMPILE_MIN_IMAGES = 300_000
"""``--compile`` auto on a CPU: compile a stage whose training passes at least this many images (steps x
global batch x views). Measured on a 2-core AMD EPYC (AVX2, fp32, channels_last, torch 2.14.1), forward +
backward + SGD, fastest of 12-16 steps (median in brackets): r18_1x at 16 px, batch 256: eager 138 img/s,
compiled 147 (1.07x; medians equal); at 32 px, batch 128: 37 vs 41 img/s (1.09x; median 1.14x). The first
compilation took 35-49 s (inductor caches its kernels on disk, later runs ~7 s). A 5-10% gain repays that
after about 10 minutes of training: ~85,000 images at r18_1x/16 px, ~300,000 at r18_0.5x, hence 300,000.
In bf16 autocast there was no gain to repay it: on a 2-core AMD EPYC with AVX512-BF16, ``simclrv2
pretrain`` at r18_1x, 16 px, batch 512 logged 228 img/s eager and 225 compiled (mean of steps 8-24), so
auto stays eager in bf16 (``benchmarks/throughput.py`` times ``ours_compiled`` against eager per host)."""
COMPILE_MIN_STEPS = 100


@dataclass
class CompileChoice:
    enabled: bool
    reason: str

    def describe(self) -> str:
        return f"torch.compile {'on' if self.enabled else 'off'} ({self.reason})"


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would call on a CPU (``CXX``, else c++/g++/clang++), None without one."""
    import shutil
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def choose_compile(requested: bool | None, device: torch.device, run_steps: int, images_per_step: int,
                   precision: str = "fp32") -> CompileChoice:
    """Whether a trainer wraps its network in ``torch.compile``.

    ``--compile`` / ``--no-compile`` decide; a CPU run without a C++ compiler cannot compile, so asking
    for it is a ConfigError before any training. Unset (auto): on a CPU, on when the stage trains at
    least :data:`COMPILE_MIN_IMAGES` images over at least :data:`COMPILE_MIN_STEPS` steps in fp32 and a
    compiler is installed (in bf16 autocast no gain was measured, see :data:`COMPILE_MIN_IMAGES`), and
    only with ``SIMCLRV2_CONV_MATMUL=native``: by default eager fp32 runs some convolution passes as
    matrix products or by Winograd (:mod:`simclrv2.models.conv_matmul`), which a compiled network does
    not (it sees oneDNN's plain convolution), and the compiled step measured 0.72x eager on the
    ``intel-avx512`` host (``benchmarks/results/throughput-intel-avx512-quick.json``, issue #17). On
    CUDA, off (not measured on a GPU yet; ``--compile`` turns it on). Compiled steps are
    numerically close to eager ones, not bit-identical (fused kernels reorder sums)."""
    if requested is False:
        return CompileChoice(False, "--no-compile")
    compiler = cpp_compiler() if device.type == "cpu" else "n/a"
    if requested:
        if compiler is None:
            raise ConfigError("compile: torch.compile on a CPU needs a C++ compiler (g++ or clang++, or set CXX), "
                              "and none was found; install one or leave --compile out")
        return CompileChoice(True, "--compile")
    if device.type != "cpu":
        return CompileChoice(False, "auto: off on CUDA until measured there; --compile turns it on")
    if precision != "fp32":
        return CompileChoice(False, f"auto: off in {precision} (no faster step measured compiled in bf16 on a "
                                    "CPU); --compile forces it")
    if matmul_enabled_by_env():
        return CompileChoice(False, f"auto: off while the matrix-product and Winograd convolutions are on "
                                    f"(compiling runs oneDNN's plain ones instead: measured 0.72x eager on an "
                                    f"AVX-512 Xeon in fp32); --compile forces it, {CONV_MATMUL_ENV}=native lets "
                                    "auto compile long runs")
    images = run_steps * images_per_step
    if images < COMPILE_MIN_IMAGES or run_steps < COMPILE_MIN_STEPS:
        return CompileChoice(False, f"auto: {images:,} training images are too few to repay the compiler's "
                                    "warm-up; --compile forces it")
    if compiler is None:
        return CompileChoice(False, "auto: no C++ compiler found (g++/clang++), which inductor needs on a CPU")
    return CompileChoice(True, f"auto: {images:,} training images repay the compiler's warm-up (<= 1 min) "
                               "for 5-10% faster steps; --no-compile turns it off")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device: cuda was requested but no CUDA GPU is available; use --device cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def choose_precision(name: str, device: torch.device,
                     shape: precision_probe.ProbeShape | None = None) -> precision_probe.PrecisionChoice:
    """The precision a run uses, and why. ``auto``: CUDA -> bf16 where supported, else fp16; a CPU
    without native bf16 -> fp32 (nothing measured); a CPU with native bf16 -> the faster of bf16 and
    fp32 at ``shape`` (:func:`simclrv2.utils.precision_probe.choose_cpu_precision`, cached), or bf16
    when no shape is known (callers without a training shape, e.g. ``make_runtime``)."""
    if name == "auto":
        if device.type == "cuda":
            supported = torch.cuda.is_bf16_supported()
            return precision_probe.PrecisionChoice("bf16" if supported else "fp16",
                                                   "CUDA bf16" if supported else "CUDA without bf16")
        if shape is not None:
            return precision_probe.choose_cpu_precision(shape)  # fp32 at once where bf16 is not native
        if cpu_has_native_bf16():
            return precision_probe.PrecisionChoice("bf16", "native bf16; no training shape to measure")
        return precision_probe.PrecisionChoice("fp32", precision_probe.NOT_NATIVE)
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("precision: fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return precision_probe.PrecisionChoice(name, "requested")


def resolve_precision(name: str, device: torch.device, shape: precision_probe.ProbeShape | None = None) -> str:
    """``bf16`` | ``fp16`` | ``fp32`` for ``--precision NAME`` on ``device`` (see :func:`choose_precision`)."""
    return choose_precision(name, device, shape).precision


def probe_shape(cfg: Config, world_size: int = 1) -> precision_probe.ProbeShape | None:
    """What ``--precision auto``'s CPU probe imitates for ``cfg``: its image size, images per core per
    step (the global batch over processes and threads) and width; None while the image size is unknown."""
    if not cfg.image_size:
        return None
    try:
        width = parse_arch_cheap(cfg.arch)[1]
    except ConfigError:  # reported by the stage that builds the network
        width = 1
    batch = cfg.batch_size or cfg.eval_batch_size
    threads = torch.get_num_threads()
    return precision_probe.ProbeShape(image_size=cfg.image_size, width=width, threads=threads,
                                      batch_per_core=max(1, batch // max(world_size, 1) // threads))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def setup_runtime(cfg: Config) -> Runtime:
    """Initialise processes (torchrun env), the device and precision, and seeds."""
    matmul_enabled_by_env()  # a bad SIMCLRV2_CONV_MATMUL is an error before any work
    allocator_choice()  # and so is a bad SIMCLRV2_ALLOCATOR (the command restarts under tcmalloc earlier)
    rank, world_size, local_rank = dist_utils.setup_distributed(timeout=getattr(cfg, "dist_timeout", None))
    device = resolve_device(cfg.device, local_rank)
    # rank 0 measures (when auto has a real choice on this CPU) and every rank uses its answer
    shape = probe_shape(cfg, world_size) if cfg.precision == "auto" and device.type == "cpu" else None
    choice = dist_utils.share_outcome((lambda: choose_precision(cfg.precision, device, shape)) if rank == 0
                                      else None)
    precision = choice.precision
    if rank == 0 and choice.probed:
        print(f"precision auto: {choice.describe()}", flush=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    allocator = allocator_in_use()
    if device.type != "cuda" and keep_freed_cpu_memory():
        allocator = "glibc, freed blocks kept"
    seed_everything(cfg.seed + rank)
    return Runtime(device=device, precision=precision, channels_last=cfg.channels_last, rank=rank,
                   world_size=world_size, local_rank=local_rank, allocator=allocator)


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (CUDA: free memory; CPU: MemAvailable), None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_allocation(nbytes: int, what: str, device: torch.device) -> None:
    """Refuse (ConfigError, exit 2) a single allocation larger than the memory the machine has left,
    BEFORE it is attempted, instead of an allocator traceback or the kernel's OOM killer."""
    free = available_memory(device)
    if free is not None and nbytes > free:
        raise ConfigError(f"{what} needs {nbytes / 2**30:.1f} GiB of {device.type} memory, more than the "
                          f"{free / 2**30:.1f} GiB available; choose a smaller value")


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    """All random states needed to continue a run bit-for-bit (saved in checkpoints)."""
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    for name, gen in generators.items():
        state[f"gen_{name}"] = gen.get_state()
    return state


def restore_rng_state(state: dict[str, torch.Tensor], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
    for name, gen in generators.items():
        if f"gen_{name}" in state:
            gen.set_state(state[f"gen_{name}"])


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)



class _SigtermReceived(BaseException):
    """Raised by the SIGTERM handler of :func:`sigterm_stops_cleanly`. A ``BaseException`` (like
    ``KeyboardInterrupt``) so that no ``except RuntimeError``/``except ValueError`` on its way up (a
    reader that turns a failed read into "damaged file", say) mistakes it for a fault of the data."""


@contextlib.contextmanager
def sigterm_stops_cleanly() -> Iterator[None]:
    """Turn SIGTERM into :class:`~simclrv2.errors.Terminated` (exit 143) for a whole command.

    Training loops install their own handler (finish the step, save a checkpoint, then raise
    ``Terminated``; see ``Trainer.fit``) and hand back to this one when they end. Everywhere else (data
    scanning and caching, feature extraction, the linear classifier, evaluation, the pipeline between
    stages) there is nothing to checkpoint, so the signal stops the command at once: the exception
    unwinds through the atomic writers (``utils.checkpoint``), which delete their temporary file, so
    nothing is left half-written. Forked decoding workers inherit the handler; there it does what
    SIGTERM does by default (the main process notices and stops). Further SIGTERMs while stopping are
    ignored so that the clean-up is not interrupted. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner, state = os.getpid(), {"stopping": False}

    def on_sigterm(signum, frame):
        if os.getpid() != owner:  # a forked worker: terminate as the default action would
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if state["stopping"]:
            return
        state["stopping"] = True
        raise _SigtermReceived()

    message = ("received SIGTERM outside a training step; stopped at once (nothing to checkpoint, no file left "
               "half-written, no results written); run the same command again with --resume and the same --out "
               "(commands without --resume, such as evaluate, just run again)")
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    except _SigtermReceived:
        raise Terminated(message) from None
    except BaseException as exc:
        # The handler's exception raised inside a C extension's callback (safetensors, torch) comes out as
        # that library's own error (e.g. "not a readable safetensors file"): the signal is still the cause.
        if state["stopping"] and not isinstance(exc, Terminated):
            raise Terminated(message) from exc
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
