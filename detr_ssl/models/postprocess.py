"""Model outputs -> per-image detections in absolute image coordinates (the COCO API format)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..utils.box_ops import denormalize_boxes
from ..utils.misc import upcast_half


def check_target_sizes(logits: Tensor, target_sizes: Tensor) -> None:
    if len(logits) != len(target_sizes) or target_sizes.shape[1] != 2:
        raise ValueError(f"target_sizes must be ({len(logits)}, 2), got {tuple(target_sizes.shape)}")


class PostProcess(nn.Module):
    """Softmax detections: each query gives its best real class (no-object excluded) and score."""

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """``target_sizes`` (B, 2) holds each image's (height, width) to scale the boxes to."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        check_target_sizes(logits, target_sizes)
        scores, labels = upcast_half(logits).softmax(-1)[..., :-1].max(-1)
        boxes = denormalize_boxes(upcast_half(boxes), target_sizes)
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]


class PostProcessSigmoid(nn.Module):
    """Sigmoid detections (Deformable DETR): the ``num_select`` best (query, class) pairs of each
    image, so one query may yield boxes of several classes, as the official code does."""

    def __init__(self, num_select: int = 100):
        super().__init__()
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """``target_sizes`` (B, 2) holds each image's (height, width) to scale the boxes to."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        check_target_sizes(logits, target_sizes)
        num_classes = logits.shape[-1]
        prob = upcast_half(logits).sigmoid().flatten(1)
        scores, index = prob.topk(min(self.num_select, prob.shape[1]), dim=1)
        queries, labels = index // num_classes, index % num_classes
        boxes = denormalize_boxes(upcast_half(boxes), target_sizes)
        boxes = torch.gather(boxes, 1, queries.unsqueeze(-1).expand(-1, -1, 4))
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]
