"""``simclrv2 import-tf``: turn a released SimCLRv2 TF1 checkpoint into a run directory (SPEC §8)."""

from __future__ import annotations

import argparse
import json

from simclrv2.errors import ConfigError

DESCRIPTION = (
    "Import a SimCLRv2 checkpoint of the reference TensorFlow code (TF1 tensor bundle, read without "
    "TensorFlow) into a run directory (model.safetensors + results.json) that works as --checkpoint for "
    "finetune / linear-eval / evaluate, as --teacher for distill, and with predict / embed / export "
    "(which then evaluate with TF1's legacy bicubic resize, the kernel the released models were scored "
    "with; --resize-mode overrides it). "
    "Outputs equal the reference graph's to ~1e-6 (parity-tested). PATH is a folder with a 'checkpoint' "
    "file, a prefix (model.ckpt-N) or the .index file; or use --download ARCH --kind KIND to fetch a "
    "released model over HTTPS into a cache."
)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from simclrv2.interop.download import DOWNLOAD_KINDS
    from simclrv2.interop.importer import DEFAULT_SELECTOR

    p = sub.add_parser("import-tf", help="Import a released TF1 SimCLRv2 checkpoint (or download one).",
                       description=DESCRIPTION, allow_abbrev=False)
    p.add_argument("path", nargs="?", default=None, metavar="PATH",
                   help="TF1 checkpoint: folder, prefix or .index file (omit with --download).")
    p.add_argument("--download", metavar="ARCH", default=None,
                   help="Fetch the released ARCH (e.g. r50_1x_sk1, r152_3x_sk1) of --kind into --cache-dir.")
    p.add_argument("--kind", choices=DOWNLOAD_KINDS, default=None,
                   help="Which released checkpoint: pretrained (linear-eval head on the encoder), "
                        "finetuned_{1,10,100}pct, supervised, distill_1pct (r152_3x_sk1 only). Required with "
                        "--download; it sets the default --ft-proj-selector ("
                        + ", ".join(f"{k} {v}" for k, v in DEFAULT_SELECTOR.items()) + ").")
    p.add_argument("--out", required=True, metavar="DIR", help="Run directory to write (must not hold a model).")
    p.add_argument("--arch", default=None,
                   help="Expected architecture; an error if the checkpoint holds another. [default: inferred "
                        "from the variable shapes]")
    p.add_argument("--ema", action="store_true",
                   help="Import the momentum-encoder copy (ema_model/) of the released pretrained checkpoints.")
    p.add_argument("--ft-proj-selector", type=int, default=None, metavar="K",
                   help="Which head activation the checkpoint's classifier reads (0 = encoder output, j = head "
                        "layer j). [default: from --kind; needed when the checkpoint has a classifier and no "
                        "--kind is given]")
    p.add_argument("--classes", default=None, metavar="FILE",
                   help="Text file with the class names, one per line, in logit order (then evaluate / distill "
                        "check them against the data set's). [default: unnamed]")
    p.add_argument("--image-size", type=int, default=None,
                   help="Image size recorded for later stages. [default: 224, or 32 for the CIFAR stem]")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="Where --download keeps the files. [default: $SIMCLRV2_CACHE or ~/.cache/simclrv2/"
                        "checkpoints]")
    p.add_argument("--mirror", default=None, metavar="URL",
                   help="Base URL to download from instead of the public bucket (same layout: URL/KIND/ARCH/).")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="No download progress bar.")
    return p


def run(args: argparse.Namespace) -> int:
    from simclrv2.interop.download import BASE_URL, download_checkpoint
    from simclrv2.interop.importer import import_tf_checkpoint

    if (args.path is None) == (args.download is None):
        raise ConfigError("give either PATH (a local TF checkpoint) or --download ARCH, not "
                          + ("both" if args.path else "neither"))
    if args.download is None:
        for flag, value in (("--cache-dir", args.cache_dir), ("--mirror", args.mirror)):
            if value is not None:
                raise ConfigError(f"{flag} applies only with --download")
        path = args.path
    else:
        if args.kind is None:
            raise ConfigError("--download needs --kind (pretrained, finetuned_1pct, finetuned_10pct, "
                              "finetuned_100pct, supervised or distill_1pct)")
        if args.arch is not None and args.arch != args.download:
            raise ConfigError(f"--arch {args.arch} differs from --download {args.download}")
        path = download_checkpoint(args.download, args.kind, cache_dir=args.cache_dir,
                                   base_url=args.mirror or BASE_URL, progress=args.progress)
    report = import_tf_checkpoint(path, args.out, arch=args.arch or args.download, ema=args.ema,
                                  ft_proj_selector=args.ft_proj_selector, kind=args.kind, classes=args.classes,
                                  image_size=args.image_size)
    summary = {k: report[k] for k in ("arch", "kind", "ema", "image_size", "num_classes", "ft_proj_selector",
                                      "global_step", "num_imported", "num_unused", "eval_resize_mode")}
    print(f"import-tf: {report['source']} -> {args.out}/model.safetensors")
    print(json.dumps(summary))
    return 0
