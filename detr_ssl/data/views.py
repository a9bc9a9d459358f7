"""Two augmented views of each image, for box-level contrastive pre-training (AlignDet §3.3, §4.1).

Each view is flipped, resized and colour-jittered on its own, with no crop (AlignDet removes
DETR's random crop), so every pseudo-box is in both views and ``proposal_ids`` pairs them.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from detr_ssl.data.transforms import random_resize, scaled_sizes, to_model_input
from detr_ssl.utils.misc import NestedTensor, nested_tensor_from_tensor_list

# AlignDet's multi-scale range for a shorter side of 800 px; scaled to --min_size like DETR's.
VIEW_SCALES = tuple(range(640, 801, 32))

Sample = tuple[Tensor, dict[str, Any]]


def build_view_transforms(min_size: int = 800, max_size: int = 1333) -> v2.Compose:
    """The augmentation of one view: flip, multi-scale resize, colour jitter (p 0.8), grayscale
    (p 0.2), then the same ending as ``build_transforms`` (normalised pixels, DETR targets)."""
    return v2.Compose([
        v2.ToImage(),
        v2.RandomHorizontalFlip(0.5),
        random_resize(scaled_sizes(VIEW_SCALES, min_size), max_size),
        v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        *to_model_input(),
    ])


class TwoViews(Dataset):
    """``((image_1, target_1), (image_2, target_2))``: two independent draws of ``transform`` on each
    sample of ``dataset``, which must return untransformed samples (PIL image, target with
    ``tv_tensors.BoundingBoxes``). Both targets keep ``image_id`` and ``proposal_ids`` and add
    ``view`` (0 or 1). The draws come from torch's global RNG, which the loader seeds per worker."""

    def __init__(self, dataset: Dataset, transform: v2.Transform) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Sample, Sample]:
        image, target = self.dataset[index]
        if not isinstance(target.get("boxes"), tv_tensors.BoundingBoxes):
            raise TypeError(f"TwoViews needs untransformed samples (boxes as tv_tensors.BoundingBoxes); "
                            f"build {type(self.dataset).__name__} with transforms=None")
        return self._view(image, target, 0), self._view(image, target, 1)

    def _view(self, image: Any, target: dict[str, Any], view: int) -> Sample:
        image, target = self.transform(image, target)
        return image, {**target, "view": torch.tensor(view, dtype=torch.int64)}


def collate_views(batch: list[tuple[Sample, Sample]]) -> tuple[NestedTensor, list[dict[str, Any]]]:
    """A batch of B view pairs as 2B images padded into one NestedTensor, ordered [the B first
    views, the B second views] (so that view 1 of sample i is at i + B), with targets in that order."""
    samples = [pair[0] for pair in batch] + [pair[1] for pair in batch]
    images, targets = zip(*samples)
    return nested_tensor_from_tensor_list(list(images)), list(targets)
