"""Convert YOLO labels into one COCO detection json: boxes (``class cx cy w h``) and oriented
boxes (YOLO-OBB, ``class x1 y1 x2 y2 x3 y3 x4 y4``: the four corners, as Ultralytics' DOTA sets
hold them), every value normalised to [0, 1] by the image width and height.

    python scripts/yolo_to_coco.py --images coco8/images/train --labels coco8/labels/train \\
        --names coco8/coco8.yaml --category_ids coco --out annotations/instances_train.json

Each image under ``--images`` is matched with ``--labels/<same relative path>.txt``; images
without a label file are kept with no annotations. An oriented box becomes the axis-aligned box
of its polygon, clipped to the image, and keeps the polygon (absolute pixels, not clipped) in
``segmentation``; the last line counts the clipped boxes.

Which format a line is (``--format auto``, the default): 5 columns are a box, 9 columns an
oriented box. Columns after the box (attributes such as weight or age) are refused unless
``--extra_columns ignore`` or ``keep`` is given; 9 columns are then still an oriented box under
``--format auto``, so a box with 4 attribute columns needs ``--format detect`` (a note on stderr
says so when such lines were read as oriented boxes). Under ``auto``, 6 to 8 columns with
``--extra_columns`` are a box with attributes, and 10 or more are refused as ambiguous (name the
format with ``--format detect`` or ``obb``). A file mixing the two formats is refused.

Problems that would make a wrong json (malformed lines, unknown class indices, empty or fully
outside boxes) stop the conversion and are listed by file and line; ``--check`` also lists the
harmless ones (empty label files, boxes clipped to the image, label files without an image). A
conversion that finds no object, or no label file for more than half of the images, fails with
the likely cause (a wrong ``--labels`` folder) and writes nothing.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import yaml

from detr_ssl.data.convert import (Problem, add_allow_unlabelled, box_annotation, coco_json, coverage_problems,
                                   image_records, orphan_labels, polygon_box, relative_image_files, require_paths,
                                   write_unless_fatal)

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


# Columns of the box itself, class included, and how each format reads.
BOX_COLUMNS = {"detect": 5, "obb": 9}
LAYOUTS = {"detect": "'class cx cy w h'", "obb": "'class x1 y1 x2 y2 x3 y3 x4 y4'"}
FORMATS = f"{LAYOUTS['detect']} (--format detect) or {LAYOUTS['obb']} (--format obb, the normalised corners)"
ACCEPTED = f"{FORMATS}, then attribute columns only with --extra_columns ignore|keep"


@dataclass(frozen=True)
class Columns:
    """How label lines are read: the box format and what to do with columns after the box."""

    format: str = "auto"  # auto | detect | obb
    extra: str = "error"  # error | ignore | keep
    names: tuple[str, ...] = ()  # names of the kept extra columns; extra_0, extra_1... when empty


class Row(NamedTuple):
    """One usable label line."""

    cls: int
    kind: str  # detect | obb
    values: tuple[float, ...]  # normalised cx cy w h, or the four normalised corners
    attributes: dict[str, float] | None  # the extra columns with --extra_columns keep
    clipped: bool  # partly outside the image


def line_layout(count: int, columns: Columns) -> tuple[str, int] | str:
    """(format, number of extra columns) of a line of ``count`` columns, or why it is refused."""
    kind, extra_allowed = columns.format, columns.extra != "error"
    if kind == "auto":
        if 5 <= count <= 9:
            kind = "obb" if count == 9 else "detect"
        elif extra_allowed and count > 9:
            return (f"{count} columns are ambiguous: {LAYOUTS['detect']} and {count - 5} extra columns, or "
                    f"{LAYOUTS['obb']} and {count - 9}; say which with --format detect or --format obb")
        else:
            return f"expected {ACCEPTED}"
    extra = count - BOX_COLUMNS[kind]
    if extra < 0:
        return f"expected {ACCEPTED}"
    if extra and not extra_allowed:
        return (f"{extra} column(s) after the box {LAYOUTS[kind]}: attribute columns need --extra_columns "
                f"ignore or keep (lines are {FORMATS})")
    if extra_allowed and columns.names and extra != len(columns.names):
        return f"{extra} extra column(s), but --extra_column_names names {len(columns.names)}"
    return kind, extra


def parse_label_file(path: Path, num_classes: int, columns: Columns = Columns()) -> tuple[list[Row], list[Problem]]:
    """Read one label file; return the usable rows and the problems found."""
    rows, problems = [], []
    lines = path.read_text().splitlines()
    if not any(line.strip() for line in lines):
        problems.append(Problem(path, None, "empty label file (image kept without objects)", fatal=False))
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row = _parse_row(line.split(), columns)
        if isinstance(row, str):
            problems.append(Problem(path, number, f"malformed line {line.strip()!r}: {row}", fatal=True))
            continue
        if not 0 <= row.cls < num_classes:
            problems.append(Problem(path, number, f"unknown class index {row.cls} (names has {num_classes})", fatal=True))
            continue
        problem = _check_box(row.kind, row.values)
        if problem is not None:
            message, fatal = problem
            problems.append(Problem(path, number, message, fatal))
            if fatal:
                continue
        rows.append(row._replace(clipped=problem is not None))
    if len({row.kind for row in rows}) > 1:
        message = f"mixes {LAYOUTS['detect']} and {LAYOUTS['obb']} lines; name the format with --format"
        problems.append(Problem(path, None, message, fatal=True))
    return rows, problems


def _parse_row(fields: list[str], columns: Columns) -> Row | str:
    """The row of one line's fields, or why it is refused."""
    layout = line_layout(len(fields), columns)
    if isinstance(layout, str):
        return layout
    kind, extra = layout
    box_end = BOX_COLUMNS[kind]
    try:
        cls, values = int(fields[0]), tuple(map(float, fields[1:box_end]))
    except ValueError:
        return f"expected {ACCEPTED}"
    attributes = None
    if columns.extra == "keep":
        names = columns.names or tuple(f"extra_{i}" for i in range(extra))
        try:
            attributes = dict(zip(names, map(float, fields[box_end:])))
        except ValueError:
            return f"the extra columns {fields[box_end:]} are not all numbers (--extra_columns keep)"
    return Row(cls, kind, values, attributes, clipped=False)


def _check_box(kind: str, values: tuple[float, ...]) -> tuple[str, bool] | None:
    """(message, fatal) for a box that is not finite, empty, outside or partly outside [0, 1]; None if fine."""
    if kind == "detect":
        cx, cy, w, h = values
        box = f"box (cx {cx}, cy {cy}, w {w}, h {h})"
        x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    else:
        box = f"oriented box (corners {' '.join(map(str, values))})"
        x1, y1, x2, y2 = min(values[0::2]), min(values[1::2]), max(values[0::2]), max(values[1::2])
    if not all(map(math.isfinite, values)):
        return f"{box} has non-finite values", True
    if not x2 > x1 or not y2 > y1:
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


def row_annotation(row: Row, ann_id: int, image: dict, category_id: int) -> dict:
    """The COCO annotation of one row: its box in pixels, the polygon of an oriented box in
    ``segmentation`` and the kept extra columns in ``attributes``."""
    width, height = image["width"], image["height"]
    extra = {} if row.attributes is None else {"attributes": row.attributes}
    if row.kind == "detect":
        return box_annotation(ann_id, image["id"], category_id, to_coco_bbox(*row.values, width, height), **extra)
    polygon = [v * (width if i % 2 == 0 else height) for i, v in enumerate(row.values)]
    bbox, _ = polygon_box(polygon, width, height)
    return box_annotation(ann_id, image["id"], category_id, bbox,
                          segmentation=[[round(v, 4) for v in polygon]], **extra)


def convert(images_dir: Path, labels_dir: Path, names: list[str], category_ids: str = "sequential",
            columns: Columns = Columns(), allow_unlabelled: bool = False) -> tuple[dict, list[Problem], dict]:
    """Build the COCO json dict for one split; return it with the problems found and the counts."""
    categories = category_table(names, category_ids)
    images, annotations, problems = [], [], []
    counts = {"images": 0, "label_files": 0, "objects": 0, "clipped": 0, "detect": 0, "obb": 0}
    for image, relative in image_records(images_dir, relative_image_files(images_dir)):
        images.append(image)
        label_file = labels_dir / relative.with_suffix(".txt")
        if not label_file.is_file():
            continue
        counts["label_files"] += 1
        rows, found = parse_label_file(label_file, len(names), columns)
        problems += found
        for row in rows:
            annotations.append(row_annotation(row, len(annotations) + 1, image, categories[row.cls]["id"]))
            counts[row.kind] += 1
            counts["clipped"] += row.clipped
    counts.update(images=len(images), objects=len(annotations))
    problems += orphan_labels(images_dir, labels_dir, [image["file_name"] for image in images])
    problems += coverage_problems(images_dir, labels_dir, "--labels", ".txt", counts, allow_unlabelled)
    info = {"description": "converted from YOLO labels by scripts/yolo_to_coco.py"}
    return coco_json(info, images, annotations, categories), problems, counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="folder of images (searched recursively)")
    parser.add_argument("--labels", type=Path, required=True, help="folder of YOLO .txt files mirroring --images")
    parser.add_argument("--names", type=str, required=True,
                        help="class names: ultralytics data yaml, text file (one per line) or 'a,b,c'")
    parser.add_argument("--out", type=Path, required=True, help="COCO json to write")
    parser.add_argument("--category_ids", choices=("sequential", "coco"), default="sequential",
                        help="'sequential': ids 1..K; 'coco': the official COCO 2017 ids of the 80 class names")
    parser.add_argument("--format", choices=("auto", "detect", "obb"), default="auto",
                        help="'detect': class cx cy w h; 'obb': class x1 y1 x2 y2 x3 y3 x4 y4 (normalised corners); "
                             "'auto' (default): 5 columns are detect, 9 are obb (see above)")
    parser.add_argument("--extra_columns", choices=("error", "ignore", "keep"), default="error",
                        help="columns after the box: refuse them (default), drop them, or keep them as floats "
                             "in an 'attributes' dict on each annotation")
    parser.add_argument("--extra_column_names", type=str, default=None,
                        help="'a,b,c': the names of the kept extra columns (default extra_0, extra_1...); "
                             "every line must then have that many")
    parser.add_argument("--check", action="store_true", help="also list harmless findings, one per line")
    add_allow_unlabelled(parser)
    return parser


def columns_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Columns:
    """The line layout the flags ask for; names without ``--extra_columns keep`` are a mistake."""
    names = tuple(n.strip() for n in (args.extra_column_names or "").split(",") if n.strip())
    if names and args.extra_columns != "keep":
        parser.error("--extra_column_names needs --extra_columns keep")
    if len(set(names)) != len(names):
        parser.error(f"--extra_column_names: names must be distinct, got {list(names)}")
    return Columns(args.format, args.extra_columns, names)


def main(argv: list[str] | None = None) -> int:
    """Convert, report, and write ``--out`` unless a problem is fatal; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    require_paths(parser, (args.images, args.labels))
    columns = columns_from_args(parser, args)
    try:
        coco, problems, counts = convert(args.images, args.labels, load_names(args.names), args.category_ids,
                                         columns, args.allow_unlabelled)
    except (OSError, ValueError) as err:
        parser.error(str(err))
    if columns.format == "auto" and columns.extra != "error" and counts["obb"]:
        print(f"note: {counts['obb']} lines of 9 columns were read as oriented boxes (--format auto); if they are "
              "boxes with 4 attribute columns, pass --format detect", file=sys.stderr)
    if write_unless_fatal(coco, args.out, problems, list_all=args.check):
        return 1
    print(f"wrote {args.out}: {counts['images']} images, {counts['objects']} boxes ({counts['detect']} detect, "
          f"{counts['obb']} obb; {counts['clipped']} clipped to the image), {len(coco['categories'])} categories")
    return 0


if __name__ == "__main__":
    sys.exit(main())
