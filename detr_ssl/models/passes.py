"""What one pass of a detector gives a pre-training method, and what a method may ask of it.

DETR and Deformable DETR both implement ``run(samples, decode, extra, backbone_grad, features)
-> DetectorPass``: a method (:mod:`detr_ssl.methods`) drives the detector through it and never
reaches into either detector's internals, so every method works on both.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..utils.misc import NestedTensor

BackboneFeatures = tuple[list[NestedTensor], list[Tensor]]  # each stage's features, and its position embedding


@dataclass
class ExtraQueries:
    """A second decoding of the same encoder memory with other queries (UP-DETR's query patches).

    offset: (B, Q, C) added to the object queries' positional embeddings.
    order: (Q,) which object query embedding each slot uses.
    self_attn_mask: (Q, Q) bool, True where decoder self-attention is blocked, or None.
    class_heads: the classifier of each decoder layer.
    """

    offset: Tensor
    order: Tensor
    self_attn_mask: Tensor | None
    class_heads: list[nn.Module]

    def classify(self, states: Tensor) -> Tensor:
        """(L, B, Q, C) decoder states -> (L, B, Q, K) logits, each layer by its own head."""
        return torch.stack([head(layer) for head, layer in zip(self.class_heads, states)])


@dataclass
class Decoded:
    """Per decoder layer: (L, B, Q, K) logits, (L, B, Q, 4) normalised cxcywh boxes, (L, B, Q, C) states."""

    logits: Tensor
    boxes: Tensor
    states: Tensor


@dataclass
class DetectorPass:
    """One forward through a detector.

    outputs: the official output dict (empty without decoding the object queries).
    levels: each encoder level's tokens and positions as (B, h, w, C) maps, finest first.
    decoded: the object queries' per-layer predictions and decoder states (None without decoding).
    extra: the predictions of ``ExtraQueries`` (None without them).
    features: the backbone's features and positions, for a second pass that shares them.
    """

    outputs: dict
    levels: list[tuple[Tensor, Tensor]]
    decoded: Decoded | None
    extra: Decoded | None
    features: BackboneFeatures
