"""The ImageNet normalisation every model input carries, and its inverse for pictures."""
from __future__ import annotations

from torch import Tensor

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
