"""Hungarian matching between predictions and ground-truth boxes (shared by every detector)."""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
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
    numbers. The blocks are computed together, as one (B, Q, most targets) tensor with the
    shorter target lists padded, so the cost takes a dozen tensor ops per batch instead of per
    image; the padding columns are cut off before matching. Returns, per image, (query indices,
    target indices) as int64 tensors.
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
        """(..., Q, C) logits, (..., T) labels -> (..., Q, T) class cost.

        Softmax classifiers (DETR): minus the probability of the target class. Sigmoid ones
        (Deformable DETR): the focal loss of calling it positive minus that of calling it
        negative, with the official fixed alpha 0.25 and gamma 2.
        """
        index = labels.unsqueeze(-2).expand(*logits.shape[:-1], labels.shape[-1])
        if not self.focal:
            return -logits.softmax(-1).gather(-1, index)
        prob = logits.sigmoid().gather(-1, index)
        alpha, gamma = 0.25, 2.0
        negative = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
        positive = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
        return positive - negative

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        logits, boxes = upcast_half(outputs["pred_logits"]), upcast_half(outputs["pred_boxes"])
        sizes = [len(target["labels"]) for target in targets]
        most = max(sizes, default=0)
        if most == 0:
            empty = torch.zeros(0, dtype=torch.int64)
            return [(empty, empty.clone()) for _ in targets]
        # Target lists padded to the longest; the padding box is a proper box, so no NaN appears.
        labels = pad_sequence([target["labels"] for target in targets], batch_first=True)
        tgt_boxes = pad_sequence([target["boxes"].to(boxes.dtype) for target in targets], batch_first=True,
                                 padding_value=0.5)
        cost = (
            self.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)
            + self.cost_class * self.class_cost(logits, labels)
            - self.cost_giou * generalized_box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(tgt_boxes))
        )
        cost = cost.nan_to_num(NON_FINITE_COST, NON_FINITE_COST, -NON_FINITE_COST).cpu()  # one device sync per batch
        indices = []
        for image_cost, size in zip(cost, sizes):
            rows, cols = linear_sum_assignment(image_cost[:, :size].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices


def build_matcher(args) -> HungarianMatcher:
    return HungarianMatcher(cost_class=args.set_cost_class, cost_bbox=args.set_cost_bbox, cost_giou=args.set_cost_giou,
                            focal=args.model == "deformable_detr")
