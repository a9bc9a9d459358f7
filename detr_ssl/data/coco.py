"""COCO-json detection data, read with pycocotools.

Two layouts are accepted for a root folder and a split name S (see data/README.md):
the official COCO 2017 one (``annotations/instances_S2017.json`` + ``S2017/``) and the
generic one the converters write (``annotations/instances_S.json`` + ``S/``).

Bad annotations are rejected by name when the dataset is built, bad images when they are
loaded; with ``skip_bad`` (``--skip_bad_samples``) both are skipped instead, and logged
(see ``detr_ssl.data.bad_samples``). Nothing is dropped silently.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from PIL import Image
from pycocotools.coco import COCO
from torch import Tensor
from torchvision.ops import box_convert, clip_boxes_to_image

from detr_ssl.data.bad_samples import ImageSizeError, MissingImageError, UnreadableImageError, first_good
from detr_ssl.data.transforms import xyxy_boxes
from detr_ssl.utils.errors import DataError, MissingFileError
from detr_ssl.utils.logging import LOGGER_NAME

LAYOUT_HELP = "see data/README.md, section 'Data layouts'"
MAX_LISTED = 5  # problems listed by name in one message; the rest are counted


def split_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """(image folder, annotation json) of ``split`` under ``root``, COCO 2017 layout first."""
    root = Path(root)
    candidates = [
        (root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json"),
        (root / split, root / "annotations" / f"instances_{split}.json"),
    ]
    for img_folder, ann_file in candidates:
        if ann_file.is_file():
            if not img_folder.is_dir():
                raise MissingFileError(f"{ann_file} exists but its image folder {img_folder} does not; {LAYOUT_HELP}")
            return img_folder, ann_file
    looked = " and ".join(str(ann_file) for _, ann_file in candidates)
    raise MissingFileError(f"no annotations for split '{split}': looked for {looked}; {LAYOUT_HELP}")


def _listing(items: list[str], sep: str = "; ") -> str:
    shown = sep.join(items[:MAX_LISTED])
    return shown + (f"{sep}..." if len(items) > MAX_LISTED else "")


@dataclass
class AnnotationScan:
    """What ``validate_annotations`` found: records to leave out, and why."""

    empty: set[int] = field(default_factory=set)  # annotation ids of boxes without area (always dropped)
    bad_images: dict[int, str] = field(default_factory=dict)  # image id -> what is wrong
    bad_annotations: dict[int, str] = field(default_factory=dict)  # annotation id -> what is wrong


def validate_annotations(coco: COCO, ann_file: Path, skip_bad: bool = False) -> AnnotationScan:
    """Find annotations that cannot be right: raise naming them, or with ``skip_bad`` return them.

    Empty boxes (width or height <= 0) occur in COCO 2017 itself, so they are dropped with
    one warning rather than refused.
    """
    no_size, no_image, unknown, not_finite, outside, empty = [], [], [], [], [], []
    scan = AnnotationScan()
    for image in coco.dataset.get("images", []):
        if not all(_is_positive_int(image.get(key)) for key in ("width", "height")):
            no_size.append(f"image {image['id']}")
            scan.bad_images[image["id"]] = (f"image {image['id']} '{image.get('file_name')}': width "
                                            f"{image.get('width')!r} and height {image.get('height')!r} are not "
                                            "positive integers")
    for ann in coco.dataset.get("annotations", []):
        name = f"annotation {ann['id']} (image {ann.get('image_id')}"
        image = coco.imgs.get(ann.get("image_id"))
        if image is None:
            no_image.append(name + ")")
            scan.bad_annotations[ann["id"]] = f"{name}): image id not in 'images'"
            continue
        where = f"{name} '{image.get('file_name')}')"
        if ann.get("category_id") not in coco.cats:
            unknown.append(f"{name}, category_id {ann.get('category_id')})")
            scan.bad_annotations[ann["id"]] = f"{where}: category_id {ann.get('category_id')!r} not in 'categories'"
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_finite(v) for v in bbox)):
            not_finite.append(f"{name}, bbox {bbox})")
            scan.bad_annotations[ann["id"]] = f"{where}: bbox {bbox} is not 4 finite numbers"
            continue
        x, y, w, h = bbox
        width, height = image.get("width", math.inf), image.get("height", math.inf)
        if w <= 0 or h <= 0:
            empty.append(ann["id"])
        elif x >= width or y >= height or x + w <= 0 or y + h <= 0:
            outside.append(f"{name} of {width}x{height} px, bbox {bbox})")
            scan.bad_annotations[ann["id"]] = f"{where}: bbox {bbox} lies entirely outside the {width}x{height} image"
    kinds = [
        (no_size, "image(s) without a positive integer width and height"),
        (no_image, "annotation(s) of an image id that is not in 'images'"),
        (unknown, f"annotation(s) with a category_id not in 'categories' (known ids: {sorted(coco.cats)})"),
        (not_finite, "annotation(s) whose bbox is not 4 finite numbers"),
        (outside, "annotation(s) whose bbox lies entirely outside its image"),
    ]
    errors = [f"{ann_file}: {len(items)} {what}: {_listing(items)}" for items, what in kinds if items]
    if errors and not skip_bad:
        raise DataError("bad records (fix the file, or pass --skip_bad_samples to skip and log them):\n"
                         + "\n".join(errors))
    if empty:
        warnings.warn(
            f"{ann_file}: dropped {len(empty)} annotation(s) whose box has zero or negative width or height "
            f"(ids {_listing([str(i) for i in empty], sep=', ')})",
            stacklevel=3,
        )
    scan.empty = set(empty)
    return scan


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive_int(value: Any) -> bool:
    return _is_finite(value) and value > 0 and value == int(value)


class CocoDetection(torchvision.datasets.CocoDetection):
    """``(image, target)`` pairs of a COCO-json split, in the format of the official DETR code.

    Crowd annotations are left out of the targets (they stay in ``self.coco`` for COCOeval);
    partly outside boxes are clipped to the image; ``transforms`` (see ``build_transforms``)
    receive a PIL RGB image and absolute XYXY boxes. With ``skip_bad``, bad records and
    missing image files are left out of the dataset and of ``self.coco`` alike (listed in
    ``self.skipped`` and the log), and an image that fails to load is replaced by the next one.
    """

    def __init__(self, img_folder: str | Path, ann_file: str | Path,
                 transforms: Callable[[Image.Image, dict[str, Any]], tuple[Any, dict[str, Any]]],
                 filter_empty: bool = False, skip_bad: bool = False) -> None:
        self.ann_file = Path(ann_file)
        self.skip_bad = skip_bad
        if self.ann_file.is_file() and self.ann_file.stat().st_size == 0:
            raise DataError(f"{ann_file}: empty file (0 bytes), expected COCO json with 'images', 'annotations' "
                             "and 'categories'; re-run the converter that wrote it (--skip_bad_samples skips "
                             "records, not a whole file)")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
                super().__init__(str(img_folder), str(ann_file), transforms=transforms)
        except json.JSONDecodeError as err:
            raise DataError(f"{ann_file}: not valid JSON: {err}") from err
        if not self.coco.dataset.get("images"):
            raise DataError(f"{ann_file}: no images listed under 'images' (--skip_bad_samples skips records, "
                             "not a whole file)")
        self.check_categories()
        scan = validate_annotations(self.coco, self.ann_file, skip_bad)
        self.dropped_ann_ids = scan.empty
        self.skipped: list[str] = []
        if skip_bad:
            self._skip(scan)
        if filter_empty:
            self.ids = [image_id for image_id in self.ids if self._annotations(image_id)]

    def check_categories(self) -> None:
        """Refuse categories this kind of dataset cannot hold (any are fine for plain COCO json)."""

    @property
    def num_classes(self) -> int:
        """Classifier size: largest category id + 1, as the official DETR code (COCO: 91)."""
        if not self.coco.cats:
            raise DataError(f"{self.ann_file}: no categories listed")
        return max(self.coco.cats) + 1

    def _skip(self, scan: AnnotationScan) -> None:
        """Leave out the bad records of ``scan`` and the images whose file is missing, and log them."""
        bad_images = dict(scan.bad_images)
        for image_id, info in self.coco.imgs.items():
            path = Path(self.root) / str(info.get("file_name"))
            if image_id not in bad_images and not path.is_file():
                bad_images[image_id] = f"image {image_id}: file not found: {path}"
        bad_anns = scan.bad_annotations
        if not bad_images and not bad_anns:
            return
        data = self.coco.dataset
        data["images"] = [image for image in data["images"] if image["id"] not in bad_images]
        data["annotations"] = [ann for ann in data.get("annotations", [])
                               if ann["id"] not in bad_anns and ann.get("image_id") not in bad_images]
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco.createIndex()
        self.ids = sorted(self.coco.imgs)
        self.skipped = [*bad_images.values(), *bad_anns.values()]
        logging.getLogger(LOGGER_NAME).warning(
            "%s: --skip_bad_samples skipped %d image(s) (with their annotations) and %d annotation(s):\n%s",
            self.ann_file, len(bad_images), len(bad_anns), "\n".join(f"  {message}" for message in self.skipped))
        if not self.ids:
            raise DataError(f"{self.ann_file}: every image was skipped as bad, nothing is left (see the log)")

    def _annotations(self, image_id: int) -> list[dict[str, Any]]:
        return [
            ann for ann in self.coco.imgToAnns[image_id]
            if not ann.get("iscrowd", 0) and ann["id"] not in self.dropped_ann_ids
        ]

    def _load_image(self, image_id: int) -> Image.Image:
        info = self.coco.imgs[image_id]
        path = Path(self.root) / info["file_name"]
        if not path.is_file():
            raise MissingImageError(f"image {image_id}: file not found: {path}")
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")  # decodes now, so a truncated file fails here
        except OSError as err:
            raise UnreadableImageError(f"cannot read image {path} (image id {image_id}): {err}") from err
        if image.size != (info["width"], info["height"]):
            raise ImageSizeError(
                f"{path} (image id {image_id}) is {image.width}x{image.height} px but {self.ann_file} "
                f"says {info['width']}x{info['height']}"
            )
        return image

    def _load_target(self, image_id: int) -> dict[str, Tensor]:
        anns = self._annotations(image_id)
        height, width = self.coco.imgs[image_id]["height"], self.coco.imgs[image_id]["width"]
        boxes = torch.tensor([ann["bbox"] for ann in anns], dtype=torch.float32).reshape(-1, 4)
        boxes = clip_boxes_to_image(box_convert(boxes, "xywh", "xyxy"), (height, width))
        return {
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "boxes": xyxy_boxes(boxes, height, width),
            "labels": torch.tensor([ann["category_id"] for ann in anns], dtype=torch.int64),
            "iscrowd": torch.tensor([ann.get("iscrowd", 0) for ann in anns], dtype=torch.int64),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
        }

    def _load(self, index: int) -> tuple[Any, dict[str, Any]]:
        image_id = self.ids[index]
        return self.transforms(self._load_image(image_id), self._load_target(image_id))

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        if self.skip_bad:
            return first_good(self._load, index, len(self))
        return self._load(index)
