"""DETR: a CNN backbone, a transformer and set-prediction heads (Carion et al., 2020)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..utils.misc import NestedTensor
from .heads import MLP, prediction_dict
from .query_patches import PatchQueries, QueryPatchOptions
from .ssl_pass import SelfSupervisedMixin
from .transformer import Transformer


class DETR(SelfSupervisedMixin, nn.Module):
    """Detects objects from the last backbone stage with ``num_queries`` object queries.

    With ``ssl_head`` (a pretext task), the encoder tokens (stride 32) also feed the task; with
    ``query_patches``, the decoder also learns to find random crops (UP-DETR).
    """

    uses_sigmoid_classes = False

    def __init__(self, backbone: nn.Module, transformer: Transformer, num_classes: int, num_queries: int,
                 aux_loss: bool = False, ssl_head: nn.Module | None = None, ssl_mode: str = "multitask",
                 query_patches: QueryPatchOptions | None = None, ssl_backbone_grad: bool = True):
        super().__init__()
        hidden_dim = transformer.d_model
        self.num_queries = num_queries
        self.transformer = transformer
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels[-1], hidden_dim, kernel_size=1)
        self.backbone = backbone
        self.aux_loss = aux_loss
        self._init_ssl(ssl_head, ssl_mode, ssl_backbone_grad)
        self._init_query_patches(query_patches, backbone.num_channels[-1], hidden_dim)

    def encode(self, samples: NestedTensor, backbone_grad: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """Backbone + encoder: (B, HW, C) memory with its (B, H, W) padding mask and (B, C, H, W) positions."""
        features, pos = self.backbone(samples, grad=backbone_grad)
        src, mask = features[-1].decompose()
        return self.transformer.encode(self.input_proj(src), mask, pos[-1]), mask, pos[-1]

    def run(self, samples: NestedTensor, decode: bool = True, patch_queries: PatchQueries | None = None,
            backbone_grad: bool = True) -> tuple[dict, list[tuple[Tensor, Tensor]]]:
        """Encode, and decode if asked: the official output dict (empty without decoding; with
        ``patch_queries`` also ``patch_outputs``) and the encoder tokens and positions as
        (B, h, w, C) maps (one level). ``backbone_grad=False`` runs the backbone without
        gradients."""
        memory, mask, pos = self.encode(samples, backbone_grad)
        outputs = {}
        if decode:
            hs = self.transformer.decode(memory, mask, pos, self.query_embed.weight)
            outputs = prediction_dict(self.class_embed(hs), self.bbox_embed(hs).sigmoid(), self.aux_loss)
        if patch_queries is not None:
            query_pos = self.query_embed.weight[patch_queries.order] + patch_queries.queries
            hs = self.transformer.decode(memory, mask, pos, query_pos, self_attn_mask=self.patch_attn_mask)
            logits = torch.stack([head(layer) for head, layer in zip(self.patch_class_heads(len(hs)), hs)])
            outputs["patch_outputs"] = self.patch_outputs(logits, self.bbox_embed(hs).sigmoid(), hs, patch_queries)
        height, width = mask.shape[-2:]
        return outputs, [(memory.unflatten(1, (height, width)), pos.permute(0, 2, 3, 1))]
