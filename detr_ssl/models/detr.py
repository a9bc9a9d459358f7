"""DETR: a CNN backbone, a transformer and set-prediction heads (Carion et al., 2020)."""
from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from ..utils.misc import NestedTensor
from .heads import MLP, prediction_dict
from .passes import BackboneFeatures, Decoded, DetectorPass, ExtraQueries
from .ssl_pass import SelfSupervisedMixin
from .transformer import Transformer


class DETR(SelfSupervisedMixin, nn.Module):
    """Detects objects from the last backbone stage with ``num_queries`` object queries.

    With ``ssl_head`` (a pretext task), the encoder tokens (stride 32) also feed the task; a
    pre-training method (``ssl_method``, see :mod:`detr_ssl.methods`) drives the whole detector
    through ``run``.
    """

    uses_sigmoid_classes = False

    def __init__(self, backbone: nn.Module, transformer: Transformer, num_classes: int, num_queries: int,
                 aux_loss: bool = False, ssl_head: nn.Module | None = None, ssl_mode: str = "multitask",
                 ssl_backbone_grad: bool = True):
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

    def layer_class_heads(self, num_layers: int) -> list[nn.Module]:
        """The classifier of each decoder layer (one, shared)."""
        return [self.class_embed] * num_layers

    def run(self, samples: NestedTensor, decode: bool = True, extra: ExtraQueries | None = None,
            backbone_grad: bool = True, features: BackboneFeatures | None = None) -> DetectorPass:
        """Backbone (or the given ``features``), encoder, and the decoder if asked: the object queries
        with ``decode``, the ``extra`` queries if given. ``backbone_grad=False`` runs the backbone
        without gradients."""
        features = features or self.backbone(samples, grad=backbone_grad)
        src, mask = features[0][-1].decompose()
        pos = features[1][-1]
        memory = self.transformer.encode(self.input_proj(src), mask, pos)
        outputs, decoded, extra_decoded = {}, None, None
        if decode:
            decoded = self.decode(memory, mask, pos, self.query_embed.weight, None, self.class_embed)
            outputs = prediction_dict(decoded.logits, decoded.boxes, self.aux_loss)
        if extra is not None:
            extra_decoded = self.decode(memory, mask, pos, self.query_embed.weight[extra.order] + extra.offset,
                                        extra.self_attn_mask, extra.classify)
        height, width = mask.shape[-2:]
        levels = [(memory.unflatten(1, (height, width)), pos.permute(0, 2, 3, 1))]
        return DetectorPass(outputs, levels, decoded, extra_decoded, features)

    def decode(self, memory: Tensor, mask: Tensor, pos: Tensor, query_pos: Tensor, self_attn_mask: Tensor | None,
               classify: Callable[[Tensor], Tensor]) -> Decoded:
        """The decoder on ``query_pos``; ``classify`` and the box head on its (L, B, Q, C) states."""
        hs = self.transformer.decode(memory, mask, pos, query_pos, self_attn_mask=self_attn_mask)
        return Decoded(classify(hs), self.bbox_embed(hs).sigmoid(), hs)
