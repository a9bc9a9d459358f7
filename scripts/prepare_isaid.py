"""Cut iSAID images into overlapping patches with COCO annotations, for ``--dataset_file isaid``.

    python scripts/prepare_isaid.py --src /data/iSAID --out /data/isaid_patches

Input is the official iSAID layout: ``SRC/SPLIT/images/<file_name>`` and
``SRC/SPLIT/instancesonly_filtered_SPLIT.json`` (COCO instances with bbox and polygon
segmentation). A split with only ``SRC/SPLIT/image_info_SPLIT.json`` (the test split) gives
patches without annotations. Output is the generic layout that ``--dataset_file isaid
--data_path OUT`` reads: ``OUT/SPLIT/<image stem>_<x0>_<y0>.png`` and
``OUT/annotations/instances_SPLIT.json``.

Patches are PATCH x PATCH windows with a stride of PATCH - OVERLAP along each axis. The last row
and column are shifted inwards so that they end at the image border (images are never padded),
and an image shorter than PATCH along an axis gives one window of its own length there. The
grid is ``detr_ssl.data.tiling.sliding_windows``, which ``scripts/predict.py`` cuts full images
with too.

Truncated instances are kept when at least MIN_AREA_FRAC of their area lies in the patch, else
they are dropped. The area is measured on the instance's polygons when it has any (its RLE mask
if it has one, its box otherwise). A kept instance gets, in patch coordinates:

* ``segmentation``: its polygons clipped to the patch (or its mask cropped to it);
* ``bbox``: the extent of the clipped polygons, widened by the margins the source bbox has
  around the full polygons (iSAID's polygons run through boundary-pixel centres, so the source
  box is 1 px wider on the right and bottom), then intersected with the bbox clipped to the
  patch. A rotated object cut at a corner so gets a tighter box than the clipped bbox, and an
  instance that lies wholly in the patch keeps its box exactly;
* ``area``: the source ``area`` times the fraction of it in the patch, so that an instance wholly
  in the patch keeps its area (iSAID's is the mask pixel count) and COCOeval's size ranges.

Runs are resumable: a patch file that already exists with the right size is not rewritten,
patches are written atomically, and the json files are rebuilt every run. The last stdout line
is a JSON summary per split.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from detr_ssl.data.tiling import Window, sliding_windows

# Source boxes may overhang the image by float noise; anything further is a wrong image/json pair.
BOUNDS_TOLERANCE = 1.0

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels


class Cut(NamedTuple):
    """The part of an instance inside a window, in patch coordinates."""

    fraction: float
    box: Box | None
    segmentation: list | dict | None


class DataError(Exception):
    """Input that cannot be prepared; the message names the file and record."""


# --- geometry -----------------------------------------------------------------------------------

def polygon_area(points: np.ndarray) -> float:
    """Area of a simple polygon given as an (N, 2) array (shoelace formula)."""
    if len(points) < 3:
        return 0.0
    x, y = points[:, 0], points[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)) / 2)


def clip_polygon(points: np.ndarray, window: Window) -> np.ndarray:
    """The part of a polygon inside the window (Sutherland-Hodgman). Exact for any simple polygon
    against a rectangle; a concave polygon cut in two comes back as one polygon whose parts are
    joined by zero-area seams along the window edge, which changes neither its area nor its extent."""
    for axis, limit, keep_below in ((0, window.x0, False), (0, window.x1, True),
                                    (1, window.y0, False), (1, window.y1, True)):
        points = _clip_half_plane(points, axis, limit, keep_below)
    return points


def _clip_half_plane(points: np.ndarray, axis: int, limit: float, keep_below: bool) -> np.ndarray:
    if len(points) == 0:
        return points
    inside = points[:, axis] <= limit if keep_below else points[:, axis] >= limit
    kept = []
    previous, previous_inside = points[-1], inside[-1]
    for point, point_inside in zip(points, inside):
        if point_inside != previous_inside:
            crossing = previous + (limit - previous[axis]) / (point[axis] - previous[axis]) * (point - previous)
            crossing[axis] = limit  # exactly on the edge, whatever the rounding
            kept.append(crossing)
        if point_inside:
            kept.append(point)
        previous, previous_inside = point, point_inside
    return np.array(kept, dtype=float).reshape(-1, 2)


def intersect(a: Box, b: Box) -> Box | None:
    """The common part of two boxes (a window is one too), or None when they share no area."""
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def _box_area(box: Box) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


def _to_patch(box: Box, window: Window) -> Box:
    return (box[0] - window.x0, box[1] - window.y0, box[2] - window.x0, box[3] - window.y0)


# --- cutting one instance -------------------------------------------------------------------------

def clip_instance(ann: dict, window: Window, min_area_frac: float) -> dict | None:
    """``ann`` cut to the window, with ``bbox``, ``area``, ``iscrowd`` and (when the source has one)
    ``segmentation`` in patch coordinates; None when less than ``min_area_frac`` of it (or none
    of it) lies in the window. The rules are in the module docstring."""
    x, y, w, h = ann["bbox"]
    box, area = (x, y, x + w, y + h), ann.get("area", w * h)
    if intersect(box, window) is None:
        return None
    cut = _cut_shape(ann, box, window)
    if cut.box is None or cut.fraction <= 0 or cut.fraction < min_area_frac:
        return None
    x1, y1, x2, y2 = (round(v, 2) for v in cut.box)
    clipped = {
        "bbox": [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)],
        "area": area if cut.fraction == 1 else round(area * cut.fraction, 2),
        "iscrowd": ann.get("iscrowd", 0),
    }
    if cut.segmentation is not None:
        clipped["segmentation"] = cut.segmentation
    return clipped


def _cut_shape(ann: dict, box: Box, window: Window) -> Cut:
    """Cut the polygons, else the RLE mask, else the box (also for degenerate polygons)."""
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, dict):
        return _cut_mask(segmentation, box, window)
    polygons = [np.asarray(p, dtype=float).reshape(-1, 2) for p in segmentation or [] if len(p) >= 6]
    if polygons and sum(map(polygon_area, polygons)) > 0:
        return _cut_polygons(polygons, box, window)
    return _cut_box(box, window)


def _cut_box(box: Box, window: Window) -> Cut:
    inside = intersect(box, window)
    fraction = _box_area(inside) / _box_area(box) if inside else 0.0
    return Cut(fraction, _to_patch(inside, window) if inside else None, None)


def _cut_polygons(polygons: list[np.ndarray], box: Box, window: Window) -> Cut:
    offset = np.array([window.x0, window.y0], dtype=float)
    if intersect(box, window) == box:  # wholly inside: shift only, exactly
        segmentation = [_flat(p - offset) for p in polygons]
        return Cut(1.0, _to_patch(box, window), segmentation)
    parts = [clip_polygon(p, window) for p in polygons]
    parts = [p for p in parts if polygon_area(p) > 0]
    if not parts:
        return Cut(0.0, None, None)
    fraction = sum(map(polygon_area, parts)) / sum(map(polygon_area, polygons))
    full, kept = _extent(polygons), _extent(parts)
    margins = [max(full[0] - box[0], 0), max(full[1] - box[1], 0),
               max(box[2] - full[2], 0), max(box[3] - full[3], 0)]
    widened = (kept[0] - margins[0], kept[1] - margins[1], kept[2] + margins[2], kept[3] + margins[3])
    tight = intersect(widened, intersect(box, window))
    if tight is None:
        return Cut(0.0, None, None)
    return Cut(fraction, _to_patch(tight, window), [_flat(p - offset) for p in parts])


def _cut_mask(rle: dict, box: Box, window: Window) -> Cut:
    if isinstance(rle["counts"], list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(rle, *rle["size"])
    mask = mask_utils.decode(rle)
    crop = np.asfortranarray(mask[window.y0:window.y1, window.x0:window.x1])
    total, inside = int(mask.sum()), int(crop.sum())
    if total == 0:
        return _cut_box(box, window)
    if inside == 0:
        return Cut(0.0, None, None)
    ys, xs = np.nonzero(crop)
    pixels = (xs.min() + window.x0, ys.min() + window.y0, xs.max() + 1 + window.x0, ys.max() + 1 + window.y0)
    tight = intersect(tuple(map(float, pixels)), intersect(box, window))
    encoded = mask_utils.encode(crop)
    encoded["counts"] = encoded["counts"].decode("ascii")
    return Cut(inside / total, _to_patch(tight, window) if tight else None, encoded)


def _extent(polygons: list[np.ndarray]) -> Box:
    points = np.concatenate(polygons)
    return (*points.min(axis=0).tolist(), *points.max(axis=0).tolist())


def _flat(points: np.ndarray) -> list[float]:
    return [round(float(v), 2) for v in points.ravel()]


# --- one split ----------------------------------------------------------------------------------

def split_json(src: Path, split: str) -> Path:
    """The split's annotation json (or, for the test split, its image-info json)."""
    folder = src / split
    if not folder.is_dir():
        raise DataError(f"split folder not found: {folder}")
    candidates = [folder / f"instancesonly_filtered_{split}.json", folder / f"image_info_{split}.json"]
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(f"no annotation json for split {split!r}: looked for {candidates[0]} and {candidates[1]}")


def load_split(json_path: Path) -> dict:
    """The COCO dict, with every annotation's bbox checked against its image."""
    try:
        coco = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{json_path}: cannot read json: {err}") from err
    for image in coco.get("images", []):
        if not all(key in image for key in ("id", "file_name", "width", "height")):
            raise DataError(f"{json_path}: image record {image} needs id, file_name, width and height")
    images = {image["id"]: image for image in coco.get("images", [])}
    for ann in coco.get("annotations", []):
        image = images.get(ann.get("image_id"))
        if image is None:
            raise DataError(f"{json_path}: annotation id {ann.get('id')} refers to an unknown "
                            f"image_id {ann.get('image_id')}")
        _check_bbox(ann, image, json_path)
    return coco


def _check_bbox(ann: dict, image: dict, json_path: Path) -> None:
    bbox = ann.get("bbox")
    where = f"{json_path}: annotation id {ann.get('id')} (image {image['file_name']})"
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)
            and all(map(math.isfinite, bbox))):
        raise DataError(f"{where}: bbox must be 4 finite numbers, got {bbox!r}")
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        raise DataError(f"{where}: bbox {bbox} has no area")
    if (x < -BOUNDS_TOLERANCE or y < -BOUNDS_TOLERANCE or x + w > image["width"] + BOUNDS_TOLERANCE
            or y + h > image["height"] + BOUNDS_TOLERANCE):
        raise DataError(f"{where}: bbox {bbox} lies outside the {image['width']}x{image['height']} image")


def write_patch(image: Image.Image, window: Window, path: Path) -> bool:
    """Save the window as PNG unless a file of the right size is already there; True if written."""
    size = (window.x1 - window.x0, window.y1 - window.y0)
    if path.is_file():
        try:
            with Image.open(path) as existing:
                if existing.size == size:
                    return False
        except OSError:
            pass  # unreadable: write it again
    temporary = path.with_name(path.name + ".tmp")
    image.crop(window).save(temporary, format="PNG")
    os.replace(temporary, path)
    return True


def prepare_split(src: Path, out: Path, split: str, patch: int, overlap: int,
                  min_area_frac: float) -> dict:
    """Write the split's patches and json; return its counts."""
    json_path = split_json(src, split)
    coco = load_split(json_path)
    anns_by_image: dict[int, list[dict]] = {}
    for ann in coco.get("annotations", []):
        anns_by_image.setdefault(ann["image_id"], []).append(ann)
    (out / split).mkdir(parents=True, exist_ok=True)
    images, annotations, kept_sources = [], [], set()
    counts = {"images": len(coco["images"]), "patches": 0, "patches_written": 0,
              "source_instances": len(coco.get("annotations", [])), "instances_kept": 0, "instances_dropped": 0}
    for source in tqdm(coco["images"], desc=split, unit="image"):
        image_path = src / split / "images" / source["file_name"]
        if not image_path.is_file():
            raise DataError(f"{json_path}: image file missing: {image_path}")
        with Image.open(image_path) as image:
            if image.size != (source["width"], source["height"]):
                raise DataError(f"{image_path}: size {image.size[0]}x{image.size[1]} differs from the json's "
                                f"{source['width']}x{source['height']}")
            for window in sliding_windows(source["width"], source["height"], patch, overlap):
                name = f"{Path(source['file_name']).stem}_{window.x0}_{window.y0}.png"
                counts["patches_written"] += write_patch(image, window, out / split / name)
                image_id = len(images) + 1
                images.append({"id": image_id, "file_name": name, "width": window.x1 - window.x0,
                               "height": window.y1 - window.y0, "source_file_name": source["file_name"],
                               "x0": window.x0, "y0": window.y0})
                for ann in anns_by_image.get(source["id"], []):
                    clipped = clip_instance(ann, window, min_area_frac)
                    if clipped is None:
                        x, y, w, h = ann["bbox"]
                        counts["instances_dropped"] += intersect((x, y, x + w, y + h), window) is not None
                        continue
                    kept_sources.add(ann["id"])
                    annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                        "category_id": ann["category_id"], **clipped,
                                        "source_annotation_id": ann["id"]})
    counts.update(patches=len(images), instances_kept=len(annotations),
                  instances_in_no_patch=counts["source_instances"] - len(kept_sources))
    info = {"description": f"iSAID {split} patches written by scripts/prepare_isaid.py",
            "patch": patch, "overlap": overlap, "min_area_frac": min_area_frac, "source_info": coco.get("info")}
    result = {"info": info, "licenses": coco.get("licenses", []), "images": images,
              "annotations": annotations, "categories": coco.get("categories", [])}
    _write_json(result, out / "annotations" / f"instances_{split}.json")
    return counts


def _write_json(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data) + "\n")
    os.replace(temporary, path)


# --- command line -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required=True,
                        help="iSAID root holding SPLIT/images/ and SPLIT/instancesonly_filtered_SPLIT.json")
    parser.add_argument("--out", type=Path, required=True,
                        help="output root: OUT/SPLIT/*.png and OUT/annotations/instances_SPLIT.json")
    parser.add_argument("--patch", type=int, default=800, help="patch side in pixels (default: 800)")
    parser.add_argument("--overlap", type=int, default=200,
                        help="overlap of neighbouring patches in pixels; stride = patch - overlap (default: 200)")
    parser.add_argument("--min_area_frac", type=float, default=0.5,
                        help="truncated instances are kept when at least this fraction of their area lies "
                             "in the patch, else they are dropped (default: 0.5)")
    parser.add_argument("--splits", nargs="+", default=["train", "val"],
                        help="splits to prepare; 'test' gives patches without annotations (default: train val)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Prepare every split; print the counts as the last line (JSON); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.patch <= 0 or not 0 <= args.overlap < args.patch:
        parser.error(f"need --patch > 0 and 0 <= --overlap < --patch, got {args.patch} and {args.overlap}")
    if not 0 <= args.min_area_frac <= 1:
        parser.error(f"--min_area_frac must lie in [0, 1], got {args.min_area_frac}")
    if not args.src.is_dir():
        parser.error(f"--src: not a folder: {args.src}")
    summary = {}
    try:
        for split in args.splits:
            summary[split] = prepare_split(args.src, args.out, split, args.patch, args.overlap, args.min_area_frac)
    except (DataError, OSError) as err:  # PIL's and the file system's messages name the file
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
