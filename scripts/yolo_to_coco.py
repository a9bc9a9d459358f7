"""Convert YOLO box labels (``class cx cy w h``, normalised) into one COCO detection json.

    python scripts/yolo_to_coco.py --images coco8/images/train --labels coco8/labels/train \\
        --names coco8/coco8.yaml --category_ids coco --out annotations/instances_train.json

Each image under ``--images`` is matched with ``--labels/<same relative path>.txt``; images
without a label file are kept with no annotations. Problems that would make a wrong json
(malformed lines, unknown class indices, empty or fully outside boxes) stop the conversion and
are listed by file and line; ``--check`` also lists the harmless ones (empty label files,
boxes clipped to the image, label files without an image).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import yaml
from PIL import Image

from detr_ssl.data.convert import Problem, orphan_labels, relative_image_files, report_problems

# YOLO values are rounded to 6 decimals, so a box edge may sit a few 1e-7 outside [0, 1].
BOUNDS_TOLERANCE = 1e-6

# The 80 COCO 2017 detection classes and their official category ids (1..90 with gaps).
COCO_CATEGORY_IDS: dict[str, int] = {
    "person": 1, "bicycle": 2, "car": 3, "motorcycle": 4, "airplane": 5, "bus": 6, "train": 7,
    "truck": 8, "boat": 9, "traffic light": 10, "fire hydrant": 11, "stop sign": 13,
    "parking meter": 14, "bench": 15, "bird": 16, "cat": 17, "dog": 18, "horse": 19, "sheep": 20,
    "cow": 21, "elephant": 22, "bear": 23, "zebra": 24, "giraffe": 25, "backpack": 27,
    "umbrella": 28, "handbag": 31, "tie": 32, "suitcase": 33, "frisbee": 34, "skis": 35,
    "snowboard": 36, "sports ball": 37, "kite": 38, "baseball bat": 39, "baseball glove": 40,
    "skateboard": 41, "surfboard": 42, "tennis racket": 43, "bottle": 44, "wine glass": 46,
    "cup": 47, "fork": 48, "knife": 49, "spoon": 50, "bowl": 51, "banana": 52, "apple": 53,
    "sandwich": 54, "orange": 55, "broccoli": 56, "carrot": 57, "hot dog": 58, "pizza": 59,
    "donut": 60, "cake": 61, "chair": 62, "couch": 63, "potted plant": 64, "bed": 65,
    "dining table": 67, "toilet": 70, "tv": 72, "laptop": 73, "mouse": 74, "remote": 75,
    "keyboard": 76, "cell phone": 77, "microwave": 78, "oven": 79, "toaster": 80, "sink": 81,
    "refrigerator": 82, "book": 84, "clock": 85, "vase": 86, "scissors": 87, "teddy bear": 88,
    "hair drier": 89, "toothbrush": 90,
}


def load_names(spec: str) -> list[str]:
    """Class names in YOLO index order from an ultralytics data yaml, a text file or 'a,b,c'."""
    path = Path(spec)
    if path.suffix.lower() in {".yaml", ".yml", ".txt"} or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"--names: file not found: {path}")
        if path.suffix.lower() in {".yaml", ".yml"}:
            return _names_from_yaml(path)
        names = [line.strip() for line in path.read_text().splitlines()]
        return [name for name in names if name]
    return [name.strip() for name in spec.split(",") if name.strip()]


def _names_from_yaml(path: Path) -> list[str]:
    names = (yaml.safe_load(path.read_text()) or {}).get("names")
    if isinstance(names, list):
        return [str(name) for name in names]
    if isinstance(names, dict) and sorted(names) == list(range(len(names))):
        return [str(names[index]) for index in range(len(names))]
    raise ValueError(f"{path}: 'names' must be a list or a mapping 0..K-1 -> name, got {names!r}")


def category_table(names: list[str], scheme: str) -> list[dict]:
    """COCO ``categories``, in YOLO index order: ids 1..K ('sequential') or the COCO 2017 ids ('coco')."""
    if scheme == "sequential":
        return [{"id": index + 1, "name": name} for index, name in enumerate(names)]
    unknown = [name for name in names if name not in COCO_CATEGORY_IDS]
    if unknown:
        raise ValueError(f"--category_ids coco: not COCO class names: {unknown}; use --category_ids sequential")
    return [{"id": COCO_CATEGORY_IDS[name], "name": name} for name in names]


Row = tuple[int, float, float, float, float]  # class, cx, cy, w, h


def parse_label_file(path: Path, num_classes: int) -> tuple[list[Row], list[Problem]]:
    """Read ``class cx cy w h`` lines; return the usable rows and the problems found."""
    rows, problems = [], []
    lines = path.read_text().splitlines()
    if not any(line.strip() for line in lines):
        problems.append(Problem(path, None, "empty label file (image kept without objects)", fatal=False))
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row = _parse_row(line)
        if row is None:
            message = f"malformed line {line.strip()!r}: expected 'class cx cy w h'"
            problems.append(Problem(path, number, message, fatal=True))
            continue
        if not 0 <= row[0] < num_classes:
            problems.append(Problem(path, number, f"unknown class index {row[0]} (names has {num_classes})", fatal=True))
            continue
        problem = _check_box(*row[1:])
        if problem is not None:
            message, fatal = problem
            problems.append(Problem(path, number, message, fatal))
            if fatal:
                continue
        rows.append(row)
    return rows, problems


def _parse_row(line: str) -> Row | None:
    fields = line.split()
    if len(fields) != 5:
        return None
    try:
        return (int(fields[0]), *map(float, fields[1:]))
    except ValueError:
        return None


def _check_box(cx: float, cy: float, w: float, h: float) -> tuple[str, bool] | None:
    """(message, fatal) for a box that is not finite, empty, outside or partly outside [0, 1]; None if fine."""
    x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    box = f"box (cx {cx}, cy {cy}, w {w}, h {h})"
    if not all(map(math.isfinite, (cx, cy, w, h))):
        return f"{box} has non-finite values", True
    if not w > 0 or not h > 0:
        return f"{box} has no area", True
    if x2 <= 0 or y2 <= 0 or x1 >= 1 or y1 >= 1:
        return f"{box} lies entirely outside the image", True
    if min(x1, y1) < -BOUNDS_TOLERANCE or max(x2, y2) > 1 + BOUNDS_TOLERANCE:
        return f"{box} is out of bounds; clipped to the image", False
    return None


def to_coco_bbox(cx: float, cy: float, w: float, h: float, width: int, height: int) -> list[float]:
    """Normalised cxcywh -> absolute COCO ``[x, y, w, h]``, clipped to the image."""
    x1, y1 = max(cx - w / 2, 0.0) * width, max(cy - h / 2, 0.0) * height
    x2, y2 = min(cx + w / 2, 1.0) * width, min(cy + h / 2, 1.0) * height
    return [x1, y1, x2 - x1, y2 - y1]


def convert(images_dir: Path, labels_dir: Path, names: list[str],
            category_ids: str = "sequential") -> tuple[dict, list[Problem]]:
    """Build the COCO json dict for one split and list the problems found in the labels."""
    categories = category_table(names, category_ids)
    images, annotations, problems = [], [], []
    for image_id, relative in enumerate(relative_image_files(images_dir), start=1):
        with Image.open(images_dir / relative) as image:
            width, height = image.size
        images.append({"id": image_id, "file_name": relative.as_posix(), "width": width, "height": height})
        label_file = labels_dir / relative.with_suffix(".txt")
        if not label_file.is_file():
            continue
        rows, found = parse_label_file(label_file, len(names))
        problems += found
        for cls, cx, cy, w, h in rows:
            bbox = [round(v, 4) for v in to_coco_bbox(cx, cy, w, h, width, height)]
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": categories[cls]["id"],
                "bbox": bbox, "area": round(bbox[2] * bbox[3], 4), "iscrowd": 0,
            })
    problems += orphan_labels(images_dir, labels_dir, images)
    coco = {
        "info": {"description": "converted from YOLO labels by scripts/yolo_to_coco.py"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": sorted(categories, key=lambda c: c["id"]),
    }
    return coco, problems


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="folder of images (searched recursively)")
    parser.add_argument("--labels", type=Path, required=True, help="folder of YOLO .txt files mirroring --images")
    parser.add_argument("--names", type=str, required=True,
                        help="class names: ultralytics data yaml, text file (one per line) or 'a,b,c'")
    parser.add_argument("--out", type=Path, required=True, help="COCO json to write")
    parser.add_argument("--category_ids", choices=("sequential", "coco"), default="sequential",
                        help="'sequential': ids 1..K; 'coco': the official COCO 2017 ids of the 80 class names")
    parser.add_argument("--check", action="store_true", help="also list harmless findings, one per line")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Convert, report, and write ``--out`` unless a problem is fatal; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for folder in (args.images, args.labels):
        if not folder.is_dir():
            parser.error(f"not a folder: {folder}")
    try:
        coco, problems = convert(args.images, args.labels, load_names(args.names), args.category_ids)
    except (OSError, ValueError) as err:
        parser.error(str(err))
    fatal = report_problems(problems, list_all=args.check)
    if fatal:
        print(f"{len(fatal)} error(s); {args.out} not written", file=sys.stderr)
        return 1
    if problems and not args.check:
        print(f"{len(problems)} warning(s) (empty label files, clipped boxes...); run with --check to list them",
              file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(coco) + "\n")
    print(f"wrote {args.out}: {len(coco['images'])} images, {len(coco['annotations'])} boxes, "
          f"{len(coco['categories'])} categories")
    return 0


if __name__ == "__main__":
    sys.exit(main())
