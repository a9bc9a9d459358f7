"""Detect objects in any images with a trained checkpoint; large images go through sliding windows.

    python scripts/predict.py --resume runs/isaid/checkpoint.pth --images /data/iSAID/val/images \\
        --exclude '*_RGB.png' --out runs/isaid/predict [--window 800 --overlap 200 --score_threshold 0.3]
    python scripts/predict.py --resume runs/isaid/checkpoint.pth --images /data/iSAID/val/images \\
        --annotations /data/iSAID/val/instancesonly_filtered_val.json --score_threshold 0 --out runs/isaid/full
    python scripts/predict.py --onnx model.onnx --images /data/iSAID/val/images --out runs/isaid/onnx

--images takes files and folders (searched recursively). The model and its preprocessing
(--min_size, --max_size) come from the checkpoint's saved configuration, or with --onnx from the
metadata scripts/export_onnx.py writes into the graph: the same windows then run through
onnxruntime on the CPU (pip install -e '.[export]'), no checkpoint or PyTorch model needed. A
graph of fixed size (Deformable DETR, or DETR exported without --dynamic) gets each window padded
into its size and the windows in batches of its batch; windows smaller than that size see more
padding than PyTorch gives them (it pads a batch to its largest window), which changes their
detections a little, so only windows that fill the graph's size give the checkpoint's output
exactly. An image larger than
--window is cut into --window x --window windows overlapping by --overlap, with the grid of
scripts/prepare_isaid.py (the last row and column shifted inwards), so that a model trained on
prepared patches sees objects at its training scale; the windows' detections are shifted back
to the full image and merged with class-wise NMS (--nms_iou). --window 0 runs each image whole.

Writes to --out:
* predictions.json  detections of every image in the COCO results format (image_id,
                    category_id, bbox as [x, y, w, h] pixels, score), scores >= --score_threshold;
* images.json       the images (id, file_name, width, height) and categories those ids refer to;
* <image stem>.png  each image with its boxes, class names and scores drawn (not with --no_draw);
* metrics.json      with --annotations: COCO box AP of the full images against that json, whose
                    image ids and category names are then used (images it does not list are
                    ignored, and counted).
The last stdout line is a JSON summary.
"""
from __future__ import annotations

import argparse
import fnmatch
import io
import json
import sys
import time
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision.ops import box_convert
from tqdm import tqdm

from detr_ssl.config import COCO_AREA_RANGES, parse_area_ranges
from detr_ssl.engine.evaluate import coco_bbox_stats, stat_names
from detr_ssl.engine.onnx_runtime import OnnxDetect
from detr_ssl.engine.predict import (Detect, SlidingWindowPredictor, TorchDetect, category_names, coco_categories,
                                     load_detector)
from detr_ssl.engine.runner import resolve_device
from detr_ssl.utils.drawing import category_colour, draw_boxes, save_png, to_uint8
from detr_ssl.utils.errors import ConfigError, UserError
from detr_ssl.utils.image import IMAGE_SUFFIXES, image_files
from detr_ssl.utils.logging import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--resume", type=Path, help="checkpoint of a detection run (checkpoint.pth)")
    source.add_argument("--onnx", type=Path,
                        help="ONNX graph of scripts/export_onnx.py, run with onnxruntime instead of a checkpoint")
    parser.add_argument("--images", type=Path, nargs="+", required=True,
                        help="image files and/or folders (searched recursively for " + " ".join(IMAGE_SUFFIXES) + ")")
    parser.add_argument("--out", type=Path, default=Path("predictions"), help="output folder (default: predictions)")
    parser.add_argument("--window", type=int, default=800,
                        help="side of the sliding windows in pixels; 0: the whole image at once (default: 800)")
    parser.add_argument("--overlap", type=int, default=200,
                        help="overlap of neighbouring windows in pixels; make it larger than the objects "
                             "(default: 200)")
    parser.add_argument("--score_threshold", type=float, default=0.3,
                        help="keep detections scoring at least this (0 for COCO AP with --annotations) (default: 0.3)")
    parser.add_argument("--nms_iou", type=float, default=0.5,
                        help="IoU above which overlapping windows' boxes of one class are merged (default: 0.5)")
    parser.add_argument("--max_dets", type=int, default=None,
                        help="at most this many detections per image after merging (default: all)")
    parser.add_argument("--batch_size", type=int, default=4, help="windows per forward pass (default: 4)")
    parser.add_argument("--device", type=str, default="cuda",
                        help="'cuda', 'cuda:N' or 'cpu'; falls back to the CPU without CUDA; ignored with --onnx, "
                             "which runs on onnxruntime's CPU provider (default: cuda)")
    parser.add_argument("--exclude", type=str, nargs="*", default=[], metavar="GLOB",
                        help="skip files whose name matches, e.g. '*_RGB.png' for iSAID's mask files")
    parser.add_argument("--annotations", type=Path, default=None,
                        help="COCO json of these images: image ids and category names from it, and COCO box AP")
    parser.add_argument("--categories", type=Path, default=None,
                        help="COCO json whose categories name the classes (default: from --annotations, else the "
                             "names the checkpoint saved, else iSAID's for an iSAID checkpoint, else the checkpoint's "
                             "training json if still there; with --onnx, the names exported into the graph)")
    parser.add_argument("--area_ranges", type=str, default=COCO_AREA_RANGES,
                        help="object-size ranges for --annotations metrics, as in main.py (default: COCO's)")
    parser.add_argument("--no_draw", action="store_true", help="write the json files only, no PNGs")
    parser.add_argument("--skip_bad_samples", action="store_true",
                        help="skip unreadable image files (listed at the end) instead of stopping")
    return parser


@dataclass
class Backend:
    """What detects (a checkpoint's model or an ONNX graph) and what the log and outputs tell of it."""

    detect: Detect
    model: str
    num_classes: int
    num_queries: int
    min_size: int
    max_size: int
    names: dict[int, str]
    runs_on: str


def checkpoint_backend(args: argparse.Namespace, logger) -> Backend:
    """The checkpoint of --resume on --device, classes named as ``category_names`` says."""
    device = resolve_device(args.device)
    model, postprocess, config, saved = load_detector(args.resume, device, logger)
    return Backend(TorchDetect(model, postprocess), config.model, config.num_classes, config.num_queries,
                   config.min_size, config.max_size, category_names(config, args.categories or args.annotations, saved),
                   str(device))


def onnx_backend(args: argparse.Namespace) -> Backend:
    """The graph of --onnx on onnxruntime, classes named by --categories/--annotations or else the
    names exported with it."""
    detect = OnnxDetect(args.onnx)
    info = detect.info
    coco_json = args.categories or args.annotations
    shape = "x".join(str(n) for n in (info.batch or "dynamic", *(info.size or ("dynamic",))))
    return Backend(detect, info.model, info.num_classes, info.num_queries, info.min_size, info.max_size,
                   coco_categories(coco_json) if coco_json else info.categories,
                   f"onnxruntime's CPU (graph input {shape}{', raw outputs' if info.raw else ''})")


def find_inputs(paths: list[Path], exclude: list[str]) -> list[Path]:
    """The image files named or found below the folders, in order, without duplicates or excluded names."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = image_files(path)
            if not found:
                raise FileNotFoundError(f"--images {path}: no image files ({', '.join(IMAGE_SUFFIXES)}) below it")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"--images {path}: no such file or folder")
    kept = [f for f in dict.fromkeys(files) if not any(fnmatch.fnmatch(f.name, pattern) for pattern in exclude)]
    if not kept:
        raise FileNotFoundError(f"--images: every file matched --exclude {' '.join(exclude)}")
    return kept


def load_coco(path: Path) -> COCO:
    """A COCO json as pycocotools' index, without its progress prints and with a clear error."""
    try:
        with redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--annotations {path}: cannot read this COCO json: {err}") from err


def assign_ids(files: list[Path], annotations: COCO | None) -> tuple[list[tuple[int, Path]], list[Path]]:
    """(image id, file) to predict, and the files left out: ids 1..N, or the ids of ``annotations``
    matched by file name (files it does not list are left out)."""
    if annotations is None:
        return list(enumerate(files, start=1)), []
    by_name: dict[str, int] = {}
    for image in annotations.dataset.get("images", []):
        by_name.setdefault(Path(image["file_name"]).name, image["id"])
    listed = [(by_name[f.name], f) for f in files if f.name in by_name]
    return listed, [f for f in files if f.name not in by_name]


def to_results(image_id: int, detection: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """One image's detections in the COCO results format."""
    boxes = box_convert(detection["boxes"], "xyxy", "xywh")
    return [{"image_id": image_id, "category_id": int(label), "bbox": [round(v, 2) for v in box],
             "score": round(float(score), 5)}
            for label, box, score in zip(detection["labels"].tolist(), boxes.tolist(), detection["scores"].tolist())]


def draw(image: Image.Image, detection: dict[str, torch.Tensor], names: dict[int, str]) -> torch.Tensor:
    """The image with each detection's box, class name and score, one colour per class."""
    labels = detection["labels"].tolist()
    texts = [f"{names.get(label, f'class {label}')} {score:.2f}" for label, score in
             zip(labels, detection["scores"].tolist())]
    width = max(2, round(max(image.size) / 800))
    return draw_boxes(to_uint8(image), detection["boxes"], texts, [category_colour(label) for label in labels], width)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.window > 0 and not 0 <= args.overlap < args.window:
        parser.error(f"need 0 <= --overlap < --window, got --window {args.window} --overlap {args.overlap}")
    if not 0 <= args.score_threshold <= 1 or not 0 < args.nms_iou <= 1:
        parser.error("--score_threshold must lie in [0, 1] and --nms_iou in (0, 1]")
    if args.batch_size < 1 or (args.max_dets is not None and args.max_dets < 1):
        parser.error("--batch_size and --max_dets must be >= 1")
    try:
        area_ranges = parse_area_ranges(args.area_ranges)
    except ValueError as err:
        parser.error(f"--area_ranges: {err}")
    if args.resume and not args.resume.is_file():
        parser.error(f"--resume: checkpoint not found: {args.resume}")
    args.out.mkdir(parents=True, exist_ok=True)
    logger = setup_logging(str(args.out), rank=0)
    try:
        files = find_inputs(args.images, args.exclude)
        gt = None if args.annotations is None else load_coco(args.annotations)
        todo, left_out = assign_ids(files, gt)
        if gt is not None and not todo:
            raise ValueError(f"--annotations {args.annotations} lists none of the {len(files)} images found")
        backend = onnx_backend(args) if args.onnx else checkpoint_backend(args, logger)
    except (OSError, ValueError, RuntimeError, UserError) as err:
        logger.error("%s", err)
        return 1
    if left_out:
        logger.warning("%d file(s) not listed in %s were left out, e.g. %s", len(left_out), args.annotations,
                       ", ".join(str(f) for f in left_out[:3]))
    predictor = SlidingWindowPredictor(backend.detect, backend.min_size, backend.max_size, args.window, args.overlap,
                                       args.batch_size, args.score_threshold, args.nms_iou)
    logger.info("predicting %d image(s) with %s (%s, %d classes, %d queries, images resized to %d px) on %s, "
                "windows of %s px overlapping by %d", len(todo), args.onnx or args.resume, backend.model,
                backend.num_classes, backend.num_queries, backend.min_size, backend.runs_on,
                args.window or "whole-image", args.overlap)

    results: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    skipped: list[str] = []
    written: set[str] = set()
    started = time.perf_counter()
    progress = tqdm(todo, desc="predict", unit="image", dynamic_ncols=True)
    for image_id, path in progress:
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except OSError as err:
            if not args.skip_bad_samples:
                logger.error("cannot read image %s: %s (remove it, --exclude it or pass --skip_bad_samples)", path, err)
                return 1
            skipped.append(f"{path}: {err}")
            continue
        try:
            detection = predictor(image)
        except ConfigError as err:  # a window that does not fit a fixed-size ONNX graph
            logger.error("%s: %s", path, err)
            return 1
        if args.max_dets is not None:
            detection = {key: value[:args.max_dets] for key, value in detection.items()}
        results += to_results(image_id, detection)
        images.append({"id": image_id, "file_name": str(path), "width": image.width, "height": image.height})
        progress.set_postfix(windows=len(predictor.windows(image.width, image.height)), found=len(detection["scores"]))
        if not args.no_draw:
            name = path.stem if path.stem not in written else f"{path.stem}_{image_id}"
            written.add(name)
            save_png(draw(image, detection, backend.names), args.out / f"{name}.png")
    seconds = time.perf_counter() - started
    if skipped:
        logger.warning("--skip_bad_samples skipped %d unreadable image(s):\n%s", len(skipped),
                       "\n".join(f"  {s}" for s in skipped))
    categories = [{"id": i, "name": name} for i, name in sorted(backend.names.items())]
    (args.out / "predictions.json").write_text(json.dumps(results))
    (args.out / "images.json").write_text(json.dumps({"images": images, "categories": categories}, indent=1))
    summary = {"images": len(images), "detections": len(results), "skipped": len(skipped),
               "seconds": round(seconds, 2), "out": str(args.out)}
    if gt is not None and images:
        by_image = {image["id"]: [] for image in images}
        for result in results:
            by_image[result["image_id"]].append(result)
        max_dets = max([100, *map(len, by_image.values())])  # COCOeval counts at most maxDets per image
        stats, per_class = coco_bbox_stats(gt, by_image, max_dets, logger, area_ranges)
        metrics = {**dict(zip(stat_names(max_dets, area_ranges), stats)), "per_class_AP": per_class}
        (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        summary["AP"] = metrics["AP"]
    logger.info("%d image(s), %d detections in %.1f s; wrote %s", len(images), len(results), seconds, args.out)
    if predictor.below_threshold and not results:
        logger.warning("kept 0 detections: all %d were below --score_threshold %g (lower it, e.g. --score_threshold 0, "
                       "to see what the model finds)", predictor.below_threshold, args.score_threshold)
    elif predictor.below_threshold:
        logger.info("%d detections below --score_threshold %g were dropped", predictor.below_threshold,
                    args.score_threshold)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
