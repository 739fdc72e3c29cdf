"""``--precision auto`` on a CPU: bf16 autocast or fp32, whichever a short measurement finds faster.

Why: bf16 autocast halves the bytes every convolution moves and, where the CPU computes bf16
natively (AVX-512-BF16 ``vdpbf16ps`` or AMX tiles), doubles or better the FLOP rate, so on such
hosts it is normally the faster choice (3.8x lightly's fp32 step on the committed
``amd-avx512bf16`` host). It is not always: on issue 17's Intel host (AVX-512-BF16 and AMX flags,
oneDNN reporting AVX-512 without AMX) a bf16 3x3 convolution ran at a quarter of the AMD host's
rate, so for some layer shapes fp32 wins. A static rule cannot know, so auto measures:

* No native bf16 (AVX2-only CPUs such as the ``amd-avx2`` host): bf16 is emulated through fp32 and
  several times slower; the answer is fp32 and **nothing is measured**.
* Native bf16: one forward + backward of a representative convolution stack -- one 3x3 convolution +
  BatchNorm + ReLU per ResNet stage, at the network's widths (64, 128, 256, 512 x width) and
  feature-map sizes (the CIFAR stem keeps the image side, the ImageNet stem divides it by 4, each
  stage halves it), at the run's batch per core (capped so one iteration stays short) -- in bf16
  autocast and in fp32, both channels_last as training runs, after untimed warm-ups, interleaved round
  by round: :data:`MIN_ROUNDS` always, more under a time budget (:data:`BUDGET_SECONDS`).
  :func:`decide` keeps fp32 unless bf16 is at least :data:`MIN_BF16_SPEEDUP` times faster: within the
  probe's noise fp32 is the exact choice.
* The decision is cached per host kind (CPU model, its bf16 flags, thread count), torch version and
  shape in ``$XDG_CACHE_HOME/simclrv2/precision_probe.json`` (default ``~/.cache``), written
  atomically; a damaged cache file is ignored and rewritten, so later runs skip the probe.

Losses stay fp32 either way (SPEC §3 note on log-sum-exp); bf16 keeps fp32's exponent range, so no
loss scaling is involved. This module knows nothing of training/: callers pass a :class:`ProbeShape`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

__all__ = ["ProbeShape", "PrecisionChoice", "parse_cpu_flags", "cpu_flags", "cpu_model_name", "has_native_bf16",
           "decide", "measure_rates", "cache_file", "cache_key", "load_cache", "save_cache",
           "choose_cpu_precision"]

#: /proc/cpuinfo flags that mean bf16 arithmetic is native (AVX-512-BF16 dot products, AMX-BF16 tiles).
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
#: bf16 must be this much faster than fp32 in the probe to be chosen (fp32 wins ties: it is exact).
MIN_BF16_SPEEDUP = 1.10
#: wall-clock budget of the timed rounds beyond :data:`MIN_ROUNDS` (a further round starts only if it fits).
BUDGET_SECONDS = 1.0
#: forward+backward FLOPs of one probe iteration per thread (keeps an fp32 iteration near 0.1 s).
FLOP_CAP_PER_THREAD = 4e9
MAX_ROUNDS = 5
#: timed rounds that always run, whatever the budget: in a cold process the warm-ups alone once read
#: bf16/fp32 as 1.06x on a 2-core AVX512-BF16 AMD EPYC (warm, the same probe read 1.58-1.90x) and picked
#: fp32, where ``benchmarks/throughput.py --quick`` then timed our step at 29.5 img/s against 42.1 in bf16
MIN_ROUNDS = 3
#: untimed iterations per precision first (oneDNN builds its kernels; the process's first autograd
#: pass starts its threads), so that the timed rounds see the steady state training runs in
WARMUP_ITERATIONS = 2
#: why nothing is measured on CPUs such as AVX2-only ones
NOT_NATIVE = "no avx512_bf16 or amx_bf16 flag, bf16 would be emulated: not measured"
CACHE_VERSION = 2  # 2: decisions of the one-round probe (version 1) are measured again
STAGE_WIDTHS = (64, 128, 256, 512)


# ---- the host ----------------------------------------------------------------------------------

def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first processor in ``/proc/cpuinfo`` text (x86 ``flags``, ARM ``Features``)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def _cpuinfo_text() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return handle.read()
    except OSError:  # not Linux: no flags known, so auto stays fp32 (no probe)
        return ""


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This machine's CPU flags (empty off Linux)."""
    return parse_cpu_flags(_cpuinfo_text())


def cpu_model_name(cpuinfo: str | None = None) -> str:
    """The first ``model name`` of ``/proc/cpuinfo`` (``unknown`` when there is none)."""
    for line in (_cpuinfo_text() if cpuinfo is None else cpuinfo).splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "model name":
            return value.strip()
    return "unknown"


def has_native_bf16(flags: frozenset[str] | set[str]) -> bool:
    """True when the flags include AVX-512-BF16 or AMX-BF16: only then is bf16 worth measuring."""
    return any(flag in flags for flag in BF16_FLAGS)


# ---- the probe ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProbeShape:
    """What the probe imitates: the training image side, images per core per step, width multiplier."""

    image_size: int
    batch_per_core: int
    width: float = 1  # the architecture's width multiplier (r18_0.25x -> 0.25, r50_2x -> 2)
    threads: int = field(default_factory=torch.get_num_threads)

    @property
    def feature_side(self) -> int:
        """Side of the first stage's feature map: the CIFAR stem (<= 32 px) keeps it, the ImageNet stem
        (stride-2 convolution + max-pool) divides it by 4."""
        return self.image_size if self.image_size <= 32 else max(1, self.image_size // 4)

    def flops_per_image(self) -> float:
        """Forward + backward FLOPs of the probe stack per image (backward ~ 2x forward)."""
        side, cin, total = self.feature_side, _channels(STAGE_WIDTHS[0], self.width), 0.0
        for stage, base in enumerate(STAGE_WIDTHS):
            side = side if stage == 0 else max(1, (side + 1) // 2)
            cout = _channels(base, self.width)
            total += 2 * 9 * cin * cout * side * side
            cin = cout
        return 3 * total

    @property
    def probe_batch(self) -> int:
        """The batch actually timed: the run's per-core batch times the threads, capped by FLOPs."""
        cap = max(1, int(FLOP_CAP_PER_THREAD * self.threads / self.flops_per_image()))
        return max(1, min(self.batch_per_core * self.threads, cap))


def _channels(base: int, width: float) -> int:
    return max(1, int(round(base * width)))


def _probe_stack(width: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = _channels(STAGE_WIDTHS[0], width)
    for stage, base in enumerate(STAGE_WIDTHS):
        cout = _channels(base, width)
        layers += [nn.Conv2d(cin, cout, 3, stride=1 if stage == 0 else 2, padding=1, bias=False),
                   nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        cin = cout
    return nn.Sequential(*layers).to(memory_format=torch.channels_last)


def measure_rates(shape: ProbeShape, budget_s: float = BUDGET_SECONDS) -> tuple[dict[str, float], float]:
    """Images/s of the probe stack in bf16 autocast and in fp32 (both channels_last), and the seconds
    the probe took. :data:`WARMUP_ITERATIONS` untimed iterations each (oneDNN builds its kernels), then
    rounds of one timed iteration per precision, alternating: :data:`MIN_ROUNDS` always, more while
    another still fits in ``budget_s`` (at most :data:`MAX_ROUNDS`); each rate is the fastest timed
    iteration (background load only adds time). The global RNG is left untouched."""
    started = time.perf_counter()
    batch = shape.probe_batch
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(0)
        net = _probe_stack(shape.width)
        x = torch.randn(batch, _channels(STAGE_WIDTHS[0], shape.width), shape.feature_side, shape.feature_side)
        x = x.contiguous(memory_format=torch.channels_last)

        def iteration(precision: str) -> float:
            begin = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = net(x)
            out.float().mean().backward()
            for param in net.parameters():
                param.grad = None
            return time.perf_counter() - begin

        for _ in range(WARMUP_ITERATIONS):
            for precision in ("bf16", "fp32"):
                iteration(precision)
        timed_from = time.perf_counter()
        best = {precision: float("inf") for precision in ("bf16", "fp32")}
        for done in range(MAX_ROUNDS):
            # a further round's likely cost is the fastest iteration of each precision so far
            if done >= MIN_ROUNDS and time.perf_counter() - timed_from + sum(best.values()) > budget_s:
                break
            for precision in best:
                best[precision] = min(best[precision], iteration(precision))
    return {precision: batch / seconds for precision, seconds in best.items()}, time.perf_counter() - started


def decide(rates: Mapping[str, float], min_speedup: float = MIN_BF16_SPEEDUP) -> str:
    """``"bf16"`` when its images/s are at least ``min_speedup`` times fp32's, else ``"fp32"``
    (also when a rate is missing or not a positive number)."""
    bf16, fp32 = rates.get("bf16"), rates.get("fp32")
    if not (isinstance(bf16, (int, float)) and isinstance(fp32, (int, float)) and bf16 > 0 and fp32 > 0):
        return "fp32"
    return "bf16" if bf16 >= min_speedup * fp32 else "fp32"


# ---- the cache ---------------------------------------------------------------------------------

def cache_file() -> Path:
    """``$XDG_CACHE_HOME/simclrv2/precision_probe.json``, default ``~/.cache/simclrv2/precision_probe.json``."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "simclrv2" / "precision_probe.json"


def load_cache(path: Path) -> dict[str, dict]:
    """The cached decisions, ``{}`` when the file is missing, unreadable, not JSON or of another version
    (a damaged file is then replaced by the next :func:`save_cache`)."""
    try:
        payload = json.loads(Path(path).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(payload, dict) or payload.get("version") != CACHE_VERSION:
        return {}
    entries = payload.get("entries")
    if not isinstance(entries, dict):
        return {}
    return {key: entry for key, entry in entries.items() if _valid_entry(entry)}


def _valid_entry(entry: object) -> bool:
    return (isinstance(entry, dict) and entry.get("precision") in ("bf16", "fp32")
            and isinstance(entry.get("images_per_s"), dict)
            and all(isinstance(v, (int, float)) for v in entry["images_per_s"].values()))


def save_cache(path: Path, entries: Mapping[str, dict]) -> bool:
    """Write ``entries`` atomically (a temporary file in the same folder, flushed, then renamed over the
    old one). Returns False instead of raising when the folder is not writable: the run still uses its
    decision, it is only measured again next time."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump({"version": CACHE_VERSION, "entries": dict(entries)}, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError:
        return False
    return True


def cache_key(shape: ProbeShape, cpuinfo: str | None = None) -> str:
    """Host kind + torch version + the shape timed: a decision is reused only where it was measured."""
    flags = parse_cpu_flags(cpuinfo) if cpuinfo is not None else cpu_flags()
    native = ",".join(sorted(f for f in flags if f in BF16_FLAGS or f.startswith("amx"))) or "none"
    return (f"{cpu_model_name(cpuinfo)} | {native} | {shape.threads} threads | torch {torch.__version__} | "
            f"{shape.feature_side}px x{shape.probe_batch} width {shape.width:g}")


# ---- the decision --------------------------------------------------------------------------------

@dataclass
class PrecisionChoice:
    """What ``--precision auto`` picked on this CPU, and on what evidence."""

    precision: str                    # "bf16" | "fp32"
    reason: str                       # "measured" | "cached" | why nothing was measured
    images_per_s: dict[str, float] = field(default_factory=dict)  # probe rates (empty when not measured)
    seconds: float | None = None      # the probe's own cost (None when not measured now)

    @property
    def probed(self) -> bool:
        """True when rates back the choice (measured now or earlier and cached)."""
        return bool(self.images_per_s)

    def describe(self) -> str:
        """``bf16 (probe: bf16 120.3 img/s, fp32 80.2 img/s, bf16/fp32 1.50x; measured in 0.82 s)``."""
        if not self.probed:
            return f"{self.precision} ({self.reason})"
        rates = ", ".join(f"{name} {rate:.1f} img/s" for name, rate in sorted(self.images_per_s.items()))
        ratio = self.images_per_s.get("bf16", 0) / self.images_per_s["fp32"] if self.images_per_s.get("fp32") else 0
        how = f"measured in {self.seconds:.2f} s" if self.seconds is not None else f"{self.reason}"
        return f"{self.precision} (probe: {rates}, bf16/fp32 {ratio:.2f}x; {how})"

    def as_json(self) -> dict:
        return asdict(self)


def choose_cpu_precision(shape: ProbeShape, *, cache: Path | None = None, cpuinfo: str | None = None,
                         measure: Callable[[ProbeShape], tuple[dict[str, float], float]] = measure_rates
                         ) -> PrecisionChoice:
    """``--precision auto`` on the CPU: fp32 without native bf16 (no probe); else the cached decision for
    this host, torch and shape, or a fresh probe (:func:`measure_rates`, then :func:`decide`) that is
    cached. ``cpuinfo`` (``/proc/cpuinfo`` text) and ``measure`` default to the real machine."""
    flags = parse_cpu_flags(cpuinfo) if cpuinfo is not None else cpu_flags()
    if not has_native_bf16(flags):
        return PrecisionChoice("fp32", NOT_NATIVE)
    path = cache_file() if cache is None else Path(cache)
    key = cache_key(shape, cpuinfo)
    entries = load_cache(path)
    if key in entries:
        entry = entries[key]
        return PrecisionChoice(entry["precision"], f"cached in {path}", dict(entry["images_per_s"]))
    rates, seconds = measure(shape)
    choice = PrecisionChoice(decide(rates), "measured", {k: float(v) for k, v in rates.items()}, seconds)
    entries[key] = {"precision": choice.precision, "images_per_s": choice.images_per_s,
                    "measured_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    save_cache(path, entries)
    return choice
