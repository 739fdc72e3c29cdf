"""The CPU memory allocator: settings, the restart under tcmalloc, and what a run records.

The restart is tested as it happens: a real process replaces itself with ``os.execve`` and the
test reads what the new image printed (same PID, ``LD_PRELOAD`` set, the library mapped).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import console_script
from simclrv2.errors import ConfigError
from simclrv2.utils.allocator import ENV_VAR, PATH_VAR, allocator_choice, find_tcmalloc, preload_env

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and /proc are Linux's")


def _tcmalloc_or_skip() -> str:
    library = find_tcmalloc({})
    if library is None:
        pytest.skip("tcmalloc is not installed (apt-get install libtcmalloc-minimal4)")
    return library


def _env_without_allocator_settings() -> dict[str, str]:
    """This process's environment less any allocator choice, so each test sets only its own."""
    return {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", ENV_VAR, PATH_VAR)}


def _a_loaded_library_file() -> str:
    """A real shared library that every Python process has already mapped (libm), as a path:
    preloading it changes nothing, so the restart can be tested where tcmalloc is not installed."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if "/libm.so" in path or "/libm-" in path:
            return path
    pytest.skip("no libm mapped in this process")


@pytest.mark.parametrize("value, expected", [(None, "auto"), ("", "auto"), ("TCMALLOC", "tcmalloc"),
                                             (" glibc ", "glibc")])
def test_the_allocator_setting_is_read_case_and_space_insensitively(value, expected):
    env = {} if value is None else {ENV_VAR: value}
    assert allocator_choice(env) == expected


def test_an_unknown_allocator_setting_is_an_error_naming_the_variable():
    with pytest.raises(ConfigError, match=ENV_VAR):
        allocator_choice({ENV_VAR: "jemalloc"})


@linux_only
def test_glibc_and_a_users_own_preload_leave_the_environment_alone(tmp_path):
    library = _a_loaded_library_file()
    assert preload_env({ENV_VAR: "glibc", PATH_VAR: library}) is None
    assert preload_env({"LD_PRELOAD": "/opt/my/libjemalloc.so", PATH_VAR: library}) is None


@linux_only
def test_a_named_library_is_preloaded_with_the_large_allocation_report_out_of_reach():
    library = _a_loaded_library_file()
    env = preload_env({PATH_VAR: library, "KEEP": "1"})
    assert env is not None
    assert env["LD_PRELOAD"] == library and env["KEEP"] == "1"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 2**40


def test_a_named_library_that_does_not_exist_is_an_error_naming_the_variable(tmp_path):
    with pytest.raises(ConfigError, match=PATH_VAR):
        preload_env({PATH_VAR: str(tmp_path / "libtcmalloc_minimal.so.4")})


@linux_only
def test_tcmalloc_asked_for_but_not_installed_is_an_error():
    if find_tcmalloc({}) is not None:
        pytest.skip("tcmalloc is installed here, so it cannot be missing")
    with pytest.raises(ConfigError, match="libtcmalloc-minimal4"):
        preload_env({ENV_VAR: "tcmalloc"})


_RESTARTING_SCRIPT = """
import os, sys
from simclrv2.utils.allocator import allocator_in_use, restart_under_tcmalloc
print(os.getpid(), os.environ.get("LD_PRELOAD", "-"), allocator_in_use(), sys.argv[1:], flush=True)
restart_under_tcmalloc()
print("went on", flush=True)
"""


@linux_only
def test_the_process_restarts_once_in_place_with_the_library_preloaded():
    library = _a_loaded_library_file()
    env = {**_env_without_allocator_settings(), PATH_VAR: library}
    proc = subprocess.run([sys.executable, "-c", _RESTARTING_SCRIPT, "a b", "--c"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    first, second, last = proc.stdout.splitlines()
    pid1, preload1, *_ = first.split(" ", 2)
    pid2, preload2, rest = second.split(" ", 2)
    assert pid1 == pid2  # replaced in place, not a child
    assert preload1 == "-" and preload2 == library
    assert rest.endswith("['a b', '--c']")  # the same arguments, word for word
    assert last == "went on"  # the restarted image did not restart again


@linux_only
def test_under_tcmalloc_the_restarted_process_uses_it():
    _tcmalloc_or_skip()
    env = _env_without_allocator_settings()
    proc = subprocess.run([sys.executable, "-c", _RESTARTING_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    first, second, _ = proc.stdout.splitlines()
    assert first.split()[2] == "glibc" and second.split()[2] == "tcmalloc"
    assert "large alloc" not in proc.stderr


@linux_only
@pytest.mark.parametrize("setting", ["bogus", "tcmalloc-missing"])
def test_a_bad_allocator_setting_stops_the_command_with_exit_2_before_any_work(setting, tmp_path):
    env = _env_without_allocator_settings()
    if setting == "bogus":
        env[ENV_VAR] = "bogus"
    else:
        env[PATH_VAR] = str(tmp_path / "nowhere" / "libtcmalloc.so")
    out = tmp_path / "run"
    proc = subprocess.run([console_script(), "pretrain", "--data", "digits", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and (ENV_VAR if setting == "bogus" else PATH_VAR) in proc.stderr
    assert not out.exists()


@linux_only
@pytest.mark.slow
def test_a_command_records_the_allocator_it_ran_with(tmp_path):
    """A real ``simclrv2 pretrain`` (2 steps): tcmalloc where installed, else glibc keeping freed blocks;
    ``SIMCLRV2_ALLOCATOR=glibc`` keeps glibc either way."""
    expected = "tcmalloc" if find_tcmalloc({}) is not None else "glibc, freed blocks kept"
    base = _env_without_allocator_settings()
    for env, want in ((base, expected), ({**base, ENV_VAR: "glibc"}, "glibc, freed blocks kept")):
        out = tmp_path / want.replace(",", "").replace(" ", "_")
        proc = subprocess.run([console_script(), "pretrain", "--data", "digits", "--max-per-class", "8",
                               "--image-size", "16", "--batch-size", "16", "--max-steps", "2", "--knn-every", "0",
                               "--no-progress", "--out", str(out)], capture_output=True, text=True, env=env,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr
        assert json.loads((out / "results.json").read_text())["allocator"] == want
        assert f"malloc: {want}" in proc.stdout
