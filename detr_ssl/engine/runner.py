"""The whole job: build data, model and optimiser from the config, then train or evaluate."""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from ..config import ARCHITECTURE_FLAGS, resolve_method, save_config
from ..data import build_dataset, category_names_of, collate_for, get_coco_api, is_unlabelled, num_classes_of
from ..data.check import check_datasets
from ..data.loader import build_loader, set_epoch
from ..data.subsets import write_subset_file
from ..models import COCO_NUM_CLASSES, build_model
from ..methods import METHODS
from ..ssl.schedule import schedule_value
from ..utils import dist
from ..utils.errors import ConfigError, config_error
from ..utils.logging import TensorBoardLogger, setup_logging
from .checkpoint import (LATEST, build_checkpoint_state, load_checkpoint, load_finetune, load_for_evaluation,
                         load_pretrained_encoder, resume_training, save_checkpoint, save_epoch_checkpoint)
from .amp import build_grad_scaler, describe_precision, is_emulated_bfloat16
from .evaluate import evaluate, evaluate_pretext
from .faults import BadSteps, Interrupted, StopTraining, TooManyBadSteps, stop_on_signals
from .ema import ModelEma, ema_weights, resume_ema
from .optim import build_lr_scheduler, build_optimizer, end_epoch, schedule_lr
from .train import steps_per_epoch, train_one_epoch


def resolve_device(requested: str) -> str:
    """The device to use: a CUDA request on a machine without CUDA falls back to the CPU, loudly."""
    if requested.startswith("cuda") and not torch.cuda.is_available():
        warnings.warn(f"--device {requested}: CUDA is not available, running on the CPU", stacklevel=2)
        return "cpu"
    return requested


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed torch, numpy and ``random``; with ``deterministic``, make torch use deterministic algorithms only.

    Deterministic mode also sets what cuBLAS and cuDNN need for it. cuBLAS reads
    ``CUBLAS_WORKSPACE_CONFIG`` (set to ``:4096:8`` unless already set) when it first runs, so this
    must be called before the process's first CUDA matrix product. Ops with no deterministic CUDA
    implementation (the backward of ms_deform_attn and of grid_sample) then raise on CUDA.
    """
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


@dataclass
class TrainingRun:
    """What a run built for training: the epoch loop and the checkpoints read it from here.

    ``model`` is what steps run (DistributedDataParallel-wrapped when distributed), ``module``
    the bare detector whose state is saved; ``categories`` (the annotations' names by id) go
    into every checkpoint, and so does ``ema`` (``--model_ema``) as ``model_ema``.
    """

    args: argparse.Namespace
    model: torch.nn.Module
    module: torch.nn.Module
    criterion: torch.nn.Module
    postprocessors: dict[str, torch.nn.Module]
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    output_dir: Path | None
    tb: TensorBoardLogger
    logger: logging.Logger
    categories: dict[int, str] = field(default_factory=dict)
    ema: ModelEma | None = None

    def checkpoint_state(self, epoch: int, **extra) -> dict:
        """The checkpoint after ``epoch`` (a collective call: every process runs it)."""
        if self.ema is not None:
            extra["model_ema"] = self.ema.state_dict()
        return build_checkpoint_state(self.module, self.optimizer, self.lr_scheduler, epoch, self.args,
                                      scaler=self.scaler.state_dict(), categories=self.categories, **extra)


def resolve_num_classes(args: argparse.Namespace, datasets: list, logger: logging.Logger) -> None:
    """Set ``args.num_classes`` from the annotations (largest category id + 1), or check the given one.

    Unlabelled images have no classes: the classifier keeps ``--num_classes`` or COCO's 91.
    """
    labelled = [d for d in datasets if not is_unlabelled(d)]
    if not labelled:
        args.num_classes = args.num_classes or COCO_NUM_CLASSES
        return
    needed = max(num_classes_of(d) for d in labelled)
    if args.num_classes is None:
        args.num_classes = needed
        logger.info("num_classes = %d (largest category id + 1, from the annotations)", args.num_classes)
    elif args.num_classes < needed:
        raise ConfigError(f"--num_classes {args.num_classes} is too small: the annotations use category ids up to "
                         f"{needed - 1}, so it must be at least {needed} (or leave it out to derive it)")


def apply_ssl_schedules(model: torch.nn.Module, criterion: torch.nn.Module, args: argparse.Namespace, step: int,
                        total_steps: int) -> None:
    """Set the SSL loss weights (lambda, and the method's by the same factor) and the
    masking/permutation ratio of optimizer step ``step`` of ``total_steps`` from their schedules."""
    if model.ssl_method is not None:
        factor = schedule_value(args.ssl_loss_schedule, 1.0, step, total_steps)
        criterion.weight_dict.update(model.ssl_method.weight_dict(factor))
    if model.ssl_head is not None:
        criterion.weight_dict["loss_ssl"] = schedule_value(args.ssl_loss_schedule, args.ssl_loss_coef, step,
                                                           total_steps)
        model.ssl_head.ratio = schedule_value(args.ssl_ratio_schedule, args.ssl_ratio, step, total_steps)


def apply_schedules(training: TrainingRun, step: int, total_steps: int) -> None:
    """Everything scheduled per optimizer step, before step ``step`` of ``total_steps``: the SSL
    weights and ratio, and the learning rates of a per-step (cosine / warmup) schedule."""
    apply_ssl_schedules(training.module, training.criterion, training.args, step, total_steps)
    if training.ema is not None:  # the average evaluates its pretext task with the same ratio
        apply_ssl_schedules(training.ema.module, training.criterion, training.args, step, total_steps)
    schedule_lr(training.lr_scheduler, step, total_steps)


def announce_ssl_schedules(model: torch.nn.Module, criterion: torch.nn.Module, args: argparse.Namespace, epoch: int,
                           step: int, total_steps: int, logger: logging.Logger) -> None:
    """Log the scheduled values of ``step``, the first of ``epoch``: once for constant schedules,
    every epoch for decaying ones (TensorBoard has them per step)."""
    if epoch != args.start_epoch and args.ssl_loss_schedule == args.ssl_ratio_schedule == "constant":
        return
    if model.ssl_method is not None:
        factor = schedule_value(args.ssl_loss_schedule, 1.0, step, total_steps)
        logger.info("epoch %d: %s%s", epoch, model.ssl_method.describe(),
                    "" if factor == 1.0 else f", scaled by {factor:.4g} (--ssl_loss_schedule)")
    if model.ssl_head is not None:
        logger.info("epoch %d: pretext task %s (%s) with lambda %.4g, ratio %.3g", epoch, args.ssl_task,
                    args.ssl_mode, criterion.weight_dict["loss_ssl"], model.ssl_head.ratio)


PRETEXT_FLAGS = ("ssl_task", "ssl_mode", "ssl_levels", "ssl_method",
                 *(flag for method in METHODS.values() for flag in method.architecture_flags))


def adopt_checkpoint_architecture(args: argparse.Namespace, checkpoint: dict, logger: logging.Logger) -> None:
    """``--eval --resume CKPT`` evaluates the model the checkpoint holds: the architecture and input
    size flags the user did not give come from its saved configuration (official checkpoints
    without one, or with the official flags only, keep the official defaults), and the log says which."""
    saved = checkpoint.get("args") or {}
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else dict(saved)
    given = set(getattr(args, "given", ()))
    wanted = ARCHITECTURE_FLAGS
    if saved.get("ssl_mode") == "pretrain":  # the pretext task is what a pre-training run evaluates
        wanted = (*wanted, "tokenizer")
    else:  # a multi-task run's pretext heads do not detect: evaluation leaves them out
        wanted = tuple(key for key in wanted if key not in PRETEXT_FLAGS)
    adopted = {key: saved[key] for key in wanted
               if key in saved and key not in given and saved[key] is not None and saved[key] != getattr(args, key)}
    if "backbone_weights" not in given:
        adopted["backbone_weights"] = "none"  # the checkpoint's weights replace them: nothing to download
    vars(args).update(adopted)
    resolve_method(args, config_error)
    logger.info("--eval: from the checkpoint's configuration: %s",
                ", ".join(f"--{key} {value}" for key, value in adopted.items()))


def build_method_dataset(image_set: str, args: argparse.Namespace):
    """The 'train' or 'val' dataset as the ``--ssl_method`` trains on it: in its number of views,
    through its own transforms if it has them."""
    method = METHODS.get(args.ssl_method)
    if method is None:
        return build_dataset(image_set, args)
    return build_dataset(image_set, args, views=method.views, transforms=method.transforms(image_set, args))


def build_validation_dataset(args: argparse.Namespace, logger: logging.Logger):
    """The images every evaluation runs on: the labelled ``--val_split`` for detection; for a
    pre-training run ``--val_path``, else the ``--val_split`` of COCO-json data, else none; as the
    method trains on them."""
    if args.ssl_mode == "pretrain" and args.dataset_file == "folder" and not args.val_path:
        logger.info("pre-training without held-out images: no validation loss (pass --val_path DIR to get one)")
        return None
    return build_method_dataset("val", args)


def warn_about_ignored_settings(args: argparse.Namespace, dataset_train, categories: dict[int, str],
                                checkpoint: dict | None, logger: logging.Logger) -> None:
    """Say what the run will silently not do as asked: flags that have no effect here, images with
    more objects than queries, and an evaluation json whose category names differ from the
    checkpoint's."""
    if args.tokenizer and args.ssl_task != "mim_discrete":
        logger.warning("--tokenizer is read only by --ssl_task mim_discrete: ignored with --ssl_task %s", args.ssl_task)
    if args.amp_dtype != "auto" and not args.amp:
        logger.warning("--amp_dtype %s has no effect without --amp: the run is float32", args.amp_dtype)
    vit_flags = [f"--{name}" for name in ("drop_path", "vit_rel_pos", "vit_pyramid", "vit_window_size")
                 if name in getattr(args, "given", ())]
    if vit_flags and not args.backbone.startswith("vit_"):
        logger.warning("%s apply to ViT backbones only: ignored with --backbone %s", ", ".join(vit_flags),
                       args.backbone)
    if dataset_train is not None and not is_unlabelled(dataset_train):
        counts = [len(anns) for anns in get_coco_api(dataset_train).imgToAnns.values()]
        crowded = [count for count in counts if count > args.num_queries]
        if crowded:
            logger.warning("%d training image(s) have more objects than --num_queries %d (up to %d): the matcher "
                           "can assign at most %d per image, the rest are never learnt; raise --num_queries",
                           len(crowded), args.num_queries, max(crowded), args.num_queries)
    saved = {int(k): str(v) for k, v in ((checkpoint or {}).get("categories") or {}).items()}
    if args.eval and saved and categories and saved != categories:
        differ = [f"{i}: {saved.get(i, '-')} / {categories.get(i, '-')}" for i in sorted({*saved, *categories})
                  if saved.get(i) != categories.get(i)]
        logger.warning("the evaluation json's categories differ from the checkpoint's (id: checkpoint / json): %s",
                       "; ".join(differ[:10]) + (f"; ... ({len(differ)} in all)" if len(differ) > 10 else ""))


def describe_run(args: argparse.Namespace, info: dist.DistInfo, model: torch.nn.Module, logger: logging.Logger) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    classes = "pre-training: no detection classes" if args.ssl_mode == "pretrain" else f"{args.num_classes} classes"
    logger.info("model %s (%s backbone, %s weights): %.1fM parameters, %.1fM trainable, %s, %d queries",
                args.model, args.backbone, args.backbone_weights, total / 1e6, trainable / 1e6, classes,
                args.num_queries)
    precision = describe_precision(args, info.device)
    if precision:
        logger.log(logging.WARNING if is_emulated_bfloat16(args, info.device) else logging.INFO, "%s", precision)
    logger.info("effective batch: %d processes x %d images x %d accumulation steps = %d images per optimizer step",
                info.world_size, args.batch_size, args.accum_steps, info.world_size * args.batch_size * args.accum_steps)


def run(args: argparse.Namespace) -> dict:
    """Train (or with ``--eval`` only evaluate) as configured; returns the last evaluation stats."""
    info = dist.init_distributed(resolve_device(args.device))
    args.device = str(info.device)
    if args.deterministic and info.device.type == "cuda" and args.model == "deformable_detr" and not args.eval:
        raise ConfigError("--deterministic on CUDA: the backward of Deformable DETR's attention (CUDA kernel or "
                         "grid_sample) adds gradients with atomics, so no CUDA run of it is bit-reproducible; train on "
                         "the CPU (--device cpu) for bit-exact runs, or drop --deterministic")
    output_dir = Path(args.output_dir) if args.output_dir else None
    if output_dir and dist.is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
    logger = setup_logging(args.output_dir or None, info.rank)
    seed_everything(args.seed + info.rank, args.deterministic)

    checkpoint = load_checkpoint(args.resume) if args.resume else None
    if args.eval and checkpoint is not None:
        adopt_checkpoint_architecture(args, checkpoint, logger)
    detects = args.ssl_mode != "pretrain"  # pre-training has no detection targets to evaluate
    views = METHODS[args.ssl_method].views if args.ssl_method != "none" else 1  # a method may want two views
    dataset_val = build_validation_dataset(args, logger)
    dataset_train = None if args.eval else build_method_dataset("train", args)
    datasets = [d for d in (dataset_train, dataset_val) if d is not None]
    check_datasets(datasets, args.check_data, args.skip_bad_samples, logger)  # every rank its share; all stop alike
    resolve_num_classes(args, datasets, logger)
    labelled = [d for d in datasets if not is_unlabelled(d)]
    categories = category_names_of(labelled[0]) if labelled else {}  # saved in every checkpoint
    warn_about_ignored_settings(args, dataset_train, categories, checkpoint, logger)
    if output_dir and dist.is_main_process():
        save_config(args, output_dir / "config.yaml")
        write_subset_file(dataset_train, output_dir)  # the --train_fraction / --shots images, if chosen

    model, criterion, postprocessors = build_model(args)
    if args.pretrain:
        load_pretrained_encoder(model, args.pretrain, logger)
    if args.finetune:
        load_finetune(model, args.finetune, logger)
    model.to(info.device)
    criterion.to(info.device)
    model_without_ddp = model
    if info.distributed:  # pre-training leaves the decoder and heads unused
        model = DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None,
                                        find_unused_parameters=not detects)
    describe_run(args, info, model_without_ddp, logger)

    optimizer = build_optimizer(model_without_ddp, args)
    lr_scheduler = build_lr_scheduler(optimizer, args)
    scaler = build_grad_scaler(args, info.device)
    start_batch = 0
    if checkpoint is not None:
        if args.eval:
            evaluated = ema_weights(checkpoint, args.resume) if args.eval_ema else checkpoint
            load_for_evaluation(model_without_ddp, evaluated, args.resume, logger,
                                hint=". --eval needs the flags of the run that wrote it (e.g. --config OUTPUT_DIR/config.yaml)")
            args.start_epoch = checkpoint.get("epoch", args.start_epoch)  # results are labelled with its epoch
        else:
            args.start_epoch = resume_training(checkpoint, model_without_ddp, optimizer, lr_scheduler, logger,
                                               args.resume)
            if "scaler" in checkpoint:
                scaler.load_state_dict(checkpoint["scaler"])
            if "interrupted_at" in checkpoint:
                start_batch = checkpoint["interrupted_at"]["batches"]
                logger.info("epoch %d stopped after %d batches (%s): it continues from there", args.start_epoch,
                            start_batch, checkpoint["interrupted_at"]["reason"])
            logger.info("resumed from %s", args.resume)
    ema = ModelEma(model_without_ddp, args.model_ema_decay) if args.model_ema and not args.eval else None
    if ema is not None and checkpoint is not None:
        resume_ema(ema, checkpoint, logger)

    loader_val = None if dataset_val is None else build_loader(dataset_val, args, train=False,
                                                               collate_fn=collate_for(views), rank=info.rank,
                                                               world_size=info.world_size)
    tb = TensorBoardLogger(args.output_dir if dist.is_main_process() else None, enabled=args.tensorboard)
    if detects:
        validate = partial(evaluate, postprocessors=postprocessors, coco_gt=get_coco_api(dataset_val),
                           device=info.device, args=args, output_dir=output_dir, tb=tb, logger=logger)
    else:
        validate = partial(evaluate_pretext, device=info.device, args=args, tb=tb, logger=logger)
    try:
        if args.eval:
            return validate(model, criterion, data_loader=loader_val, epoch=args.start_epoch)
        loader_train = build_loader(dataset_train, args, train=True, collate_fn=collate_for(views), rank=info.rank,
                                    world_size=info.world_size)
        if detects and args.val_split == args.train_split and args.dataset_file != "folder":
            logger.warning("evaluating on the training split '%s': the AP measures memorisation (an overfitting "
                           "check), not generalisation", args.train_split)
        training = TrainingRun(args, model, model_without_ddp, criterion, postprocessors, optimizer, lr_scheduler,
                               scaler, output_dir, tb, logger, categories, ema)
        stats = train(training, loader_train, loader_val, validate, start_batch)
        report_outputs(output_dir, args.tensorboard, logger)
        return stats
    finally:
        tb.close()
        dist.cleanup()


def train(training: TrainingRun, loader_train, loader_val, validate: Callable[..., dict], start_batch: int = 0) -> dict:
    """The epoch loop: train, step the schedule, checkpoint, evaluate, log.

    The first epoch starts at ``start_batch`` (a resumed mid-epoch stop). SIGTERM, SIGINT or
    ``--max_bad_steps`` non-finite losses in a row stop the loop between optimizer steps, and the
    state reached is checkpointed. Then SIGTERM returns (a clean exit), SIGINT raises
    ``KeyboardInterrupt`` and non-finite losses raise ``TooManyBadSteps``.
    """
    args, logger, output_dir = training.args, training.logger, training.output_dir
    stats: dict = {}
    if args.start_epoch >= args.epochs:
        logger.warning("start epoch %d >= --epochs %d: nothing to train", args.start_epoch, args.epochs)
    device = torch.device(args.device)
    bad_steps = BadSteps(args.max_bad_steps)
    schedule = partial(apply_schedules, training)
    on_step = partial(training.ema.update, training.module) if training.ema is not None else None
    with stop_on_signals(logger) as stop:
        logger.info("training from epoch %d to %d on %d images", args.start_epoch, args.epochs - 1,
                    len(loader_train.dataset))
        try:
            for epoch in range(args.start_epoch, args.epochs):
                first_batch = start_batch if epoch == args.start_epoch else 0
                signum = stop.agreed(device)  # a signal during the previous evaluation or checkpoint
                if signum:
                    raise Interrupted(signum, epoch, first_batch)
                started = time.time()
                set_epoch(loader_train, epoch, args.seed, first_batch)
                epoch_steps = steps_per_epoch(loader_train, args, first_batch)
                first_step, total_steps = epoch * epoch_steps + first_batch // args.accum_steps, args.epochs * epoch_steps
                schedule(first_step, total_steps)
                announce_ssl_schedules(training.module, training.criterion, args, epoch, first_step, total_steps, logger)
                train_stats = train_one_epoch(training.model, training.criterion, loader_train, training.optimizer,
                                              device, epoch, args, training.tb, logger, training.scaler, first_batch,
                                              stop, bad_steps, schedule, on_step)
                end_epoch(training.lr_scheduler)
                if output_dir and ((epoch + 1) % args.checkpoint_every == 0 or epoch == args.epochs - 1):
                    state = training.checkpoint_state(epoch)  # collective
                    if dist.is_main_process():
                        save_epoch_checkpoint(output_dir, state, args.keep_last)
                evaluated = loader_val is not None and ((epoch + 1) % args.eval_every == 0
                                                        or epoch == args.epochs - 1)
                if evaluated:
                    stats = validate(training.model, training.criterion, data_loader=loader_val, epoch=epoch)
                    if training.ema is not None:  # the average next to the model: val_ema_* in log.jsonl
                        ema_stats = validate(training.ema.module, training.criterion, data_loader=loader_val,
                                             epoch=epoch, tag="val_ema")
                        stats.update({f"ema_{key}": value for key, value in ema_stats.items()})
                log_epoch(epoch, train_stats, stats if evaluated else {}, time.time() - started, output_dir, logger)
        except StopTraining as stopped:
            save_stopped_checkpoint(training, stopped)
            if isinstance(stopped, TooManyBadSteps):
                logger.error("%s", stopped)
                raise
            if stopped.signum == signal.SIGINT:
                raise KeyboardInterrupt from stopped
    return stats


def save_stopped_checkpoint(training: TrainingRun, stopped: StopTraining) -> None:
    """Checkpoint the state of a stopped run as OUTPUT_DIR/checkpoint.pth (collective).

    ``epoch`` is the last completed epoch, as in every checkpoint, and ``interrupted_at`` holds
    how many batches of the next one the state includes: ``--resume`` continues at that batch.
    The numbered per-epoch checkpoints are left alone.
    """
    output_dir, logger = training.output_dir, training.logger
    if not output_dir:
        logger.warning("%s; nothing saved (no --output_dir)", stopped)
        return
    interrupted_at = {"epoch": stopped.epoch, "batches": stopped.batches, "reason": stopped.reason}
    state = training.checkpoint_state(stopped.epoch - 1, interrupted_at=interrupted_at)
    path = output_dir / LATEST
    logger.info("%s; saving %s", stopped, path)
    if dist.is_main_process():
        save_checkpoint(path, state)
    logger.info("saved; continue with --resume %s", path)


def report_outputs(output_dir: Path | None, tensorboard: bool, logger: logging.Logger) -> None:
    """Tell the user where the results of the run are."""
    if not output_dir:
        logger.info("done; nothing was saved (no --output_dir)")
        return
    logger.info("done. checkpoint: %s | config: %s | log: %s", output_dir / "checkpoint.pth",
                output_dir / "config.yaml", output_dir / "log.jsonl")
    if tensorboard:
        logger.info("watch the curves with: tensorboard --logdir %s", output_dir / "tensorboard")


def log_epoch(epoch: int, train_stats: dict, eval_stats: dict, seconds: float, output_dir: Path | None,
              logger: logging.Logger) -> None:
    """One JSON line per epoch in OUTPUT_DIR/log.jsonl (as the official log.txt); a console line after evaluations."""
    if "AP" in eval_stats:
        logger.info("epoch %d done in %.1f s: train loss %.4f, val AP %.4f, AP50 %.4f", epoch, seconds,
                    train_stats.get("loss", float("nan")), eval_stats["AP"], eval_stats["AP50"])
    elif eval_stats:
        logger.info("epoch %d done in %.1f s: train loss %.4f, val loss %.4f", epoch, seconds,
                    train_stats.get("loss", float("nan")), eval_stats["loss"])
    if output_dir and dist.is_main_process():
        record = {"epoch": epoch, "seconds": round(seconds, 1),
                  **{f"train_{k}": v for k, v in train_stats.items()},
                  **{f"val_{k}": v for k, v in eval_stats.items()}}
        with open(output_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
