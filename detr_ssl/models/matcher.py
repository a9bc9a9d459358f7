"""Hungarian matching between predictions and ground-truth boxes (shared by every detector)."""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou

from ..utils.box_ops import cxcywh_to_xyxy
from ..utils.misc import upcast_half

# Stands in for non-finite costs (a diverged model, a corrupt image) so that matching still runs:
# the loss of such outputs is non-finite too, and training skips that step instead of crashing here.
NON_FINITE_COST = 1e6


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising class + L1 + GIoU cost, image by image.

    Each image gets its own (queries x its targets) cost block; the official code builds one
    batch-wide (B*Q x all targets) matrix and slices it, which costs B times more for the same
    numbers. Returns, per image, (query indices, target indices) as int64 tensors.
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 1.0, cost_giou: float = 1.0, focal: bool = False):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matcher costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal = focal

    def class_cost(self, logits: Tensor, labels: Tensor) -> Tensor:
        """(Q, C) logits, (T,) labels -> (Q, T) class cost.

        Softmax classifiers (DETR): minus the probability of the target class. Sigmoid ones
        (Deformable DETR): the focal loss of calling it positive minus that of calling it
        negative, with the official fixed alpha 0.25 and gamma 2.
        """
        if not self.focal:
            return -logits.softmax(-1)[:, labels]
        prob = logits.sigmoid()[:, labels]
        alpha, gamma = 0.25, 2.0
        negative = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
        positive = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
        return positive - negative

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        costs = []
        for image_logits, image_boxes, target in zip(upcast_half(logits), upcast_half(boxes), targets):
            tgt_boxes = target["boxes"].to(image_boxes.dtype)
            cost = (
                self.cost_bbox * torch.cdist(image_boxes, tgt_boxes, p=1)
                + self.cost_class * self.class_cost(image_logits, target["labels"])
                - self.cost_giou * generalized_box_iou(cxcywh_to_xyxy(image_boxes), cxcywh_to_xyxy(tgt_boxes))
            )
            costs.append(cost)
        sizes = [c.shape[1] for c in costs]
        indices = []
        batch_cost = torch.cat(costs, dim=1).nan_to_num(NON_FINITE_COST, NON_FINITE_COST, -NON_FINITE_COST)
        for cost in batch_cost.cpu().split(sizes, dim=1):  # one device sync per batch
            rows, cols = linear_sum_assignment(cost.numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices


def build_matcher(args) -> HungarianMatcher:
    return HungarianMatcher(cost_class=args.set_cost_class, cost_bbox=args.set_cost_bbox, cost_giou=args.set_cost_giou,
                            focal=args.model == "deformable_detr")
