"""End to end vs the isolated step: a whole ``simclrv2 pretrain`` run (JPEG decoding, augmentation,
step, monitors) against the same step timed alone on pre-made views (issue 17, item 5).

A benchmark, not a test: it writes JSON (``--out``) and prints a summary; nothing is asserted.

Cases (``--cases``):

* ``cifar32``: the CIFAR-10 JPEG folder (``--cifar``, default ``../shared/datasets/cifar10``),
  subsampled with ``--max-per-class``, trained at 32 px (CIFAR stem);
* ``jpeg224_at64``: a folder of 224-px JPEGs (CIFAR images upsampled, bicubic, quality 90; made
  once under ``--work``) trained at 64 px (ImageNet stem): the issue's "first steps 3x slower" case;
* ``jpeg224_at224``: the same folder trained at 224 px.

For each case, in this order (one process at a time, never two at once):

1. **isolated**: a worker process builds the step as ``PretrainTrainer`` does (same config, model with
   the online probe, optimiser, ``PretrainStep``), makes one batch of views with our augmentation and
   times ``--isolated-steps`` steps after 2 warm-up steps (median and min).
2. **end to end**: ``simclrv2 pretrain`` in a subprocess with ``--log-every 1``; per-step seconds
   come from the logged ``train/images_per_s`` (each window covers data wait, augmentation, step and
   whatever ran since the previous log, i.e. an epoch-end kNN monitor lands in the next step), kNN
   monitor seconds from ``monitor/knn_seconds``.  ``--knn-policies default,every-epoch`` also runs
   the old behaviour (``--knn-every`` = steps per epoch: a monitor at every epoch end) for a
   before/after comparison.

Reported per run: warm-up (first steps' seconds vs the median of the later ones), the last epoch's
images/s, the whole fit's images/s with and without monitors, the kNN share of the training time,
the process wall time, and ``e2e_vs_isolated`` = last epoch's images/s / isolated images/s (target
>= 0.9).  The load average before/after goes into the JSON: on a shared machine every figure is
inflated, ratios less so.

Usage::

    python benchmarks/end_to_end.py --quick          # small folders, 2 epochs, minutes
    python benchmarks/end_to_end.py --cases cifar32 --max-per-class 500 --batch-size 256 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CIFAR = REPO.parent / "shared" / "datasets" / "cifar10"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "end_to_end.json"
CASES = {"cifar32": ("cifar", 32), "jpeg224_at64": ("jpeg224", 64), "jpeg224_at224": ("jpeg224", 224)}


def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _build_subsample(cifar: Path, out: Path, train_per_class: int, test_per_class: int, key: str,
                     place: Callable[[Path, Path], None], classes: tuple[str, ...] | None = None) -> Path:
    """``out/{train,test}/<class>/`` with the first ``n`` CIFAR JPEGs of each class (of ``classes``, or
    all) put there by ``place(src, dest_file)``; built once per ``key`` (a ``.complete`` marker), then reused."""
    done = out / ".complete"
    want = f"{key} {train_per_class} {test_per_class}" + (f" {','.join(classes)}" if classes else "")
    if done.exists() and done.read_text() == want:
        return out
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for class_dir in sorted(p for p in (cifar / split).iterdir() if p.is_dir()):
            if classes is not None and class_dir.name not in classes:
                continue
            dest = out / split / class_dir.name
            dest.mkdir(parents=True, exist_ok=True)
            for src in sorted(class_dir.glob("*.jpg"))[:n]:
                place(src, dest / src.name)
    done.write_text(want)
    return out


def make_jpeg_folder(cifar: Path, out: Path, side: int, train_per_class: int, test_per_class: int) -> Path:
    """ROOT/{train,test}/<class>/*.jpg of CIFAR images upsampled to ``side`` px (made once, reused)."""
    from PIL import Image

    def upsample(src: Path, dest: Path) -> None:
        with Image.open(src) as img:
            img.convert("RGB").resize((side, side), Image.BICUBIC).save(dest, quality=90)

    return _build_subsample(cifar, out, train_per_class, test_per_class, f"{side}px", upsample)


def subsample_cifar(cifar: Path, out: Path, train_per_class: int, test_per_class: int,
                    classes: tuple[str, ...] | None = None) -> Path:
    """Symlinked subsample (the test split too: the monitor's cost depends on its size)."""
    def link(src: Path, dest: Path) -> None:
        if not dest.exists():
            dest.symlink_to(src.resolve())

    return _build_subsample(cifar, out, train_per_class, test_per_class, "links", link, classes)


# ---- isolated step (worker process) -------------------------------------------------------------

def isolated_worker(image_size: int, batch: int, steps: int, num_classes: int, arch: str) -> dict[str, Any]:
    import torch

    from simclrv2.augment import AugmentConfig, SimCLRAugmentation
    from simclrv2.config import build_config
    from simclrv2.models import create_model
    from simclrv2.training.pretrain import PretrainStep
    from simclrv2.training.runtime import setup_runtime
    from simclrv2.training.trainer import build_optimizer, plan_steps

    cfg = build_config("pretrain", flag_values={"arch": arch, "device": "cpu", "image_size": image_size})
    rt = setup_runtime(cfg)
    plan = plan_steps(cfg, 10 * batch, batch)
    net = rt.prepare_model(create_model(arch, image_size=image_size, num_proj_layers=cfg.num_proj_layers,
                                        proj_out_dim=cfg.proj_out_dim, num_classes=num_classes,
                                        classifier_stop_grad=True))
    optimizer = build_optimizer(cfg, net, plan.peak_lr)
    step = PretrainStep(net, optimizer, rt, temperature=cfg.temperature, weight_decay=cfg.weight_decay or 0.0)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8, generator=gen)
    aug = SimCLRAugmentation(AugmentConfig.for_pretraining(image_size, color_jitter_strength=cfg.color_jitter_strength,
                                                           use_blur=cfg.use_blur))
    views = rt.layout(aug.two_views(images, gen))
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    times = []
    for i in range(2 + steps):
        start = time.perf_counter()
        float(step(views, labels)["loss"])
        if i >= 2:
            times.append(time.perf_counter() - start)
    return {"seconds_min": min(times), "seconds_median": statistics.median(times), "steps": steps,
            "images_per_s": batch / statistics.median(times), "images_per_s_best": batch / min(times),
            "precision": rt.precision, "threads": torch.get_num_threads()}


def run_isolated(image_size: int, batch: int, steps: int, num_classes: int, arch: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--isolated-worker",
           json.dumps([image_size, batch, steps, num_classes, arch])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ---- end to end ---------------------------------------------------------------------------------

def run_pretrain(data: Path, image_size: int, batch: int, epochs: int, arch: str, knn_every: int | None,
                 workers: int) -> dict[str, Any]:
    from simclrv2.training.rundir import read_metrics

    with tempfile.TemporaryDirectory(prefix="simclrv2-e2e-") as tmp:
        run_dir = Path(tmp) / "run"
        args = ["pretrain", "--data", str(data), "--image-size", str(image_size), "--batch-size", str(batch),
                "--epochs", str(epochs), "--arch", arch, "--log-every", "1", "--checkpoint-every", "1000000",
                "--no-progress", "--device", "cpu", "--num-workers", str(workers), "--out", str(run_dir)]
        if knn_every is not None:
            args += ["--knn-every", str(knn_every)]
        code = "import sys; from simclrv2.cli.main import main; sys.exit(main(sys.argv[1:]))"
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"simclrv2 pretrain failed ({proc.returncode}): {proc.stderr[-2000:]}")
        records = read_metrics(run_dir)
        results = json.loads((run_dir / "results.json").read_text())
    steps = {r["step"]: batch / r["train/images_per_s"] for r in records if "train/images_per_s" in r}
    knn = [(r["step"], r["monitor/knn_seconds"]) for r in records if "monitor/knn_seconds" in r]
    seq = [steps[s] for s in sorted(steps)]
    n_steps = len(seq)
    per_epoch = n_steps // epochs
    final_step = max(steps)
    # The monitor at an epoch end lands in the next step's window; the final one comes after the fit.
    epoch_end_knn = sum(sec for st, sec in knn if st < final_step)
    final_knn = sum(sec for st, sec in knn if st == final_step)
    fit_seconds = sum(seq)
    later = seq[3:] if len(seq) > 3 else seq[-1:]
    last_epoch = seq[-per_epoch:]
    last_epoch_knn = sum(sec for st, sec in knn if final_step - per_epoch <= st < final_step)
    return {
        "knn_every": knn_every if knn_every is not None else "default (5% budget)",
        "steps": n_steps, "steps_per_epoch": per_epoch, "epochs": epochs,
        "step_seconds": seq, "knn_monitors": [{"step": s, "seconds": sec} for s, sec in knn],
        "warmup": {"first_steps_seconds": seq[:3], "later_median_seconds": statistics.median(later),
                   "first_step_vs_later": seq[0] / statistics.median(later)},
        "last_epoch_images_per_s": batch * per_epoch / sum(last_epoch),
        "last_epoch_images_per_s_excl_monitor": batch * per_epoch / max(sum(last_epoch) - last_epoch_knn, 1e-9),
        "fit_images_per_s": batch * n_steps / (fit_seconds + final_knn),
        "epoch_end_knn_seconds": epoch_end_knn, "final_knn_seconds": final_knn,
        "knn_share_of_training": (epoch_end_knn + final_knn) / max(fit_seconds - epoch_end_knn, 1e-9),
        "epoch_end_knn_share_of_training": epoch_end_knn / max(fit_seconds - epoch_end_knn, 1e-9),
        "process_wall_seconds": wall, "knn_top1": results.get("knn_top1"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--quick", action="store_true", help="small folders and batches (minutes)")
    parser.add_argument("--cifar", type=Path, default=DEFAULT_CIFAR, help="CIFAR-10 JPEG folder (train/, test/)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "simclrv2-e2e",
                        help="where the generated folders are kept between runs")
    parser.add_argument("--max-per-class", type=int, default=None, help="training images per class")
    parser.add_argument("--test-per-class", type=int, default=None, help="test images per class")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--isolated-steps", type=int, default=None)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--arch", default="r18_1x_sk0")
    parser.add_argument("--knn-policies", default="default,every-epoch",
                        help="default (5%% budget) and/or every-epoch (the old behaviour)")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/end_to_end-<host kind>[-quick].json: one file per host kind)")
    parser.add_argument("--isolated-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.isolated_worker:
        print(json.dumps(isolated_worker(*json.loads(args.isolated_worker))))
        return
    q = args.quick
    per_class = args.max_per_class or (13 if q else 160)
    test_per_class = args.test_per_class or (20 if q else 200)
    batch = args.batch_size or (32 if q else 128)
    epochs = args.epochs or 2
    iso_steps = args.isolated_steps or (3 if q else 5)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {unknown}; choose from {list(CASES)}")
    if not (args.cifar / "train").is_dir():
        parser.error(f"--cifar: {args.cifar} has no train/ folder")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from throughput import host_info, machine_busy_before, run_record  # sibling benchmark script

    import torch

    host = host_info(torch.get_num_threads())
    # One result file per host kind (as throughput.py): end_to_end-<host kind>[-quick].json.
    out = args.out or DEFAULT_OUT.with_name(f"end_to_end-{host['host_kind']}{'-quick' if q else ''}.json")
    load_before = load_average()
    busy, cpu_used_before, busy_rule = machine_busy_before(load_before)
    report: dict[str, Any] = {"run": run_record(argv, "benchmarks/end_to_end.py"),
                              "load_average_before": load_before, "machine_busy": busy,
                              "other_cpu_use_before": cpu_used_before, "busy_rule": busy_rule, "host": host,
                              "torch": torch.__version__,
                              "settings": {"train_per_class": per_class, "test_per_class": test_per_class,
                                           "batch_size": batch, "epochs": epochs, "arch": args.arch,
                                           "num_workers": args.num_workers, "quick": q}, "cases": {}}
    policies = [p.strip() for p in args.knn_policies.split(",") if p.strip()]
    for case in cases:
        kind, size = CASES[case]
        if kind == "cifar":
            data = subsample_cifar(args.cifar, args.work / f"cifar32-{per_class}-{test_per_class}", per_class,
                                   test_per_class)
        else:
            data = make_jpeg_folder(args.cifar, args.work / f"jpeg224-{per_class}-{test_per_class}", 224,
                                    per_class, test_per_class)
        case_batch = max(8, batch // 4) if size >= 224 else batch
        print(f"[{case}] isolated step ({size} px, batch {case_batch}) ...", file=sys.stderr, flush=True)
        iso_before = run_isolated(size, case_batch, iso_steps, 10, args.arch)
        entry: dict[str, Any] = {"image_size": size, "batch_size": case_batch, "data": str(data), "runs": {}}
        steps_per_epoch = (10 * per_class) // case_batch
        for policy in policies:
            iso = iso_before
            knn_every = None if policy == "default" else steps_per_epoch
            print(f"[{case}] simclrv2 pretrain, kNN {policy} ...", file=sys.stderr, flush=True)
            r = run_pretrain(data, size, case_batch, epochs, args.arch, knn_every, args.num_workers)
            r["e2e_vs_isolated"] = r["last_epoch_images_per_s"] / iso["images_per_s"]
            r["e2e_vs_isolated_excl_monitor"] = r["last_epoch_images_per_s_excl_monitor"] / iso["images_per_s"]
            entry["runs"][policy] = r
            print(f"  {policy}: last epoch {r['last_epoch_images_per_s']:.1f} img/s = "
                  f"{100 * r['e2e_vs_isolated']:.0f}% of isolated ({iso['images_per_s']:.1f}); kNN "
                  f"{100 * r['knn_share_of_training']:.0f}% of training (epoch ends "
                  f"{100 * r['epoch_end_knn_share_of_training']:.0f}%); first step "
                  f"{r['warmup']['first_step_vs_later']:.1f}x later ones", file=sys.stderr, flush=True)
        # Timed again after the runs: on a shared machine the load changes, and load only adds time,
        # so the faster of the two measurements is the isolated step's speed.
        iso_after = run_isolated(size, case_batch, iso_steps, 10, args.arch)
        iso = max(iso_before, iso_after, key=lambda d: d["images_per_s"])
        entry["isolated"] = {**iso, "before_runs": iso_before, "after_runs": iso_after}
        for r in entry["runs"].values():
            r["e2e_vs_isolated"] = r["last_epoch_images_per_s"] / iso["images_per_s"]
            r["e2e_vs_isolated_excl_monitor"] = r["last_epoch_images_per_s_excl_monitor"] / iso["images_per_s"]
        print(f"  isolated {iso_before['images_per_s']:.1f} before, {iso_after['images_per_s']:.1f} after; "
              + "; ".join(f"{p}: {100 * r['e2e_vs_isolated']:.0f}% of isolated" for p, r in entry["runs"].items()),
              file=sys.stderr, flush=True)
        report["cases"][case] = entry
    report["load_average_after"] = load_average()
    report["machine_note"] = (f"BUSY machine ({busy_rule}): absolute figures inflated" if busy
                              else f"quiet machine ({busy_rule})")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
