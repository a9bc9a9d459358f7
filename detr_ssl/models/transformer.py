"""The DETR encoder-decoder transformer.

Parameter names equal the official DETR ones (``self_attn``, ``multihead_attn``, ``linear1``,
``linear2``, ``norm1``...), so official checkpoints load strictly. Tensors are batch-first
(B, L, C); attention runs through ``nn.MultiheadAttention`` with ``need_weights=False``, which
dispatches to ``scaled_dot_product_attention`` instead of materialising averaged weights (in CPU
training, our subclass computes it with a cheaper dropout).
The encoder and decoder are exposed separately because the SSL tasks use the encoder alone.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import Dropout, seeded_dropout

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}


class MultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` (same parameters and keys) whose attention-weight dropout, in CPU
    training, is :mod:`detr_ssl.ops.seeded_dropout`'s: ``scaled_dot_product_attention`` with dropout
    draws its masks with ``bernoulli_`` (4 % of a DETR-R50 CPU step). Everywhere else, and when the
    attention weights are asked for, it is the parent's forward."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if (need_weights or is_causal or not self.batch_first or not self._qkv_same_embed_dim or self.in_proj_bias is None
                or self.bias_k is not None or self.add_zero_attn
                or not seeded_dropout.applies(query, self.dropout, self.training)):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        return self._attend_with_seeded_dropout(query, key, value, key_padding_mask, attn_mask), None

    def _attend_with_seeded_dropout(self, query: Tensor, key: Tensor, value: Tensor,
                                    key_padding_mask: Tensor | None, attn_mask: Tensor | None) -> Tensor:
        """softmax(q k^T / sqrt(d) + masks), dropped out, times v: the computation of the parent's
        forward, batch-first, with boolean masks (True = not attended) or additive float ones."""
        batch, _, width = query.shape
        heads = self.num_heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)

        def split_heads(x: Tensor) -> Tensor:
            return x.unflatten(-1, (heads, width // heads)).transpose(1, 2)  # (B, heads, L, d)

        if key is query:  # self-attention: one product for both projections
            q, k = F.linear(query, self.in_proj_weight[:2 * width], self.in_proj_bias[:2 * width]).chunk(2, dim=-1)
        else:
            q, k = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k)
        q, k, v = split_heads(q), split_heads(k), split_heads(F.linear(value, w_v, b_v))
        scores = (q * (width // heads) ** -0.5) @ k.transpose(-2, -1)
        if attn_mask is not None:
            mask = attn_mask if attn_mask.dim() == 2 else attn_mask.view(batch, heads, *attn_mask.shape[-2:])
            scores = scores + _additive_mask(mask, scores.dtype)
        if key_padding_mask is not None:
            scores = scores + _additive_mask(key_padding_mask, scores.dtype)[:, None, None, :]
        weights = seeded_dropout.dropout(scores.softmax(-1), self.dropout, self.training)
        attended = (weights @ v).transpose(1, 2).flatten(2)
        return F.linear(attended, self.out_proj.weight, self.out_proj.bias)


def _additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (True = masked) as 0 / -inf, a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def with_pos_embed(tensor: Tensor, pos: Tensor | None) -> Tensor:
    return tensor if pos is None else tensor + pos


def clone_layers(layer: nn.Module, count: int) -> nn.ModuleList:
    return nn.ModuleList(copy.deepcopy(layer) for _ in range(count))


class FeedForwardMixin:
    """The position-wise FFN that every DETR-family layer owns as ``linear1``/``linear2``."""

    def _init_ffn(self, d_model: int, dim_feedforward: int, dropout: float, activation: str) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.activation = ACTIVATIONS[activation]

    def ffn(self, x: Tensor) -> Tensor:
        hidden = self.linear1(x)
        if self.activation is F.relu:  # one pass, and no activation stored for the backward pass
            return self.linear2(seeded_dropout.relu_dropout(hidden, self.dropout.p, self.training))
        return self.linear2(self.dropout(self.activation(hidden)))


class TransformerEncoderLayer(FeedForwardMixin, nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", normalize_before: bool = False):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self._init_ffn(d_model, dim_feedforward, dropout, activation)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.normalize_before = normalize_before

    def _attend(self, x: Tensor, pos: Tensor | None, key_padding_mask: Tensor | None) -> Tensor:
        q = k = with_pos_embed(x, pos)
        return self.self_attn(q, k, value=x, key_padding_mask=key_padding_mask, need_weights=False)[0]

    def forward(self, src: Tensor, key_padding_mask: Tensor | None = None, pos: Tensor | None = None) -> Tensor:
        if self.normalize_before:
            src = src + self.dropout1(self._attend(self.norm1(src), pos, key_padding_mask))
            return src + self.dropout2(self.ffn(self.norm2(src)))
        src = self.norm1(src + self.dropout1(self._attend(src, pos, key_padding_mask)))
        return self.norm2(src + self.dropout2(self.ffn(src)))


class TransformerDecoderLayer(FeedForwardMixin, nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", normalize_before: bool = False):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self._init_ffn(d_model, dim_feedforward, dropout, activation)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.dropout3 = Dropout(dropout)
        self.normalize_before = normalize_before

    def _self_attend(self, tgt: Tensor, query_pos: Tensor | None, attn_mask: Tensor | None) -> Tensor:
        q = k = with_pos_embed(tgt, query_pos)
        return self.self_attn(q, k, value=tgt, attn_mask=attn_mask, need_weights=False)[0]

    def _cross_attend(self, tgt: Tensor, memory: Tensor, query_pos: Tensor | None, pos: Tensor | None,
                      memory_key_padding_mask: Tensor | None) -> Tensor:
        return self.multihead_attn(
            query=with_pos_embed(tgt, query_pos), key=with_pos_embed(memory, pos), value=memory,
            key_padding_mask=memory_key_padding_mask, need_weights=False,
        )[0]

    def forward(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Tensor | None = None,
                pos: Tensor | None = None, query_pos: Tensor | None = None,
                self_attn_mask: Tensor | None = None) -> Tensor:
        if self.normalize_before:
            tgt = tgt + self.dropout1(self._self_attend(self.norm1(tgt), query_pos, self_attn_mask))
            tgt = tgt + self.dropout2(self._cross_attend(self.norm2(tgt), memory, query_pos, pos, memory_key_padding_mask))
            return tgt + self.dropout3(self.ffn(self.norm3(tgt)))
        tgt = self.norm1(tgt + self.dropout1(self._self_attend(tgt, query_pos, self_attn_mask)))
        tgt = self.norm2(tgt + self.dropout2(self._cross_attend(tgt, memory, query_pos, pos, memory_key_padding_mask)))
        return self.norm3(tgt + self.dropout3(self.ffn(tgt)))


class TransformerEncoder(nn.Module):
    def __init__(self, layer: nn.Module, num_layers: int, norm: nn.Module | None = None):
        super().__init__()
        self.layers = clone_layers(layer, num_layers)
        self.norm = norm

    def forward(self, src: Tensor, key_padding_mask: Tensor | None = None, pos: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            src = layer(src, key_padding_mask=key_padding_mask, pos=pos)
        return src if self.norm is None else self.norm(src)


class TransformerDecoder(nn.Module):
    """Returns the normalised output of every layer, stacked: (layers, B, Q, C)."""

    def __init__(self, layer: nn.Module, num_layers: int, norm: nn.Module):
        super().__init__()
        self.layers = clone_layers(layer, num_layers)
        self.norm = norm

    def forward(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Tensor | None = None,
                pos: Tensor | None = None, query_pos: Tensor | None = None,
                self_attn_mask: Tensor | None = None) -> Tensor:
        intermediate = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_key_padding_mask=memory_key_padding_mask, pos=pos, query_pos=query_pos,
                        self_attn_mask=self_attn_mask)
            intermediate.append(self.norm(tgt))
        return torch.stack(intermediate)


class Transformer(nn.Module):
    """DETR's transformer: ``encode`` image tokens, then ``decode`` object queries against them."""

    def __init__(self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", normalize_before: bool = False):
        super().__init__()
        encoder_layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation, normalize_before)
        self.encoder = TransformerEncoder(encoder_layer, num_encoder_layers, nn.LayerNorm(d_model) if normalize_before else None)
        decoder_layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation, normalize_before)
        self.decoder = TransformerDecoder(decoder_layer, num_decoder_layers, nn.LayerNorm(d_model))
        self.d_model = d_model
        self.nhead = nhead
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def encode(self, src: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
        """(B, C, H, W) features, (B, H, W) padding mask, (B, C, H, W) positions -> (B, HW, C) memory."""
        return self.encoder(src.flatten(2).transpose(1, 2), key_padding_mask=mask.flatten(1),
                            pos=pos.flatten(2).transpose(1, 2))

    def decode(self, memory: Tensor, mask: Tensor, pos: Tensor, query_embed: Tensor,
               self_attn_mask: Tensor | None = None) -> Tensor:
        """Decode (Q, C) query embeddings (or (B, Q, C), one set per image) against (B, HW, C)
        memory -> (layers, B, Q, C). ``self_attn_mask`` (Q, Q), True where a query may not look."""
        query_pos = query_embed.expand(memory.shape[0], -1, -1)
        return self.decoder(memory.new_zeros(query_pos.shape), memory, memory_key_padding_mask=mask.flatten(1),
                            pos=pos.flatten(2).transpose(1, 2), query_pos=query_pos, self_attn_mask=self_attn_mask)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        memory = self.encode(src, mask, pos)
        return self.decode(memory, mask, pos, query_embed), memory


def build_transformer(args) -> Transformer:
    return Transformer(
        d_model=args.hidden_dim, nhead=args.nheads, num_encoder_layers=args.enc_layers,
        num_decoder_layers=args.dec_layers, dim_feedforward=args.dim_feedforward, dropout=args.dropout,
        normalize_before=args.pre_norm,
    )
