"""The optimiser and learning-rate schedule: the official DETR recipe by default, and the recipe
plain-ViT detectors train with (ViTDet, MAE fine-tuning) on request.

Official (the defaults): AdamW with a slower backbone, a step drop of the learning rates at
``--lr_drop`` (StepLR stepped once per epoch), weight decay on every parameter, in the official
parameter-group order so that optimizer states of official checkpoints line up.

On request, for any backbone:

- ``--layer_decay D`` < 1: backbone layer ``i`` of ``depth`` trains at ``--lr_backbone`` x
  D^(depth - i). ViT: the patch embedding and position table are layer 0, block N is layer N + 1
  (depth = the number of blocks), as ViTDet and MAE fine-tuning. ResNet: the stem is layer 0 and
  ``layer1``..``layer4`` are layers 1..4 (depth 4). The new modules inside a ViT backbone (the
  simple pyramid, the relative-position tables) are randomly initialised: they always train at
  ``--lr``, as the transformer does.
- ``--no_decay_norm_bias``: no weight decay on norms and biases (every 1-D tensor), position
  tables (``pos_embed``, ``rel_pos*``, learned position encodings) and the DETR query and level
  embeddings; the rest keeps ``--weight_decay``.
- ``--lr_scheduler cosine`` and/or ``--warmup_epochs`` / ``--warmup_iters``: the learning rate is
  a function of the optimizer step, set before every step (:class:`PerStepLR`), so a resumed run,
  also one stopped mid-epoch, continues the same curve.
"""
from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable

import torch
from torch import nn

LINEAR_PROJ_NAMES = ("reference_points", "sampling_offsets")  # Deformable DETR's slower layers
BODY = "backbone.0.body."
VIT_NEW_MODULES = (BODY + "pyramid.", BODY + "rel_pos")  # new in a ViT backbone: trained at --lr
VIT_EMBEDDINGS = (BODY + "vit.patch_embed.", BODY + "vit.pos_embed", BODY + "vit.norm_pre.")  # layer 0
VIT_BLOCK = re.compile(re.escape(BODY) + r"vit\.blocks\.(\d+)\.")
RESNET_STAGE = re.compile(re.escape(BODY) + r"layer(\d)\.")
RESNET_STAGES = 4
NO_DECAY_NAMES = ("pos_embed", "rel_pos", "query_embed", "level_embed", "row_embed", "col_embed")


def _official_group(name: str, args: argparse.Namespace) -> int:
    """Index of the official parameter group of ``name``: 0 the rest (--lr), 1 the backbone
    (--lr_backbone), 2 Deformable DETR's linear projections (--lr x --lr_linear_proj_mult). A ViT
    backbone's new modules are in group 0."""
    if name.startswith(VIT_NEW_MODULES):
        return 0
    if args.model != "deformable_detr":
        return int("backbone" in name)
    if "backbone.0" in name:
        return 1
    return 2 if any(key in name for key in LINEAR_PROJ_NAMES) else 0


def backbone_layer(name: str, vit_depth: int) -> tuple[int, int] | None:
    """``(layer, depth)`` of a backbone body parameter for layer-wise lr decay, or None outside the
    body's layers (the rest of the backbone trains at the plain --lr_backbone). ``vit_depth`` 0: a ResNet."""
    if not name.startswith(BODY) or name.startswith(VIT_NEW_MODULES):
        return None
    if vit_depth:
        block = VIT_BLOCK.match(name)
        if block:
            return int(block.group(1)) + 1, vit_depth
        return (0, vit_depth) if name.startswith(VIT_EMBEDDINGS) else None
    stage = RESNET_STAGE.match(name)
    return (int(stage.group(1)) if stage else 0), RESNET_STAGES


def _vit_depth(model: nn.Module) -> int:
    """The number of ViT blocks of the backbone (0 for a ResNet)."""
    blocks = {int(m.group(1)) for name, _ in model.named_parameters() if (m := VIT_BLOCK.match(name))}
    return max(blocks) + 1 if blocks else 0


def decays(name: str, parameter: nn.Parameter) -> bool:
    """Whether ``--no_decay_norm_bias`` keeps weight decay on this parameter: not on norms and
    biases (1-D), position tables and query / level embeddings (ViTDet, detectron2's
    ``weight_decay_norm`` / ``weight_decay_embed`` 0)."""
    return parameter.ndim > 1 and not any(key in name for key in NO_DECAY_NAMES)


def _recipe(args: argparse.Namespace) -> tuple[float, bool]:
    """``(--layer_decay, --no_decay_norm_bias)``; namespaces saved before these flags are official."""
    return getattr(args, "layer_decay", 1.0), getattr(args, "no_decay_norm_bias", False)


_fused_on_cpu = True


def set_fused_on_cpu(enabled: bool) -> None:
    """Build CPU optimizers with AdamW's fused kernel (the default) or its per-tensor loop (for A/B timings)."""
    global _fused_on_cpu
    _fused_on_cpu = enabled


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW with the official parameter groups, in the official order so that optimizer states
    of official checkpoints line up.

    DETR: the rest at ``--lr``, ``backbone`` at ``--lr_backbone``. Deformable DETR: the rest,
    the CNN (``backbone.0``) at ``--lr_backbone``, and the sampling-offset and reference-point
    layers at ``--lr`` x ``--lr_linear_proj_mult``. With ``--layer_decay`` or
    ``--no_decay_norm_bias`` each of these splits by layer and decay (:func:`recipe_groups`).
    Parameters on the CPU get AdamW's fused kernel: the same update (to float rounding) in a
    fraction of the per-tensor loop's time (24 against 60-83 ms a step for DETR-R50 / Deformable
    DETR-R50 on a 2-core EPYC, docs/benchmarks.md); elsewhere torch's default implementation.
    """
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    lrs = [args.lr, args.lr_backbone, args.lr * getattr(args, "lr_linear_proj_mult", 1.0)]
    layer_decay, no_decay = _recipe(args)
    if layer_decay != 1.0 or no_decay:
        param_groups = recipe_groups(trainable, args, lrs, _vit_depth(model))
    else:
        official = [[] for _ in range(3 if args.model == "deformable_detr" else 2)]
        for name, p in trainable:
            official[_official_group(name, args)].append(p)
        param_groups = [{"params": params, **({"lr": lrs[i]} if i else {})} for i, params in enumerate(official)]
    betas = tuple(getattr(args, "adam_betas", (0.9, 0.999)))  # namespaces saved before the flag: AdamW's default
    fused = _fused_on_cpu and all(p.device.type == "cpu" for _, p in trainable)
    return torch.optim.AdamW(param_groups, lr=args.lr, betas=betas, weight_decay=args.weight_decay,
                             **({"fused": True} if fused else {}))


def recipe_groups(trainable: list[tuple[str, nn.Parameter]], args: argparse.Namespace, lrs: list[float],
                  vit_depth: int) -> list[dict]:
    """One group per (official group, backbone layer, decay or not), in that order, named (``name``)
    for the logs: ``lr`` = the official group's lr x its layer's decay factor."""
    layer_decay, no_decay = _recipe(args)
    groups: dict[tuple[int, int, bool], dict] = {}
    for name, p in trainable:
        official = _official_group(name, args)
        layer = backbone_layer(name, vit_depth) if official == 1 else None
        scale = layer_decay ** (layer[1] - layer[0]) if layer else 1.0
        decayed = decays(name, p) or not no_decay
        key = (official, -1 if layer is None else layer[0], not decayed)
        if key not in groups:
            label = ("rest", "backbone", "linear_proj")[official] + ("" if layer is None else f".layer{layer[0]}")
            groups[key] = {"params": [], "lr": lrs[official] * scale, "name": label + ("" if decayed else ".no_decay"),
                           "weight_decay": args.weight_decay if decayed else 0.0}
        groups[key]["params"].append(p)
    return [groups[key] for key in sorted(groups)]


def lr_factor(args: argparse.Namespace, step: int, total_steps: int) -> float:
    """The factor on every initial learning rate at optimizer step ``step`` of ``total_steps``:
    linear warmup from ``--warmup_factor`` over the warmup steps, then the ``--lr_drop`` steps
    (0.1 every that many epochs) or a cosine to ``--min_lr`` / ``--lr`` at ``total_steps``."""
    epoch_steps = max(total_steps // args.epochs, 1)
    warmup = args.warmup_iters or round(args.warmup_epochs * epoch_steps)
    if step < warmup:
        return args.warmup_factor + (1 - args.warmup_factor) * step / warmup
    if args.lr_scheduler == "step":
        return 0.1 ** (step // (args.lr_drop * epoch_steps))
    floor = args.min_lr / args.lr
    progress = (step - warmup) / max(total_steps - warmup, 1)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class PerStepLR(torch.optim.lr_scheduler.LRScheduler):
    """Every group's lr = its initial lr x ``factor(step, total_steps)``, set by :meth:`at` before
    each optimizer step from the step's index in the run: a pure function of the step, so a
    resumed run (also mid-epoch) sets the same values as the uninterrupted one."""

    def __init__(self, optimizer: torch.optim.Optimizer, factor: Callable[[int, int], float]):
        self.factor = factor
        self.total_steps = 1  # known once the loader is: at() sets it
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch, self.total_steps) for base in self.base_lrs]

    def at(self, step: int, total_steps: int) -> None:
        """Set the learning rates of optimizer step ``step`` of ``total_steps``."""
        self.last_epoch, self.total_steps = step, total_steps
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr

    def state_dict(self) -> dict:
        """The plain values only (the factor is rebuilt from the flags): checkpoints load with weights_only."""
        return {key: value for key, value in self.__dict__.items() if key not in ("optimizer", "factor")}


def is_per_step(args: argparse.Namespace) -> bool:
    """Whether the schedule changes the lr every optimizer step (cosine or warmup) rather than per epoch."""
    return (getattr(args, "lr_scheduler", "step") != "step" or getattr(args, "warmup_epochs", 0) > 0
            or getattr(args, "warmup_iters", 0) > 0)


def build_lr_scheduler(optimizer: torch.optim.Optimizer,
                       args: argparse.Namespace) -> torch.optim.lr_scheduler.LRScheduler:
    """The official StepLR (x0.1 every ``args.lr_drop`` epochs, stepped once per epoch), or with
    cosine or warmup a :class:`PerStepLR` on :func:`lr_factor`."""
    if args.lr_drop < 1:
        raise ValueError(f"--lr_drop must be >= 1 epoch, got {args.lr_drop}")
    if is_per_step(args):
        return PerStepLR(optimizer, lambda step, total_steps: lr_factor(args, step, total_steps))
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_drop, gamma=0.1)


def schedule_lr(lr_scheduler: torch.optim.lr_scheduler.LRScheduler, step: int, total_steps: int) -> None:
    """Before optimizer step ``step``: set the lrs of a per-step schedule (the official one steps per epoch)."""
    if isinstance(lr_scheduler, PerStepLR):
        lr_scheduler.at(step, total_steps)


def end_epoch(lr_scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """After an epoch: step the official per-epoch schedule (a per-step one is set before each step)."""
    if not isinstance(lr_scheduler, PerStepLR):
        lr_scheduler.step()
