"""Unsupervised pseudo-boxes ("proposals") for DETReg / AlignDet pre-training: computing them
(``scripts/propose_boxes.py``) and reading them back for ``--dataset_file folder --proposals``.

What DETReg does (amirbar/DETReg, ``datasets/selfdet.py`` at a4b6363, the ``--strategy topk
--max_prop 30`` of every ``configs/DETReg_top30_*.sh``): ``selective_search(img, h, w,
res_size=128)`` resizes the RGB image to 128 x 128 (``cv2.resize``, aspect ratio not kept; the
array goes to OpenCV as it is, so OpenCV reads it as BGR), runs OpenCV's selective search in
'fast' mode (``switchToSelectiveSearchFast()``), scales the ``(x, y, w, h)`` rectangles back to
the image size, and keeps the first ``max_prop`` = 30 in the order ``process()`` returns them.
There is no size filter and no other ranking; an image left with fewer than 2 boxes is replaced
by a random other one. Its box cache (``datasets/cache_ss.py``) runs at full resolution
(``res_size=None``) instead. Our defaults (``--resize 128 --top_k 30 --min_size 0``) are the
``topk`` rule; ``--resize 0`` is the cache's; ``--min_size`` adds a filter DETReg does not have
(boxes narrower or lower than it, in original pixels, are dropped before the top k are taken).

The order is OpenCV's ranking: each region's rank is ``rand() / RAND_MAX * level`` from the C
library's ``rand()`` (``selectivesearchsegmentation.cpp``), not ``cv::RNG``, so
``cv2.setRNGSeed`` has no effect; we call ``srand`` with a seed drawn from ``(--seed, image id)``
before each image, which makes the output independent of the number of workers and of the
images done before (POSIX systems; DETReg itself does not seed, so its boxes change per epoch).
The rank is stored as ``rank`` (0 is best) and as ``score`` = 1 - rank / (boxes of the image).
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from detr_ssl import __version__
from detr_ssl.data.convert import box_annotation, coco_json
from detr_ssl.utils.errors import ConfigError, DataError, MissingFileError
from detr_ssl.utils.image import find_images
from detr_ssl.utils.logging import LOGGER_NAME

METHODS = ("selective_search", "random")
CATEGORIES = [{"id": 1, "name": "object"}]
OPENCV_HINT = ("--method selective_search needs OpenCV's contrib modules (cv2.ximgproc): pip install "
               "opencv-contrib-python-headless (or pip install -e '.[proposals]'); --method random works without it")
# Boxes may overshoot the image by this much (pixels) from rounding; they are clamped to it.
BOUNDS_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ProposalSettings:
    """Everything that decides the boxes; a resumed run must match it exactly."""

    method: str = "selective_search"
    top_k: int = 30  # boxes kept per image; 0 keeps all
    min_size: float = 0.0  # smallest width and height kept, in original pixels
    resize: int = 128  # selective search on a resize x resize copy; 0: the full image
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def require_selective_search() -> ModuleType:
    """The ``cv2`` module with ``ximgproc``, or a ConfigError with the pip command."""
    try:
        import cv2
        from cv2 import ximgproc  # noqa: F401  (opencv-python without contrib lacks it)
    except ImportError as err:
        raise ConfigError(OPENCV_HINT) from err
    return cv2


def init_worker(method: str) -> None:
    """One OpenCV thread per worker process: the pool is the parallelism."""
    if method == "selective_search":
        require_selective_search().setNumThreads(1)


def image_seed(seed: int, image_id: int) -> int:
    """A 32-bit seed for one image, from the run's seed and the image id."""
    return int(np.random.SeedSequence([seed, image_id]).generate_state(1)[0])


def selective_search(pixels: np.ndarray, resize: int, seed: int) -> np.ndarray:
    """OpenCV's 'fast' selective search on an (H, W, 3) uint8 array, DETReg's way (see the module
    docstring): (N, 4) absolute XYXY boxes on the original image, best first."""
    cv2 = require_selective_search()
    height, width = pixels.shape[:2]
    base = cv2.resize(pixels, (resize, resize)) if resize else pixels
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(base)
    search.switchToSelectiveSearchFast()
    if os.name == "posix":
        ctypes.CDLL(None).srand(ctypes.c_uint(seed))  # the ranking draws from the C library's rand()
    rects = search.process().astype(np.float64).reshape(-1, 4)
    boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)
    if resize:
        boxes *= np.array([width, height, width, height]) / resize
    return boxes


def random_boxes(height: int, width: int, count: int, min_size: float, rng: np.random.Generator) -> np.ndarray:
    """``count`` uniformly drawn (N, 4) XYXY boxes inside the image, each side in [min_size, image
    side]; none when the image is smaller than ``min_size``."""
    low = max(min_size, 1.0)
    if width < low or height < low:
        return np.zeros((0, 4))
    sides = rng.uniform([low, low], [width, height], size=(count, 2))
    corners = rng.uniform(0.0, 1.0, size=(count, 2)) * (np.array([width, height]) - sides)
    return np.concatenate([corners, corners + sides], axis=1)


def keep_boxes(boxes: np.ndarray, height: int, width: int, min_size: float, top_k: int) -> np.ndarray:
    """Boxes clipped to the image, without those narrower or lower than ``min_size`` (or empty),
    then the first ``top_k`` of the ranking (all for 0)."""
    boxes = boxes.clip(0, [width, height, width, height])
    sides = boxes[:, 2:] - boxes[:, :2]
    boxes = boxes[((sides > 0) & (sides >= min_size)).all(axis=1)]
    return boxes[:top_k] if top_k else boxes


def propose(task: tuple[int, str, str], settings: ProposalSettings) -> dict[str, Any]:
    """The record of one image ``(index, path, file_name)``: its size and boxes (XYXY, best first),
    or the error that kept it from being read."""
    index, path, file_name = task
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except OSError as err:
        return {"index": index, "file_name": file_name, "error": f"cannot read image {path}: {err}"}
    height, width = pixels.shape[:2]
    seed = image_seed(settings.seed, index)
    if settings.method == "selective_search":
        boxes = keep_boxes(selective_search(pixels, settings.resize, seed), height, width, settings.min_size,
                           settings.top_k)
    else:
        boxes = random_boxes(height, width, settings.top_k, settings.min_size, np.random.default_rng(seed))
    return {"index": index, "file_name": file_name, "height": height, "width": width, "boxes": boxes.tolist()}


def proposals_json(settings: ProposalSettings, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The COCO-style json of the records (sorted by image index; unreadable images left out):
    one category "object", ``rank`` and ``score`` on every box, the settings in ``info``."""
    info: dict[str, Any] = {**settings.as_dict(), "tool": "scripts/propose_boxes.py", "version": __version__}
    if settings.method == "selective_search":
        info["opencv"] = require_selective_search().__version__
    images, annotations = [], []
    for record in sorted(records, key=lambda r: r["index"]):
        if "error" in record:
            continue
        images.append({key: record[key] for key in ("file_name", "height", "width")} | {"id": record["index"]})
        count = len(record["boxes"])
        for rank, (x1, y1, x2, y2) in enumerate(record["boxes"]):
            annotations.append(box_annotation(len(annotations) + 1, record["index"], 1, [x1, y1, x2 - x1, y2 - y1],
                                              score=round(1 - rank / count, 6), rank=rank))
    return coco_json(info, images, annotations, CATEGORIES)


@dataclass(frozen=True)
class Proposals:
    """Pseudo-boxes of the images of one folder, in ``ImageFolder``'s order. The boxes of all
    images are one tensor (with offsets) rather than a list: DataLoader workers then share it
    without copying."""

    source: Path  # the json
    files: list[Path]  # the folder's images, as find_images lists them
    boxes: Tensor  # (total, 4) float32 absolute XYXY, image after image, best first
    offsets: Tensor  # (images + 1,) int64: image i's boxes are boxes[offsets[i]:offsets[i + 1]]
    sizes: Tensor  # (images, 2) int64 (height, width) the json gives; -1 for images it does not list
    info: dict[str, Any]

    def __len__(self) -> int:
        return len(self.files)

    @property
    def missing(self) -> int:
        """How many images of the folder the json does not list (they get no boxes)."""
        return int((self.sizes[:, 0] < 0).sum())

    def boxes_for(self, index: int, height: int, width: int) -> Tensor:
        """The (N, 4) boxes of image ``index``, which must have the size the json gives."""
        listed = self.sizes[index].tolist()
        if listed[0] >= 0 and listed != [height, width]:
            raise DataError(f"{self.files[index]} is {width}x{height} px, but {self.source} gives {listed[1]}x"
                            f"{listed[0]} for it: the proposals were computed on other images; recompute them "
                            "with scripts/propose_boxes.py")
        return self.boxes[self.offsets[index]:self.offsets[index + 1]]


def load_proposals(path: str | Path, images_root: str | Path, top_k: int | None = None) -> Proposals:
    """Read and check a proposals json (``scripts/propose_boxes.py``'s format) for the images
    under ``images_root``, matched by ``file_name`` (the path relative to it); each image's boxes
    sorted by ``rank`` (file order where there is none), cut to ``top_k`` when given.

    Missing fields, boxes outside their image and file names that are not under the folder are a
    DataError naming the file and the field; folder images the json does not list get no boxes,
    and one warning counts them.
    """
    path, root = Path(path), Path(images_root)
    if not path.is_file():
        raise MissingFileError(f"--proposals {path}: file not found; compute it with python scripts/propose_boxes.py "
                               f"--images {root} --out {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a json file ({err}); expected scripts/propose_boxes.py's output") from err
    files = find_images(root)
    index_of = {file.relative_to(root).as_posix(): index for index, file in enumerate(files)}
    sizes = torch.full((len(files), 2), -1, dtype=torch.int64)
    slot_of_id = _read_images(_list_field(data, "images", path), index_of, sizes, path, root)
    per_image: list[list[tuple[int, list[float]]]] = [[] for _ in files]
    for number, annotation in enumerate(_list_field(data, "annotations", path)):
        where = f"{path}: annotations[{number}]"
        _require_fields(annotation, ("image_id", "bbox"), where)
        slot = slot_of_id.get(annotation["image_id"])
        if slot is None:
            raise DataError(f"{where}.image_id {annotation['image_id']!r}: no image of 'images' has this id")
        rank = annotation.get("rank", number)
        if not isinstance(rank, int) or isinstance(rank, bool):
            raise DataError(f"{where}.rank {rank!r}: expected an integer (0 is the best box)")
        per_image[slot].append((rank, _box(annotation["bbox"], sizes[slot].tolist(), files[slot], f"{where}.bbox")))
    boxes = [torch.tensor([box for _, box in sorted(entries, key=lambda e: e[0])][:top_k], dtype=torch.float32)
             .reshape(-1, 4) for entries in per_image]
    offsets = torch.tensor([0, *(len(b) for b in boxes)]).cumsum(0)
    proposals = Proposals(path, files, torch.cat(boxes), offsets, sizes, data.get("info", {}))
    if proposals.missing:
        logging.getLogger(LOGGER_NAME).warning("%s lists no entry for %d of the %d images under %s: they train "
                                               "without boxes", path, proposals.missing, len(files), root)
    return proposals


def _list_field(data: Any, field: str, path: Path) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(field), list):
        raise DataError(f"{path}: missing field '{field}' (a list); expected scripts/propose_boxes.py's output "
                        "(COCO-style 'images' and 'annotations')")
    return data[field]


def _require_fields(record: Any, fields: tuple[str, ...], where: str) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {record!r}")
    for field in fields:
        if field not in record:
            raise DataError(f"{where}: missing field '{field}'")


def _read_images(images: list, index_of: dict[str, int], sizes: Tensor, path: Path, root: Path) -> dict[Any, int]:
    """Fill ``sizes`` from the json's ``images``; return the folder index of each image id."""
    slot_of_id: dict[Any, int] = {}
    for number, image in enumerate(images):
        where = f"{path}: images[{number}]"
        _require_fields(image, ("id", "file_name", "height", "width"), where)
        name = image["file_name"]
        if name not in index_of:
            raise DataError(f"{where}.file_name {name!r}: no such image under {root}; were the proposals computed "
                            f"for another folder? (python scripts/propose_boxes.py --images {root} --out {path})")
        for field in ("height", "width"):
            if not isinstance(image[field], int) or isinstance(image[field], bool) or image[field] <= 0:
                raise DataError(f"{where}.{field} {image[field]!r}: expected a positive integer (pixels)")
        if image["id"] in slot_of_id:
            raise DataError(f"{where}.id {image['id']!r}: two images have this id")
        if sizes[index_of[name], 0] >= 0:
            raise DataError(f"{where}.file_name {name!r}: listed twice")
        slot_of_id[image["id"]] = index_of[name]
        sizes[index_of[name]] = torch.tensor([image["height"], image["width"]])
    return slot_of_id


def _box(bbox: Any, size: list[int], file: Path, where: str) -> list[float]:
    """A COCO ``[x, y, w, h]`` that lies inside its ``(height, width)`` image, as XYXY clamped to it."""
    if (not isinstance(bbox, list) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)):
        raise DataError(f"{where} {bbox!r}: expected [x, y, w, h], 4 finite numbers in pixels")
    height, width = size
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        raise DataError(f"{where} {bbox}: width and height must be positive")
    if x < -BOUNDS_TOLERANCE or y < -BOUNDS_TOLERANCE or x + w > width + BOUNDS_TOLERANCE \
            or y + h > height + BOUNDS_TOLERANCE:
        raise DataError(f"{where} {bbox}: outside its image {file.name} ({width}x{height} px)")
    return [max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))]
