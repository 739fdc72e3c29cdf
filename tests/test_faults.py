"""Real faults in real processes: SIGKILL at EVERY checkpoint-writing call in turn, SIGTERM, and a
decoding worker killed by SIGKILL (as the out-of-memory killer does).

The write points are not hand-picked: a Python audit hook (``sys.addaudithook``; events ``open``
for writing, ``os.rename``/``os.replace``, ``os.remove``, ``os.mkdir``, ``os.rmdir``, ``shutil.rmtree``)
counts every file-system change under ``OUT/checkpoints`` and to ``OUT/model.safetensors`` during an
uninterrupted run. Then, for each i, a fresh process runs the same command and SIGKILLs itself at
the i-th such call; ``--resume`` must then finish with exactly the uninterrupted run's weights
(CPU, fp32, one thread: bit-exact) and leave no temporary file. One driver process imports torch
once, warms itself with one throwaway run, and forks a child per run, which keeps each of the
~2 x N runs to a fraction of a second.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import child_pids

DRIVER = r'''
import json, os, signal, sys
import torch
torch.set_num_threads(1)
import simclrv2.training.pretrain as P
P.PretrainTrainer.monitor_knn = lambda self, step: None
from simclrv2.cli.main import main
from safetensors.torch import load_file

base, root = json.loads(sys.argv[1]), sys.argv[2]
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
EVENTS = ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree")

def run(out, kill_at=None, record=None):
    pid = os.fork()
    if pid == 0:
        watched = (os.path.join(out, "checkpoints"), os.path.join(out, "model.safetensors"),
                   os.path.join(out, ".model.safetensors"))
        seen = []
        def hook(event, args):
            if event == "open":
                if not isinstance(args[0], (str, bytes, os.PathLike)) or not (args[2] or 0) & WRITE_FLAGS:
                    return
            elif event not in EVENTS:
                return
            path = os.fsdecode(args[0]) if isinstance(args[0], (str, bytes, os.PathLike)) else ""
            if not path.startswith(watched):
                return
            seen.append(f"{event} {os.path.relpath(path, out)}")
            if len(seen) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        sys.addaudithook(hook)
        sys.stdout = open(os.devnull, "w")
        code = main(base + ["--out", out])
        if record:
            with open(record, "w") as handle:
                json.dump(seen, handle)
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)

def weights(out):
    return load_file(os.path.join(out, "model.safetensors"))

# Warm the parent once (lazy imports, first-call kernel set-up: ~2.5 s that every fork would
# otherwise pay again) with a run into its own directory, which no child reads or writes.
sys.stdout, real_stdout = open(os.devnull, "w"), sys.stdout
assert main(base + ["--out", os.path.join(root, "warm-up")]) == 0
sys.stdout = real_stdout
ref = os.path.join(root, "reference")
assert run(ref, record=os.path.join(root, "events.json")) == 0
events = json.load(open(os.path.join(root, "events.json")))
want = weights(ref)
report = {"events": events, "cases": []}
for i in range(1, len(events) + 1):
    out = os.path.join(root, f"kill{i:03d}")
    killed = run(out, kill_at=i)
    resumed = run(out)
    got = weights(out) if resumed == 0 else {}
    same = resumed == 0 and got.keys() == want.keys() and all(torch.equal(want[k], got[k]) for k in want)
    temporaries = [str(p) for p in __import__("pathlib").Path(out).rglob("*") if ".tmp" in p.name]
    report["cases"].append({"at": events[i - 1], "killed": killed, "resumed": resumed, "same": same,
                            "temporaries": temporaries})
print(json.dumps(report))
'''

BASE = ["pretrain", "--data", "digits", "--arch", "r18_0.25x_sk0", "--image-size", "8", "--max-per-class", "2", "--batch-size", "8",
        "--schedule-steps", "1", "--checkpoint-every", "1", "--knn-every", "1000000", "--no-progress",
        "--device", "cpu", "--precision", "fp32", "--log-every", "1", "--resume"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_sigkill_at_every_checkpoint_write_then_resume_gives_the_uninterrupted_weights(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(BASE), str(tmp_path)], env=_env(),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    events = report["events"]
    # every kind of write point of the checkpoint and of the export is enumerated (the mid-run resume
    # after a kill is test_reliability's SIGKILL test; one checkpoint keeps this at ~2 x 15 short runs)
    kinds = {e.split()[0] for e in events}
    assert {"open", "os.rename", "os.mkdir"} <= kinds, events
    assert any(e.startswith("os.rename checkpoints/latest") or "latest" in e for e in events), events
    assert any("model.safetensors" in e and not e.startswith("open checkpoints") for e in events), events
    bad = [c for c in report["cases"] if c["killed"] != -signal.SIGKILL or c["resumed"] != 0 or not c["same"]
           or c["temporaries"]]
    assert not bad, f"{len(bad)} of {len(events)} write points lose or change data: {bad[:3]}"


_SIGTERM_CLI = ("import sys, simclrv2.training.pretrain as P; P.PretrainTrainer.monitor_knn = lambda self, step: None; "
                "from simclrv2.cli.main import main; sys.exit(main(sys.argv[1:]))")


def test_sigterm_saves_a_checkpoint_and_exits_143_then_resume_finishes(tmp_path: Path) -> None:
    """What a scheduler sends before pre-emption: the step in progress ends, a checkpoint is written
    (although --checkpoint-every is far away), the exit code is 143, and --resume continues there."""
    out = tmp_path / "run"
    args = [a for a in BASE if a != "--resume"]
    args[args.index("--schedule-steps") + 1] = "400"
    args[args.index("--checkpoint-every") + 1] = "100000"
    proc = subprocess.Popen([sys.executable, "-c", _SIGTERM_CLI, *args, "--out", str(out)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = out / "logs" / "metrics.jsonl", time.monotonic() + 180
    try:
        while not (log.is_file() and log.read_text().count("\n") >= 2):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no training step within 180 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "received SIGTERM; saved a checkpoint at step" in err
    meta = json.loads((out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip() / "meta.json")
                      .read_text())
    assert 2 <= meta["step"] < 400
    resumed = subprocess.run([sys.executable, "-c", _SIGTERM_CLI, *args, "--out", str(out), "--resume",
                              "--max-steps", str(meta["step"] + 1)], env=_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"continuing from step {meta['step']}" in resumed.stdout


# ------------------------------------------------------------------ a decoding worker killed by SIGKILL
_FORCE_DISK_CLI = ("import sys, simclrv2.data.datasets as D; D.fits_in_memory = lambda *a, **k: False; "
                   "import simclrv2.training.pretrain as P; P.PretrainTrainer.monitor_knn = lambda self, step: None; "
                   "from simclrv2.cli.main import main; sys.exit(main(sys.argv[1:]))")
"""The folder is read from disk while training (as one larger than the memory cache is), so the
decoding workers live during training."""


def _noise_folder(root: Path, per_class: int, size: int) -> Path:
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / "train" / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                root / "train" / f"c{c}" / f"{i}.jpg", quality=95)
    return root


def _kill_a_worker(proc: subprocess.Popen) -> int:
    """SIGKILL (what the OOM killer sends) one decoding worker of ``proc`` once it has two."""
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no decoding workers within 120 s"
        workers = child_pids(proc.pid)
        if len(workers) >= 2:
            os.kill(workers[0], signal.SIGKILL)
            return workers[0]
        time.sleep(0.005)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("phase", ["caching", "training"])
def test_a_decoding_worker_killed_by_sigkill_gives_one_message_and_exit_1(phase, tmp_path: Path) -> None:
    root = _noise_folder(tmp_path / "data", per_class=300 if phase == "caching" else 16, size=96)
    out = tmp_path / "run"
    args = ["pretrain", "--data", str(root), "--image-size", "32", "--arch", "r18_0.25x_sk0", "--batch-size", "8",
            "--schedule-steps", "100000", "--checkpoint-every", "100000", "--knn-every", "1000000", "--num-workers",
            "2", "--no-progress", "--device", "cpu", "--precision", "fp32", "--out", str(out)]
    script = _SIGTERM_CLI if phase == "caching" else _FORCE_DISK_CLI  # caching: the folder fits in memory
    proc = subprocess.Popen([sys.executable, "-c", script, *args], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        if phase == "training":  # wait for the plan line: the workers that follow decode training batches
            for line in proc.stdout:
                if line.startswith("pretrain: "):
                    break
            assert proc.poll() is None, proc.stderr.read()[-3000:]
        victim = _kill_a_worker(proc)
        stdout, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip() and "warning" not in line.lower()]
    assert len(lines) == 1 and "stopped: an image-decoding worker" in lines[0] and str(victim) in lines[0], err
    assert "--num-workers" in err and "memory" in err
    if phase == "caching":
        assert "pretrain: " not in stdout  # it died before training started
    assert not (out / "model.safetensors").exists() and not (out / "results.json").exists()


_HALF_BUILT_ITERATOR = r'''
import os, signal, sys, time
from pathlib import Path
from torch.utils.data import DataLoader, Dataset, Sampler
from simclrv2.data.loader import release_dead_loader, worker_failure

flag = Path(sys.argv[1])

class Items(Dataset):
    def __len__(self): return 8
    def __getitem__(self, i): return i

class WaitsForADeadWorker(Sampler):
    """With batch_size=None the sampler is the iterator's index sampler, so its iter() runs twice inside
    the iterator's __init__, the second time after DataLoader has installed its SIGCHLD handler and
    before _workers_status exists: the worker killed meanwhile lands there. The signal may reach
    another thread, so the wait is short sleeps, between which Python runs the handler that raises."""
    calls = 0
    def __len__(self): return 8
    def __iter__(self):
        WaitsForADeadWorker.calls += 1
        if WaitsForADeadWorker.calls == 1:   # the base iterator's __init__, before any worker starts
            return iter(range(8))
        flag.touch()
        for _ in range(3000):
            time.sleep(0.01)
        return iter(range(8))

def kill_first_worker_once_the_sampler_runs(worker_id):
    if worker_id == 0:
        while not flag.exists():
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGKILL)

loader = DataLoader(Items(), sampler=WaitsForADeadWorker(), num_workers=2, batch_size=None,
                    worker_init_fn=kill_first_worker_once_the_sampler_runs)
started = time.monotonic()
try:
    iter(loader)
except RuntimeError as exc:
    print("worker death recognised:", worker_failure(exc) is not None, round(time.monotonic() - started, 1))
    if sys.argv[2] == "release":
        release_dead_loader(exc)
    print("after release", flush=True)
import gc
gc.collect()   # what the end of the CLI's except block and interpreter exit do to the exception
'''


@pytest.mark.timeout(120)
@pytest.mark.parametrize("release", [False, True])
def test_a_worker_killed_while_the_loader_starts_leaves_no_traceback_once_released(release, tmp_path: Path) -> None:
    """The CLI's SIGKILL message stood above torch's "Exception ignored ... AttributeError:
    '_MultiProcessingDataLoaderIter' object has no attribute '_workers_status'" traceback in 1 of 12
    runs of the test above; here a real worker is killed (SIGKILL) inside that window every time.
    Without release_dead_loader (the control) the traceback appears; with it, it does not."""
    result = subprocess.run([sys.executable, "-c", _HALF_BUILT_ITERATOR, str(tmp_path / "sampler-started"),
                             "release" if release else "keep"], env=_env(), capture_output=True, text=True,
                            timeout=100)
    assert result.returncode == 0, result.stderr[-3000:]
    recognised, seconds = result.stdout.splitlines()[0].split()[-2:]
    assert recognised == "True" and float(seconds) < 25, result.stdout   # the signal ended the sampler's sleep
    if release:
        assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr
    else:
        assert "_workers_status" in result.stderr, result.stderr


_ABANDONED_TRANSFER = r'''
import os, socket, sys, time
from multiprocessing import resource_sharer
import torch
from simclrv2.data.loader import BatchIterator, quiet_abandoned_transfers
from simclrv2.data.sources import TensorImageSource
if sys.argv[1] == "quiet":
    quiet_abandoned_transfers(0)               # what each of our DataLoader workers runs first
elif sys.argv[1] == "main":                    # the main process, once it has built a DataLoader of ours
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    loader = BatchIterator(TensorImageSource(images, [0] * 4, ["a"]), 2, shuffle=False,
                           drop_last=True, num_workers=1)
    loader._uses_workers = lambda: True        # a folder source would start the same DataLoader
    next(iter(loader))
read_end, _ = os.pipe()
resource_sharer.DupFd(read_end)                # what handing a shared-memory batch to the main process does
receiver = socket.socket(socket.AF_UNIX)
receiver.connect(resource_sharer._resource_sharer._address)
receiver.recv(4096)                            # the serving thread's authentication challenge
receiver.close()                               # the main process stops in the middle of the handshake
time.sleep(1.0)
print("still serving", flush=True)
'''


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["keep", "quiet", "main"])
def test_a_receiver_hanging_up_on_a_worker_leaves_no_traceback_with_our_worker_init(mode, tmp_path: Path) -> None:
    """The other half of the SIGKILL test's stray output (2 of 10 runs): the surviving worker's
    resource_sharer thread printed an EOFError traceback when the stopping main process hung up while
    collecting a batch. A real socket does that here; the control (keep) shows the traceback, our
    ``worker_init_fn`` drops it (quiet). The main process hands index batches to its workers the same
    way (a killed worker hung up on it once in CI): once it has built our DataLoader it drops it too (main)."""
    result = subprocess.run([sys.executable, "-c", _ABANDONED_TRANSFER, mode], env=_env(),
                            capture_output=True, text=True, timeout=50)
    assert result.returncode == 0 and "still serving" in result.stdout, result.stderr[-3000:]
    if mode != "keep":
        assert "Traceback" not in result.stderr, result.stderr
    else:
        assert "EOFError" in result.stderr and "resource_sharer" in result.stderr, result.stderr
