"""``--ssl_levels``: the pretext task on every encoder level, not only the one the paper used.

The task corrupts and scores as usual on its own level (the finest, stride 8, for Deformable
DETR). Each other level's tokens own larger patches (16, 32, 64 px), which do not line up
with the task's patches, so there they predict the original pixels of their own patch, scored
with L1 on the pixels the task changed (all real pixels for reconstruction). The levels'
losses are averaged with the task's.
"""
from __future__ import annotations

from torch import Tensor, nn

from detr_ssl.ssl.patches import patchify, pixel_mask


class LevelHeads(nn.Module):
    """One linear pixel head per extra level (strides ``strides``)."""

    def __init__(self, hidden_dim: int, strides: list[int]):
        super().__init__()
        self.strides = list(strides)
        self.heads = nn.ModuleList(nn.Linear(hidden_dim, stride * stride * 3) for stride in self.strides)

    def forward(self, tokens: list[Tensor]) -> list[Tensor]:
        """(B, h_l, w_l, C) tokens of each extra level -> (B, h_l, w_l, s_l * s_l * 3) pixels."""
        return [head(level) for head, level in zip(self.heads, tokens)]

    def loss(self, predictions: list[Tensor], images: Tensor, valid: Tensor, changed: Tensor) -> Tensor:
        """Mean over levels of the L1 error on the real pixels in ``changed`` (B, H, W)."""
        total = images.new_zeros(())
        for stride, prediction in zip(self.strides, predictions):
            weight = pixel_mask(valid & changed, stride)
            error = (prediction.float() - patchify(images, stride).float()).abs() * weight
            total = total + error.sum() / weight.sum().clamp(min=1)
        return total / max(len(predictions), 1)
