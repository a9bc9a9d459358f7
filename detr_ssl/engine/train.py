"""One training epoch: forward, weighted loss, gradient accumulation, clipping and logging."""
from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Iterable, Mapping, Sized
from contextlib import nullcontext
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from detr_ssl.engine.amp import autocast, build_grad_scaler, to_float32
from detr_ssl.utils.dist import is_main_process, reduce_dict
from detr_ssl.utils.logging import MetricTracker, TensorBoardLogger
from detr_ssl.utils.misc import NestedTensor

Targets = list[dict[str, Any]]


def to_device(samples: NestedTensor, targets: Targets, device: torch.device | str) -> tuple[NestedTensor, Targets]:
    """Move a batch to ``device``; target entries that are not tensors are kept as they are."""
    targets = [
        {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in target.items()}
        for target in targets
    ]
    return samples.to(device, non_blocking=True), targets


def batch_limit(data_loader: Sized, limit: int | None) -> int:
    """How many batches an epoch runs: all of them, or at most ``limit``."""
    return len(data_loader) if limit is None else min(len(data_loader), limit)


def image_ids(targets: Targets) -> list[int]:
    return [int(torch.as_tensor(target["image_id"]).item()) for target in targets]


def weighted_loss(loss_dict: Mapping[str, Tensor], weight_dict: Mapping[str, float]) -> Tensor:
    """The total the optimiser minimises: only keys in ``weight_dict`` count."""
    return sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)


def logged_losses(loss_dict: Mapping[str, Tensor], weight_dict: Mapping[str, float]) -> dict[str, Tensor]:
    """Losses averaged over processes, with their weighted total under ``'loss'``."""
    reduced = reduce_dict({k: v.detach() for k, v in loss_dict.items()})
    return {"loss": weighted_loss(reduced, weight_dict), **reduced}


def _accumulation_window(index: int, accum_steps: int, num_batches: int) -> tuple[int, bool]:
    """Size of the window of batch ``index`` and whether the optimizer steps after it.

    The last window of an epoch may be shorter; its batches are averaged over its own size.
    """
    start = index - index % accum_steps
    size = min(accum_steps, num_batches - start)
    return size, index == start + size - 1


def _check_finite(losses: dict[str, Tensor], epoch: int, index: int, targets: Targets) -> None:
    """Stop at the first non-finite loss, naming the batch so that its images can be inspected.

    ``losses`` are averaged over processes, so every process stops at the same step.
    """
    if not math.isfinite(losses["loss"].item()):
        raise FloatingPointError(
            f"non-finite loss {losses['loss'].item()} at epoch {epoch}, step {index}; "
            f"image ids of the batch: {image_ids(targets)}; losses: "
            + ", ".join(f"{k} {v.item():.4g}" for k, v in losses.items())
        )


@torch.no_grad()
def log_ssl_images(model: nn.Module, ssl_outputs: dict[str, Any], tb: TensorBoardLogger, step: int) -> None:
    """The pretext task's grid (input, corrupted input, prediction, target) to TensorBoard."""
    task = (model.module if isinstance(model, DistributedDataParallel) else model).ssl_head
    grid = task.visualize(ssl_outputs["images"], ssl_outputs["corrupted"], ssl_outputs["prediction"],
                          ssl_outputs["targets"], ssl_outputs["valid"])
    tb.images(f"ssl/{type(task).name}", grid, step, rows=4)


def _optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, clip_max_norm: float,
                    scaler: torch.amp.GradScaler) -> None:
    """Unscale (float16 AMP), clip, step; a disabled scaler makes this a plain clipped step."""
    scaler.unscale_(optimizer)
    if clip_max_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    data_loader: Iterable[tuple[NestedTensor, Targets]],
    optimizer: torch.optim.Optimizer,
    device: torch.device | str,
    epoch: int,
    args: argparse.Namespace,
    tb: TensorBoardLogger,
    logger: logging.Logger,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """Train for one epoch and return the epoch means of the losses (and the learning rate).

    Gradients are accumulated over ``args.accum_steps`` batches, each loss divided by the
    window size, so a window equals one step on its concatenated batches for mean losses.
    TensorBoard gets one point per optimizer step at ``epoch * steps_per_epoch + step``.
    """
    model.train()
    criterion.train()
    scaler = scaler or build_grad_scaler(args, device)
    num_batches = batch_limit(data_loader, args.limit_train_batches)
    steps_per_epoch = math.ceil(num_batches / args.accum_steps)
    lr = optimizer.param_groups[0]["lr"]
    epoch_meter, window_meter = MetricTracker(), MetricTracker()
    optimizer.zero_grad(set_to_none=True)
    progress = tqdm(islice(data_loader, num_batches), total=num_batches, desc=f"epoch {epoch} train",
                    disable=not is_main_process(), dynamic_ncols=True, leave=False)
    for index, (samples, targets) in enumerate(progress):
        samples, targets = to_device(samples, targets, device)
        window, steps_now = _accumulation_window(index, args.accum_steps, num_batches)
        # Under DDP, gradients are all-reduced only on the batch that completes the window.
        skip_sync = isinstance(model, DistributedDataParallel) and not steps_now
        with model.no_sync() if skip_sync else nullcontext():
            with autocast(args, device):
                outputs = to_float32(model(samples))
            loss_dict = criterion(outputs, targets)
            losses = logged_losses(loss_dict, criterion.weight_dict)
            _check_finite(losses, epoch, index, targets)
            scaler.scale(weighted_loss(loss_dict, criterion.weight_dict) / window).backward()
        epoch_meter.update(losses)
        window_meter.update(losses)
        step = epoch * steps_per_epoch + index // args.accum_steps
        if "ssl_outputs" in outputs and tb.active and args.vis_every and index % args.vis_every == 0:
            log_ssl_images(model, outputs["ssl_outputs"], tb, step)
        if steps_now:
            _optimizer_step(model, optimizer, args.clip_max_norm, scaler)
            schedule = {"lr": lr}
            if "loss_ssl" in criterion.weight_dict:
                schedule["ssl_lambda"] = criterion.weight_dict["loss_ssl"]
            tb.scalars({**window_meter.summary(), **schedule}, step, "train")
            window_meter = MetricTracker()
        progress.set_postfix(loss=f"{epoch_meter.summary()['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
    logger.info("epoch %d train: %s", epoch, epoch_meter.format())
    return {**epoch_meter.summary(), "lr": lr}
