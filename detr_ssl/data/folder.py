"""Unlabelled images for self-supervised pre-training: any folder tree of image files."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from detr_ssl.data.bad_samples import UnreadableImageError, first_good
from detr_ssl.data.transforms import untransformed, xyxy_boxes
from detr_ssl.utils.image import find_images

if TYPE_CHECKING:
    from detr_ssl.data.proposals import Proposals


class ImageFolder(Dataset):
    """``(image, target)`` pairs with empty targets, so that the detection transforms and the
    collate function serve unlabelled images unchanged; the image id is the index in sorted order.
    With ``skip_bad`` an unreadable file is replaced by the next readable one (and reported).

    With ``proposals`` (``load_proposals`` of the same folder) the targets hold each image's
    pseudo-boxes as ``boxes``, one class (``labels`` 0), and ``proposal_ids``: each box's index in
    the image's proposal list, which the transforms keep in step with the boxes they drop.
    ``transforms=None`` returns the untransformed sample (PIL image, absolute XYXY target).
    """

    def __init__(self, root: str | Path,
                 transforms: Callable[[Image.Image, dict[str, Any]], tuple[Any, dict[str, Any]]] | None = None,
                 skip_bad: bool = False, proposals: Proposals | None = None) -> None:
        self.root = Path(root)
        self.files = find_images(root)
        self.transforms = untransformed if transforms is None else transforms
        self.skip_bad = skip_bad
        if proposals is not None and proposals.files != self.files:
            raise ValueError(f"proposals of {proposals.source} were loaded for another folder than {self.root}")
        self.proposals = proposals

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        if self.skip_bad:
            return first_good(self._load, index, len(self))
        return self._load(index)

    def _load(self, index: int) -> tuple[Any, dict[str, Any]]:
        path = self.files[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except OSError as err:
            raise UnreadableImageError(f"cannot read image {path}: {err}") from err
        boxes = torch.zeros(0, 4) if self.proposals is None else self.proposals.boxes_for(index, image.height,
                                                                                           image.width)
        target = {
            "image_id": torch.tensor(index, dtype=torch.int64),
            "boxes": xyxy_boxes(boxes, image.height, image.width),
            "labels": torch.zeros(len(boxes), dtype=torch.int64),
            "iscrowd": torch.zeros(len(boxes), dtype=torch.int64),
            "orig_size": torch.tensor([image.height, image.width], dtype=torch.int64),
        }
        if self.proposals is not None:
            target["proposal_ids"] = torch.arange(len(boxes), dtype=torch.int64)
        return self.transforms(image, target)
