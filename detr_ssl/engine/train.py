"""One training epoch: forward, weighted loss, gradient accumulation, clipping and logging."""
from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sized
from contextlib import nullcontext
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from detr_ssl.data.bad_samples import log_skipped, skipped_in
from detr_ssl.engine.amp import autocast, build_grad_scaler, to_float32
from detr_ssl.engine.faults import BadSteps, Interrupted, StopRequest, TooManyBadSteps
from detr_ssl.utils.dist import all_gather_object, is_main_process, reduce_dict
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


def batch_limit(data_loader: Sized, limit: int | None, start: int = 0) -> int:
    """How many batches an epoch runs: all of them, or at most ``limit``.

    A loader resumed at batch ``start`` yields (and counts) only the batches from there on.
    """
    total = start + len(data_loader)
    return total if limit is None else min(total, limit)


def steps_per_epoch(data_loader: Sized, args: argparse.Namespace, start: int = 0) -> int:
    """Optimizer steps of a whole training epoch (``start``: where a resumed loader begins)."""
    return math.ceil(batch_limit(data_loader, args.limit_train_batches, start) / args.accum_steps)


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


def _warn_non_finite(losses: dict[str, Tensor], epoch: int, index: int, targets: Targets,
                     logger: logging.Logger) -> None:
    """Name the batch of a non-finite loss, so that its images can be inspected (each process
    logs its own share of the batch)."""
    logger.warning("non-finite loss %s at epoch %d, batch %d: its optimizer step is skipped; image ids of the "
                   "batch: %s; losses: %s", losses["loss"].item(), epoch, index, image_ids(targets),
                   ", ".join(f"{k} {v.item():.4g}" for k, v in losses.items()))


def _skip_step(model: nn.Module, optimizer: torch.optim.Optimizer, buffers: list[Tensor], bad_steps: BadSteps,
               epoch: int, batches: int, tb: TensorBoardLogger, step: int) -> None:
    """Drop an accumulation window that had a non-finite loss: no update, and its gradients and
    buffer changes (batch-norm statistics) are undone, so the model stays the last good one.

    Every process skips the same windows: the losses they test are averaged over processes.
    A float16 ``GradScaler`` still skips the steps whose gradients overflow on its own; those
    have finite losses and do not count here.
    """
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for buffer, saved in zip(model.buffers(), buffers):
            buffer.copy_(saved)
    bad_steps.in_a_row += 1
    bad_steps.total += 1
    tb.scalars({"bad_steps": bad_steps.total}, step, "train")
    if bad_steps.in_a_row >= bad_steps.limit:
        raise TooManyBadSteps(
            f"{bad_steps.in_a_row} optimizer steps in a row had a non-finite loss (--max_bad_steps "
            f"{bad_steps.limit}), the last one ending after {batches} batches of epoch {epoch}; the model is "
            "the one of the last good step. Lower --lr, clip with --clip_max_norm or check the images logged above.",
            epoch, batches, reason="non-finite losses")


def unwrap(model: nn.Module) -> nn.Module:
    """The detector inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def model_hook(model: nn.Module, name: str) -> Callable | None:
    """The detector's optional engine hook ``name`` (``pictures``, ``after_optimizer_step``), or None:
    any detector module trains here, ours add pretext pictures and per-step work through these."""
    return getattr(unwrap(model), name, None)


def log_pictures(model: nn.Module, outputs: dict[str, Any], targets: Targets, tb: TensorBoardLogger, step: int,
                 prefix: str = "") -> None:
    """The pretext task's and method's pictures of a batch's outputs to TensorBoard (``prefix`` 'val/'
    for validation images)."""
    pictures = model_hook(model, "pictures")
    for tag, images, rows in pictures(outputs, targets) if pictures is not None else ():
        tb.images(prefix + tag, images, step, rows=rows)


def _optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, clip_max_norm: float,
                    scaler: torch.amp.GradScaler) -> None:
    """Unscale (float16 AMP), clip, step; a disabled scaler makes this a plain clipped step. Then
    the model's own after-step work (a pre-training method's momentum copy)."""
    scaler.unscale_(optimizer)
    if clip_max_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    after_step = model_hook(model, "after_optimizer_step")
    if after_step is not None:
        after_step()


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
    start_batch: int = 0,
    stop: StopRequest | None = None,
    bad_steps: BadSteps | None = None,
    schedule: Callable[[int, int], None] | None = None,
    on_step: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Train for one epoch and return the epoch means of the losses (and the learning rate).

    Gradients are accumulated over ``args.accum_steps`` batches, each loss divided by the
    window size, so a window equals one step on its concatenated batches for mean losses.
    TensorBoard gets one point per optimizer step at ``epoch * steps_per_epoch + step``.
    A resumed epoch passes the loader positioned at ``start_batch``.

    A window with a non-finite loss makes no update; ``args.max_bad_steps`` such steps in a row
    (counted in ``bad_steps`` across epochs) raise ``TooManyBadSteps``. A stop signal noted in
    ``stop`` raises ``Interrupted`` after the optimizer step in progress. Images that
    ``--skip_bad_samples`` replaced are logged once, at the end of the epoch. ``schedule(step,
    total_steps)`` sets the scheduled values (SSL weights, ratio) before each optimizer step's
    window, counted over the whole run (and the learning rates, with a per-step schedule);
    ``on_step()`` runs after every optimizer step (the ``--model_ema`` update).
    """
    model.train()
    criterion.train()
    scaler = scaler or build_grad_scaler(args, device)
    if bad_steps is None:
        bad_steps = BadSteps(args.max_bad_steps)
    skipped_before = bad_steps.total
    num_batches = batch_limit(data_loader, args.limit_train_batches, start_batch)
    epoch_steps = steps_per_epoch(data_loader, args, start_batch)
    lr = optimizer.param_groups[0]["lr"]
    epoch_meter, window_meter = MetricTracker(), MetricTracker()
    buffers, window_is_bad = None, False
    skipped: list[str] = []
    optimizer.zero_grad(set_to_none=True)
    progress = tqdm(enumerate(islice(data_loader, max(num_batches - start_batch, 0)), start=start_batch),
                    initial=start_batch, total=num_batches, desc=f"epoch {epoch} train",
                    disable=not is_main_process(), dynamic_ncols=True, leave=False)
    for index, (samples, targets) in progress:
        step = epoch * epoch_steps + index // args.accum_steps
        if schedule is not None and index % args.accum_steps == 0:
            schedule(step, args.epochs * epoch_steps)
            lr = optimizer.param_groups[0]["lr"]
        samples, targets = to_device(samples, targets, device)
        skipped.extend(skipped_in(targets))
        window, steps_now = _accumulation_window(index, args.accum_steps, num_batches)
        if buffers is None:  # buffers (batch-norm statistics) before the window, restored if it is skipped
            buffers = [buffer.detach().clone() for buffer in model.buffers()]
        # Under DDP, gradients are all-reduced only on the batch that completes the window.
        skip_sync = isinstance(model, DistributedDataParallel) and not steps_now
        with model.no_sync() if skip_sync else nullcontext():
            with autocast(args, device):
                outputs = to_float32(model(samples))
            loss_dict = criterion(outputs, targets)
            losses = logged_losses(loss_dict, criterion.weight_dict)
            scaler.scale(weighted_loss(loss_dict, criterion.weight_dict) / window).backward()
        if math.isfinite(losses["loss"].item()):
            epoch_meter.update(losses)
            window_meter.update(losses)
        else:
            _warn_non_finite(losses, epoch, index, targets, logger)
            window_is_bad = True
        if model_hook(model, "pictures") is not None and tb.active and args.vis_every and index % args.vis_every == 0:
            log_pictures(model, outputs, targets, tb, step)
        if steps_now:
            if window_is_bad:
                _skip_step(model, optimizer, buffers, bad_steps, epoch, index + 1, tb, step)
            else:
                _optimizer_step(model, optimizer, args.clip_max_norm, scaler)
                if on_step is not None:
                    on_step()
                bad_steps.in_a_row = 0
                tb.scalars({**window_meter.summary(), **_schedule(lr, criterion)}, step, "train")
            window_meter, buffers, window_is_bad = MetricTracker(), None, False
            signum = stop.agreed(device) if stop is not None and index + 1 < num_batches else 0
            if signum:
                raise Interrupted(signum, epoch, index + 1)
        progress.set_postfix(loss=f"{epoch_meter.summary().get('loss', math.nan):.4f}", lr=f"{lr:.2e}",
                             refresh=False)
    logger.info("epoch %d train: %s", epoch, epoch_meter.format())
    log_skipped(logger, f"epoch {epoch} train", (m for messages in all_gather_object(skipped) for m in messages))
    if bad_steps.total > skipped_before:
        logger.warning("epoch %d: %d optimizer steps skipped for non-finite losses", epoch,
                       bad_steps.total - skipped_before)
    return {**epoch_meter.summary(), "lr": lr}


def _schedule(lr: float, criterion: nn.Module) -> dict[str, float]:
    """The scheduled values logged with each step: learning rate and, with a pretext task, its lambda."""
    schedule = {"lr": lr}
    if "loss_ssl" in criterion.weight_dict:
        schedule["ssl_lambda"] = criterion.weight_dict["loss_ssl"]
    return schedule
