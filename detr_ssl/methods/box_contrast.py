"""Box-domain contrastive pre-training (AlignDet, Li et al., ICCV 2023), with PreDet's overlap positives.

Each unlabelled image comes as two views (flip, resize, colour; no crop) with its ``--proposals``
pseudo-boxes, paired across the views by ``proposal_ids``. The detector and its momentum copy (an
exponential moving average of it, without gradients, always in evaluation mode) both detect the
pseudo-boxes of every view; each is matched to them by the detector's Hungarian matcher on box
costs only (``--set_cost_class 0``: the classifier learns nothing here, AlignDet "replaces the
classification with box contrastive learning", and its Deformable DETR config matches with a zero
class cost). The last decoder layer's states of matched queries, projected by a MoCo v2 MLP
(``contrast_projection``), are contrasted with InfoNCE (AlignDet eq. 4): the positives of an online
query are the momentum keys of the other view of the same image matched to the same pseudo-box
(``--box_contrast_positive proposal``, AlignDet) or to one whose IoU with the query's pseudo-box is at
least ``--positive_iou`` (``overlap``, PreDet); its negatives are all other keys of that view in the
batch. Both views serve as queries (a symmetric loss). The detector's own L1 + GIoU losses regress
the pseudo-boxes on every decoder layer; the class losses weigh 0.

From AlignDet's code (github.com/liming-ai/AlignDet at d29f70b): the projection is
Linear(256, 256)-ReLU-Linear(256, 256) (``AlignDet/models/dense_heads/detr_head.py``, ``projector``),
the momentum 0.996 (``AlignDet/models/detectors/selfsup_detector.py``, ``base_momentum``; its
``MomentumUpdateHook`` also raises it to 1 along a cosine over training, which needs the training
progress and is not done here), query embeddings are copied to the momentum detector instead of
averaged (same file, ``_ema_normal``), and the temperature is 0.5. Where we differ: AlignDet's DETR
also trains the classifier on 256 k-means clusters of the pseudo-boxes' features (supplement B.5;
our proposals have no clusters), pools the embeddings of all decoder layers, and counts the
unmatched queries and the detached online embeddings of other pseudo-boxes among the negatives.
"""
from __future__ import annotations

import argparse
import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, box_iou

from ..models.criterion import Indices, matched_query_index, repeat_for_aux_layers
from ..models.heads import MLP
from ..models.matcher import build_matcher
from ..models.passes import DetectorPass
from ..utils.misc import NestedTensor
from .base import DetectorMethod, Error, Picture
from .drawing import beside, draw_view, proposal_ids

POSITIVE_RULES = ("proposal", "overlap")
# Copied, not averaged: "We should keep the query embedding values of the two models the same in DETR."
# (AlignDet/models/detectors/selfsup_detector.py, _ema_normal)
COPIED_TO_MOMENTUM = ("query_embed.",)


@contextmanager
def swapped_modules(module: nn.Module, replacements: dict[str, nn.Module | None]) -> Iterator[None]:
    """Replace submodules for the duration of the block: None leaves them out of a deep copy, and a
    module lends it (the online backbone to the momentum detector)."""
    saved = {name: module._modules[name] for name in replacements}
    module._modules.update(replacements)
    try:
        yield
    finally:
        module._modules.update(saved)


def backbone_trains(detector: nn.Module) -> bool:
    """Whether any CNN parameter learns. A learned position embedding has gradients but sits in the
    backbone's optimizer group, so with ``--lr_backbone 0`` it stays put as well."""
    return any(p.requires_grad for p in detector.backbone[0].parameters())


def paired_tensors(copied: nn.Module, online: nn.Module) -> Iterator[tuple[str, Tensor, Tensor]]:
    """Every parameter and buffer of ``copied`` with the online tensor of the same name."""
    originals = {**dict(online.named_parameters()), **dict(online.named_buffers())}
    for name, tensor in (*copied.named_parameters(), *copied.named_buffers()):
        if name not in originals:
            raise KeyError(f"momentum copy: {name} has no online counterpart")
        yield name, tensor, originals[name]


class MomentumDetector(nn.Module):
    """The momentum copy of the detector (``contrast_momentum``) and of the projection.

    With a frozen backbone it holds none: its moving average would equal the online one, so the
    momentum pass borrows the online backbone and its features of the step (the backbone runs once
    per step, and checkpoints stay small). Encoder pretext heads are left out; nothing trains it by
    gradient, and it stays in evaluation mode (keys without dropout noise).
    """

    def __init__(self, detector: nn.Module, projection: nn.Module, share_backbone: bool):
        super().__init__()
        left_out = ("ssl_head", "backbone") if share_backbone else ("ssl_head",)
        with swapped_modules(detector, {name: None for name in left_out if name in detector._modules}):
            self.detector = copy.deepcopy(detector)
        self.projection = copy.deepcopy(projection)
        self.share_backbone = share_backbone
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> MomentumDetector:
        """Evaluation mode whatever ``mode``: ``model.train()`` does not reach it."""
        return super().train(False)

    @torch.no_grad()
    def keys(self, samples: NestedTensor, online: DetectorPass, backbone: nn.Module) -> dict[str, Tensor]:
        """The last decoder layer's projected states, boxes and logits of the batch."""
        if self.share_backbone:
            with swapped_modules(self.detector, {"backbone": backbone}):
                decoded = self.detector.run(samples, features=online.features).decoded
        else:
            decoded = self.detector.run(samples).decoded
        return {"momentum": self.projection(decoded.states[-1]), "momentum_boxes": decoded.boxes[-1],
                "momentum_logits": decoded.logits[-1]}

    @torch.no_grad()
    def update(self, detector: nn.Module, momentum: float) -> None:
        """m <- momentum * m + (1 - momentum) * theta for every floating tensor, paired by name with
        the online detector's (and projection's); query embeddings and integer buffers are copied."""
        averaged, targets = [], []
        for copied, online in ((self.detector, detector), (self.projection, detector.contrast_projection)):
            for name, mine, theirs in paired_tensors(copied, online):
                if name.startswith(COPIED_TO_MOMENTUM) or not mine.is_floating_point():
                    mine.copy_(theirs)
                else:
                    averaged.append(mine)
                    targets.append(theirs)
        if averaged:
            torch._foreach_lerp_(averaged, targets, 1.0 - momentum)


@dataclass
class MatchedQueries:
    """The matched queries of a batch, batch slot after slot.

    embeddings: (M, D) projected decoder states.
    images: (M,) the index of the image (shared by its two views).
    views: (M,) the view (0 or 1).
    proposals: (M,) the proposal id of the pseudo-box each is matched to.
    """

    embeddings: Tensor
    images: Tensor
    views: Tensor
    proposals: Tensor


def view_layout(targets: list[dict]) -> tuple[Tensor, Tensor, bool]:
    """Each batch slot's image index and view, and whether the batch has two views.

    Two-view batches are [first views of images 0..B-1, second views of images 0..B-1] (the order
    of ``DetectorMethod.views = 2``); a batch whose targets carry no ``view`` (a held-out set with one
    view per image) has one view of each image, and its keys are the momentum pass of that view.
    """
    slots = torch.arange(len(targets))
    if not all("view" in target for target in targets):
        return slots, torch.zeros_like(slots), False
    if len(targets) % 2:
        raise ValueError(f"box_contrast: a two-view batch has an even number of images, got {len(targets)}")
    half = len(targets) // 2
    return slots % half, slots // half, True


def matched_queries(embeddings: Tensor, indices: Indices, targets: list[dict], images: Tensor,
                    views: Tensor) -> MatchedQueries:
    """The (B, Q, D) ``embeddings`` of the queries that ``indices`` match, with their image, view and
    pseudo-box."""
    device = embeddings.device
    slot, query = (index.to(device) for index in matched_query_index(indices))
    proposals = [proposal_ids(target)[matched.to(target["boxes"].device)].to(device)
                 for target, (_, matched) in zip(targets, indices)]
    return MatchedQueries(embeddings[slot, query], images.to(device)[slot], views.to(device)[slot],
                          torch.cat(proposals))


def proposal_overlaps(targets: list[dict], images: Tensor) -> Tensor:
    """(images, K, K) IoU between the pseudo-boxes of each image, indexed by proposal id (K: the
    largest id + 1; ``images``: each target's image index, on the CPU); NaN where no view holds both.

    Views only flip and resize, which keep the IoU of two boxes, so either view that holds both
    gives their IoU on the original image; a box dropped from one view is read from the other.
    """
    ids = [proposal_ids(target) for target in targets]
    size = int(torch.cat(ids).max()) + 1 if sum(map(len, ids)) else 0
    table = torch.full((int(images.max()) + 1, size, size), float("nan"), device=ids[0].device)
    for target, index, image in zip(targets, ids, images.tolist()):
        boxes = box_convert(target["boxes"].float(), "cxcywh", "xyxy")
        table[image, index[:, None], index[None, :]] = box_iou(boxes, boxes)
    return table


def info_nce(queries: Tensor, keys: Tensor, positive: Tensor, candidate: Tensor,
             temperature: float) -> tuple[Tensor, Tensor]:
    """AlignDet eq. (4) and the top-1 accuracy (%).

    ``queries`` (M, D) and ``keys`` (K, D) are L2-normalised here; ``candidate`` (M, K) marks each
    query's keys and ``positive`` (M, K) its positives among them; the other candidates are its
    negatives. Each (query, positive) pair costs -log(e^s+ / (e^s+ + sum over negatives e^s-)), with
    s = cosine / temperature; the loss is the mean over all pairs of the batch, so its scale does not
    grow with the batch (queries without a positive add nothing). The accuracy counts the queries
    with a positive whose most similar candidate is one.
    """
    if positive.numel() == 0:
        zero = queries.sum() * 0.0
        return zero, zero.detach()
    logits = F.normalize(queries.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T / temperature
    negatives = candidate & ~positive
    negative_term = logits.masked_fill(~negatives, float("-inf")).logsumexp(1, keepdim=True)
    pair_loss = torch.logaddexp(logits, negative_term) - logits
    loss = torch.where(positive, pair_loss, 0.0).sum() / positive.sum().clamp(min=1)
    with torch.no_grad():
        has_positive = positive.any(1)
        best = logits.masked_fill(~candidate, float("-inf")).argmax(1, keepdim=True)
        hits = positive.gather(1, best).squeeze(1) & has_positive
        accuracy = hits.sum() / has_positive.sum().clamp(min=1) * 100
    return loss, accuracy


class BoxContrast(DetectorMethod):
    """AlignDet box-domain pre-training: regress the pseudo-boxes, contrast their queries across views."""

    name = "box_contrast"
    modes = ("pretrain",)
    views = 2
    needs_proposals = True
    pretrain_classes = 1  # class-agnostic; the classifier is not trained and --pretrain drops it
    module_prefixes = ("contrast_projection.", "contrast_momentum.")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add = parser.add_argument_group("box-domain contrastive pre-training (--ssl_method box_contrast)").add_argument
        add("--box_contrast_temperature", type=float, default=0.5,
            help="temperature of the InfoNCE loss between the projected queries of the two views (AlignDet: 0.5)")
        add("--box_contrast_momentum", type=float, default=0.996,
            help="EMA coefficient m of the momentum detector, after every optimizer step: momentum <- m * momentum + "
                 "(1 - m) * online (AlignDet's base momentum; it also raises it to 1 over training, here it stays)")
        add("--box_contrast_loss_coef", type=float, default=1.0,
            help="weight of the contrastive loss (AlignDet: 1 for DETR, 2 for Deformable DETR); the box losses keep "
                 "--bbox_loss_coef and --giou_loss_coef, the class losses weigh 0")
        add("--box_contrast_positive", type=str, default="proposal", choices=POSITIVE_RULES,
            help="the positives of a query among the other view's: 'proposal' (AlignDet) the queries matched to the "
                 "same pseudo-box; 'overlap' (PreDet) those matched to a pseudo-box whose IoU with the query's is at "
                 "least --positive_iou")
        add("--positive_iou", type=float, default=0.5,
            help="--box_contrast_positive overlap: the IoU of two pseudo-boxes that makes their queries positives "
                 "(PreDet: 0.5)")

    @classmethod
    def validate(cls, args: argparse.Namespace, error: Error) -> None:
        if args.box_contrast_temperature <= 0:
            error(f"--box_contrast_temperature must be > 0, got {args.box_contrast_temperature}")
        if not 0 <= args.box_contrast_momentum < 1:
            error(f"--box_contrast_momentum must be in [0, 1), got {args.box_contrast_momentum}")
        if args.box_contrast_loss_coef < 0:
            error(f"--box_contrast_loss_coef must be >= 0, got {args.box_contrast_loss_coef}")
        if not 0 < args.positive_iou <= 1:
            error(f"--positive_iou must be in (0, 1], got {args.positive_iou}")
        if not getattr(args, "proposals", None):
            error("--ssl_method box_contrast learns from pseudo-boxes: pass --proposals FILE "
                  "(scripts/propose_boxes.py)")
        if args.dataset_file != "folder":
            error(f"--ssl_method box_contrast pre-trains on unlabelled images with --proposals: use --dataset_file "
                  f"folder, not {args.dataset_file}")
        top_k = getattr(args, "proposal_top_k", None)
        if top_k is not None and top_k > args.num_queries:
            error(f"--proposal_top_k ({top_k}) must be <= --num_queries ({args.num_queries}): every pseudo-box "
                  "needs a query to match it (AlignDet keeps fewer boxes than queries)")

    @classmethod
    def configure(cls, args: argparse.Namespace, given: set[str]) -> None:
        if "lr_backbone" not in given:
            args.lr_backbone = 0.0  # AlignDet freezes the backbone in box-domain pre-training (Table 11)
        if "set_cost_class" not in given:
            args.set_cost_class = 0.0  # match on boxes only: the classifier is not trained

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.matcher = build_matcher(args)
        self.temperature = args.box_contrast_temperature
        self.momentum = args.box_contrast_momentum
        self.positive_rule = args.box_contrast_positive
        self.positive_iou = args.positive_iou

    def attach(self, detector: nn.Module) -> None:
        """``contrast_projection`` (MoCo v2 MLP on the decoder states, AlignDet's sizes) and its momentum
        copy with the detector's in ``contrast_momentum``."""
        hidden_dim = detector.transformer.d_model
        projection = MLP(hidden_dim, hidden_dim, hidden_dim, 2)
        share_backbone = not backbone_trains(detector)
        detector.contrast_momentum = MomentumDetector(detector, projection, share_backbone)
        detector.contrast_projection = projection
        super().attach(detector)

    def forward(self, detector: nn.Module, samples: NestedTensor, detect: bool) -> DetectorPass:
        """Both detectors on every view; the online outputs (scored by the criterion) gain ``contrast``."""
        result = detector.run(samples)
        result.outputs["contrast"] = {
            "online": detector.contrast_projection(result.decoded.states[-1]),
            **detector.contrast_momentum.keys(samples, result, detector.backbone),
            "images": samples.tensors,
        }
        return result

    def after_optimizer_step(self, detector: nn.Module) -> None:
        detector.contrast_momentum.update(detector, self.momentum)

    def loss(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        """``loss_contrast`` (InfoNCE over the matched queries, see ``info_nce``) and the logged
        ``contrast_accuracy``."""
        if "contrast" not in outputs:
            return {}
        contrast = outputs["contrast"]
        images, views, two_views = view_layout(targets)
        online = self.matcher(outputs, targets)
        momentum = self.matcher({"pred_logits": contrast["momentum_logits"], "pred_boxes": contrast["momentum_boxes"]},
                                targets)
        queries = matched_queries(contrast["online"], online, targets, images, views)
        keys = matched_queries(contrast["momentum"], momentum, targets, images, views)
        positive, candidate = self.key_masks(queries, keys, targets, images, two_views)
        loss, accuracy = info_nce(queries.embeddings, keys.embeddings, positive, candidate, self.temperature)
        return {"loss_contrast": loss, "contrast_accuracy": accuracy}

    def key_masks(self, queries: MatchedQueries, keys: MatchedQueries, targets: list[dict], images: Tensor,
                  two_views: bool) -> tuple[Tensor, Tensor]:
        """(M, K) masks of each query's positives and candidate keys (those of the other view, of
        every image; with one view per image, all)."""
        if two_views:
            candidate = queries.views[:, None] != keys.views[None, :]
        else:
            candidate = torch.ones(len(queries.views), len(keys.views), dtype=torch.bool, device=keys.views.device)
        if self.positive_rule == "proposal":
            related = queries.proposals[:, None] == keys.proposals[None, :]
        else:
            overlaps = proposal_overlaps(targets, images)
            related = overlaps[queries.images[:, None], queries.proposals[:, None], keys.proposals[None, :]] \
                >= self.positive_iou
        return candidate & related & (queries.images[:, None] == keys.images[None, :]), candidate

    def weight_dict(self, scale: float = 1.0) -> dict[str, float]:
        """``loss_contrast`` at ``--box_contrast_loss_coef`` x ``scale``; the class losses of every
        decoder layer (and two-stage proposals) at 0, the classifier being replaced by the contrast."""
        two_stage = getattr(self.args, "two_stage", False)
        no_classes = repeat_for_aux_layers(self.args, {"loss_ce": 0.0}, proposals=two_stage)
        return {**no_classes, "loss_contrast": self.args.box_contrast_loss_coef * scale}

    def describe(self) -> str:
        return (f"box contrast on the --proposals pseudo-boxes ({self.positive_rule} positives, temperature "
                f"{self.temperature:.4g}, momentum {self.momentum:.4g}) with weight "
                f"{self.args.box_contrast_loss_coef:.4g}")

    @torch.no_grad()
    def pictures(self, outputs: dict, targets: list[dict]) -> list[Picture]:
        """The first image's two views side by side: pseudo-boxes (green) and the online predictions
        matched to them (red), numbered by proposal id."""
        if "contrast" not in outputs:
            return []
        slots = [0, len(targets) // 2] if view_layout(targets)[2] else [0]
        boxes = outputs["pred_boxes"][slots]
        indices = self.matcher({"pred_logits": outputs["pred_logits"][slots], "pred_boxes": boxes},
                               [targets[slot] for slot in slots])
        images = outputs["contrast"]["images"]
        views = [draw_view(images[slot], targets[slot], view_boxes, match)
                 for slot, view_boxes, match in zip(slots, boxes, indices)]
        return [("ssl/box_contrast_views", beside(views)[None].float() / 255, 1)]
