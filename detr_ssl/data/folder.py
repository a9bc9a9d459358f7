"""Unlabelled images for self-supervised pre-training: any folder tree of image files."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from detr_ssl.data.bad_samples import UnreadableImageError, first_good
from detr_ssl.data.transforms import xyxy_boxes
from detr_ssl.utils.image import find_images


class ImageFolder(Dataset):
    """``(image, target)`` pairs with empty targets, so that the detection transforms and the
    collate function serve unlabelled images unchanged; the image id is the index in sorted order.
    With ``skip_bad`` an unreadable file is replaced by the next readable one (and reported)."""

    def __init__(self, root: str | Path,
                 transforms: Callable[[Image.Image, dict[str, Any]], tuple[Any, dict[str, Any]]],
                 skip_bad: bool = False) -> None:
        self.root = Path(root)
        self.files = find_images(root)
        self.transforms = transforms
        self.skip_bad = skip_bad

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
        target = {
            "image_id": torch.tensor(index, dtype=torch.int64),
            "boxes": xyxy_boxes(torch.zeros(0, 4), image.height, image.width),
            "labels": torch.zeros(0, dtype=torch.int64),
            "iscrowd": torch.zeros(0, dtype=torch.int64),
            "orig_size": torch.tensor([image.height, image.width], dtype=torch.int64),
        }
        return self.transforms(image, target)
