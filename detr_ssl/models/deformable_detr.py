"""Deformable DETR (Zhu et al., 2021): multi-scale features, deformable attention, sigmoid classes.

Options as the official code: iterative box refinement (each decoder layer refines the
previous layer's boxes with its own heads) and two-stage (encoder tokens propose the
decoder's reference boxes). Without refinement, one class head and one box head are shared
by every decoder layer: the state dict lists them once per layer, as aliases of one tensor.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.box_ops import inverse_sigmoid
from ..utils.misc import NestedTensor
from .deformable_transformer import DeformableTransformer
from .heads import MLP, prediction_dict
from .passes import BackboneFeatures, Decoded, DetectorPass, ExtraQueries
from .ssl_pass import SelfSupervisedMixin

PRIOR_PROBABILITY = 0.01  # initial sigmoid score of every class, so the focal loss starts stable


def input_projections(in_channels: list[int], hidden_dim: int, num_levels: int) -> nn.ModuleList:
    """1x1 conv + GroupNorm(32) per backbone level, then stride-2 3x3 convs for the extra levels."""
    projections = [nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim))
                   for c in in_channels]
    channels = in_channels[-1]
    for _ in range(num_levels - len(in_channels)):
        projections.append(nn.Sequential(nn.Conv2d(channels, hidden_dim, kernel_size=3, stride=2, padding=1),
                                         nn.GroupNorm(32, hidden_dim)))
        channels = hidden_dim
    for projection in projections:
        nn.init.xavier_uniform_(projection[0].weight, gain=1)
        nn.init.constant_(projection[0].bias, 0)
    return nn.ModuleList(projections)


def level_strides(backbone_strides: list[int], num_levels: int) -> list[int]:
    """Strides of the feature levels: the backbone's, then each extra level halves the last."""
    strides = list(backbone_strides[:num_levels])
    while len(strides) < num_levels:
        strides.append(strides[-1] * 2)
    return strides


class DeformableDETR(SelfSupervisedMixin, nn.Module):
    """Detects objects from ``num_feature_levels`` feature levels with ``num_queries`` queries.

    With ``ssl_head`` (a pretext task), the encoder tokens of the highest-resolution level
    (stride 8) also feed the task; a pre-training method (``ssl_method``, see
    :mod:`detr_ssl.methods`) drives the whole detector through ``run``. Extra queries (UP-DETR's
    patches, which the official code has for DETR only) join the queries' positional half, from
    which the reference points are predicted.
    """

    uses_sigmoid_classes = True

    def __init__(self, backbone: nn.Module, transformer: DeformableTransformer, num_classes: int, num_queries: int,
                 num_feature_levels: int, aux_loss: bool = True, with_box_refine: bool = False,
                 two_stage: bool = False, ssl_head: nn.Module | None = None, ssl_mode: str = "multitask",
                 ssl_backbone_grad: bool = True):
        super().__init__()
        if two_stage and not with_box_refine:
            raise ValueError("two-stage Deformable DETR needs box refinement (--with_box_refine), as the official one")
        hidden_dim = transformer.d_model
        self.num_queries = num_queries
        self.num_feature_levels = num_feature_levels
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage
        self.transformer = transformer
        class_embed = nn.Linear(hidden_dim, num_classes)
        nn.init.constant_(class_embed.bias, -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        nn.init.constant_(bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0)
        nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)  # initial boxes about 0.12 wide and high
        num_predictions = transformer.decoder.num_layers + (1 if two_stage else 0)
        if with_box_refine:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_predictions))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_predictions))
            for head in self.bbox_embed[1:]:  # later layers refine: their heads start at a zero delta
                nn.init.constant_(head.layers[-1].bias[2:], 0.0)
            self.transformer.decoder.bbox_embed = self.bbox_embed
        else:
            self.class_embed = nn.ModuleList(class_embed for _ in range(num_predictions))
            self.bbox_embed = nn.ModuleList(bbox_embed for _ in range(num_predictions))
        if two_stage:
            self.transformer.decoder.class_embed = self.class_embed
            for head in self.bbox_embed:
                nn.init.constant_(head.layers[-1].bias[2:], 0.0)
        else:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)
        self.input_proj = input_projections(backbone.num_channels, hidden_dim, num_feature_levels)
        self.level_strides = level_strides(backbone.strides, num_feature_levels)
        self.backbone = backbone
        self._init_ssl(ssl_head, ssl_mode, ssl_backbone_grad)

    def multiscale_features(self, samples: NestedTensor, features: BackboneFeatures | None = None
                            ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Projected features, padding masks and positions of every level, extra levels included,
        from the backbone's ``features`` of ``samples`` (computed here when not given)."""
        features, positions = features or self.backbone(samples)
        srcs = [projection(feature.tensors) for projection, feature in zip(self.input_proj, features)]
        masks = [feature.mask for feature in features]
        positions = list(positions)
        for level in range(len(features), self.num_feature_levels):
            source = features[-1].tensors if level == len(features) else srcs[-1]
            src = self.input_proj[level](source)
            mask = F.interpolate(samples.mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
            srcs.append(src)
            masks.append(mask)
            positions.append(self.backbone[1](NestedTensor(src, mask)).to(src.dtype))
        return srcs, masks, positions

    def layer_class_heads(self, num_layers: int) -> list[nn.Module]:
        """The classifier of each decoder layer."""
        return list(self.class_embed)[:num_layers]

    def run(self, samples: NestedTensor, decode: bool = True, extra: ExtraQueries | None = None,
            backbone_grad: bool = True, features: BackboneFeatures | None = None) -> DetectorPass:
        """Backbone (or the given ``features``), encoder, and the decoder if asked: the object queries
        with ``decode``, the ``extra`` queries if given. Levels come finest first, positions with
        the level embedding. ``backbone_grad=False`` runs the backbone without gradients."""
        features = features or self.backbone(samples, grad=backbone_grad)
        memory, flat = self.transformer.encode(*self.multiscale_features(samples, features))
        levels = []
        for (height, width), start in zip(flat["spatial_shapes"].tolist(), flat["level_start_index"].tolist()):
            tokens = slice(start, start + height * width)
            levels.append((memory[:, tokens].unflatten(1, (height, width)),
                           flat["pos"][:, tokens].unflatten(1, (height, width))))
        outputs, decoded, extra_decoded = {}, None, None
        if decode:
            query_embed = None if self.two_stage else self.query_embed.weight
            decoded, proposals = self.decode(memory, flat, query_embed, None, None, self.class_embed)
            outputs = prediction_dict(decoded.logits, decoded.boxes, self.aux_loss)
            if self.two_stage:
                outputs["enc_outputs"] = proposals
        if extra is not None:
            query_embed = None if self.two_stage else self.query_embed.weight[extra.order]
            extra_decoded = self.decode(memory, flat, query_embed, extra.offset, extra.self_attn_mask,
                                        extra.class_heads)[0]
        return DetectorPass(outputs, levels, decoded, extra_decoded, features)

    def decode(self, memory: Tensor, flat: dict, query_embed: Tensor | None, query_pos_offset: Tensor | None,
               self_attn_mask: Tensor | None, class_heads: list[nn.Module]) -> tuple[Decoded, dict | None]:
        """Decode the queries and apply the per-layer heads; for two-stage also the encoder's proposals
        in the official ``enc_outputs`` layout."""
        decoded = self.transformer.decode(memory, flat, query_embed, query_pos_offset=query_pos_offset,
                                          self_attn_mask=self_attn_mask)
        logits, boxes = self.layer_predictions(decoded, class_heads)
        proposals = None
        if self.two_stage:
            proposals = {"pred_logits": decoded["enc_class"], "pred_boxes": decoded["enc_coord_unact"].sigmoid()}
        return Decoded(logits, boxes, decoded["hs"]), proposals

    def layer_predictions(self, decoded: dict, class_heads: list[nn.Module]) -> tuple[Tensor, Tensor]:
        """(L, B, Q, classes) logits and (L, B, Q, 4) boxes of every decoder layer."""
        hs = decoded["hs"]
        # layer l predicts relative to the references it read: the initial ones, then layer l-1's
        # (with refinement these become boxes, so the two cannot be stacked)
        references = [decoded["init_reference"], *decoded["inter_references"][:-1]]
        logits, boxes = [], []
        for layer in range(hs.shape[0]):
            delta = self.bbox_embed[layer](hs[layer])
            reference = inverse_sigmoid(references[layer])
            if reference.shape[-1] == 4:
                delta = delta + reference
            else:
                delta = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            logits.append(class_heads[layer](hs[layer]))
            boxes.append(delta.sigmoid())
        return torch.stack(logits), torch.stack(boxes)
