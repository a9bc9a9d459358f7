"""Position encodings for image features: sine (fixed) and learned, as in DETR."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..utils.misc import NestedTensor


class PositionEmbeddingSine(nn.Module):
    """The 'Attention is all you need' sine encoding, generalised to 2-D images.

    With ``normalize`` the cumulative coordinates are divided by the valid (unpadded) extent,
    so an image's encoding does not depend on how much padding its batch added.
    """

    def __init__(self, num_pos_feats: int = 64, temperature: int = 10000, normalize: bool = False,
                 scale: float | None = None, offset: float = 0.0):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("scale requires normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self.offset = offset

    def forward(self, features: NestedTensor) -> Tensor:
        not_mask = ~features.mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=not_mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)

        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute row/column embeddings (feature maps up to 50x50, as the official code)."""

    def __init__(self, num_pos_feats: int = 256, max_size: int = 50):
        super().__init__()
        self.row_embed = nn.Embedding(max_size, num_pos_feats)
        self.col_embed = nn.Embedding(max_size, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, features: NestedTensor) -> Tensor:
        x = features.tensors
        h, w = x.shape[-2:]
        limit = self.row_embed.num_embeddings
        if h > limit or w > limit:
            raise ValueError(
                f"learned position embedding covers feature maps up to {limit}x{limit}, got {h}x{w}; "
                "use --position_embedding sine or smaller images (--max_size)"
            )
        x_emb = self.col_embed(torch.arange(w, device=x.device))
        y_emb = self.row_embed(torch.arange(h, device=x.device))
        pos = torch.cat([x_emb.unsqueeze(0).repeat(h, 1, 1), y_emb.unsqueeze(1).repeat(1, w, 1)], dim=-1)
        return pos.permute(2, 0, 1).unsqueeze(0).repeat(x.shape[0], 1, 1, 1)


def build_position_encoding(args) -> nn.Module:
    """``--position_embedding sine|learned`` with half the width per axis.

    Deformable DETR's sine encoding measures pixel centres (offset -0.5), DETR's pixel ends.
    """
    steps = args.hidden_dim // 2
    if args.position_embedding == "sine":
        return PositionEmbeddingSine(steps, normalize=True, offset=-0.5 if args.model == "deformable_detr" else 0.0)
    if args.position_embedding == "learned":
        return PositionEmbeddingLearned(steps)
    raise ValueError(f"--position_embedding: unknown value {args.position_embedding!r} (sine, learned)")
