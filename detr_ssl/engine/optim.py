"""The official DETR optimiser: AdamW with a slower backbone, and a step learning-rate drop."""
from __future__ import annotations

import argparse

import torch
from torch import nn


LINEAR_PROJ_NAMES = ("reference_points", "sampling_offsets")  # Deformable DETR's slower layers


def _named(trainable: list[tuple[str, nn.Parameter]], keywords: tuple[str, ...], inside: bool = True) -> list:
    """The parameters whose name contains one of ``keywords`` (or, with ``inside=False``, none)."""
    return [p for name, p in trainable if any(key in name for key in keywords) == inside]


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW with the official parameter groups, in the official order so that optimizer states
    of official checkpoints line up.

    DETR: the rest at ``--lr``, ``backbone`` at ``--lr_backbone``. Deformable DETR: the rest,
    the CNN (``backbone.0``) at ``--lr_backbone``, and the sampling-offset and reference-point
    layers at ``--lr`` x ``--lr_linear_proj_mult``.
    """
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if args.model != "deformable_detr":
        param_groups = [
            {"params": _named(trainable, ("backbone",), inside=False)},
            {"params": _named(trainable, ("backbone",)), "lr": args.lr_backbone},
        ]
    else:
        param_groups = [
            {"params": _named(trainable, ("backbone.0", *LINEAR_PROJ_NAMES), inside=False)},
            {"params": _named(trainable, ("backbone.0",)), "lr": args.lr_backbone},
            {"params": _named(trainable, LINEAR_PROJ_NAMES), "lr": args.lr * args.lr_linear_proj_mult},
        ]
    return torch.optim.AdamW(param_groups, lr=args.lr, weight_decay=args.weight_decay)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace) -> torch.optim.lr_scheduler.StepLR:
    """Multiply every learning rate by 0.1 every ``args.lr_drop`` epochs (stepped once per epoch)."""
    if args.lr_drop < 1:
        raise ValueError(f"--lr_drop must be >= 1 epoch, got {args.lr_drop}")
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_drop, gamma=0.1)
