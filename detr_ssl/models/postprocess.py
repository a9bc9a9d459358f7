"""Model outputs -> per-image detections in absolute image coordinates (the COCO API format)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..utils.box_ops import denormalize_boxes
from ..utils.misc import upcast_half


class PostProcess(nn.Module):
    """Softmax detections: each query gives its best real class (no-object excluded) and score."""

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """``target_sizes`` (B, 2) holds each image's (height, width) to scale the boxes to."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(logits) != len(target_sizes) or target_sizes.shape[1] != 2:
            raise ValueError(f"target_sizes must be ({len(logits)}, 2), got {tuple(target_sizes.shape)}")
        scores, labels = upcast_half(logits).softmax(-1)[..., :-1].max(-1)
        boxes = denormalize_boxes(upcast_half(boxes), target_sizes)
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]
