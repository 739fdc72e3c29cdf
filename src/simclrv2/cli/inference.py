"""``simclrv2 predict | embed | export``: use a trained network (parsers and runners).

The heavy imports (torch, onnx) happen in the runners, so ``simclrv2 --help`` stays fast. Every
user-facing failure is a :class:`~simclrv2.errors.SimCLRv2Error` that ``cli.main`` prints as
``simclrv2 CMD: error: ...`` with its exit code (2 bad input or checkpoint, 1 export parity).
"""

from __future__ import annotations

import argparse
from typing import Any

COMMANDS = ("predict", "embed", "export")

_CONTRACT = ("Input contract: float32 RGB in [0, 1], NCHW, no mean/std normalisation; each image decoded at full "
             "resolution, centre crop of 0.875 and one resize to the checkpoint's image size (the preprocessing "
             "of `simclrv2 evaluate`).")

RESIZE_MODES = ("bicubic", "bicubic_legacy", "bilinear")  # simclrv2.augment.resize.RESIZE_MODES (no torch import)


def _resize_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--resize-mode", choices=RESIZE_MODES, default=None,
                   help=f"Resize kernel of the centre crop {what}: bicubic (TF2 tf.image.resize), bicubic_legacy "
                        "(TF1 tf.image.resize_bicubic, the code the released checkpoints were evaluated with) or "
                        "bilinear. [default: the checkpoint's recorded one (bicubic_legacy after import-tf), "
                        "else bicubic]")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="RUN",
                   help="Run directory (its model.safetensors) or a .safetensors file.")


def _runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=256, help="Images per batch. [default: 256]")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="Where to run: cpu, cuda or auto. [default: auto]")
    p.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="auto = bf16 autocast where the hardware has it (as evaluate), else fp32. [default: auto]")
    p.add_argument("--strict", action="store_true",
                   help="Stop (exit 2) at the first unreadable image instead of listing it on stderr and "
                        "skipping it.")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="Show a progress bar on stderr. [default: on]")


def add_parsers(sub: Any) -> None:
    """Register the three subcommands on ``sub`` (an ``add_subparsers`` object)."""
    p = sub.add_parser("predict", help="Classify images with a fine-tuned checkpoint.",
                       description="Classify image files and folders (walked recursively) with a trained "
                                   "classifier. One row per image: path, label, prob and the top-k labels and "
                                   "probabilities. " + _CONTRACT)
    _common(p)
    p.add_argument("paths", nargs="+", metavar="PATH", help="Image files or folders.")
    p.add_argument("--out", default=None, metavar="FILE", help="Output file [default: stdout].")
    p.add_argument("--format", dest="fmt", choices=("csv", "jsonl"), default="csv",
                   help="csv (columns path,label,prob,label_1,prob_1,...) or jsonl. [default: csv]")
    p.add_argument("--top-k", type=int, default=5, help="Number of best classes per image. [default: 5]")
    _resize_option(p, "(SPEC §6)")
    _runtime_options(p)

    p = sub.add_parser("embed", help="Write one embedding vector per image.",
                       description="Encoder features (or a projection-head layer) of every image, with its path "
                                   "and, when the folder has class sub-folders, its label. Output: .safetensors "
                                   "(tensors embeddings, labels; metadata paths, classes) or .npz (arrays "
                                   "embeddings, paths, labels, classes). " + _CONTRACT)
    _common(p)
    p.add_argument("--data", nargs="+", required=True, metavar="DIR|PATH", help="Image folders or files.")
    p.add_argument("--out", required=True, metavar="FILE.safetensors|FILE.npz", help="Output file.")
    p.add_argument("--layer", default="features",
                   help="features (encoder output), proj_1 .. proj_k (projection-head layers the checkpoint has) "
                        "or projection (the last head layer). [default: features]")
    _resize_option(p, "(SPEC §6)")
    _runtime_options(p)

    p = sub.add_parser("export", help="Export to ONNX or TorchScript, with a parity check.",
                       description="Write the classifier (or the encoder) as ONNX or TorchScript with a dynamic "
                                   "batch dimension, the input contract and class names in the file's metadata; "
                                   "then load it with its runtime and compare with PyTorch fp32 (exit 1 and the "
                                   "file is removed above 1e-4). " + _CONTRACT)
    _common(p)
    p.add_argument("--format", dest="fmt", choices=("onnx", "torchscript"), required=True, help="Output format.")
    p.add_argument("--out", required=True, metavar="FILE", help="Output file (e.g. model.onnx, model.pt).")
    p.add_argument("--what", choices=("classifier", "encoder"), default="classifier",
                   help="classifier: images -> logits; encoder: images -> features. [default: classifier]")
    _resize_option(p, "that the input contract in the file's metadata names (simclrv2.resize_mode; the graph "
                      "itself takes preprocessed images)")


def run(args: argparse.Namespace) -> int:
    """Run the parsed subcommand; returns the exit code (errors propagate as SimCLRv2Error)."""
    if args.command == "predict":
        from simclrv2.inference.predict import predict_files

        predict_files(args.checkpoint, args.paths, out=args.out, fmt=args.fmt, top_k=args.top_k,
                      batch_size=args.batch_size, device=args.device, precision=args.precision,
                      strict=args.strict, progress=args.progress, resize_mode=args.resize_mode)
    elif args.command == "embed":
        from simclrv2.inference.embed import embed_files

        embed_files(args.checkpoint, args.data, args.out, layer=args.layer, batch_size=args.batch_size,
                    device=args.device, precision=args.precision, strict=args.strict, progress=args.progress,
                    resize_mode=args.resize_mode)
    elif args.command == "export":
        from simclrv2.inference.export import export_file

        export_file(args.checkpoint, args.out, fmt=args.fmt, what=args.what, resize_mode=args.resize_mode)
    else:  # pragma: no cover - guarded by argparse
        raise NotImplementedError(args.command)
    return 0
