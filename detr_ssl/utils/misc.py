"""Batching images of different sizes: the NestedTensor of the official DETR code."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class NestedTensor:
    """A padded batch of images and a mask that is True on padding pixels.

    Images are padded bottom-right to the largest height and width in the batch, as the
    official DETR code does, so the top-left pixel of every image stays at (0, 0).
    """

    tensors: Tensor
    mask: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> NestedTensor:
        return NestedTensor(
            self.tensors.to(device, non_blocking=non_blocking),
            self.mask.to(device, non_blocking=non_blocking),
        )

    def decompose(self) -> tuple[Tensor, Tensor]:
        return self.tensors, self.mask

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        """(height, width) of each image without its padding."""
        valid = ~self.mask
        heights = valid[:, :, 0].sum(1).tolist()
        widths = valid[:, 0, :].sum(1).tolist()
        return list(zip(heights, widths))


def nested_tensor_from_tensor_list(images: list[Tensor], size_divisibility: int = 0) -> NestedTensor:
    """Pad a list of CHW images into one NestedTensor.

    ``size_divisibility`` rounds the padded size up to a multiple (0: no rounding, as DETR).
    """
    if not images:
        raise ValueError("cannot batch an empty list of images")
    if any(img.ndim != 3 for img in images):
        raise ValueError(f"expected CHW images, got shapes {[tuple(i.shape) for i in images]}")
    channels = images[0].shape[0]
    height = max(img.shape[1] for img in images)
    width = max(img.shape[2] for img in images)
    if size_divisibility > 1:
        height = -(-height // size_divisibility) * size_divisibility
        width = -(-width // size_divisibility) * size_divisibility
    batch = images[0].new_zeros((len(images), channels, height, width))
    mask = torch.ones((len(images), height, width), dtype=torch.bool, device=images[0].device)
    for img, padded, pad_mask in zip(images, batch, mask):
        padded[:, : img.shape[1], : img.shape[2]].copy_(img)
        pad_mask[: img.shape[1], : img.shape[2]] = False
    return NestedTensor(batch, mask)


def as_nested_tensor(samples: NestedTensor | list[Tensor] | Tensor) -> NestedTensor:
    """Accept what ``model(samples)`` accepts: a NestedTensor, a list of CHW images or a batch."""
    if isinstance(samples, NestedTensor):
        return samples
    if isinstance(samples, Tensor) and samples.ndim == 4:
        samples = list(samples)
    return nested_tensor_from_tensor_list(list(samples))


def upcast_half(tensor: Tensor) -> Tensor:
    """float16/bfloat16 to float32 (for numerically sensitive steps under AMP); other dtypes unchanged,
    so float64 checks against the official code stay in float64."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def is_tracing() -> bool:
    """Whether this call is being scripted, traced (ONNX) or compiled: shortcuts that look at
    tensor values (is anything padded?) or call compiled CPU kernels must not be baked into a graph."""
    return torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()
