"""Convert Pascal-VOC xml annotations (one ``<annotation>`` file per image) into one COCO detection json.

    python scripts/voc_to_coco.py --images VOC2007/JPEGImages --annotations VOC2007/Annotations \\
        --image_set VOC2007/ImageSets/Main/train.txt --out ROOT/annotations/instances_train.json [--check]

Each image under ``--images`` is matched with ``--annotations/<same relative path>.xml``;
``--image_set`` (a VOC ``ImageSets/*.txt`` list, the first word of each line an image id = file
name without suffix) keeps only the images it lists, in its order. An image without an xml file
is kept without objects.

Boxes. ``<bndbox>`` holds ``xmin ymin xmax ymax`` as VOC's 1-based, inclusive pixel indices, so
the COCO box is ``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]``: a box from 1 to W
covers the whole image, 0 to W in COCO's continuous coordinates (the rule of Detectron2's VOC
loader). Rotated boxes in ``<robndbox>`` come in two flavours: roLabelImg / HRSC style ``cx cy w
h angle`` (pixels; angle in radians, turning clockwise on screen, x right and y down) and DIOR-R
style corners ``x_left_top y_left_top x_right_top ... y_left_bottom``; both are continuous pixel
coordinates, taken as they are. A rotated box becomes the axis-aligned box of its four corners,
and the corners are kept in ``segmentation``. Every box is clipped to the image (counted and,
with ``--check``, listed).

Classes. ``--classes a,b,c`` or ``--classes_file`` (one name per line) give ids 1..K in that
order; without them the classes are collected from the converted files and sorted by name, so a
split that lacks a class gets other ids than one that has it: pass the list when splits are used
together. Each annotation keeps ``difficult`` (0/1, VOC's flag; 0 when missing) and has
``iscrowd`` 0.

Checks. ``<size>`` must equal the image file's size (read from its header); malformed xml,
unknown classes, boxes with no area in the image, ids of ``--image_set`` without an image stop
the conversion, listed by file. ``--check`` also lists the harmless findings (clipped boxes,
images without an xml file, xml files without an image, a missing ``<size>`` or another
``<filename>``). A conversion that finds no object, or no xml file for more than half of the
images, fails with the likely cause (a wrong ``--annotations`` folder) and writes nothing.
"""
from __future__ import annotations

import argparse
import math
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import NamedTuple

from detr_ssl.data.convert import (Problem, add_allow_unlabelled, box_annotation, coco_json, coverage_problems,
                                   image_records, orphan_labels, polygon_box, relative_image_files, require_paths,
                                   write_unless_fatal)

BNDBOX = ("xmin", "ymin", "xmax", "ymax")
ROTATED = ("cx", "cy", "w", "h", "angle")  # roLabelImg, HRSC style
CORNERS = ("x_left_top", "y_left_top", "x_right_top", "y_right_top",  # DIOR-R style
           "x_right_bottom", "y_right_bottom", "x_left_bottom", "y_left_bottom")


class VocObject(NamedTuple):
    """One ``<object>``: its class, VOC flag and four corners in 0-based pixel coordinates."""

    index: int  # 1-based position among the file's objects, for messages
    name: str
    difficult: int
    corners: tuple[float, ...]  # x1 y1 ... x4 y4
    rotated: bool  # from <robndbox>; its corners go into segmentation


class VocFile(NamedTuple):
    """What one xml file says about its image."""

    filename: str | None
    size: tuple[int, int] | None  # width, height; None when missing or zero
    objects: list[VocObject]


def load_classes(names: str | None, names_file: Path | None) -> list[str] | None:
    """The class list of ``--classes`` or ``--classes_file``; None: collect it from the files."""
    if names is None and names_file is None:
        return None
    raw = names.split(",") if names is not None else names_file.read_text().splitlines()
    classes = [name.strip() for name in raw if name.strip()]
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"--classes: need distinct class names, got {classes}")
    return classes


def select_images(images_dir: Path, image_set: Path | None) -> tuple[list[Path], list[Problem]]:
    """The images to convert (relative paths): all, or those ``image_set`` lists by id, in its order."""
    images = relative_image_files(images_dir)
    if image_set is None:
        return images, []
    by_id = {}
    for path in images:
        by_id.setdefault(path.with_suffix("").as_posix(), path)
    selected, problems = {}, []
    for number, line in enumerate(image_set.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        image_id = line.split()[0]
        if image_id in by_id:
            selected.setdefault(image_id, by_id[image_id])
        else:
            message = f"image id {image_id!r} has no image file under --images {images_dir}"
            problems.append(Problem(image_set, number, message, fatal=True))
    return list(selected.values()), problems


def parse_annotation(path: Path) -> tuple[VocFile | None, list[Problem]]:
    """Read one xml file; return what it holds (None when unreadable) and the problems found."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        return None, [Problem(path, err.position[0], f"not valid xml: {err}", fatal=True)]
    if root.tag != "annotation":
        return None, [Problem(path, None, f"not a Pascal-VOC file: root element <{root.tag}>, expected <annotation>",
                              fatal=True)]
    objects, problems = [], []
    for index, element in enumerate(root.findall("object"), start=1):
        obj = _parse_object(element, index)
        if isinstance(obj, str):
            problems.append(Problem(path, None, f"object {index}: {obj}", fatal=True))
        else:
            objects.append(obj)
    return VocFile(root.findtext("filename"), _size(root), objects), problems


def _size(root: ET.Element) -> tuple[int, int] | None:
    try:
        width, height = (int(float(root.findtext(f"size/{key}", ""))) for key in ("width", "height"))
    except ValueError:
        return None
    return (width, height) if width > 0 and height > 0 else None


def _parse_object(element: ET.Element, index: int) -> VocObject | str:
    """One ``<object>``, or why it is refused."""
    name = (element.findtext("name") or "").strip()
    if not name:
        return "no <name>"
    difficult = (element.findtext("difficult") or "0").strip()
    if difficult not in ("0", "1"):
        return f"({name}) <difficult> is {difficult!r}, not 0 or 1"
    rotated = element.find("robndbox")
    box = rotated if rotated is not None else element.find("bndbox")
    if box is None:
        return f"({name}) has neither <bndbox> nor <robndbox>"
    if rotated is None:
        keys = BNDBOX
    else:
        keys = ROTATED if box.find("cx") is not None else CORNERS
    try:
        values = [float(box.findtext(key, "")) for key in keys]
    except ValueError:
        return f"({name}) <{box.tag}> needs the numbers {' '.join(keys)}"
    if not all(map(math.isfinite, values)):
        return f"({name}) <{box.tag}> has non-finite values {values}"
    if keys == ROTATED:
        corners = rotated_corners(*values)
    elif keys == CORNERS:
        corners = tuple(values)
    else:
        xmin, ymin, xmax, ymax = values  # 1-based inclusive pixel indices -> 0-based edges
        corners = (xmin - 1, ymin - 1, xmax, ymin - 1, xmax, ymax, xmin - 1, ymax)
    return VocObject(index, name, int(difficult), corners, rotated is not None)


def rotated_corners(cx: float, cy: float, w: float, h: float, angle: float) -> tuple[float, ...]:
    """The four corners of a ``w`` x ``h`` rectangle centred on (cx, cy), turned by ``angle``
    radians (clockwise on screen: x right, y down), from the one that is top left at angle 0."""
    cos, sin = math.cos(angle), math.sin(angle)
    corners = []
    for dx, dy in ((-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)):
        corners += [cx + dx * cos - dy * sin, cy + dx * sin + dy * cos]
    return tuple(corners)


def check_image(voc: VocFile, image: dict, xml: Path) -> list[Problem]:
    """The xml's ``<size>`` against the image file (fatal when they differ: the boxes would be for
    another version of the image) and its ``<filename>`` (a warning)."""
    real = (image["width"], image["height"])
    problems = []
    if voc.size is None:
        problems.append(Problem(xml, None, f"no usable <size>; the image file's {real[0]}x{real[1]} is used", False))
    elif voc.size != real:
        message = (f"<size> {voc.size[0]}x{voc.size[1]} differs from the image file's {real[0]}x{real[1]} "
                   f"({image['file_name']}): the boxes may belong to another version of the image")
        problems.append(Problem(xml, None, message, fatal=True))
    if voc.filename and Path(voc.filename).name != Path(image["file_name"]).name:
        message = f"<filename> {voc.filename!r} is not the image's name {Path(image['file_name']).name!r}"
        problems.append(Problem(xml, None, message, fatal=False))
    return problems


def object_annotation(obj: VocObject, ann_id: int, image: dict, classes: list[str],
                      xml: Path) -> tuple[dict | None, Problem | None]:
    """The COCO annotation of one object and the problem with it: fatal (no annotation) for an
    unknown class or no box area in the image, a warning when the box was clipped."""
    where = f"object {obj.index} ({obj.name})"
    if obj.name not in classes:
        message = f"{where}: unknown class {obj.name!r} (known: {', '.join(classes)}); see --classes"
        return None, Problem(xml, None, message, fatal=True)
    width, height = image["width"], image["height"]
    bbox, clipped = polygon_box(obj.corners, width, height)
    corners = [round(v, 4) for v in obj.corners]
    if bbox is None:
        return None, Problem(xml, None, f"{where}: box {corners} has no area inside the {width}x{height} image", True)
    extra = {"segmentation": [corners]} if obj.rotated else {}
    annotation = box_annotation(ann_id, image["id"], classes.index(obj.name) + 1, bbox, difficult=obj.difficult,
                                **extra)
    problem = Problem(xml, None, f"{where}: box {corners} clipped to the {width}x{height} image", False)
    return annotation, problem if clipped else None


def convert(images_dir: Path, annotations_dir: Path, classes: list[str] | None = None, image_set: Path | None = None,
            allow_unlabelled: bool = False) -> tuple[dict, list[Problem], dict]:
    """Build the COCO json dict for one split; return it with the problems found and the counts."""
    relatives, problems = select_images(images_dir, image_set)
    images, parsed = [], []
    for image, relative in image_records(images_dir, relatives):
        images.append(image)
        xml = annotations_dir / relative.with_suffix(".xml")
        if not xml.is_file():
            problems.append(Problem(images_dir / relative, None,
                                    f"image without an xml file ({xml}); kept without objects", fatal=False))
            continue
        voc, found = parse_annotation(xml)
        problems += found
        if voc is not None:
            problems += check_image(voc, image, xml)
            parsed.append((image, voc, xml))
    collected = classes is None
    classes = sorted({obj.name for _, voc, _ in parsed for obj in voc.objects}) if collected else classes
    annotations, counts = [], {"images": len(images), "label_files": len(parsed), "objects": 0, "rotated": 0,
                               "difficult": 0, "clipped": 0}
    for image, voc, xml in parsed:
        for obj in voc.objects:
            annotation, problem = object_annotation(obj, len(annotations) + 1, image, classes, xml)
            problems += [problem] if problem else []
            if annotation is not None:
                annotations.append(annotation)
                counts["rotated"] += obj.rotated
                counts["difficult"] += obj.difficult
                counts["clipped"] += problem is not None
    counts["objects"] = len(annotations)
    all_images = [path.as_posix() for path in relative_image_files(images_dir)]
    problems += orphan_labels(images_dir, annotations_dir, all_images, suffix=".xml")
    problems += coverage_problems(images_dir, annotations_dir, "--annotations", ".xml", counts, allow_unlabelled)
    info = {"description": "converted from Pascal-VOC xml by scripts/voc_to_coco.py",
            "classes": "collected from the annotations, sorted by name" if collected else "as given"}
    categories = [{"id": index + 1, "name": name} for index, name in enumerate(classes)]
    return coco_json(info, images, annotations, categories), problems, counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="folder of images (searched recursively)")
    parser.add_argument("--annotations", type=Path, required=True,
                        help="folder of VOC .xml files mirroring --images (e.g. VOC2007/Annotations)")
    parser.add_argument("--out", type=Path, required=True, help="COCO json to write")
    names = parser.add_mutually_exclusive_group()
    names.add_argument("--classes", type=str, default=None,
                       help="'a,b,c': class names in id order (ids 1..K); default: the names found, sorted")
    names.add_argument("--classes_file", type=Path, default=None, help="the class names, one per line, in id order")
    parser.add_argument("--image_set", type=Path, default=None,
                        help="convert only the image ids this list holds (VOC ImageSets/Main/train.txt)")
    parser.add_argument("--check", action="store_true", help="also list harmless findings, one per line")
    add_allow_unlabelled(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Convert, report, and write ``--out`` unless a problem is fatal; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    require_paths(parser, (args.images, args.annotations), (args.classes_file, args.image_set))
    try:
        classes = load_classes(args.classes, args.classes_file)
        coco, problems, counts = convert(args.images, args.annotations, classes, args.image_set,
                                         args.allow_unlabelled)
    except (OSError, ValueError) as err:
        parser.error(str(err))
    if write_unless_fatal(coco, args.out, problems, list_all=args.check):
        return 1
    names = [c["name"] for c in coco["categories"]]
    print(f"classes (ids 1..{len(names)}, {coco['info']['classes']}): {', '.join(names)}")
    print(f"wrote {args.out}: {counts['images']} images, {counts['objects']} boxes ({counts['rotated']} rotated, "
          f"{counts['difficult']} difficult; {counts['clipped']} clipped to the image), {len(names)} categories")
    return 0


if __name__ == "__main__":
    sys.exit(main())
