"""Image files on disk, and the ImageNet normalisation every model input carries (with its
inverse for pictures)."""
from __future__ import annotations

from pathlib import Path

from torch import Tensor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def denormalize(images: Tensor) -> Tensor:
    """Normalised (..., 3, H, W) images back to pixel values in [0, 1] (float32 at least)."""
    images = images.float()
    mean = images.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(3, 1, 1)
    return (images * std + mean).clamp(0, 1)


def normalize(pixels: Tensor) -> Tensor:
    """(..., 3, H, W) pixel values in [0, 1] -> ImageNet-normalised values."""
    mean = pixels.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = pixels.new_tensor(IMAGENET_STD).view(3, 1, 1)
    return (pixels - mean) / std


def image_files(root: str | Path) -> list[Path]:
    """Every image file below ``root`` (by suffix, any case), sorted so that the order (and any ids
    given in it) is stable; empty when there is none."""
    return sorted(p for p in Path(root).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def find_images(root: str | Path) -> list[Path]:
    """``image_files(root)`` for a run's ``--data_path``: an error naming the folder when it is
    not one or holds no image."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data_path {root}: not a directory")
    files = image_files(root)
    if not files:
        raise ValueError(f"--data_path {root}: no image files ({', '.join(IMAGE_SUFFIXES)}) below it")
    return files
