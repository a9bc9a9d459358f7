"""DETR: a CNN backbone, a transformer and set-prediction heads (Carion et al., 2020)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.misc import NestedTensor
from .ssl_pass import SelfSupervisedMixin
from .transformer import Transformer


class MLP(nn.Module):
    """A stack of linear layers with ReLU in between (the box head); ``layers.N`` as the official code."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def prediction_dict(logits: Tensor, boxes: Tensor, aux_loss: bool) -> dict:
    """Official output dict from per-layer (L, B, Q, *) predictions: last layer + ``aux_outputs``."""
    out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
    if aux_loss:
        out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
    return out


class DETR(SelfSupervisedMixin, nn.Module):
    """Detects objects from the last backbone stage with ``num_queries`` object queries.

    With ``ssl_head`` (a pretext task), the encoder tokens (stride 32) also feed the task.
    """

    def __init__(self, backbone: nn.Module, transformer: Transformer, num_classes: int, num_queries: int,
                 aux_loss: bool = False, ssl_head: nn.Module | None = None, ssl_mode: str = "multitask"):
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
        self.ssl_head = ssl_head
        self.ssl_mode = ssl_mode

    def encode(self, samples: NestedTensor) -> tuple[Tensor, Tensor, Tensor]:
        """Backbone + encoder: (B, HW, C) memory with its (B, H, W) padding mask and (B, C, H, W) positions."""
        features, pos = self.backbone(samples)
        src, mask = features[-1].decompose()
        return self.transformer.encode(self.input_proj(src), mask, pos[-1]), mask, pos[-1]

    def run(self, samples: NestedTensor, decode: bool = True) -> tuple[dict, list[tuple[Tensor, Tensor]]]:
        """Encode, and decode if asked: the official output dict (empty without decoding) and the
        encoder tokens and positions as (B, h, w, C) maps (one level)."""
        memory, mask, pos = self.encode(samples)
        outputs = {}
        if decode:
            hs = self.transformer.decode(memory, mask, pos, self.query_embed.weight)
            outputs = prediction_dict(self.class_embed(hs), self.bbox_embed(hs).sigmoid(), self.aux_loss)
        height, width = mask.shape[-2:]
        return outputs, [(memory.unflatten(1, (height, width)), pos.permute(0, 2, 3, 1))]
