"""UP-DETR random query patch detection inside a detector, shared by DETR and Deformable DETR.

Each image gives ``num_patches`` random crops (:mod:`detr_ssl.ssl.updetr`). They pass the
backbone, are average-pooled and projected to the query width (``patch2query``), repeated so
that every crop feeds one group of ``num_queries // num_patches`` consecutive queries, and added
to the object queries' positional embeddings (``--query_shuffle`` draws which object query
serves which slot). Decoder self-attention is masked between groups. The decoded queries
predict object / no-object and a box, matched against the crop boxes; with
``--feature_recon`` they also reconstruct the crop's pooled feature (``feature_align``).

Parameter names are the official UP-DETR ones, so its checkpoints load strictly. In
pre-training the detector's own class head is the object / no-object head (2 classes, as the
official model); next to detection (multi-task) a separate ``patch_class_embed`` is.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..ssl.updetr import (PATCH_DROP_RATIO, PATCH_NUM_CLASSES, augment_patches, crop_patches, crop_targets,
                          group_attention_mask, sample_crop_boxes, valid_sizes)
from ..utils.misc import NestedTensor
from .heads import MLP, prediction_dict


@dataclass(frozen=True)
class QueryPatchOptions:
    """``--num_patches``, ``--feature_recon``, ``--query_shuffle``; ``own_class_head`` in multi-task."""

    num_patches: int = 10
    feature_recon: bool = False
    query_shuffle: bool = False
    own_class_head: bool = False


@dataclass
class PatchQueries:
    """One batch's query patches, ready for the decoder.

    queries: (B, Q, C) patch features per query slot, to add to the positional query embeddings.
    order: (Q,) which object query embedding each slot uses (a permutation with --query_shuffle).
    features: (B * M, C_backbone) the crops' pooled backbone features (feature-reconstruction targets).
    targets: per image, the crop boxes (normalised cxcywh) with label PATCH_LABEL.
    patches: (B * M, 3, S, S) the crops as fed to the backbone (for TensorBoard).
    sizes: (B, 2) the valid (height, width) of each image.
    images: (B, 3, H, W) the images the crops come from (for TensorBoard).
    """

    queries: Tensor
    order: Tensor
    features: Tensor
    targets: list[dict[str, Tensor]]
    patches: Tensor
    sizes: Tensor
    images: Tensor


class QueryPatchMixin:
    """Adds UP-DETR's query-patch heads and pass to a detector with ``backbone``, ``num_queries``,
    ``class_embed`` and ``bbox_embed``. ``query_patches`` is None when the detector has none."""

    query_patches: QueryPatchOptions | None
    uses_sigmoid_classes: bool  # focal-loss classes (Deformable DETR) rather than softmax + no-object (DETR)

    def _init_query_patches(self, options: QueryPatchOptions | None, backbone_channels: int, hidden_dim: int) -> None:
        self.query_patches = options
        if options is None:
            return
        if options.num_patches < 1 or self.num_queries % options.num_patches:
            raise ValueError(f"--num_queries ({self.num_queries}) must be a multiple of --num_patches "
                             f"({options.num_patches}): every crop gets an equal group of queries")
        self.patch2query = nn.Linear(backbone_channels, hidden_dim)
        if options.feature_recon:
            self.feature_align = MLP(hidden_dim, hidden_dim, backbone_channels, 2)
        if options.own_class_head:
            self.patch_class_embed = nn.Linear(hidden_dim, PATCH_NUM_CLASSES + (0 if self.uses_sigmoid_classes else 1))
        self.register_buffer("patch_attn_mask", group_attention_mask(self.num_queries, options.num_patches),
                             persistent=False)

    def crop_features(self, patches: Tensor) -> Tensor:
        """(N, 3, S, S) crops -> (N, C) average-pooled last-stage backbone features. A frozen
        backbone runs without autograd (the crops need no gradient)."""
        body = self.backbone[0].body
        trainable = any(p.requires_grad for p in body.parameters())
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            return list(body(patches).values())[-1].mean((2, 3))

    def make_patch_queries(self, samples: NestedTensor) -> PatchQueries:
        """Draw the crops of every image and turn them into query-slot features."""
        options = self.query_patches
        batch, num_patches = samples.tensors.shape[0], options.num_patches
        sizes = valid_sizes(samples.mask)
        boxes = sample_crop_boxes(sizes, num_patches)
        patches = crop_patches(samples.tensors, boxes)
        if self.training:
            patches = augment_patches(patches)
        features = self.crop_features(patches)
        queries = (self.patch2query(features).view(batch, num_patches, -1)
                   .repeat_interleave(self.num_queries // num_patches, dim=1))
        if self.training:  # drop some slots' patch, as dropout (official mask_ratio)
            keep = torch.rand(batch, self.num_queries, 1, device=queries.device) > PATCH_DROP_RATIO
            queries = queries * keep.to(queries.dtype)
        shuffle = options.query_shuffle and self.training
        order = (torch.randperm(self.num_queries) if shuffle else torch.arange(self.num_queries)).to(queries.device)
        return PatchQueries(queries, order, features, crop_targets(boxes, sizes), patches, sizes, samples.tensors)

    def patch_class_heads(self, num_layers: int) -> list[nn.Module]:
        """The object / no-object head of each decoder layer."""
        if self.query_patches.own_class_head:
            return [self.patch_class_embed] * num_layers
        heads = self.class_embed
        return list(heads) if isinstance(heads, nn.ModuleList) else [heads] * num_layers

    def patch_outputs(self, logits: Tensor, boxes: Tensor, hs: Tensor, patch_queries: PatchQueries) -> dict:
        """The official UP-DETR output dict from per-layer (L, B, Q, *) predictions and decoder
        states, plus the crops' ``targets`` and what TensorBoard draws."""
        out = prediction_dict(logits, boxes, self.aux_loss)
        if self.query_patches.feature_recon:
            features = self.feature_align(hs)
            layers = [*out.get("aux_outputs", []), out]
            for layer, feature in zip(layers, features[len(features) - len(layers):]):
                layer.update(pred_feature=feature, gt_feature=patch_queries.features)
        scores = logits[-1].sigmoid() if self.uses_sigmoid_classes else logits[-1].softmax(-1)
        out.update(targets=patch_queries.targets, patches=patch_queries.patches, sizes=patch_queries.sizes,
                   images=patch_queries.images, object_scores=scores[..., 1].detach())
        return out
