"""The DETR set criterion: match, then classification, box L1 and GIoU losses (+ auxiliary layers).

Loss names and values follow the official code (``loss_ce``, ``loss_bbox``, ``loss_giou``,
``class_error``, ``cardinality_error``, suffixed ``_0``..``_{L-2}`` for auxiliary decoder layers).
``weight_dict`` says which entries count in the total loss and with what weight.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from ..utils.box_ops import cxcywh_to_xyxy
from .matcher import HungarianMatcher

Indices = list[tuple[Tensor, Tensor]]
MatchedLoss = Callable[[dict, list[dict], Indices, float], dict[str, Tensor]]


def matched_query_index(indices: Indices) -> tuple[Tensor, Tensor]:
    """(batch index, query index) of every matched prediction, image after image."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    query_idx = torch.cat([src for src, _ in indices])
    return batch_idx, query_idx


def average_num_boxes(targets: list[dict[str, Tensor]], device: torch.device) -> float:
    """Target boxes per process, averaged over processes and at least 1 (the loss normaliser)."""
    num_boxes = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    world_size = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num_boxes)
        world_size = dist.get_world_size()
    return torch.clamp(num_boxes / world_size, min=1).item()


class SetCriterion(nn.Module):
    """Hungarian-matched set losses.

    ``matched_losses`` (name -> function(outputs, targets, indices, num_boxes)) add a method's losses
    of matched queries; ``pretext_losses`` (functions of outputs and targets) add the losses of
    the encoder task and the pre-training method on their own outputs.

    Classification is a softmax over the classes plus no-object, the no-object weight being
    ``eos_coef`` (DETR), or, with ``focal_alpha``, a sigmoid focal loss per class where
    no-object is all-negative (Deformable DETR). Two-stage encoder proposals (``enc_outputs``)
    are matched class-agnostically and give the ``_enc`` losses.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict[str, float],
                 eos_coef: float = 0.1, focal_alpha: float | None = None,
                 losses: tuple[str, ...] = ("labels", "boxes", "cardinality"),
                 matched_losses: dict[str, MatchedLoss] | None = None,
                 pretext_losses: tuple[Callable[[dict, list[dict]], dict[str, Tensor]], ...] = ()):
        super().__init__()
        # functions, not modules: the heads they score belong to the model (and its checkpoint)
        self.matched_losses = dict(matched_losses or {})
        self.pretext_losses = pretext_losses
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.focal_alpha = focal_alpha
        self.losses = (*losses, *self.matched_losses)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def loss_labels(self, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float,
                    log: bool = True) -> dict[str, Tensor]:
        """Softmax cross-entropy or sigmoid focal loss of the classes; logs class_error."""
        logits = outputs["pred_logits"]
        idx = matched_query_index(indices)
        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[idx] = matched_labels
        if self.focal_alpha is None:
            loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)
        else:
            # one-hot over classes + no-object, whose column is dropped: no-object is all zeros
            one_hot = F.one_hot(target_classes, self.num_classes + 1)[..., :-1].to(logits.dtype)
            loss_ce = sigmoid_focal_loss(logits, one_hot, alpha=self.focal_alpha, gamma=2.0, reduction="sum") / num_boxes
        losses = {"loss_ce": loss_ce}
        if log:
            losses["class_error"] = 100 - top1_accuracy(logits[idx], matched_labels)
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs: dict, targets: list[dict], indices: Indices,
                         num_boxes: float) -> dict[str, Tensor]:
        """L1 error in the number of non-empty predictions; logged only, it has no gradient."""
        logits = outputs["pred_logits"]
        target_counts = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device)
        predicted_counts = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(predicted_counts.float(), target_counts.float())}

    def loss_boxes(self, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float) -> dict[str, Tensor]:
        """L1 and GIoU losses of matched boxes, each summed and divided by the number of targets."""
        src_boxes = outputs["pred_boxes"][matched_query_index(indices)]
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none").sum() / num_boxes
        # eps=0: the official formula exactly; torchvision's default eps shifts tiny boxes' loss by eps/area
        loss_giou = generalized_box_iou_loss(cxcywh_to_xyxy(src_boxes), cxcywh_to_xyxy(target_boxes),
                                             reduction="sum", eps=0.0)
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou / num_boxes}

    def get_loss(self, name: str, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float,
                 **kwargs) -> dict[str, Tensor]:
        loss_map = {"labels": self.loss_labels, "cardinality": self.loss_cardinality, "boxes": self.loss_boxes,
                    **self.matched_losses}
        if name not in loss_map:
            raise ValueError(f"unknown loss {name!r}; known: {sorted(loss_map)}")
        return loss_map[name](outputs, targets, indices, num_boxes, **kwargs)

    def detection_losses(self, outputs: dict, targets: list[dict], num_boxes: float, suffix: str = "",
                         log: bool = True) -> dict[str, Tensor]:
        """All losses of one decoder layer's outputs, keys suffixed for auxiliary layers."""
        indices = self.matcher(outputs, targets)
        losses = {}
        for name in self.losses:
            kwargs = {"log": log} if name == "labels" else {}
            losses.update(self.get_loss(name, outputs, targets, indices, num_boxes, **kwargs))
        return {key + suffix: value for key, value in losses.items()}

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        """Detection losses for the detection outputs (``pred_logits``...), and the pretext losses
        (e.g. ``loss_ssl``, ``loss_patch_*``) of the task's and method's own outputs."""
        losses = {}
        for pretext_loss in self.pretext_losses:
            losses.update(pretext_loss(outputs, targets))
        if "pred_logits" in outputs:
            losses.update(self.detection_set_losses(outputs, targets))
        return losses

    def detection_set_losses(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        """The last layer's losses, the auxiliary layers' and the two-stage proposals'."""
        num_boxes = average_num_boxes(targets, outputs["pred_logits"].device)
        losses = self.detection_losses(outputs, targets, num_boxes)
        for i, aux_outputs in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self.detection_losses(aux_outputs, targets, num_boxes, suffix=f"_{i}", log=False))
        if "enc_outputs" in outputs:
            class_agnostic = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            losses.update(self.detection_losses(outputs["enc_outputs"], class_agnostic, num_boxes, suffix="_enc",
                                                log=False))
        return losses


@torch.no_grad()
def top1_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Percentage of rows whose arg-max is the label (0 when there are no rows, as the official code)."""
    if labels.numel() == 0:
        return torch.zeros([], device=logits.device)
    return (logits.argmax(-1) == labels).float().mean() * 100


def repeat_for_aux_layers(args, last_layer: dict[str, float], proposals: bool) -> dict[str, float]:
    """``last_layer``'s weights repeated for each auxiliary decoder layer (and the proposals)."""
    weights = dict(last_layer)
    if args.aux_loss:
        suffixes = [f"_{i}" for i in range(args.dec_layers - 1)] + (["_enc"] if proposals else [])
        for suffix in suffixes:
            weights.update({key + suffix: value for key, value in last_layer.items()})
    return weights


def class_loss_coef(args) -> float:
    """The class weight: 1 for DETR, ``--cls_loss_coef`` for Deformable DETR."""
    return args.cls_loss_coef if args.model == "deformable_detr" else 1.0


def detection_weight_dict(args) -> dict[str, float]:
    """Loss weights for the last decoder layer and, with ``--aux_loss``, each earlier one (and the
    two-stage proposals), and the encoder task's ``loss_ssl`` (lambda); a method adds its own."""
    last_layer = {"loss_ce": class_loss_coef(args), "loss_bbox": args.bbox_loss_coef, "loss_giou": args.giou_loss_coef}
    weights = repeat_for_aux_layers(args, last_layer, proposals=getattr(args, "two_stage", False))
    if args.ssl_task != "none":
        weights["loss_ssl"] = args.ssl_loss_coef  # lambda; a --ssl_loss_schedule updates it every optimizer step
    return weights
