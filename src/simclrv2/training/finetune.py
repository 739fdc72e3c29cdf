"""Step 2 (fine-tuning from a projection-head layer) and the supervised baseline.

Fine-tuning (paper §2, SPEC §0, §2.1, §5): start from a pretraining checkpoint, keep the first
``ft_proj_selector`` layers of the projection head (1 for 1%/10% labels, 0 = head input for all
labels), add a zero-initialised linear classifier (``zero_init_logits_layer``), and train the
WHOLE network (TF2 / maintainer reply in issue #109; the TF1 quirk that leaves retained head
layers frozen is not reproduced) on the labelled subset with crop + flip only. LARS, lr
0.005·sqrt(B) (0.002·sqrt(B) for width > 1 or SK), no weight decay, no warmup.

Deviation under ``--recipe auto`` (``--classifier-init probe``, the default there): the classifier does
not start at zero but as a linear probe fitted on the frozen features it reads (the linear-evaluation
recipe, SPEC §5, on centre-cropped labelled images), and the whole network is then fine-tuned from it
(LP-FT, Kumar et al. 2022), at a quarter of the SPEC §5 rate, with the head input as the classifier's
input and frozen BatchNorm statistics (``simclrv2/recipes.py``). Fine-tuning thus starts where linear
evaluation ends; from a zero classifier
it ended 3-6 points below linear evaluation on small CIFAR-10 subsets (issue #19). ``--classifier-init
zero`` (or ``--recipe reference``) is the reference's start.

The supervised baseline trains the same architecture from scratch (no head) on the same
labelled subset: Nesterov momentum, lr 0.1·B/256, wd 1e-4, cosine (the recipe of the released
supervised checkpoints, SPEC §5).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from simclrv2 import recipes
from simclrv2.config import Config, few_labels, stage_defaults
from simclrv2.errors import ConfigError
from simclrv2.models import create_model
from simclrv2.recipes import CLASSIFIER_PROBE
from simclrv2.training.classifier import train_and_evaluate
from simclrv2.training.data_setup import RunData, prepare_data
from simclrv2.training.evaluate import run_inference
from simclrv2.training.linear_eval import train_linear_classifier
from simclrv2.training.model_io import build_from_meta, load_checkpoint, load_state_into, model_meta
from simclrv2.training.rundir import RunDirectory
from simclrv2.training.runtime import Runtime, setup_runtime


class _ClassifierInput(nn.Module):
    """``x -> {"features": the activation the classifier reads}`` (``hiddens[ft_proj_selector]``)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": self.net.hiddens(x)[self.net.ft_proj_selector]}


def fit_probe_classifier(net: nn.Module, cfg: Config, rt: Runtime, data: RunData) -> dict[str, Any]:
    """Set ``net.classifier`` to a linear probe fitted on the frozen features it reads (LP-FT's first step).

    The probe is the linear-evaluation recipe (Nesterov SGD, lr 0.1·B/256, wd 1e-6, 90 epochs at batch
    256, cosine; SPEC §5) on centre-cropped labelled training images, with the network in inference mode,
    exactly as ``simclrv2 linear-eval`` trains its classifier (at ``ft_proj_selector`` 0 it is the same
    classifier). Deterministic given ``cfg.seed``, so every rank of a distributed run fits the same one.
    Returns what results.json records: the probe's accuracy on its own training images."""
    recipe = stage_defaults("linear-eval")
    net = rt.prepare_model(net)
    out, labels = run_inference(_ClassifierInput(net), data.train, rt, image_size=data.image_size,
                                indices=data.labeled_indices, batch_size=cfg.eval_batch_size, keys=("features",),
                                progress=cfg.progress, desc="probe features")
    features = out["features"]
    probe = train_linear_classifier(features, labels, data.num_classes, epochs=float(recipe["epochs"]),
                                    batch_size=int(recipe["batch_size"]), learning_rate=recipe["learning_rate"],
                                    scaling=recipe["learning_rate_scaling"], weight_decay=recipe["weight_decay"],
                                    seed=cfg.seed)
    with torch.no_grad():
        net.classifier.weight.copy_(probe.weight)
        net.classifier.bias.copy_(probe.bias)
        train_top1 = float((probe(features).argmax(1) == labels).float().mean())
    return {"classifier_init": CLASSIFIER_PROBE, "probe_train_top1": round(train_top1, 4)}


def build_finetune_network(checkpoint: str, num_classes: int, selector: int, classes: list[str]):
    """The pretrained network with its head cut after layer ``selector`` and a new zero classifier."""
    state, src_meta, file = load_checkpoint(checkpoint)
    layers = src_meta["num_proj_layers"]
    if src_meta.get("head_layers_kept") is not None:
        layers = src_meta["head_layers_kept"]
    kept = layers if selector == -1 else selector
    if not 0 <= kept <= layers:
        raise ConfigError(f"ft_proj_selector: {selector} is larger than the {layers}-layer projection head of "
                          f"{file}")
    meta = model_meta(arch=src_meta["arch"], image_size=src_meta["image_size"],
                      num_proj_layers=src_meta["num_proj_layers"], proj_out_dim=src_meta.get("proj_out_dim", 128),
                      num_classes=num_classes, ft_proj_selector=kept, head_layers_kept=kept, classes=classes,
                      stage="finetune")
    net = build_from_meta(meta)
    # zero_init_logits_layer (SPEC §2.2): the pretraining probe's classifier is not restored.
    backbone_state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    own_keys = set(net.state_dict())
    backbone_state = {k: v for k, v in backbone_state.items() if k in own_keys or not k.startswith("head.")}
    load_state_into(net, backbone_state, source=str(file), expected_arch=meta["arch"],
                    source_arch=src_meta["arch"], strict=False)
    missing = [k for k in own_keys if not k.startswith("classifier.") and k not in backbone_state
               and not k.endswith("num_batches_tracked")]
    if missing:
        raise ConfigError(f"checkpoint: {file} lacks {len(missing)} weights of the {meta['arch']} network "
                          f"(e.g. {missing[:3]})")
    return net, meta, src_meta


def finetune(cfg: Config) -> dict[str, Any]:
    """``simclrv2 finetune``."""
    rt = setup_runtime(cfg)
    _, src_meta, src_file = load_checkpoint(cfg.checkpoint)
    head_layers = src_meta["num_proj_layers"] if src_meta.get("head_layers_kept") is None \
        else src_meta["head_layers_kept"]
    if cfg.ft_proj_selector is not None and cfg.ft_proj_selector != -1 and not (
            0 <= cfg.ft_proj_selector <= head_layers):  # checked before any data is loaded
        raise ConfigError(f"ft_proj_selector: {cfg.ft_proj_selector} is larger than the {head_layers}-layer "
                          f"projection head of {src_file} (allowed: -1 or 0..{head_layers})")
    if cfg.image_size and cfg.image_size != src_meta["image_size"]:
        raise ConfigError(f"image_size: the checkpoint was trained at {src_meta['image_size']} px, got "
                          f"--image-size {cfg.image_size}")
    cfg = cfg.replace(image_size=src_meta["image_size"], arch=src_meta["arch"])
    run = RunDirectory.create(cfg, "finetune", rt.is_main)
    data = prepare_data(cfg, need_test=True, with_pool=False)
    # No classes check against the checkpoint: fine-tuning starts a new zero classifier, so a network
    # pretrained without labels, or on other classes (its online probe's), fine-tunes on any labelled set.
    net, meta, _ = build_finetune_network(cfg.checkpoint, data.num_classes, cfg.ft_proj_selector, data.classes)
    init_record: dict[str, Any] = {"classifier_init": cfg.classifier_init}
    if cfg.classifier_init == CLASSIFIER_PROBE:
        init_record = fit_probe_classifier(net, cfg, rt, data)
        if rt.is_main:
            print(f"finetune: classifier starts as a linear probe on the frozen features (LP-FT; train top-1 "
                  f"{init_record['probe_train_top1']:.3f}); --classifier-init zero for the reference's zero "
                  "classifier", flush=True)
    if rt.is_main:
        print(f"finetune: reads head layer {meta['ft_proj_selector']}, BatchNorm statistics {cfg.bn_stats} "
              f"(recipe {cfg.recipe}; the reference: head layer "
              f"{recipes.finetune_selector('reference', few_labels(cfg))}"
              ", statistics re-estimated: --recipe reference)", flush=True)
    return train_and_evaluate("finetune", cfg, rt, run, data, data.labeled_indices, net, meta,
                              extra_results={"checkpoint": str(cfg.checkpoint),
                                             "ft_proj_selector": meta["ft_proj_selector"],
                                             "bn_stats": cfg.bn_stats,
                                             "label_fraction": cfg.label_fraction, **init_record})


def supervised(cfg: Config) -> dict[str, Any]:
    """``simclrv2 supervised``: the from-scratch baseline on the labelled subset."""
    rt = setup_runtime(cfg)
    run = RunDirectory.create(cfg, "supervised", rt.is_main)
    data = prepare_data(cfg, need_test=True, with_pool=False)
    meta = model_meta(arch=cfg.arch, image_size=data.image_size, num_proj_layers=0,
                      num_classes=data.num_classes, classes=data.classes, stage="supervised")
    net = create_model(cfg.arch, image_size=data.image_size, num_proj_layers=0, num_classes=data.num_classes,
                       zero_init_classifier=False)
    return train_and_evaluate("supervised", cfg, rt, run, data, data.labeled_indices, net, meta,
                              extra_results={"label_fraction": cfg.label_fraction})
