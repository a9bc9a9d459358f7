"""Model outputs -> detections in absolute image coordinates (the COCO API format).

Each post-processor computes the whole batch at once (:meth:`batched`, stacked tensors, which an
ONNX export traces with a dynamic batch) and its per-image dicts are slices of those tensors, so
evaluation, prediction and the exported graph share one implementation.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..utils.box_ops import denormalize_boxes
from ..utils.misc import upcast_half


def check_target_sizes(logits: Tensor, target_sizes: Tensor) -> None:
    if len(logits) != len(target_sizes) or target_sizes.shape[1] != 2:
        raise ValueError(f"target_sizes must be ({len(logits)}, 2), got {tuple(target_sizes.shape)}")


def per_image(boxes: Tensor, scores: Tensor, labels: Tensor) -> list[dict[str, Tensor]]:
    """Batched (B, K, 4), (B, K), (B, K) detections as one dict per image."""
    return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]


class PostProcess(nn.Module):
    """Softmax detections: each query gives its best real class (no-object excluded) and score."""

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """``target_sizes`` (B, 2) holds each image's (height, width) to scale the boxes to."""
        return per_image(*self.batched(outputs, target_sizes))

    @torch.no_grad()
    def batched(self, outputs: dict[str, Tensor], target_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(boxes (B, Q, 4) XYXY pixels, scores (B, Q), labels (B, Q)) of the whole batch."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        check_target_sizes(logits, target_sizes)
        scores, labels = upcast_half(logits).softmax(-1)[..., :-1].max(-1)
        return denormalize_boxes(upcast_half(boxes), target_sizes), scores, labels


class PostProcessSigmoid(nn.Module):
    """Sigmoid detections (Deformable DETR): the ``num_select`` best (query, class) pairs of each
    image, so one query may yield boxes of several classes, as the official code does."""

    def __init__(self, num_select: int = 100):
        super().__init__()
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """``target_sizes`` (B, 2) holds each image's (height, width) to scale the boxes to."""
        return per_image(*self.batched(outputs, target_sizes))

    @torch.no_grad()
    def batched(self, outputs: dict[str, Tensor], target_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(boxes (B, K, 4) XYXY pixels, scores (B, K), labels (B, K)) of the whole batch, best first."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        check_target_sizes(logits, target_sizes)
        num_classes = logits.shape[-1]
        prob = upcast_half(logits).sigmoid().flatten(1)
        scores, index = prob.topk(min(self.num_select, prob.shape[1]), dim=1)
        queries, labels = index // num_classes, index % num_classes
        boxes = denormalize_boxes(upcast_half(boxes), target_sizes)
        return torch.gather(boxes, 1, queries.unsqueeze(-1).expand(-1, -1, 4)), scores, labels
