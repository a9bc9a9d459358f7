"""The Deformable DETR transformer (Zhu et al., 2021): multi-scale deformable attention.

Each query attends to a few sampling points per head and level around its reference point
instead of to every token, so the encoder can read four feature levels (strides 8-64).
Parameter names equal the official ones (``sampling_offsets``, ``attention_weights``,
``value_proj``, ``output_proj``, ``level_embed``...), so official checkpoints load strictly.
Tensors are batch-first (B, L, C). The sampling itself is :func:`detr_ssl.ops.ms_deform_attn`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import Dropout, ms_deform_attn
from ..utils.box_ops import inverse_sigmoid
from ..utils.misc import is_tracing
from .transformer import FeedForwardMixin, MultiheadAttention, clone_layers, with_pos_embed


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention: ``n_points`` learned samples per head and level.

    Reference points are (x, y) in [0, 1] per level, or (cx, cy, w, h) boxes whose size scales
    the offsets (box refinement and two-stage).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: head h starts sampling along direction 2*pi*h/heads,
        point k at distance k+1, with uniform attention weights."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        for projection in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(projection.weight)
            nn.init.constant_(projection.bias, 0.0)

    def forward(self, query: Tensor, reference_points: Tensor, value_input: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """query (B, Q, C), reference_points (B, Q, levels, 2 or 4), value_input (B, S, C) -> (B, Q, C)."""
        batch, num_queries, _ = query.shape
        value = self.value_proj(value_input)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(batch, value_input.shape[1], self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(batch, num_queries, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(batch, num_queries, self.n_heads, self.n_levels * self.n_points)
        weights = F.softmax(weights, -1).view(batch, num_queries, self.n_heads, self.n_levels, self.n_points)
        locations = sampling_locations(reference_points, offsets, spatial_shapes)
        output = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(output)


def sampling_locations(reference_points: Tensor, offsets: Tensor, spatial_shapes: Tensor) -> Tensor:
    """Where each head samples each level: (B, Q, heads, levels, points, 2) in [0, 1] image coordinates.

    Offsets are in pixels of their level around (x, y) reference points, or in units of half the box
    over ``points`` around the centre of (cx, cy, w, h) reference boxes (box refinement, two-stage).
    One ``addcmul`` over operands whose innermost (levels, points, 2) block is contiguous in all three:
    broadcasting the references and scales over the points instead made this 5-10x slower on a CPU
    (2 % of a Deformable DETR training step).
    """
    points = offsets.shape[-2]
    if reference_points.shape[-1] == 2:
        origin = reference_points
        scale = _per_point(1.0 / spatial_shapes.flip(-1).to(reference_points.dtype), points)  # (1/W, 1/H)
    elif reference_points.shape[-1] == 4:
        origin = reference_points[..., :2]
        scale = _per_point(reference_points[..., 2:] * (0.5 / points), points).unsqueeze(2)
    else:
        raise ValueError(f"reference_points must end in 2 or 4 coordinates, got {reference_points.shape[-1]}")
    return torch.addcmul(_per_point(origin, points).unsqueeze(2), offsets, scale)


def _per_point(pairs: Tensor, points: int) -> Tensor:
    """(..., levels, 2) -> (..., levels, points, 2), contiguous."""
    return pairs.unsqueeze(-2).expand(*pairs.shape[:-1], points, 2).contiguous()


class DeformableEncoderLayer(FeedForwardMixin, nn.Module):
    """Post-norm layer: deformable self-attention over all levels, then the FFN."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, activation: str = "relu",
                 n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self._init_ffn(d_model, d_ffn, dropout, activation)
        self.dropout2 = Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        attended = self.self_attn(with_pos_embed(src, pos), reference_points, src, spatial_shapes, level_start_index,
                                  padding_mask)
        src = self.norm1(src + self.dropout1(attended))
        return self.norm2(src + self.dropout2(self.ffn(src)))


class DeformableDecoderLayer(FeedForwardMixin, nn.Module):
    """Post-norm layer: query self-attention, deformable cross-attention into the memory, FFN."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, activation: str = "relu",
                 n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self._init_ffn(d_model, d_ffn, dropout, activation)
        self.dropout3 = Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor, padding_mask: Tensor | None = None,
                self_attn_mask: Tensor | None = None) -> Tensor:
        q = k = with_pos_embed(tgt, query_pos)
        attended = self.self_attn(q, k, value=tgt, attn_mask=self_attn_mask, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attended))
        attended = self.cross_attn(with_pos_embed(tgt, query_pos), reference_points, memory, spatial_shapes,
                                   level_start_index, padding_mask)
        tgt = self.norm1(tgt + self.dropout1(attended))
        return self.norm3(tgt + self.dropout3(self.ffn(tgt)))


def padding_or_none(mask: Tensor | None) -> Tensor | None:
    """The (B, S) padding mask, or None where no token is padded: zeroing the padded values then
    changes nothing, but costs a copy of every layer's values (1.5 % of a CPU training step)."""
    if mask is None or is_tracing() or mask.any():
        return mask
    return None


def encoder_reference_points(spatial_shapes: Tensor, valid_ratios: Tensor) -> Tensor:
    """Pixel centres of every level, normalised by the valid extent: (B, S, levels, 2)."""
    points = []
    for level, (height, width) in enumerate(spatial_shapes.tolist()):
        ref_y, ref_x = torch.meshgrid(
            torch.linspace(0.5, height - 0.5, height, dtype=torch.float32, device=valid_ratios.device),
            torch.linspace(0.5, width - 0.5, width, dtype=torch.float32, device=valid_ratios.device),
            indexing="ij",
        )
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
        points.append(torch.stack((ref_x, ref_y), -1))
    return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]


class DeformableEncoder(nn.Module):
    def __init__(self, layer: nn.Module, num_layers: int):
        super().__init__()
        self.layers = clone_layers(layer, num_layers)

    def forward(self, src: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, valid_ratios: Tensor,
                pos: Tensor, padding_mask: Tensor) -> Tensor:
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios).to(src.dtype)
        padding_mask = padding_or_none(padding_mask)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return src


class DeformableDecoder(nn.Module):
    """Returns every layer's output and reference points, stacked: (layers, B, Q, C), (layers, B, Q, 2|4).

    With box refinement, ``bbox_embed`` (the detector's per-layer box heads, set by it) moves
    each layer's reference boxes; two-stage also sets ``class_embed`` for the proposals.
    """

    def __init__(self, layer: nn.Module, num_layers: int):
        super().__init__()
        self.layers = clone_layers(layer, num_layers)
        self.num_layers = num_layers
        self.bbox_embed: nn.ModuleList | None = None
        self.class_embed: nn.ModuleList | None = None

    def forward(self, tgt: Tensor, reference_points: Tensor, memory: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, valid_ratios: Tensor, query_pos: Tensor,
                padding_mask: Tensor, self_attn_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        outputs, references = [], []
        padding_mask = padding_or_none(padding_mask)
        for index, layer in enumerate(self.layers):
            ratios = valid_ratios if reference_points.shape[-1] == 2 else torch.cat([valid_ratios, valid_ratios], -1)
            tgt = layer(tgt, query_pos, reference_points[:, :, None] * ratios[:, None], memory, spatial_shapes,
                        level_start_index, padding_mask, self_attn_mask)
            if self.bbox_embed is not None:
                delta = self.bbox_embed[index](tgt)
                if reference_points.shape[-1] == 4:
                    refined = delta + inverse_sigmoid(reference_points)
                else:
                    refined = torch.cat([delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1)
                reference_points = refined.sigmoid().detach()
            outputs.append(tgt)
            references.append(reference_points)
        return torch.stack(outputs), torch.stack(references)


def valid_ratio(mask: Tensor) -> Tensor:
    """(B, H, W) padding mask -> (B, 2): the unpadded fraction of the width and of the height."""
    _, height, width = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1)
    valid_w = (~mask[:, 0, :]).sum(1)
    return torch.stack([valid_w.float() / width, valid_h.float() / height], -1)


def proposal_pos_embed(proposals: Tensor, num_pos_feats: int, temperature: int = 10000) -> Tensor:
    """Sine embedding of (B, K, 4) unnormalised proposal boxes -> (B, K, 4 * num_pos_feats)."""
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    pos = proposals.sigmoid()[:, :, :, None] * (2 * math.pi) / dim_t
    return torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)


class DeformableTransformer(nn.Module):
    """Flattens the feature levels, encodes them, and decodes queries from reference points.

    Without two-stage, the ``(Q, 2C)`` query embedding splits into positions and contents and a
    linear ``reference_points`` layer places each query. With two-stage, every encoder token
    proposes a box; the ``num_queries`` best become the decoder's reference boxes and queries.
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 1024, dropout: float = 0.1,
                 activation: str = "relu", num_feature_levels: int = 4, dec_n_points: int = 4,
                 enc_n_points: int = 4, two_stage: bool = False, two_stage_num_proposals: int = 300):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        encoder_layer = DeformableEncoderLayer(d_model, dim_feedforward, dropout, activation, num_feature_levels,
                                               nhead, enc_n_points)
        self.encoder = DeformableEncoder(encoder_layer, num_encoder_layers)
        decoder_layer = DeformableDecoderLayer(d_model, dim_feedforward, dropout, activation, num_feature_levels,
                                               nhead, dec_n_points)
        self.decoder = DeformableDecoder(decoder_layer, num_decoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    def flatten_levels(self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor]) -> dict[str, Tensor]:
        """Concatenate the levels' tokens; positions get their level's embedding added."""
        spatial_shapes = torch.as_tensor([src.shape[-2:] for src in srcs], dtype=torch.long, device=srcs[0].device)
        return {
            "src": torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1),
            "mask": torch.cat([mask.flatten(1) for mask in masks], 1),
            "pos": torch.cat([pos.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1)
                              for level, pos in enumerate(pos_embeds)], 1),
            "spatial_shapes": spatial_shapes,
            "level_start_index": torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1])),
            "valid_ratios": torch.stack([valid_ratio(mask) for mask in masks], 1),
        }

    def encode(self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor]) -> tuple[Tensor, dict]:
        """Per-level (B, C, H, W) features, masks and positions -> (B, S, C) memory and the flat layout."""
        flat = self.flatten_levels(srcs, masks, pos_embeds)
        memory = self.encoder(flat["src"], flat["spatial_shapes"], flat["level_start_index"], flat["valid_ratios"],
                              flat["pos"], flat["mask"])
        return memory, flat

    def encoder_proposals(self, memory: Tensor, mask: Tensor, spatial_shapes: Tensor) -> tuple[Tensor, Tensor]:
        """Two-stage: one box per valid token (its cell, 0.05 x 2^level wide) in logit space, inf where
        invalid, and the memory projected for the proposal heads."""
        batch = memory.shape[0]
        proposals, start = [], 0
        for level, (height, width) in enumerate(spatial_shapes.tolist()):
            level_mask = mask[:, start:start + height * width].view(batch, height, width)
            valid_h = (~level_mask[:, :, 0]).sum(1)
            valid_w = (~level_mask[:, 0, :]).sum(1)
            grid_y, grid_x = torch.meshgrid(
                torch.linspace(0, height - 1, height, dtype=torch.float32, device=memory.device),
                torch.linspace(0, width - 1, width, dtype=torch.float32, device=memory.device),
                indexing="ij",
            )
            grid = torch.stack([grid_x, grid_y], -1)
            scale = torch.stack([valid_w, valid_h], 1).view(batch, 1, 1, 2)
            grid = (grid.unsqueeze(0).expand(batch, -1, -1, -1) + 0.5) / scale
            size = torch.ones_like(grid) * 0.05 * (2.0 ** level)
            proposals.append(torch.cat((grid, size), -1).view(batch, -1, 4))
            start += height * width
        proposals = torch.cat(proposals, 1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        proposals = proposals.masked_fill(mask.unsqueeze(-1), float("inf")).masked_fill(~valid, float("inf"))
        output_memory = memory.masked_fill(mask.unsqueeze(-1), 0.0).masked_fill(~valid, 0.0)
        return self.enc_output_norm(self.enc_output(output_memory)), proposals

    def decode(self, memory: Tensor, flat: dict, query_embed: Tensor | None, query_pos_offset: Tensor | None = None,
               self_attn_mask: Tensor | None = None) -> dict[str, Tensor]:
        """Decode queries against the memory: ``hs`` (layers, B, Q, C), the initial and per-layer
        references, and for two-stage the encoder's proposal logits and boxes (logit space).

        ``query_pos_offset`` (B, Q, C) is added to the queries' positional half (UP-DETR patch
        features; before the reference points are predicted from it, so a query can look where its
        patch is); ``self_attn_mask`` (Q, Q) is True where a query may not look at another.
        """
        batch, _, channels = memory.shape
        out: dict[str, Tensor] = {}
        if self.two_stage:
            if memory.shape[1] < self.two_stage_num_proposals:
                raise ValueError(f"two-stage Deformable DETR picks {self.two_stage_num_proposals} proposals from the "
                                 f"encoder tokens, but the images of this batch give only {memory.shape[1]}: use "
                                 "larger images (--min_size) or fewer --num_queries")
            output_memory, proposals = self.encoder_proposals(memory, flat["mask"], flat["spatial_shapes"])
            layer = self.decoder.num_layers
            out["enc_class"] = self.decoder.class_embed[layer](output_memory)
            out["enc_coord_unact"] = self.decoder.bbox_embed[layer](output_memory) + proposals
            topk = torch.topk(out["enc_class"][..., 0], self.two_stage_num_proposals, dim=1)[1]
            topk_coords = torch.gather(out["enc_coord_unact"], 1, topk.unsqueeze(-1).repeat(1, 1, 4)).detach()
            reference_points = topk_coords.sigmoid()
            query_pos, tgt = torch.split(self.pos_trans_norm(self.pos_trans(proposal_pos_embed(topk_coords, channels // 2))),
                                         channels, dim=2)
            query_pos = with_pos_embed(query_pos, query_pos_offset)
        else:
            query_pos, tgt = torch.split(query_embed, channels, dim=1)
            query_pos = with_pos_embed(query_pos.unsqueeze(0).expand(batch, -1, -1), query_pos_offset)
            tgt = tgt.unsqueeze(0).expand(batch, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()
        out["hs"], out["inter_references"] = self.decoder(
            tgt, reference_points, memory, flat["spatial_shapes"], flat["level_start_index"], flat["valid_ratios"],
            query_pos, flat["mask"], self_attn_mask)
        out["init_reference"] = reference_points
        return out


def build_deformable_transformer(args) -> DeformableTransformer:
    return DeformableTransformer(
        d_model=args.hidden_dim, nhead=args.nheads, num_encoder_layers=args.enc_layers,
        num_decoder_layers=args.dec_layers, dim_feedforward=args.dim_feedforward, dropout=args.dropout,
        num_feature_levels=args.num_feature_levels, dec_n_points=args.dec_n_points, enc_n_points=args.enc_n_points,
        two_stage=args.two_stage, two_stage_num_proposals=args.num_queries,
    )
