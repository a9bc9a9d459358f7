"""Masked image modelling: hide a fraction of the patches and recover them from the context."""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from detr_ssl.utils.image import IMAGENET_MEAN, IMAGENET_STD
from detr_ssl.ssl.base import ContinuousTask, PretextTask, SSLTargets, paste, token_cross_entropy
from detr_ssl.ssl.patches import patchify, pixel_mask, select_tokens, selection_counts, token_masks, token_to_pixel_mask
from detr_ssl.ssl.tokenizer import Tokenizer

# The dataset mean colour in ImageNet-normalised space. The paper's code wrote the
# un-normalised ImageNet mean (0.485, 0.456, 0.406) into the normalised tensor, a slip.
MASK_VALUE = 0.0


def mask_patches(images: Tensor, valid: Tensor, patch_size: int, ratio: float,
                 generator: torch.Generator | None = None) -> tuple[Tensor, SSLTargets]:
    """Fill round(ratio * full tokens) random full patches of each image with ``MASK_VALUE``.

    Returns the masked images and continuous targets (the original patches) whose loss mask
    is the masked tokens.
    """
    token_valid, token_full = token_masks(valid, patch_size)
    masked = select_tokens(token_full, selection_counts(token_full, ratio), generator)
    corrupted = images.masked_fill(token_to_pixel_mask(masked, patch_size), MASK_VALUE)
    targets = SSLTargets(target=patchify(images, patch_size), loss_mask=masked,
                         pixel_valid=pixel_mask(valid, patch_size), token_valid=token_valid)
    return corrupted, targets


class MIMContinuous(ContinuousTask):
    """L1 between predicted and original pixels of the masked patches."""

    name = "mim_continuous"

    @torch.no_grad()
    def corrupt(self, images: Tensor, valid: Tensor,
                generator: torch.Generator | None = None) -> tuple[Tensor, SSLTargets]:
        return mask_patches(images, valid, self.patch_size, self.ratio, generator)


class MIMDiscrete(PretextTask):
    """Cross-entropy on the visual-token id of each masked patch, as BEiT.

    The ids come from a fitted ``Tokenizer`` whose patch size must be the task's; it is a
    submodule, so it follows the model across devices and into its checkpoints.
    """

    name = "mim_discrete"
    uses_tokenizer = True

    def __init__(self, hidden_dim: int, patch_size: int, ratio: float = 0.5, tokenizer: Tokenizer | None = None):
        super().__init__(hidden_dim, patch_size, ratio, tokenizer)
        if tokenizer is None:
            raise ValueError("mim_discrete needs a visual tokenizer: fit one with scripts/fit_tokenizer.py "
                             "and pass it with --tokenizer FILE")
        if tokenizer.patch_size != patch_size:
            raise ValueError(f"the tokenizer's patch size is {tokenizer.patch_size} but the encoder tokens own "
                             f"{patch_size}x{patch_size} patches: fit a tokenizer with --patch_size {patch_size}")
        fitted_on = torch.tensor([tokenizer.mean, tokenizer.std])
        if not torch.allclose(fitted_on, torch.tensor([IMAGENET_MEAN, IMAGENET_STD])):
            raise ValueError(f"the tokenizer was fitted on patches normalised with mean {tokenizer.mean}, std "
                             f"{tokenizer.std}, but the images are normalised with ImageNet's")
        self.tokenizer = tokenizer
        self.head = nn.Linear(hidden_dim, tokenizer.codebook_size)

    @torch.no_grad()
    def corrupt(self, images: Tensor, valid: Tensor,
                generator: torch.Generator | None = None) -> tuple[Tensor, SSLTargets]:
        corrupted, targets = mask_patches(images, valid, self.patch_size, self.ratio, generator)
        ids = self.tokenizer.encode(targets.target.flatten(0, 2).float()).view(targets.loss_mask.shape)
        return corrupted, dataclasses.replace(targets, target=ids)

    def loss(self, prediction: Tensor, targets: SSLTargets) -> dict[str, Tensor]:
        return token_cross_entropy(prediction, targets)

    def prediction_patches(self, prediction: Tensor, targets: SSLTargets, corrupted_patches: Tensor) -> Tensor:
        """The codebook entry of the predicted id on each masked patch."""
        return paste(self._decode(prediction.argmax(-1)), corrupted_patches, targets.loss_mask)

    def target_patches(self, targets: SSLTargets, corrupted_patches: Tensor) -> Tensor:
        """The codebook entry of the target id: the best picture the task asks for."""
        return paste(self._decode(targets.target), corrupted_patches, targets.loss_mask)

    def _decode(self, ids: Tensor) -> Tensor:
        return self.tokenizer.decode(ids.flatten()).view(*ids.shape, -1)
