"""Import a released SimCLRv2 TF1 checkpoint into a simclrv2 run directory (SPEC §8.1, §8.3).

:func:`import_tf_checkpoint` reads the bundle (:mod:`.tf_bundle`), infers the architecture
from the variable shapes, builds our network (full 3-layer projection head, as the reference
builds it in ``train_mode=finetune``, plus ``head_supervised`` on
``hiddens[ft_proj_selector]``), copies every tensor by creation order (:mod:`.tf_names`), and
writes ``OUT/model.safetensors`` with the usual model meta (stage ``"imported"``) and
``OUT/results.json`` listing what was imported and what was left out, and why.

Strictness: every variable of the checkpoint is either copied or skipped for a stated reason
(optimiser slots, ``global_step``, the unused live/EMA copy); any other variable, a missing
one, or a shape that differs is a :class:`~simclrv2.errors.CheckpointError` naming it.  Every
parameter and buffer of our network is filled, except ``num_batches_tracked`` (a PyTorch
counter with no TF counterpart; it is unused with a fixed BN momentum, and left at 0).

``ft_proj_selector`` cannot be read from a checkpoint (the head's hidden layers all have the
encoder's width, so ``head_supervised/linear_layer/dense/kernel`` ``[2048·w, classes]`` fits
``hiddens[0]``, ``[1]`` and ``[2]`` alike; the manifests of all 13 released architectures show
it), so it is an option with a default per kind of checkpoint (:data:`DEFAULT_SELECTOR`), decided
from what the reference code and paper say each kind was trained with:

* ``pretrained`` -> 0: the TF1 code creates no ``head_supervised`` in pretraining; the released
  one is the linear-evaluation head trained alongside (TF2 ``lineareval_while_pretraining``) on
  ``stop_gradient(hiddens[ft_proj_selector])`` with the flag's default 0 (SPEC §2.2, §7); applied
  to the average-pool features it scores within 0.8 points of the published linear-eval column
  (Separius' conversion, SPEC §8.3).
* ``finetuned_1pct`` / ``finetuned_10pct`` -> 1: the README's fine-tuning command passes
  ``--ft_proj_selector=1`` and the paper fine-tunes "from the first layer of the projection head
  for 1%/10% of labeled examples" (SPEC §2.1, §7).
* ``finetuned_100pct`` -> 0: the same paper sentence goes on "but from the input of the
  projection head when 100% labels are present" (SPEC §2.1).
* ``supervised`` -> 0: the baselines were trained "with finetune mode from scratch" (SPEC §7,
  issue #10) with the flag's default 0; with a larger selector the TF1 code would have put
  never-trained head layers (in no ``trainable_variables_inblock_*`` collection, SPEC §2.2) between
  encoder and classifier.
* ``distill_1pct`` -> 0: "Students have no projection head" (SPEC §1, paper §3: the student
  "has the same model architecture as the teacher (excluding projection head)").

None of these can be confirmed from the weights without the ImageNet validation set; a user who
knows better passes ``--ft-proj-selector``. The EMA copy (``--ema``) holds no ``head_supervised``;
its classifier is then the live one, and results.json says so.

Every import records ``eval_resize_mode = "bicubic_legacy"`` in the model meta: the released
checkpoints come from the TF1 code, whose ``preprocess_for_eval`` resizes the centre crop with
``tf.image.resize_bicubic`` (legacy, non-half-pixel; SPEC §6), so ``evaluate`` / ``predict`` /
``embed`` use that kernel by default for an imported model (``--resize-mode`` overrides it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simclrv2.errors import CheckpointError, ConfigError
from simclrv2.interop.tf_bundle import TFCheckpoint
from simclrv2.interop.tf_names import (
    BASE,
    EMA_PREFIX,
    HEAD,
    SUPERVISED,
    TFArchitecture,
    infer_architecture,
    is_optimizer_slot,
    map_network,
)
from simclrv2.models.network import SimCLRNet
from simclrv2.models.registry import create_model, parse_arch
from simclrv2.training.evaluate import EVAL_RESIZE_MODE_KEY
from simclrv2.training.model_io import model_meta
from simclrv2.utils.checkpoint import atomic_write_text, save_weights

__all__ = ["KINDS", "DEFAULT_SELECTOR", "IMPORTED_STAGE", "import_tf_checkpoint", "convert_checkpoint",
           "read_classes_file"]

#: Kinds of released checkpoints (folders of the public bucket, SPEC §8.1).
KINDS = ("pretrained", "finetuned_1pct", "finetuned_10pct", "finetuned_100pct", "supervised", "distill_1pct")
#: Default ``ft_proj_selector`` per kind (see the module docstring).
DEFAULT_SELECTOR = {"pretrained": 0, "finetuned_1pct": 1, "finetuned_10pct": 1, "finetuned_100pct": 0,
                    "supervised": 0, "distill_1pct": 0}
#: Resize kernel of the reference evaluation the released TF1 checkpoints were scored with (SPEC §6).
TF1_EVAL_RESIZE_MODE = "bicubic_legacy"
IMPORTED_STAGE = "imported"
MAX_CLASSES_FILE_BYTES = 4 * 1024 * 1024


def read_classes_file(path: str | Path, num_classes: int) -> list[str]:
    """Class names, one per line (blank lines ignored), in the order of the logits."""
    p = Path(path)
    try:
        if p.stat().st_size > MAX_CLASSES_FILE_BYTES:
            raise ConfigError(f"classes: {p} is larger than {MAX_CLASSES_FILE_BYTES} bytes; expected one class "
                              "name per line")
        names = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"classes: cannot read {p} ({getattr(exc, 'strerror', None) or exc})") from exc
    if len(names) != num_classes:
        raise ConfigError(f"classes: {p} names {len(names)} classes, the checkpoint's classifier has "
                          f"{num_classes} outputs")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"classes: {p} names the class {dup!r} twice")
    return names


def _choose_arch(info: TFArchitecture, arch: str | None) -> str:
    if arch is None:
        return info.arch
    try:
        wanted = parse_arch(arch).name
    except ValueError as exc:
        raise ConfigError(f"arch: {exc}") from exc
    if wanted == info.arch or wanted in info.ambiguous:
        return wanted
    raise CheckpointError(f"arch: the checkpoint holds a {info.arch} network"
                          f"{' (CIFAR stem)' if info.cifar_stem else ''}, not {wanted}")


def convert_checkpoint(ckpt: TFCheckpoint, *, arch: str | None = None, ema: bool = False,
                       ft_proj_selector: int | None = None, kind: str | None = None,
                       image_size: int | None = None) -> tuple[SimCLRNet, dict[str, Any]]:
    """Our network with the checkpoint's weights (eval mode) and a report of the import."""
    if kind is not None and kind not in KINDS:
        raise ConfigError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
    shapes = {name: e.shape for name, e in ckpt.entries.items()}
    prefix = EMA_PREFIX if ema else ""
    if ema and not any(n.startswith(EMA_PREFIX + BASE) for n in shapes):
        raise CheckpointError(f"ema: {ckpt.index_path} holds no {EMA_PREFIX}{BASE} copy (only the released "
                              "pretrained checkpoints carry the momentum encoder); import without --ema")
    info = infer_architecture(shapes, prefix)
    name = _choose_arch(info, arch)
    cifar = info.cifar_stem
    if image_size is None:
        image_size = 32 if cifar else 224
    elif (image_size <= 32) != cifar:
        raise ConfigError(f"image_size: {image_size} px selects the {'CIFAR' if image_size <= 32 else 'ImageNet'} "
                          f"stem, but the checkpoint has the {'CIFAR' if cifar else 'ImageNet'} stem (use "
                          f"{'<= 32' if cifar else '> 32'})")
    has_classifier = info.num_classes > 0
    if ft_proj_selector is None:
        ft_proj_selector = DEFAULT_SELECTOR[kind] if kind is not None else 0
        if has_classifier and kind is None and info.num_proj_layers > 0:
            raise ConfigError("ft_proj_selector: the checkpoint's classifier may read the encoder output (0) or "
                              "a projection-head layer (1, 2, ...) and the shapes cannot tell which; pass "
                              "--kind (pretrained|finetuned_*|supervised|distill_1pct) or --ft-proj-selector")
    n = info.num_proj_layers
    if not 0 <= ft_proj_selector <= n:
        raise ConfigError(f"ft_proj_selector: {ft_proj_selector} is out of range for the checkpoint's {n}-layer "
                          f"projection head (0..{n})")
    with torch.device("meta"):
        probe = create_model(name, image_size=image_size, num_proj_layers=n, proj_out_dim=info.proj_out_dim)
    if has_classifier:
        width = probe.feature_dim if probe.head is None else probe.head.out_dim_at(ft_proj_selector)
        if width != info.classifier_in_dim:
            raise CheckpointError(f"ft_proj_selector: {SUPERVISED}kernel reads {info.classifier_in_dim} features, "
                                  f"but hiddens[{ft_proj_selector}] has {width}; choose the selector the "
                                  "checkpoint was trained with")
    # Built on the meta device and then allocated uninitialised: every parameter and buffer is
    # overwritten below (a strict load), and the random initialisation of a large ResNet costs
    # seconds to minutes on a CPU.
    with torch.device("meta"):
        net = create_model(name, image_size=image_size, num_proj_layers=n, proj_out_dim=info.proj_out_dim,
                           num_classes=info.num_classes, ft_proj_selector=ft_proj_selector)
    net = net.to_empty(device="cpu")
    classifier_prefix = prefix if f"{prefix}{SUPERVISED}kernel" in shapes else ""
    assignments = map_network(net, list(shapes), prefix=prefix, classifier_prefix=classifier_prefix)
    state = net.state_dict()
    filled: dict[str, torch.Tensor] = {}
    imported: list[dict[str, Any]] = []
    for a in assignments:
        if a.tf_name not in ckpt:
            raise CheckpointError(f"checkpoint: {ckpt.index_path} lacks {a.tf_name}, needed for {a.key} of the "
                                  f"{name} network")
        array = ckpt.read(a.tf_name)
        if array.dtype.kind != "f":
            raise CheckpointError(f"checkpoint: {a.tf_name} holds {array.dtype} values, not floating point")
        value = np.ascontiguousarray(a.transform(array), dtype=np.float32)
        if tuple(value.shape) != a.shape:
            raise CheckpointError(f"checkpoint: {a.tf_name} has shape {list(array.shape)}, which does not fit "
                                  f"{a.key} of shape {list(a.shape)} in the {name} network")
        filled[a.key] = torch.from_numpy(value)
        imported.append({"tf": a.tf_name, "ours": a.key, "shape": list(array.shape)})
    left = [k for k in state if k not in filled and not k.endswith("num_batches_tracked")]
    if left:
        raise CheckpointError(f"checkpoint: nothing in {ckpt.index_path} fills {len(left)} tensors of the {name} "
                              f"network (e.g. {left[:3]})")
    for k in state:
        if k.endswith("num_batches_tracked"):
            filled[k] = torch.zeros_like(state[k])
    net.load_state_dict(filled, strict=True)
    net.eval()

    used = {a.tf_name for a in assignments}
    unused: list[dict[str, str]] = []
    surplus: list[str] = []
    for var in ckpt.names():
        if var in used:
            continue
        if is_optimizer_slot(var):
            reason = "optimiser state"
        elif ema and not var.startswith(EMA_PREFIX) and var.startswith((BASE, HEAD, "head_supervised/")):
            reason = "live weights (the EMA copy was imported)"
        elif not ema and var.startswith(EMA_PREFIX):
            reason = "momentum-encoder (EMA) copy (import it with --ema)"
        else:
            surplus.append(var)
            continue
        unused.append({"name": var, "reason": reason})
    if surplus:
        raise CheckpointError(f"checkpoint: {len(surplus)} variables of {ckpt.index_path} belong to no layer of the "
                              f"{name} network: {', '.join(surplus[:5])}{' ...' if len(surplus) > 5 else ''}")
    global_step = int(ckpt.read("global_step")) if "global_step" in ckpt else None
    report: dict[str, Any] = {
        "stage": IMPORTED_STAGE, "source": str(ckpt.prefix), "kind": kind, "arch": name,
        "cifar_stem": cifar, "image_size": image_size, "ema": ema, "global_step": global_step,
        "num_proj_layers": n, "proj_out_dim": info.proj_out_dim, "num_classes": info.num_classes,
        "ft_proj_selector": ft_proj_selector,
        "classifier_source": (f"{classifier_prefix}{SUPERVISED}" if has_classifier else None),
        "num_imported": len(imported), "num_unused": len(unused),
        "imported": imported, "unused": unused,
    }
    if ema and has_classifier and classifier_prefix == "":
        report["note"] = ("the EMA copy holds no head_supervised: the classifier is the live one, trained on the "
                          "live encoder's features")
    return net, report


def import_tf_checkpoint(path: str | Path, out: str | Path, *, arch: str | None = None, ema: bool = False,
                         ft_proj_selector: int | None = None, kind: str | None = None,
                         classes: str | Path | None = None, image_size: int | None = None,
                         overwrite: bool = False) -> dict[str, Any]:
    """``simclrv2 import-tf``: convert ``path`` and write the run directory ``out``; returns results."""
    out = Path(out)
    if (out / "model.safetensors").exists() and not overwrite:
        raise ConfigError(f"out: {out} already holds a model.safetensors; choose another --out or delete it")
    ckpt = TFCheckpoint(path)
    net, report = convert_checkpoint(ckpt, arch=arch, ema=ema, ft_proj_selector=ft_proj_selector, kind=kind,
                                     image_size=image_size)
    names: list[str] = []
    if classes is not None:
        if report["num_classes"] == 0:
            raise ConfigError(f"classes: the checkpoint {ckpt.prefix} has no classifier to name the classes of")
        names = read_classes_file(classes, report["num_classes"])
    meta = model_meta(arch=report["arch"], image_size=report["image_size"], num_proj_layers=report["num_proj_layers"],
                      proj_out_dim=report["proj_out_dim"], num_classes=report["num_classes"],
                      ft_proj_selector=report["ft_proj_selector"], classes=names, stage=IMPORTED_STAGE)
    meta["tf_kind"] = kind
    meta["tf_source"] = str(ckpt.prefix)
    meta[EVAL_RESIZE_MODE_KEY] = TF1_EVAL_RESIZE_MODE
    report["eval_resize_mode"] = TF1_EVAL_RESIZE_MODE
    report["classes"] = names
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_weights(net.state_dict(), out / "model.safetensors", meta)
        atomic_write_text(out / "results.json", json.dumps(report, indent=2))
    except OSError as exc:
        raise ConfigError(f"out: cannot write {out} ({exc.strerror or exc})") from exc
    return report
