"""Reconstruction: the encoder sees the clean image and its tokens must give the pixels back."""
from __future__ import annotations

import torch
from torch import Tensor

from detr_ssl.ssl.base import ContinuousTask, SSLTargets
from detr_ssl.ssl.patches import patchify, pixel_mask, token_masks


class Reconstruction(ContinuousTask):
    """L1 between predicted and original pixels of every real pixel.

    The input is not corrupted, so in multitask mode the clean pass that serves detection
    serves this task too; ``ratio`` plays no part.
    """

    name = "reconstruction"
    corrupts_input = False

    @torch.no_grad()
    def corrupt(self, images: Tensor, valid: Tensor,
                generator: torch.Generator | None = None) -> tuple[Tensor, SSLTargets]:
        token_valid, _ = token_masks(valid, self.patch_size)
        targets = SSLTargets(target=patchify(images, self.patch_size), loss_mask=token_valid,
                             pixel_valid=pixel_mask(valid, self.patch_size), token_valid=token_valid)
        return images, targets
