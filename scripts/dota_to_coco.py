"""Convert DOTA ``labelTxt`` files (oriented quadrilaterals) into one COCO detection json.

    python scripts/dota_to_coco.py --images DOTA/train/images --labels DOTA/train/labelTxt \\
        --out ROOT/annotations/instances_train.json [--skip_difficult] [--check]

A label file holds optional header lines (``imagesource:...``, ``gsd:...``), then one object per
line: ``x1 y1 x2 y2 x3 y3 x4 y4 category difficult`` (``difficult`` may be missing, as the DOTA
devkit allows; it then counts as 0). Each quadrilateral becomes its axis-aligned bounding box
(min and max of the four corners), clipped to the image; image sizes are read from the image
headers. Each image under ``--images`` is matched with ``--labels/<same relative path>.txt``.

Problems that would make a wrong json (malformed lines, unknown classes, boxes with no area
inside the image) stop the conversion and are listed by file and line. ``--check`` also lists
the harmless ones (out-of-bounds corners, empty label files, label files without an image,
images without a label file) and exits with status 1 when there is any problem at all.
The last stdout line is a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import NamedTuple

from PIL import Image
from tqdm import tqdm

from detr_ssl.data.convert import Problem, orphan_labels, relative_image_files, report_problems

HEADER_PREFIXES = ("imagesource:", "gsd:")

# DOTA v1.0 in its standard order; category ids are 1..15 in this order.
DOTA_V1_CLASSES = [
    "plane", "ship", "storage-tank", "baseball-diamond", "tennis-court", "basketball-court",
    "ground-track-field", "harbor", "bridge", "large-vehicle", "small-vehicle", "helicopter",
    "roundabout", "soccer-ball-field", "swimming-pool",
]


class DotaObject(NamedTuple):
    """One labelled quadrilateral and the line it came from."""

    line: int
    points: tuple[float, ...]  # x1 y1 x2 y2 x3 y3 x4 y4
    category: str
    difficult: int


def load_classes(spec: str | None) -> list[str]:
    """Class names in id order (ids 1..K): the DOTA v1.0 list, a text file (one per line) or 'a,b,c'."""
    if spec is None:
        return list(DOTA_V1_CLASSES)
    path = Path(spec)
    if path.is_file():
        names = [line.strip() for line in path.read_text().splitlines()]
    else:
        names = [name.strip() for name in spec.split(",")]
    names = [name for name in names if name]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"--classes: need distinct class names, got {names}")
    return names


def parse_label_file(path: Path, classes: list[str]) -> tuple[list[DotaObject], list[Problem]]:
    """Read one label file; return its well-formed objects of known classes and the problems found."""
    objects, problems = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.strip().lower().startswith(HEADER_PREFIXES):
            continue
        obj = _parse_object(line, number)
        if obj is None:
            message = f"malformed line {line.strip()!r}: expected 'x1 y1 x2 y2 x3 y3 x4 y4 category difficult'"
            problems.append(Problem(path, number, message, fatal=True))
        elif obj.category not in classes:
            message = f"unknown class {obj.category!r} (known: {', '.join(classes)}); see --classes"
            problems.append(Problem(path, number, message, fatal=True))
        else:
            objects.append(obj)
    if not objects and not problems:
        problems.append(Problem(path, None, "empty label file (image kept without objects)", fatal=False))
    return objects, problems


def _parse_object(line: str, number: int) -> DotaObject | None:
    fields = line.split()
    if len(fields) not in (9, 10):
        return None
    try:
        points = tuple(float(v) for v in fields[:8])
        difficult = int(fields[9]) if len(fields) == 10 else 0
    except ValueError:
        return None
    if not all(map(math.isfinite, points)) or difficult not in (0, 1):
        return None
    return DotaObject(number, points, fields[8], difficult)


def quad_to_bbox(points: tuple[float, ...], width: int, height: int) -> list[float] | None:
    """The quadrilateral's axis-aligned box as COCO ``[x, y, w, h]``, clipped to the image; None
    when nothing of it with an area lies inside."""
    xs, ys = points[0::2], points[1::2]
    x1, y1 = max(min(xs), 0.0), max(min(ys), 0.0)
    x2, y2 = min(max(xs), float(width)), min(max(ys), float(height))
    if x2 <= x1 or y2 <= y1:
        return None
    return [x1, y1, x2 - x1, y2 - y1]


def out_of_bounds(points: tuple[float, ...], width: int, height: int) -> bool:
    """True when a corner lies outside the image (before clipping)."""
    xs, ys = points[0::2], points[1::2]
    return min(xs) < 0 or min(ys) < 0 or max(xs) > width or max(ys) > height


def convert(images_dir: Path, labels_dir: Path, classes: list[str],
            skip_difficult: bool = False) -> tuple[dict, list[Problem], dict]:
    """Build the COCO json dict; return it with the problems found and the counts."""
    images, annotations, problems = [], [], []
    counts = {"images": 0, "label_files": 0, "objects": 0, "difficult": 0, "skipped_difficult": 0}
    for image_id, relative in enumerate(tqdm(relative_image_files(images_dir), desc="images", unit="image"), start=1):
        with Image.open(images_dir / relative) as image:
            width, height = image.size
        images.append({"id": image_id, "file_name": relative.as_posix(), "width": width, "height": height})
        label_file = labels_dir / relative.with_suffix(".txt")
        if not label_file.is_file():
            problems.append(Problem(images_dir / relative, None,
                                    f"image without a label file ({label_file}); kept without objects", fatal=False))
            continue
        counts["label_files"] += 1
        objects, found = parse_label_file(label_file, classes)
        problems += found
        for obj in objects:
            counts["difficult"] += obj.difficult
            if obj.difficult and skip_difficult:
                counts["skipped_difficult"] += 1
                continue
            bbox = quad_to_bbox(obj.points, width, height)
            if bbox is None:
                message = f"box of {obj.points} has no area inside the {width}x{height} image"
                problems.append(Problem(label_file, obj.line, message, fatal=True))
                continue
            if out_of_bounds(obj.points, width, height):
                message = f"corner outside the {width}x{height} image in {obj.points}; box clipped to the image"
                problems.append(Problem(label_file, obj.line, message, fatal=False))
            bbox = [round(v, 4) for v in bbox]
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": classes.index(obj.category) + 1,
                "bbox": bbox, "area": round(bbox[2] * bbox[3], 4), "iscrowd": 0, "difficult": obj.difficult,
            })
    problems += orphan_labels(images_dir, labels_dir, images)
    counts.update(images=len(images), objects=len(annotations))
    coco = {
        "info": {"description": "converted from DOTA labelTxt by scripts/dota_to_coco.py"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": index + 1, "name": name} for index, name in enumerate(classes)],
    }
    return coco, problems, counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="folder of images (searched recursively)")
    parser.add_argument("--labels", type=Path, required=True,
                        help="folder of DOTA labelTxt .txt files mirroring --images")
    parser.add_argument("--out", type=Path, required=True, help="COCO json to write")
    parser.add_argument("--skip_difficult", action="store_true",
                        help="drop objects marked difficult (default: keep them, with 'difficult': 1)")
    parser.add_argument("--check", action="store_true",
                        help="list every problem by file and line, harmless ones included, and exit 1 if any")
    parser.add_argument("--classes", type=str, default=None,
                        help="class names in id order (ids 1..K): a text file, one per line, or 'a,b,c' "
                             "(default: the 15 DOTA v1.0 classes)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Convert, report, and write ``--out`` unless a problem is fatal; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for folder in (args.images, args.labels):
        if not folder.is_dir():
            parser.error(f"not a folder: {folder}")
    try:
        coco, problems, counts = convert(args.images, args.labels, load_classes(args.classes), args.skip_difficult)
    except (OSError, ValueError) as err:
        parser.error(str(err))
    fatal = report_problems(problems, list_all=args.check)
    if not fatal:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(coco) + "\n")
    elif not args.check:
        print(f"{len(fatal)} error(s); {args.out} not written", file=sys.stderr)
    counts.update(errors=len(fatal), warnings=len(problems) - len(fatal), out=None if fatal else str(args.out))
    print(json.dumps(counts))
    return 1 if fatal or (args.check and problems) else 0


if __name__ == "__main__":
    sys.exit(main())
