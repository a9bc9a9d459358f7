"""The official DETR augmentation, rebuilt on ``torchvision.transforms.v2``.

A sample is ``(image, target)``: a PIL image and a dict whose ``boxes`` are absolute XYXY
``tv_tensors.BoundingBoxes``, with per-box ``labels`` and ``iscrowd`` (and ``proposal_ids`` for
pseudo-boxes, see ``proposals.py``). v2 transforms move the boxes with the pixels; the last step
turns them into DETR targets (normalised cxcywh) and adds ``size`` and ``area``.

The official sizes assume a shorter side of 800 px. All of them are scaled by
``min_size / 800`` so that small ``--min_size`` values keep the same augmentation, shrunk.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.ops import box_area
from torchvision.transforms import v2

from detr_ssl.utils.box_ops import normalize_boxes
from detr_ssl.utils.image import IMAGENET_MEAN, IMAGENET_STD


# Official DETR sizes for a shorter side of 800 px.
OFFICIAL_MIN_SIZE = 800
TRAIN_SCALES = tuple(range(480, 801, 32))
CROP_PRE_SCALES = (400, 500, 600)
CROP_RANGE = (384, 600)


# Per-box target tensors besides the boxes: a crop that drops a box drops its entry in each.
PER_BOX_KEYS = ("labels", "iscrowd", "proposal_ids")


def target_labels(sample: tuple[Any, dict[str, Tensor]]) -> tuple[Tensor, ...]:
    """Per-box tensors that ``SanitizeBoundingBoxes`` must drop together with the boxes: those of
    ``PER_BOX_KEYS`` the target holds."""
    target = sample[1]
    return tuple(target[key] for key in PER_BOX_KEYS if key in target)


class RandomSizeCrop(v2.Transform):
    """Random crop whose height and width are each drawn uniformly in [min_size, min(side, max_size)].

    Boxes are clipped to the crop; those left under one pixel wide or high are dropped with
    their labels, as the official crop drops boxes that fell outside.
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        self.min_size = min_size
        self.max_size = max_size
        self.sanitize = v2.SanitizeBoundingBoxes(labels_getter=target_labels)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        crop_h = self._draw(min(self.min_size, height), min(height, self.max_size))
        crop_w = self._draw(min(self.min_size, width), min(width, self.max_size))
        return {
            "top": self._draw(0, height - crop_h),
            "left": self._draw(0, width - crop_w),
            "height": crop_h,
            "width": crop_w,
        }

    @staticmethod
    def _draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, ()))

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(v2.functional.crop, inpt, **params)

    def forward(self, *inputs: Any) -> Any:
        return self.sanitize(super().forward(*inputs))


def to_detr_target(image: Tensor, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """Absolute XYXY boxes -> normalised cxcywh; add ``size`` (h, w) and box ``area`` in pixels."""
    height, width = image.shape[-2:]
    boxes = target["boxes"].as_subclass(Tensor)
    target = {
        **target,
        "boxes": normalize_boxes(boxes, height, width),
        "area": box_area(boxes),
        "size": torch.tensor([height, width], dtype=torch.int64),
    }
    return image.as_subclass(Tensor), target


def resize(size: int, max_size: int | None = None) -> v2.Resize:
    """Shorter side to ``size``, longer side at most ``max_size`` (the official ``resize``)."""
    if max_size is not None and size >= max_size:
        return v2.Resize(None, max_size=max_size)
    return v2.Resize(size, max_size=max_size)


def random_resize(sizes: list[int], max_size: int | None = None) -> v2.RandomChoice:
    """Shorter side to one of ``sizes``, drawn uniformly (the official ``RandomResize``)."""
    return v2.RandomChoice([resize(size, max_size) for size in sizes])


def scaled(size: int, factor: float) -> int:
    """An official size times ``factor``, at least one pixel."""
    return max(1, round(size * factor))


def scaled_sizes(sizes: tuple[int, ...], min_size: int) -> list[int]:
    """Official sizes (for a shorter side of 800 px) scaled to ``min_size``, sorted, without repeats."""
    factor = min_size / OFFICIAL_MIN_SIZE
    return sorted({scaled(size, factor) for size in sizes})


def to_model_input() -> list[Any]:
    """The steps every pipeline ends with: float pixels, ImageNet normalisation, boxes clamped to
    the image, DETR targets."""
    return [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        v2.ClampBoundingBoxes(),
        to_detr_target,
    ]


def untransformed(image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The identity transform: the raw sample (PIL image, absolute XYXY target), for wrappers such
    as ``views.TwoViews`` that transform it themselves."""
    return image, target


def build_transforms(image_set: str, min_size: int = 800, max_size: int = 1333, augment: bool = True) -> v2.Compose:
    """Official DETR transforms for 'train' (flip, multi-scale resize, random crop) or 'val'."""
    if image_set not in ("train", "val"):
        raise ValueError(f"image_set must be 'train' or 'val', got {image_set!r}")
    if image_set == "train" and augment:
        factor = min_size / OFFICIAL_MIN_SIZE
        scales = scaled_sizes(TRAIN_SCALES, min_size)
        crop_pre_scales = scaled_sizes(CROP_PRE_SCALES, min_size)
        crop_min, crop_max = (scaled(size, factor) for size in CROP_RANGE)
        geometry = [
            v2.RandomHorizontalFlip(0.5),
            v2.RandomChoice([
                random_resize(scales, max_size),
                v2.Compose([
                    random_resize(crop_pre_scales),
                    RandomSizeCrop(crop_min, crop_max),
                    random_resize(scales, max_size),
                ]),
            ]),
        ]
    else:
        geometry = [resize(min_size, max_size)]
    return v2.Compose([v2.ToImage(), *geometry, *to_model_input()])


CROP_SCALE = (0.2, 1.0)  # MAE's RandomResizedCrop: 20-100 % of the image's area
CENTRE_CROP_RATIO = 224 / 256  # MAE's (and ImageNet's) evaluation: resize to 256, keep the central 224


def build_crop_transforms(image_set: str, size: int) -> v2.Compose:
    """MAE's pipeline of square ``size`` crops: 'train' a random resized crop (area 20-100 %,
    bicubic) and flip, 'val' the central crop of the image resized to ``size`` / 0.875, so that
    images of any size and shape batch without padding."""
    if image_set not in ("train", "val"):
        raise ValueError(f"image_set must be 'train' or 'val', got {image_set!r}")
    bicubic = v2.InterpolationMode.BICUBIC
    if image_set == "train":
        geometry = [v2.RandomResizedCrop(size, scale=CROP_SCALE, interpolation=bicubic, antialias=True),
                    v2.RandomHorizontalFlip(0.5)]
    else:
        geometry = [v2.Resize(round(size / CENTRE_CROP_RATIO), interpolation=bicubic, antialias=True),
                    v2.CenterCrop(size)]
    return v2.Compose([v2.ToImage(), *geometry, *to_model_input()])


def xyxy_boxes(boxes: Tensor, height: int, width: int) -> tv_tensors.BoundingBoxes:
    """Absolute XYXY boxes on an image of the given size, as the transforms expect them."""
    return tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width))
