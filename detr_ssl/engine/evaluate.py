"""Evaluation: validation losses and COCO box AP with pycocotools."""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
from collections.abc import Iterable
from contextlib import redirect_stdout
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn
from torchvision.ops import box_convert
from tqdm import tqdm

from detr_ssl.config import AREA_UNBOUNDED, COCO_AREA_RANGES, parse_area_ranges
from detr_ssl.data.bad_samples import log_skipped, skipped_in
from detr_ssl.engine.amp import autocast, to_float32
from detr_ssl.engine.coco_backend import coco_evaluator
from detr_ssl.engine.train import Targets, batch_limit, image_ids, log_pictures, logged_losses, to_device
from detr_ssl.utils.dist import all_gather_object, is_main_process
from detr_ssl.utils.logging import MetricTracker, TensorBoardLogger
from detr_ssl.utils.misc import NestedTensor

Detections = dict[int, list[dict[str, Any]]]
AreaRanges = list[tuple[str, float, float]]  # (label, min area, max area) in px^2, see --area_ranges
COCO_AREAS: AreaRanges = parse_area_ranges(COCO_AREA_RANGES)
_COCO_AREA_NAMES = {"small": "s", "medium": "m", "large": "l"}  # COCO's APs/APm/APl


def _summary_rows(area_labels: list[str]) -> list[tuple[str, float | None, str, int]]:
    """The COCO box metrics as (AP or AR, IoU threshold or None for 0.50:0.95, area range,
    index into the sorted maxDets): the 12 standard ones for COCO's areas, one AP and one AR row
    per area range in general. pycocotools' own summarize() fixes maxDets=100 for the first AP
    and its three area ranges, so it cannot honour --max_dets or --area_ranges; these rows do
    the same computation with any of them."""
    return [("AP", None, "all", 2), ("AP", 0.5, "all", 2), ("AP", 0.75, "all", 2),
            *(("AP", None, label, 2) for label in area_labels),
            ("AR", None, "all", 0), ("AR", None, "all", 1), ("AR", None, "all", 2),
            *(("AR", None, label, 2) for label in area_labels)]


def area_stat_name(kind: str, label: str) -> str:
    """'APs' for COCO's small, medium and large (as everywhere else), 'AP_tiny' for other labels."""
    return f"{kind}{_COCO_AREA_NAMES[label]}" if label in _COCO_AREA_NAMES else f"{kind}_{label}"


def tensorboard_metrics(area_ranges: AreaRanges = COCO_AREAS) -> list[str]:
    """The metrics plotted in TensorBoard: AP, AP50, AP75 and the AP of each area range."""
    return ["AP", "AP50", "AP75", *(area_stat_name("AP", label) for label, _, _ in area_ranges)]


def coco_max_dets(max_dets: int) -> list[int]:
    """COCOeval's maxDets for ``--max_dets``, in the sorted order COCOeval.evaluate() uses."""
    return sorted([1, 10, max_dets])


def stat_names(max_dets: int, area_ranges: AreaRanges = COCO_AREAS) -> list[str]:
    """Names of the COCO box metrics, in the order of ``coco_eval_bbox`` (12 for COCO's areas)."""
    few, some, most = coco_max_dets(max_dets)
    labels = [label for label, _, _ in area_ranges]
    return ["AP", "AP50", "AP75", *(area_stat_name("AP", label) for label in labels),
            f"AR{few}", f"AR{some}", f"AR{most}", *(area_stat_name("AR", label) for label in labels)]


def to_coco_results(image_id: int, detection: dict[str, Tensor], max_dets: int) -> list[dict[str, Any]]:
    """The ``max_dets`` best-scoring boxes of one image in the COCO results format (xywh)."""
    scores, order = detection["scores"].topk(min(max_dets, len(detection["scores"])))
    boxes = box_convert(detection["boxes"][order], "xyxy", "xywh")
    labels = detection["labels"][order]
    return [
        {"image_id": image_id, "category_id": label, "bbox": box, "score": score}
        for label, box, score in zip(labels.tolist(), boxes.tolist(), scores.tolist())
    ]


def _merge(per_process: list[Detections]) -> Detections:
    """Union of the processes' detections; an image that a distributed sampler padded in twice
    is counted once."""
    merged: Detections = {}
    for detections in per_process:
        for image_id, results in detections.items():
            merged.setdefault(image_id, results)
    return merged


def coco_bbox_stats(coco_gt: COCO, detections: Detections, max_dets: int, logger: logging.Logger,
                    area_ranges: AreaRanges = COCO_AREAS,
                    backend: str = "pycocotools") -> tuple[list[float], dict[str, float]]:
    """COCOeval's box metrics (named by ``stat_names``) and the AP of each category over exactly
    the images in ``detections``, tables logged. ``area_ranges`` replace COCO's small, medium
    and large (``--area_ranges``); 'all' is always first. ``backend``: ``--coco_eval_backend``.

    No detections at all gives zeros (pycocotools cannot load an empty result list); images
    without ground truth give pycocotools' -1 ("undefined"), as do categories without any.
    """
    rows = _summary_rows([label for label, _, _ in area_ranges])
    results = [dict(result) for results in detections.values() for result in results]
    if not results:
        logger.warning("no detections in the %d evaluated images: every COCO metric is 0", len(detections))
        return [0.0] * len(rows), {}
    image_ids = sorted(detections)
    if not coco_gt.getAnnIds(imgIds=image_ids):
        logger.warning("no ground-truth boxes in the %d evaluated images: COCO metrics are undefined (-1)", len(image_ids))
    with redirect_stdout(io.StringIO()):
        coco_eval = coco_evaluator(coco_gt, results, backend)  # --coco_eval_backend
        coco_eval.params.imgIds = image_ids
        coco_eval.params.maxDets = coco_max_dets(max_dets)
        coco_eval.params.areaRng = [[0.0, AREA_UNBOUNDED]] + [[low, high] for _, low, high in area_ranges]
        coco_eval.params.areaRngLbl = ["all"] + [label for label, _, _ in area_ranges]
        coco_eval.evaluate()
        coco_eval.accumulate()
    stats, lines = zip(*(_summary_row(coco_eval, *row) for row in rows))
    logger.info("COCO box metrics on %d images:\n%s", len(image_ids), "\n".join(lines))
    per_class = per_class_ap(coco_eval, coco_gt)
    _log_per_class(per_class, logger)
    return list(stats), per_class


def per_class_ap(coco_eval: COCOeval, coco_gt: COCO) -> dict[str, float]:
    """AP@[.50:.95] (all areas, the largest maxDets) of each category; -1 where it has no ground truth."""
    precision = coco_eval.eval["precision"][:, :, :, coco_eval.params.areaRngLbl.index("all"), -1]  # [T, R, K]
    per_class = {}
    for index, category_id in enumerate(coco_eval.params.catIds):
        values = precision[:, :, index]
        valid = values[values > -1]
        per_class[coco_gt.cats[category_id]["name"]] = float(valid.mean()) if valid.size else -1.0
    return per_class


def _log_per_class(per_class: dict[str, float], logger: logging.Logger) -> None:
    measured = {name: ap for name, ap in per_class.items() if ap >= 0}
    width = max((len(name) for name in measured), default=0)
    rows = [f"  {name:<{width}}  {ap:.3f}" for name, ap in sorted(measured.items(), key=lambda item: -item[1])]
    logger.info("AP per category (%d with ground truth):\n%s", len(measured), "\n".join(rows))
    missing = [name for name, ap in per_class.items() if ap < 0]
    if missing:
        logger.info("no ground truth in the evaluated images, so no AP, for %d categories: %s", len(missing),
                    ", ".join(missing))


def _summary_row(coco_eval: COCOeval, kind: str, iou: float | None, area: str, det_index: int) -> tuple[float, str]:
    """One COCO metric (mean over the valid entries, -1 if none) and its line in the usual table."""
    params = coco_eval.params
    values = coco_eval.eval["precision" if kind == "AP" else "recall"]  # [T, (R,) K, A, M]
    if iou is not None:
        values = values[np.isclose(params.iouThrs, iou)]
    values = values[..., params.areaRngLbl.index(area), det_index]
    valid = values[values > -1]
    stat = float(valid.mean()) if valid.size else -1.0
    title = "Average Precision  (AP)" if kind == "AP" else "Average Recall     (AR)"
    iou_text = f"{params.iouThrs[0]:0.2f}:{params.iouThrs[-1]:0.2f}" if iou is None else f"{iou:0.2f}"
    line = f" {title} @[ IoU={iou_text:<9} | area={area:>6} | maxDets={params.maxDets[det_index]:>3d} ] = {stat:0.3f}"
    return stat, line


def _write_results(path: Path, detections: Detections) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([result for results in detections.values() for result in results]))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    criterion: nn.Module,
    postprocessors: dict[str, nn.Module],
    data_loader: Iterable[tuple[NestedTensor, Targets]],
    coco_gt: COCO,
    device: torch.device | str,
    args: argparse.Namespace,
    output_dir: str | os.PathLike | None,
    epoch: int,
    tb: TensorBoardLogger,
    logger: logging.Logger,
    tag: str = "val",
) -> dict[str, Any]:
    """Validation losses and COCO box metrics; the same dict is returned on every process.

    Returns ``{'coco_eval_bbox': [stats], 'AP': ..., 'AP50': ..., ..., 'loss': ..., <loss keys>}``
    (12 stats with COCO's area ranges) and, on the main process, writes
    ``OUTPUT_DIR/results_{epoch:04d}.json``. Images that ``--skip_bad_samples`` skipped are
    logged and left out of the metrics. ``tag`` names the curves in TensorBoard, the log and the
    results file (``val_ema``, ``results_val_ema_{epoch:04d}.json``, for the ``--model_ema`` average).
    """
    # Checkpoints and namespaces made before --area_ranges existed evaluate with COCO's ranges.
    area_ranges = parse_area_ranges(getattr(args, "area_ranges", COCO_AREA_RANGES))
    model.eval()
    criterion.eval()
    num_batches = batch_limit(data_loader, args.limit_val_batches)
    meter = MetricTracker()
    detections: Detections = {}
    skipped: list[str] = []
    progress = tqdm(islice(data_loader, num_batches), total=num_batches, desc=f"epoch {epoch} val",
                    disable=not is_main_process(), dynamic_ncols=True, leave=False)
    for samples, targets in progress:
        samples, targets = to_device(samples, targets, device)
        with autocast(args, device):
            outputs = to_float32(model(samples))
        meter.update(logged_losses(criterion(outputs, targets), criterion.weight_dict))
        skipped.extend(skipped_in(targets))
        orig_sizes = torch.stack([target["orig_size"] for target in targets])
        for image_id, detection in zip(image_ids(targets), postprocessors["bbox"](outputs, orig_sizes)):
            detections[image_id] = to_coco_results(image_id, detection, args.max_dets)
    detections = _merge(all_gather_object(detections))
    log_skipped(logger, f"epoch {epoch} val", (m for messages in all_gather_object(skipped) for m in messages))
    stats = None
    if is_main_process():
        if output_dir:
            name = f"results_{epoch:04d}.json" if tag == "val" else f"results_{tag}_{epoch:04d}.json"
            _write_results(Path(output_dir) / name, detections)
        stats = coco_bbox_stats(coco_gt, detections, args.max_dets, logger, area_ranges,
                                getattr(args, "coco_eval_backend", "pycocotools"))
    stats, per_class = all_gather_object(stats)[0]
    metrics = dict(zip(stat_names(args.max_dets, area_ranges), stats))
    tb.scalars({name: metrics[name] for name in tensorboard_metrics(area_ranges)}, epoch, tag)
    tb.scalars(meter.summary(), epoch, tag)
    logger.info("epoch %d %s: %s", epoch, tag, meter.format())
    return {"coco_eval_bbox": stats, **metrics, "per_class_AP": per_class, **meter.summary()}


@torch.no_grad()
def evaluate_pretext(
    model: nn.Module,
    criterion: nn.Module,
    data_loader: Iterable[tuple[NestedTensor, Targets]],
    device: torch.device | str,
    args: argparse.Namespace,
    epoch: int,
    tb: TensorBoardLogger,
    logger: logging.Logger,
    tag: str = "val",
) -> dict[str, Any]:
    """The validation losses of a pre-training run (``--ssl_mode pretrain``): its pretext losses
    on held-out images, returned on every process.

    The corruption (masks, permutations, crops) is drawn from a generator seeded by ``--seed``
    alone, outside the training random stream: every epoch sees the same corrupted images, so
    the losses compare across epochs, and training (and its exact resume) is left untouched.
    TensorBoard gets the losses and the pretext task's pictures of the first validation batch
    (under ``tag``, as :func:`evaluate`).
    """
    model.eval()
    criterion.eval()
    num_batches = batch_limit(data_loader, args.limit_val_batches)
    meter = MetricTracker()
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    progress = tqdm(islice(data_loader, num_batches), total=num_batches, desc=f"epoch {epoch} val",
                    disable=not is_main_process(), dynamic_ncols=True, leave=False)
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(args.seed)
        for index, (samples, targets) in enumerate(progress):
            samples, targets = to_device(samples, targets, device)
            with autocast(args, device):
                outputs = to_float32(model(samples))
            meter.update(logged_losses(criterion(outputs, targets), criterion.weight_dict))
            if index == 0 and tb.active:
                log_pictures(model, outputs, targets, tb, epoch, prefix=f"{tag}/")
    summary = meter.summary()
    tb.scalars(summary, epoch, tag)
    logger.info("epoch %d %s (pretext task on %d held-out batches): %s", epoch, tag, num_batches, meter.format())
    return summary
