"""Which ``malloc`` serves CPU tensors, and starting a command under tcmalloc (issue 17, item 4).

Why: a CPU training step allocates and frees dozens of large tensors (activations, gradients).
glibc's default serves each allocation of 32 MB or more with a fresh ``mmap`` and unmaps it on
``free``, so every step pays page faults and kernel page-zeroing again. Our fallback,
:func:`simclrv2.training.runtime.keep_freed_cpu_memory`, makes glibc keep freed blocks: faster,
but glibc's heap then fragments and the process holds far more memory than it uses. tcmalloc
(gperftools) keeps and reuses freed pages without that fragmentation. Measured on a 2-core Intel
Xeon with AVX-512 (no bf16; host kind ``intel-avx512``), our fp32 pretraining step at batch 256,
each variant in its own process, interleaved round by round (``benchmarks/throughput.py``):

  ===================================  ===========================  ==================
  allocator (two interleaved runs)     seconds/step, min [median]   peak memory growth
  ===================================  ===========================  ==================
  run 1: glibc, default policy         11.33 [12.09]                2896 MB
  run 1: glibc, freed blocks kept       7.82 [8.31]                 4892 MB
  run 2: glibc, freed blocks kept       7.83 [9.70]                 4318 MB
  run 2: tcmalloc 2.10 (this module)    7.66 [8.81]                 2644 MB
  run 2: jemalloc 5.3 (its defaults)   12.77 [15.40]                2630 MB
  ===================================  ===========================  ==================

lightly's peer step grew by 2750-2850 MB on the same host; ``benchmarks/throughput.py
--ablate-malloc`` measures our step with each glibc policy beside the tcmalloc one.

So the ``simclrv2`` command restarts itself once, at its very start and before any heavy import,
with ``LD_PRELOAD`` naming tcmalloc when the library is installed (Debian/Ubuntu:
``apt-get install libtcmalloc-minimal4``; conda: ``gperftools``). Nothing else changes: the
process keeps its PID, arguments, environment, standard streams and signal handling, and every
result is bit-identical (the allocator only decides where tensors live). Where tcmalloc is not
found, the command runs as before with glibc and ``keep_freed_cpu_memory``.

``SIMCLRV2_ALLOCATOR``: ``auto`` (default: tcmalloc when found, else glibc), ``tcmalloc`` (an
error, exit 2, when it is not found), ``glibc`` (never restart). ``SIMCLRV2_TCMALLOC`` names the
library file when it is not on the loader's search path. An ``LD_PRELOAD`` of the user's own is
left as it is. The Python API (``simclrv2.pretrain(...)``) cannot restart its caller: start that
Python with ``LD_PRELOAD=libtcmalloc_minimal.so.4`` for the same effect.
"""

from __future__ import annotations

import ctypes.util
import glob
import os
import sys
from collections.abc import Mapping

from ..errors import ConfigError

__all__ = ["ENV_VAR", "PATH_VAR", "allocator_choice", "find_tcmalloc", "preload_env", "restart_under_tcmalloc",
           "allocator_in_use"]

#: ``auto`` | ``tcmalloc`` | ``glibc``.
ENV_VAR = "SIMCLRV2_ALLOCATOR"
#: An explicit path to the tcmalloc shared library.
PATH_VAR = "SIMCLRV2_TCMALLOC"
#: tcmalloc prints a line for every allocation above this many bytes (default 1 GiB); a 224-px batch
#: of activations passes that, so the report is moved out of reach.
_REPORT_THRESHOLD_VAR = "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"
_LIBRARY_NAMES = ("tcmalloc_minimal", "tcmalloc")


def allocator_choice(environ: Mapping[str, str] | None = None) -> str:
    """``SIMCLRV2_ALLOCATOR`` read and checked: ``auto``, ``tcmalloc`` or ``glibc`` (ConfigError otherwise)."""
    value = (os.environ if environ is None else environ).get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in ("auto", "tcmalloc", "glibc"):
        raise ConfigError(f"{ENV_VAR}={value!r} is not understood: use 'auto' (the default: tcmalloc when it is "
                          "installed, else glibc), 'tcmalloc' or 'glibc'")
    return value


def find_tcmalloc(environ: Mapping[str, str] | None = None) -> str | None:
    """The tcmalloc library to preload: ``SIMCLRV2_TCMALLOC`` when set (a ConfigError when that file does
    not exist), else the first of libtcmalloc_minimal / libtcmalloc on the loader's search path or in
    this Python's ``lib`` folder (conda, virtual environments), else None."""
    env = os.environ if environ is None else environ
    explicit = env.get(PATH_VAR, "").strip()
    if explicit:
        if not os.path.isfile(explicit):
            raise ConfigError(f"{PATH_VAR}={explicit!r}: no such file (it should name the tcmalloc shared "
                              "library, e.g. /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4)")
        return explicit
    for name in _LIBRARY_NAMES:
        found = ctypes.util.find_library(name)  # a soname such as libtcmalloc_minimal.so.4 (ldconfig's cache)
        if found:
            return found
        for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
            matches = sorted(glob.glob(os.path.join(prefix, "lib", f"lib{name}.so*")))
            if matches:
                return matches[0]
    return None


def preload_env(environ: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """The environment to run a CPU training process under tcmalloc, or None when nothing should change
    (not Linux, ``SIMCLRV2_ALLOCATOR=glibc``, an ``LD_PRELOAD`` already set, or auto without tcmalloc).
    ConfigError for a bad setting or a tcmalloc that was asked for and is missing."""
    env = dict(os.environ if environ is None else environ)
    choice = allocator_choice(env)
    if choice == "glibc" or not sys.platform.startswith("linux"):
        return None
    if env.get("LD_PRELOAD", "").strip():
        return None  # the user's own preload (jemalloc, tcmalloc, a profiler) is theirs to keep
    library = find_tcmalloc(env)
    if library is None:
        if choice == "tcmalloc":
            raise ConfigError(f"{ENV_VAR}=tcmalloc but no tcmalloc library was found: install it "
                              f"(apt-get install libtcmalloc-minimal4, or conda's gperftools) or name it "
                              f"with {PATH_VAR}=/path/to/libtcmalloc_minimal.so.4")
        return None
    env["LD_PRELOAD"] = library
    env.setdefault(_REPORT_THRESHOLD_VAR, str(1 << 62))
    return env


def restart_under_tcmalloc() -> None:
    """Replace this process by the same command under tcmalloc, when :func:`preload_env` says so.

    Called by the ``simclrv2`` command before it imports torch. ``os.execve`` keeps the PID (so a
    supervisor, ``torchrun`` or a shell's job control still sees the same process), the open files
    and the environment; ``sys.orig_argv`` repeats the command line exactly. Returns normally when
    there is nothing to do; the restarted process finds ``LD_PRELOAD`` set and does not restart again.
    """
    env = preload_env()
    if env is None:
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def allocator_in_use() -> str:
    """``tcmalloc``, ``jemalloc`` or ``glibc``: which malloc this process has mapped (``/proc/self/maps``)."""
    try:
        with open("/proc/self/maps") as handle:
            maps = handle.read()
    except OSError:
        return "glibc" if sys.platform.startswith("linux") else "system"
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if f"lib{name}" in maps:
            return name
    return "glibc"
