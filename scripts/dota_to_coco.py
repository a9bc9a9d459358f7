"""Convert DOTA ``labelTxt`` files (oriented quadrilaterals) into one COCO detection json.

    python scripts/dota_to_coco.py --images DOTA/train/images --labels DOTA/train/labelTxt \\
        --out ROOT/annotations/instances_train.json [--skip_difficult] [--check]

A label file holds optional header lines (``imagesource:...``, ``gsd:...``), then one object per
line: ``x1 y1 x2 y2 x3 y3 x4 y4 category difficult`` (``difficult`` may be missing, as the DOTA
devkit allows; it then counts as 0). Each quadrilateral becomes its axis-aligned bounding box
(min and max of the four corners), clipped to the image; image sizes are read from the image
headers. Each image under ``--images`` is matched with ``--labels/<same relative path>.txt``.

Category ids are 1..K in the order of the class list: the DOTA v1.0 classes by default,
``--classes dota1.5`` / ``dota2.0`` for the later versions, each in the DOTA website's order or,
with ``--class_order devkit``, in the order of the DOTA devkit's ``DOTA2COCO.py`` (which
mmrotate and most published DOTA checkpoints use). The devkit lists only the 15 v1.0 classes;
v1.5 appends container-crane and v2.0 then airport and helipad, in both orders. The json's
``info`` and the summary line name the order used.

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

from tqdm import tqdm

from detr_ssl.data.convert import (Problem, add_allow_unlabelled, box_annotation, coco_json, coverage_problems,
                                   image_records, orphan_labels, polygon_box, relative_image_files, require_paths,
                                   write_unless_fatal)

HEADER_PREFIXES = ("imagesource:", "gsd:")

# DOTA v1.0 in the order of the DOTA website (https://captain-whu.github.io/DOTA/).
DOTA_V1_CLASSES = [
    "plane", "ship", "storage-tank", "baseball-diamond", "tennis-court", "basketball-court",
    "ground-track-field", "harbor", "bridge", "large-vehicle", "small-vehicle", "helicopter",
    "roundabout", "soccer-ball-field", "swimming-pool",
]
# DOTA v1.0 in the order of wordname_15 in CAPTAIN-WHU/DOTA_devkit's DOTA2COCO.py (and mmrotate).
DOTA_V1_DEVKIT_CLASSES = [
    "plane", "baseball-diamond", "bridge", "ground-track-field", "small-vehicle", "large-vehicle", "ship",
    "tennis-court", "basketball-court", "storage-tank", "soccer-ball-field", "roundabout", "harbor",
    "swimming-pool", "helicopter",
]
# What each later version appends to the v1.0 list, in either order.
DOTA_ADDED = {"dota1.0": [], "dota1.5": ["container-crane"], "dota2.0": ["container-crane", "airport", "helipad"]}
CLASS_ORDERS = {"website": DOTA_V1_CLASSES, "devkit": DOTA_V1_DEVKIT_CLASSES}
DEFAULT_CLASS_ORDER = "website"


class DotaObject(NamedTuple):
    """One labelled quadrilateral and the line it came from."""

    line: int
    points: tuple[float, ...]  # x1 y1 x2 y2 x3 y3 x4 y4
    category: str
    difficult: int


def load_classes(spec: str | None, order: str = DEFAULT_CLASS_ORDER) -> list[str]:
    """Class names in id order (ids 1..K): a DOTA version's list (default v1.0) in ``order``
    ('website' or 'devkit'), a text file (one per line) or 'a,b,c'."""
    if spec is None or spec in DOTA_ADDED:
        return CLASS_ORDERS[order] + DOTA_ADDED[spec or "dota1.0"]
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
            problems.append(Problem(path, number, _unknown_class(obj.category, classes), fatal=True))
        else:
            objects.append(obj)
    if not objects and not problems:
        problems.append(Problem(path, None, "empty label file (image kept without objects)", fatal=False))
    return objects, problems


def _unknown_class(category: str, classes: list[str]) -> str:
    """The error for a class not in ``classes``, naming the DOTA version that has it."""
    version = next((v for v, added in DOTA_ADDED.items() if category in added), None)
    hint = f"a DOTA {version[4:]} class: use --classes {version}" if version else "see --classes"
    return f"unknown class {category!r} (known: {', '.join(classes)}); {hint}"


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


def convert(images_dir: Path, labels_dir: Path, classes: list[str], skip_difficult: bool = False,
            class_order: str = DEFAULT_CLASS_ORDER, allow_unlabelled: bool = False) -> tuple[dict, list[Problem], dict]:
    """Build the COCO json dict; return it with the problems found and the counts. ``class_order``
    is only recorded in ``info`` (``classes`` is already in that order)."""
    images, annotations, problems = [], [], []
    counts = {"images": 0, "label_files": 0, "objects": 0, "difficult": 0, "skipped_difficult": 0}
    relatives = tqdm(relative_image_files(images_dir), desc="images", unit="image")
    for image, relative in image_records(images_dir, relatives):
        images.append(image)
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
            annotation, problem = object_annotation(obj, len(annotations) + 1, image, classes, label_file)
            problems += [problem] if problem else []
            annotations += [annotation] if annotation else []
    counts.update(images=len(images), objects=len(annotations))
    problems += orphan_labels(images_dir, labels_dir, [image["file_name"] for image in images])
    problems += coverage_problems(images_dir, labels_dir, "--labels", ".txt", counts, allow_unlabelled)
    info = {"description": "converted from DOTA labelTxt by scripts/dota_to_coco.py", "class_order": class_order}
    categories = [{"id": index + 1, "name": name} for index, name in enumerate(classes)]
    return coco_json(info, images, annotations, categories), problems, counts


def object_annotation(obj: DotaObject, ann_id: int, image: dict, classes: list[str],
                      label_file: Path) -> tuple[dict | None, Problem | None]:
    """The COCO annotation of one object (its quadrilateral's box clipped to the image) and the
    problem with it: fatal (no annotation) when no box area is left, a warning when clipped."""
    width, height = image["width"], image["height"]
    bbox, clipped = polygon_box(obj.points, width, height)
    if bbox is None:
        message = f"box of {obj.points} has no area inside the {width}x{height} image"
        return None, Problem(label_file, obj.line, message, fatal=True)
    problem = None
    if clipped:
        message = f"corner outside the {width}x{height} image in {obj.points}; box clipped to the image"
        problem = Problem(label_file, obj.line, message, fatal=False)
    category_id = classes.index(obj.category) + 1
    return box_annotation(ann_id, image["id"], category_id, bbox, difficult=obj.difficult), problem


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
                        help="class names in id order (ids 1..K): dota1.0 (default, 15 classes), dota1.5 (16), "
                             "dota2.0 (18), a text file, one per line, or 'a,b,c'")
    parser.add_argument("--class_order", choices=tuple(CLASS_ORDERS), default=None,
                        help="order, and so category ids, of the dotaX lists: 'website' (default: the DOTA website's "
                             "order, which this script has always written, so that re-converting keeps the ids of "
                             "earlier jsons and of the models trained on them) or 'devkit' (the DOTA devkit's "
                             "DOTA2COCO.py: plane, baseball-diamond, bridge, ...; what mmrotate and most published "
                             "DOTA checkpoints assume)")
    add_allow_unlabelled(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Convert, report, and write ``--out`` unless a problem is fatal; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    require_paths(parser, (args.images, args.labels))
    builtin = args.classes is None or args.classes in DOTA_ADDED
    if args.class_order is not None and not builtin:
        parser.error("--class_order orders the built-in lists (--classes dota1.0|dota1.5|dota2.0); "
                     "a list of your own keeps its order")
    class_order = (args.class_order or DEFAULT_CLASS_ORDER) if builtin else "as given by --classes"
    try:
        classes = load_classes(args.classes, args.class_order or DEFAULT_CLASS_ORDER)
        coco, problems, counts = convert(args.images, args.labels, classes, args.skip_difficult, class_order,
                                         args.allow_unlabelled)
    except (OSError, ValueError) as err:
        parser.error(str(err))
    fatal = write_unless_fatal(coco, args.out, problems, list_all=args.check)
    counts.update(errors=len(fatal), warnings=len(problems) - len(fatal), out=None if fatal else str(args.out),
                  class_order=class_order)
    print(json.dumps(counts))
    return 1 if fatal or (args.check and problems) else 0


if __name__ == "__main__":
    sys.exit(main())
