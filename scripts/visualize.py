"""Draw ground truth and predictions of COCO-json data, side by side or overlaid.

    python scripts/visualize.py --annotations /data/isaid_patches/annotations/instances_val.json \\
        --images /data/isaid_patches/val --results runs/isaid/results_0099.json --out runs/isaid/vis
    python scripts/visualize.py --annotations ISAID/val/instancesonly_filtered_val.json \\
        --images ISAID/val/images --results runs/isaid/full/predictions.json --overlay --out runs/isaid/full_vis

--annotations is a COCO json (the ground truth, its file names, sizes and category names);
--images the folder its ``file_name`` entries are relative to. --results is a COCO results
json: ``results_NNNN.json`` of a main.py evaluation (same json as --annotations) or
``predictions.json`` of scripts/predict.py --annotations (full images). Without --results only
the ground truth is drawn.

Each picture goes to OUT/<image stem>.png: ground truth (green, class names) on the left and
predictions scoring at least --score_threshold (red, class names and scores) on the right, or
both on one image with --overlay. Images drawn: --image_ids, else those with results (or all
the json lists without --results), at most --limit. The last stdout line is a JSON summary.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from collections import defaultdict
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision.ops import box_convert
from tqdm import tqdm

from detr_ssl.utils.drawing import (GROUND_TRUTH_COLOUR, PREDICTION_COLOUR, caption, draw_boxes, save_png,
                                    side_by_side, to_uint8)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", type=Path, required=True, help="COCO json of the ground truth")
    parser.add_argument("--images", type=Path, required=True, help="folder the json's file_name entries are in")
    parser.add_argument("--results", type=Path, default=None, help="COCO results json (main.py or predict.py)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    parser.add_argument("--overlay", action="store_true", help="draw both on one image instead of side by side")
    parser.add_argument("--score_threshold", type=float, default=0.3,
                        help="draw predictions scoring at least this (default: 0.3)")
    parser.add_argument("--image_ids", type=int, nargs="*", default=None, help="only these image ids")
    parser.add_argument("--limit", type=int, default=None, help="at most this many images")
    return parser


def load_results(path: Path, coco: COCO, annotations: Path) -> dict[int, list[dict[str, Any]]]:
    """Detections by image id, refusing ones of images the ground truth does not list."""
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--results {path}: cannot read: {err}") from err
    if not isinstance(results, list):
        raise ValueError(f"--results {path}: expected a COCO results list of detections, got {type(results).__name__}")
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for index, result in enumerate(results):
        if not {"image_id", "category_id", "bbox", "score"} <= set(result):
            raise ValueError(f"--results {path}: detection {index} lacks image_id, category_id, bbox or score: "
                             f"{result}")
        if result["image_id"] not in coco.imgs:
            raise ValueError(f"--results {path}: detection {index} is of image id {result['image_id']}, which "
                             f"--annotations {annotations} does not list; were they made on "
                             "another split or json?")
        by_image[result["image_id"]].append(result)
    return by_image


def boxes_of(records: list[dict[str, Any]]) -> torch.Tensor:
    """XYXY boxes of COCO records (annotations or detections)."""
    boxes = torch.tensor([record["bbox"] for record in records], dtype=torch.float32).reshape(-1, 4)
    return box_convert(boxes, "xywh", "xyxy")


def render(image: Image.Image, truth: list[dict], predictions: list[dict] | None, names: dict[int, str],
           overlay: bool) -> torch.Tensor:
    """The picture of one image: ground truth and predictions, side by side or overlaid."""
    width = max(2, round(max(image.size) / 800))
    name = lambda record: names.get(record["category_id"], f"class {record['category_id']}")  # noqa: E731
    truth_texts = [name(a) + (" (crowd)" if a.get("iscrowd") else "") for a in truth]
    pixels = to_uint8(image)
    left = draw_boxes(pixels, boxes_of(truth), truth_texts, GROUND_TRUTH_COLOUR, width)
    if predictions is None:
        return caption(left, f"ground truth: {len(truth)}")
    texts = [f"{name(p)} {p['score']:.2f}" for p in predictions]
    right = draw_boxes(left if overlay else pixels, boxes_of(predictions), texts, PREDICTION_COLOUR, width)
    title = f"predictions: {len(predictions)}"
    if overlay:
        return caption(right, f"ground truth (green): {len(truth)}, {title} (red)")
    return side_by_side(caption(left, f"ground truth: {len(truth)}"), caption(right, title))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.images.is_dir():
        parser.error(f"--images: not a folder: {args.images}")
    try:
        with redirect_stdout(io.StringIO()):
            coco = COCO(str(args.annotations))
    except (OSError, json.JSONDecodeError) as err:
        parser.error(f"--annotations {args.annotations}: cannot read this COCO json: {err}")
    try:
        results = None if args.results is None else load_results(args.results, coco, args.annotations)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.image_ids:
        unknown = [i for i in args.image_ids if i not in coco.imgs]
        if unknown:
            parser.error(f"--image_ids {unknown} are not in {args.annotations}")
        image_ids = args.image_ids
    else:
        image_ids = sorted(results) if results is not None else sorted(coco.imgs)
    image_ids = image_ids[:args.limit]
    names = {cat_id: cat["name"] for cat_id, cat in coco.cats.items()}
    drawn = 0
    for image_id in tqdm(image_ids, desc="visualize", unit="image", dynamic_ncols=True):
        info = coco.imgs[image_id]
        path = args.images / info["file_name"]
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except OSError as err:
            print(f"error: image {image_id} of {args.annotations}: cannot read {path}: {err} (is --images the "
                  "folder its file_name entries are relative to?)", file=sys.stderr)
            return 1
        truth = coco.imgToAnns[image_id]
        predictions = None
        if results is not None:
            predictions = [r for r in results.get(image_id, []) if r["score"] >= args.score_threshold]
        picture = render(image, truth, predictions, names, args.overlay)
        save_png(picture, args.out / f"{Path(info['file_name']).stem}.png")
        drawn += 1
    print(json.dumps({"images": drawn, "out": str(args.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
