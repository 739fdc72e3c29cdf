"""The ``simclrv2`` command: one subcommand per stage of the method.

The options of each subcommand are generated from :class:`simclrv2.config.Config`, so that
``--help`` documents every option and the YAML file accepts exactly the same names.
Invalid settings exit with code 2 before any work starts.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
from dataclasses import fields
from typing import Any, Callable, Sequence

from simclrv2 import __version__
from simclrv2.config import Config, build_config, check_applies, field_kind, fields_for_stage, load_yaml, \
    stage_defaults
from simclrv2.errors import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_USAGE, ConfigError, SimCLRv2Error, TrainingError

DESCRIPTIONS = {
    "pretrain": "Step 1: task-agnostic SimCLRv2 contrastive pretraining (NT-Xent over two augmented views, "
                "deep projection head, LARS, warmup + cosine; optional momentum memory).",
    "finetune": "Step 2: fine-tune a pretrained network on the labelled fraction, from a projection-head "
                "layer (--ft-proj-selector), with random crop + flip only.",
    "linear-eval": "Linear evaluation: a linear classifier on frozen head-input features.",
    "supervised": "Supervised baseline: the same architecture trained from scratch on the same labels.",
    "distill": "Step 3: distil a fine-tuned teacher into a student (same size = self-distillation, or "
               "smaller) on all training images with a temperature softmax (paper Eq. 2-3).",
    "evaluate": "Top-1 / top-5 accuracy of a checkpoint on the labelled evaluation split.",
    "pipeline": "Pretrain -> fine-tune at each label fraction -> distil -> evaluate, plus the supervised "
                "baseline and linear evaluation; re-runs skip finished stages; writes a report.",
    "demo": "The whole pipeline on the embedded digits data, offline: about 12 minutes on 2 CPU cores with "
            "its 3 seeds (--seeds 1: about 5).",
}

SHORT_HELP = {
    "pretrain": "Step 1: self-supervised SimCLRv2 pretraining.",
    "finetune": "Step 2: fine-tune on the labelled fraction.",
    "distill": "Step 3: distil a fine-tuned teacher into a student using unlabelled images.",
    "linear-eval": "Linear classifier on frozen features.",
    "supervised": "Supervised baseline from scratch on the same labels.",
    "evaluate": "Top-1 / top-5 of a checkpoint.",
    "pipeline": "All stages, resumable, with a report of the gains.",
    "demo": "The pipeline on the embedded digits data (offline).",
}


def _annotation_base(annotation: Any) -> type:
    """The Python type of a Config field (``int | None`` -> int)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing), {})  # dataclass annotations are strings here
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args:
        base = args[0]
        if typing.get_origin(base) is list:
            return list
        return base
    return annotation


def add_config_options(parser: argparse.ArgumentParser, stage: str) -> None:
    """Add one option per Config field used by ``stage``; defaults are suppressed so that only
    flags the user typed override the YAML file and stage defaults."""
    defaults = Config()
    for f in fields_for_stage(stage):
        meta = f.metadata
        flag = "--" + f.name.replace("_", "-")
        kind = _annotation_base(f.type)
        default = stage_defaults(stage).get(f.name, getattr(defaults, f.name))  # e.g. pipeline: resume on
        help_text = meta["help"]
        if default is not None and kind is not bool and f.name not in ("epochs",):
            help_text += f" [default: {default}]"
        kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            if default is not None:
                kwargs["help"] = help_text + f" [default: {'on' if default else 'off'}]"
        elif meta.get("action") == "append":
            kwargs["action"] = "append"
            kwargs["metavar"] = "DIR"
        elif kind is list:
            kwargs["nargs"] = meta.get("nargs", "+")
            kwargs["type"] = meta.get("type", float)
        else:
            kwargs["type"] = kind
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
            kwargs["metavar"] = f.name.upper() if not meta.get("choices") else None
            if kwargs["metavar"] is None:
                del kwargs["metavar"]
        parser.add_argument(flag, **kwargs)
    parser.add_argument("--config", dest="config_file", default=None, metavar="FILE.yaml",
                        help="YAML file of options (same names as the flags, dashes or underscores); "
                             "flags given on the command line override it.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simclrv2",
        description="SimCLRv2 (Chen et al., 2020): many unlabelled images + a few labelled ones -> a strong "
                    "classifier. Steps: pretrain -> finetune -> distill; plus linear-eval, supervised, "
                    "evaluate, and pipeline/demo that run everything and report the gains.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `simclrv2 <command> --help` for the options of each command.\n"
               "Quick start: `simclrv2 demo` (offline, embedded data).",
    )
    parser.add_argument("--version", action="version", version=f"simclrv2 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for stage in ("pretrain", "finetune", "distill", "linear-eval", "supervised", "evaluate", "pipeline",
                  "demo"):
        p = sub.add_parser(stage, help=SHORT_HELP[stage], description=DESCRIPTIONS[stage], allow_abbrev=False)
        add_config_options(p, stage)
    models = sub.add_parser("models", help="List the architectures of the model zoo with parameter counts.",
                            description="List the SimCLRv2 ResNet family: name, depth, width, selective "
                                        "kernels, parameters (SPEC §11 rule: conv weights + 4 numbers per "
                                        "BatchNorm channel, trunk only) and feature dimension.")
    models.add_argument("--json", action="store_true", help="Print a JSON list instead of a table.")
    models.add_argument("--image-size", type=int, default=224,
                        help="Input size the models are built for (<= 32 uses the CIFAR stem). [default: 224]")
    models.add_argument("--all", action="store_true", help="Also list every depth/width combination.")
    from simclrv2.cli.inference import add_parsers as add_inference_parsers
    add_inference_parsers(sub)  # predict, embed, export
    from simclrv2.cli.import_tf import add_parser as add_import_tf_parser
    add_import_tf_parser(sub)  # import-tf
    return parser


def config_from_args(stage: str, args: argparse.Namespace) -> Config:
    flag_values = {f.name: getattr(args, f.name) for f in fields(Config) if hasattr(args, f.name)}
    file_values = load_yaml(args.config_file, stage) if getattr(args, "config_file", None) else {}
    if "unlabeled" in flag_values and "unlabeled" in file_values:  # repeatable: flags add to the file's
        flag_values["unlabeled"] = [*file_values["unlabeled"], *flag_values["unlabeled"]]
    return build_config(stage, file_values, flag_values)


def check_extra_arguments(stage: str, extras: list[str]) -> None:
    """Arguments argparse did not recognise: an option of another command, a misspelt one (with
    "did you mean"), or a stray value. Raises ConfigError naming the first one (exit 2)."""
    for arg in extras:
        if arg.startswith("--") and len(arg) > 2:
            name = arg[2:].split("=", 1)[0].replace("-", "_")
            if name.startswith("no_") and name[3:] in {f.name for f in fields(Config)} \
                    and field_kind(name[3:])[0] == "bool":
                name = name[3:]
            check_applies(name, stage, flag=True)
            raise ConfigError(f"--{name.replace('_', '-')}: unexpected form {arg!r}")  # pragma: no cover
        raise ConfigError(f"unexpected argument {arg!r} (options start with --; see simclrv2 {stage} --help)")


def _runner(stage: str) -> Callable[[Config], Any]:
    if stage == "pretrain":
        from simclrv2.training.pretrain import pretrain
        return pretrain
    if stage == "finetune":
        from simclrv2.training.finetune import finetune
        return finetune
    if stage == "supervised":
        from simclrv2.training.finetune import supervised
        return supervised
    if stage == "linear-eval":
        from simclrv2.training.linear_eval import linear_eval
        return linear_eval
    if stage == "distill":
        from simclrv2.training.distill import distill
        return distill
    if stage == "evaluate":
        from simclrv2.training.evaluate import evaluate_checkpoint
        return evaluate_checkpoint
    if stage == "pipeline":
        from simclrv2.training.pipeline import run_pipeline
        return run_pipeline
    if stage == "demo":
        from simclrv2.training.pipeline import run_demo
        return run_demo
    raise NotImplementedError(stage)


#: Subcommands that run a network: started under tcmalloc where it is installed (``utils/allocator.py``).
MODEL_COMMANDS = frozenset(DESCRIPTIONS) | {"predict", "embed", "export"}


def _restart_under_tcmalloc(argv: Sequence[str] | None) -> int | None:
    """As a command (``argv`` None) that runs a network, restart once under tcmalloc when it is installed
    (:mod:`simclrv2.utils.allocator`); an exit code for a bad ``SIMCLRV2_ALLOCATOR`` / ``SIMCLRV2_TCMALLOC``,
    else None. Called before torch is imported, so the restart costs one interpreter start."""
    command = next((word for word in sys.argv[1:] if not word.startswith("-")), None)
    if argv is not None or command not in MODEL_COMMANDS:
        return None
    from simclrv2.utils.allocator import restart_under_tcmalloc
    try:
        restart_under_tcmalloc()  # returns only when nothing is to change
    except ConfigError as exc:
        print(f"simclrv2 {command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """The ``simclrv2`` command; returns its exit code (``simclrv2.errors``)."""
    if (code := _restart_under_tcmalloc(argv)) is not None:
        return code
    try:
        return _main(argv)
    except BrokenPipeError:
        # the reader of our standard output went away (``simclrv2 models | head``): stop quietly, as a
        # C tool killed by SIGPIPE would, and keep Python from failing again when it flushes at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras and args.command in (None, "models") or (extras and args.command not in DESCRIPTIONS):
        parser.parse_args(argv)  # argparse's own message and exit code 2
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "models":
        from simclrv2.cli.models import print_models
        return print_models(as_json=args.json, image_size=args.image_size, show_all=args.all)
    if args.command == "import-tf":
        from simclrv2.cli.import_tf import run as run_import_tf
        try:
            return run_import_tf(args)
        except SimCLRv2Error as exc:
            print(f"simclrv2 {args.command}: error: {exc}", file=sys.stderr)
            return exc.exit_code
    if args.command in ("predict", "embed", "export"):
        from simclrv2.cli.inference import run as run_inference_command
        try:
            return run_inference_command(args)
        except SimCLRv2Error as exc:
            print(f"simclrv2 {args.command}: error: {exc}", file=sys.stderr)
            return exc.exit_code
    try:
        check_extra_arguments(args.command, extras)
        cfg = config_from_args(args.command, args)
        runner = _runner(args.command)
    except SimCLRv2Error as exc:
        print(f"simclrv2 {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ImportError, NotImplementedError) as exc:  # a stage not built yet
        print(f"simclrv2 {args.command}: not available in this version ({exc})", file=sys.stderr)
        return EXIT_USAGE
    from simclrv2.training.runtime import sigterm_stops_cleanly
    from simclrv2.utils.distributed import cleanup_distributed
    try:
        with sigterm_stops_cleanly():  # SIGTERM outside a training loop: exit 143, one line (errors.py)
            runner(cfg)
        cleanup_distributed()
    except TrainingError as exc:
        print(f"simclrv2 {args.command}: stopped: {exc}", file=sys.stderr)
        from simclrv2.data.loader import release_dead_loader
        release_dead_loader(exc)  # a worker death's half-built DataLoader iterator, without its traceback
        return exc.exit_code
    except SimCLRv2Error as exc:
        print(f"simclrv2 {args.command}: error: {exc}", file=sys.stderr)
        cleanup_distributed()  # every rank found the same problem before training (errors.py exit 2)
        return exc.exit_code
    except RuntimeError as exc:  # a decoding worker died outside a training loop (data/loader.py)
        from simclrv2.data.loader import release_dead_loader, worker_failure
        if (failure := worker_failure(exc)) is None:
            raise
        print(f"simclrv2 {args.command}: stopped: {failure}", file=sys.stderr)
        release_dead_loader(exc)
        return failure.exit_code
    except KeyboardInterrupt:
        print(f"simclrv2 {args.command}: interrupted; resume with --resume --out <run dir>", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
