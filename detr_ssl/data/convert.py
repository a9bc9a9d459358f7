"""Shared pieces of the label converters in ``scripts/`` (YOLO, DOTA, Pascal-VOC -> COCO json):
problem records and their report, the image records, boxes from polygons, the written json, and
the check that refuses a conversion pointed at the wrong folder."""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from detr_ssl.utils.image import IMAGE_SUFFIXES, image_files

# What label files of another converter's format look like, by suffix: the hint when none of the
# expected files is found.
FOREIGN_LABELS = {
    ".xml": "Pascal-VOC annotations; use scripts/voc_to_coco.py",
    ".txt": "YOLO or DOTA labelTxt files; use scripts/yolo_to_coco.py or scripts/dota_to_coco.py",
    ".json": "json files (COCO json needs no conversion: put it in the generic layout, see data/README.md)",
}


@dataclass(frozen=True)
class Problem:
    """One finding about the input; ``fatal`` ones stop the conversion."""

    file: Path
    line: int | None
    message: str
    fatal: bool

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else str(self.file)
        return f"{'error' if self.fatal else 'warning'}: {where}: {self.message}"


def relative_image_files(images_dir: Path) -> list[Path]:
    """Image files under ``images_dir``, relative to it, sorted (their COCO ``file_name``s)."""
    return [path.relative_to(images_dir) for path in image_files(images_dir)]


def image_records(images_dir: Path, relatives: Iterable[Path]) -> Iterator[tuple[dict, Path]]:
    """(COCO image record, relative path) per image, ids from 1; sizes come from the file headers
    (PIL opens lazily), so no pixel is decoded."""
    for image_id, relative in enumerate(relatives, start=1):
        with Image.open(images_dir / relative) as image:
            width, height = image.size
        yield {"id": image_id, "file_name": relative.as_posix(), "width": width, "height": height}, relative


def orphan_labels(images_dir: Path, labels_dir: Path, file_names: Iterable[str], suffix: str = ".txt") -> list[Problem]:
    """Warnings for label files (``*suffix``) under ``labels_dir`` whose image is not among
    ``file_names`` (paths relative to ``images_dir``): labels that would silently go unused."""
    stems = {Path(name).with_suffix("").as_posix() for name in file_names}
    return [
        Problem(labels_dir / p, None, f"label file without an image in {images_dir}", fatal=False)
        for p in sorted(q.relative_to(labels_dir) for q in labels_dir.rglob(f"*{suffix}"))
        if p.with_suffix("").as_posix() not in stems
    ]


def polygon_box(points: Sequence[float], width: int, height: int) -> tuple[list[float] | None, bool]:
    """The axis-aligned box of a polygon ``x1 y1 x2 y2 ...`` (pixels) as COCO ``[x, y, w, h]``,
    clipped to the image, and whether clipping changed it; None when nothing with an area is inside."""
    xs, ys = points[0::2], points[1::2]
    x1, y1 = max(min(xs), 0.0), max(min(ys), 0.0)
    x2, y2 = min(max(xs), float(width)), min(max(ys), float(height))
    clipped = min(xs) < 0 or min(ys) < 0 or max(xs) > width or max(ys) > height
    if x2 <= x1 or y2 <= y1:
        return None, clipped
    return [x1, y1, x2 - x1, y2 - y1], clipped


def box_annotation(ann_id: int, image_id: int, category_id: int, bbox: Sequence[float], **extra) -> dict:
    """One COCO annotation: the box rounded to 1e-4 px, its area, ``iscrowd`` 0, then ``extra``
    keys (``segmentation``, ``difficult``, ``attributes``...)."""
    bbox = [round(v, 4) for v in bbox]
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "area": round(bbox[2] * bbox[3], 4), "iscrowd": 0, **extra}


def coco_json(info: dict, images: list[dict], annotations: list[dict], categories: list[dict]) -> dict:
    """The COCO detection json every converter writes (categories sorted by id)."""
    return {"info": info, "licenses": [], "images": images, "annotations": annotations,
            "categories": sorted(categories, key=lambda c: c["id"])}


def report_problems(problems: list[Problem], list_all: bool) -> list[Problem]:
    """Print the fatal problems (every one with ``list_all``, i.e. ``--check``) to stderr, one per
    line; returns the fatal ones, which stop the conversion."""
    fatal = [p for p in problems if p.fatal]
    for problem in problems if list_all else fatal:
        print(problem, file=sys.stderr)
    return fatal


def write_unless_fatal(coco: dict, out: Path, problems: list[Problem], list_all: bool) -> list[Problem]:
    """Report the problems and write ``out`` only when none is fatal: no json beats a wrong one.
    Returns the fatal problems."""
    fatal = report_problems(problems, list_all)
    if fatal:
        print(f"{len(fatal)} error(s); {out} not written", file=sys.stderr)
        return fatal
    if problems and not list_all:
        print(f"{len(problems)} warning(s) (empty label files, clipped boxes...); run with --check to list them",
              file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(coco) + "\n")
    return fatal


def add_allow_unlabelled(parser: argparse.ArgumentParser) -> None:
    """The one way past the wrong-folder check for data sets that are mostly background images."""
    parser.add_argument("--allow_unlabelled", action="store_true",
                        help="accept that more than half of the images have no label file (background images); "
                             "without it such a conversion fails, as the sign of a wrong label folder")


def require_paths(parser: argparse.ArgumentParser, folders: Iterable[Path], files: Iterable[Path | None] = ()) -> None:
    """Stop at parsing, naming it, when an input folder or file of a converter is not there."""
    for folder in folders:
        if not folder.is_dir():
            parser.error(f"not a folder: {folder}")
    for file in files:
        if file is not None and not file.is_file():
            parser.error(f"file not found: {file}")


def coverage_problems(images_dir: Path, labels_dir: Path, flag: str, suffix: str, counts: dict,
                      allow_unlabelled: bool = False) -> list[Problem]:
    """Fatal problems when a conversion looks pointed at the wrong folder: no image, no object at
    all, or (unless ``allow_unlabelled``) no ``suffix`` label file for more than half the images.
    ``counts`` holds ``images``, ``label_files`` and ``objects``; the message gives the likely fix."""
    images, labelled, objects = counts["images"], counts["label_files"], counts["objects"]
    if images == 0:
        return [Problem(images_dir, None, "no image files under --images; is it the right folder?", fatal=True)]
    unlabelled = images - labelled
    if objects and (allow_unlabelled or 2 * unlabelled <= images):
        return []
    if objects:
        reason = f"{unlabelled} of {images} images have no {suffix} file in {flag}"
        fix = f"{likely_fix(images_dir, labels_dir, flag, suffix)} (or pass --allow_unlabelled)"
    elif labelled:
        reason, fix = f"no objects in the {labelled} {suffix} files found", "every label file is empty or refused"
    else:
        reason, fix = "no objects found", likely_fix(images_dir, labels_dir, flag, suffix)
    return [Problem(labels_dir, None, f"{reason}: {fix}", fatal=True)]


def likely_fix(images_dir: Path, labels_dir: Path, flag: str, suffix: str) -> str:
    """What ``labels_dir`` holds instead of label files mirroring ``images_dir``: the hint of
    :func:`coverage_problems`."""
    found = Counter(p.suffix.lower() for p in labels_dir.rglob("*") if p.is_file())
    unlabelled = next((p for p in relative_image_files(images_dir)
                       if not (labels_dir / p.with_suffix(suffix)).is_file()), None)
    if found[suffix] and unlabelled is not None:
        first_label = min(p.relative_to(labels_dir) for p in labels_dir.rglob(f"*{suffix}"))
        return (f"{flag} holds {found[suffix]} {suffix} files, but they do not mirror --images: image "
                f"'{unlabelled}' needs '{labels_dir / unlabelled.with_suffix(suffix)}', the first label file "
                f"is '{first_label}'")
    images = sum(found[s] for s in IMAGE_SUFFIXES)
    foreign = [(found[s], s) for s in FOREIGN_LABELS if s != suffix and found[s]]
    if foreign:
        count, other = max(foreign)
        return f"found {count} {other} files in {flag}: these look like {FOREIGN_LABELS[other]}"
    if images:
        return f"found {images} image files in {flag}: is it the images folder?"
    return f"found no {suffix} file in {flag} {labels_dir}"
