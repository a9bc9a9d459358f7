"""Box helpers not in torchvision.ops: normalisation between absolute and relative boxes.

Conversions (``box_convert``), IoU and GIoU come from ``torchvision.ops``.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    return box_convert(boxes, "cxcywh", "xyxy")


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    return box_convert(boxes, "xyxy", "cxcywh")


def normalize_boxes(boxes_xyxy: Tensor, height: int, width: int) -> Tensor:
    """Absolute xyxy pixels -> normalised cxcywh in [0, 1], the DETR target format."""
    scale = torch.tensor([width, height, width, height], dtype=boxes_xyxy.dtype, device=boxes_xyxy.device)
    return xyxy_to_cxcywh(boxes_xyxy) / scale


def denormalize_boxes(boxes_cxcywh: Tensor, sizes_hw: Tensor) -> Tensor:
    """Normalised cxcywh (B, N, 4) -> absolute xyxy for images of the given (B, 2) (h, w) sizes."""
    height, width = sizes_hw.unbind(-1)
    scale = torch.stack([width, height, width, height], dim=-1).to(boxes_cxcywh.dtype)
    return cxcywh_to_xyxy(boxes_cxcywh) * scale[:, None, :]


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x) with x clamped to [eps, 1 - eps]: boxes in [0, 1] -> the unbounded space refinements add in."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
