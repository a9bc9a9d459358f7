"""The official DETR optimiser: AdamW with a slower backbone, and a step learning-rate drop."""
from __future__ import annotations

import argparse

import torch
from torch import nn


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW at ``args.lr``, with the trainable ``backbone`` parameters at ``args.lr_backbone``.

    The group order (rest, then backbone) is the official one, so optimizer states of official
    checkpoints line up.
    """
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    param_groups = [
        {"params": [p for name, p in trainable if "backbone" not in name]},
        {"params": [p for name, p in trainable if "backbone" in name], "lr": args.lr_backbone},
    ]
    return torch.optim.AdamW(param_groups, lr=args.lr, weight_decay=args.weight_decay)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace) -> torch.optim.lr_scheduler.StepLR:
    """Multiply every learning rate by 0.1 every ``args.lr_drop`` epochs (stepped once per epoch)."""
    if args.lr_drop < 1:
        raise ValueError(f"--lr_drop must be >= 1 epoch, got {args.lr_drop}")
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_drop, gamma=0.1)
