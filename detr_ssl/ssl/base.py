"""The pretext-task interface: corrupt the input, predict from encoder tokens, score, draw.

A task sees the padded, ImageNet-normalised batch ``images`` (B, 3, H, W) with ``valid``
(B, H, W) marking real pixels, H and W multiples of the patch size p. The engine runs
``corrupt`` (when ``corrupts_input``), passes the corrupted images through backbone and
encoder, and hands the tokens of the SSL level to ``predict`` and ``loss``.
"""
from __future__ import annotations

import abc

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detr_ssl.ssl.patches import patchify, token_to_pixel_mask, unpatchify
from detr_ssl.utils.image import denormalize

if TYPE_CHECKING:
    from detr_ssl.ssl.tokenizer import Tokenizer


@dataclass
class SSLTargets:
    """What ``corrupt`` knows that the model must recover.

    target: continuous tasks (B, h, w, p*p*3) original normalised patch pixels; discrete ones
        (B, h, w) int64 class ids.
    loss_mask: (B, h, w) bool, the tokens whose prediction counts in the loss.
    pixel_valid: (B, h, w, p*p*3) bool, the real (non-padding) pixels of each patch.
    token_valid: (B, h, w) bool, tokens on the real image (jigsaw_discrete's candidate positions).
    """

    target: Tensor
    loss_mask: Tensor
    pixel_valid: Tensor
    token_valid: Tensor

    def __getitem__(self, index: slice) -> SSLTargets:
        """The targets of a slice of the batch."""
        return SSLTargets(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


class PretextTask(nn.Module, abc.ABC):
    """One self-supervised task on the encoder: subclasses set ``name``, build ``head`` and
    implement ``corrupt``, ``predict`` and ``loss``.

    ``ratio`` (the fraction of each image's eligible patches to corrupt) is a plain attribute
    so that the engine can follow a ratio schedule epoch by epoch.
    """

    name: ClassVar[str]
    corrupts_input: ClassVar[bool] = True
    level_heads: nn.Module | None = None  # --ssl_levels: a LevelHeads for the other encoder levels
    uses_tokenizer: ClassVar[bool] = False
    head: nn.Module

    def __init__(self, hidden_dim: int, patch_size: int, ratio: float = 0.5, tokenizer: Tokenizer | None = None):
        super().__init__()
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        self.hidden_dim = hidden_dim
        self.patch_size = patch_size
        self.ratio = ratio

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch (p * p * 3)."""
        return self.patch_size * self.patch_size * 3

    @abc.abstractmethod
    def corrupt(self, images: Tensor, valid: Tensor,
                generator: torch.Generator | None = None) -> tuple[Tensor, SSLTargets]:
        """The corrupted batch (same shape and dtype) and what the model must recover, drawn per image."""

    def predict(self, memory: Tensor, pos: Tensor, targets: SSLTargets) -> Tensor:
        """(B, h, w, C) encoder tokens and their position embeddings -> the task's prediction."""
        return self.head(memory)

    @abc.abstractmethod
    def loss(self, prediction: Tensor, targets: SSLTargets) -> dict[str, Tensor]:
        """``{"loss_ssl": scalar}``: the prediction scored against the targets where ``loss_mask`` is set."""

    def outputs_loss(self, outputs: dict, targets: list[dict] | None = None) -> dict[str, Tensor]:
        """The loss of the model's ``ssl_outputs`` (none when the outputs have none, e.g. in
        evaluation): the task's own, averaged with the other levels' pixel losses under
        ``--ssl_levels`` (see :mod:`detr_ssl.ssl.levels`). ``targets`` (detection) are not read."""
        if "ssl_outputs" not in outputs:
            return {}
        ssl_outputs = outputs["ssl_outputs"]
        losses = self.loss(ssl_outputs["prediction"], ssl_outputs["targets"])
        level_predictions = ssl_outputs.get("level_predictions")
        if level_predictions:
            changed = token_to_pixel_mask(ssl_outputs["targets"].loss_mask, self.patch_size)[:, 0]
            levels = self.level_heads.loss(level_predictions, ssl_outputs["images"], ssl_outputs["valid"], changed)
            count = len(level_predictions) + 1
            losses["loss_ssl"] = (losses["loss_ssl"] + levels * (count - 1)) / count
        return losses

    def prediction_patches(self, prediction: Tensor, targets: SSLTargets, corrupted_patches: Tensor) -> Tensor:
        """(B, h, w, p*p*3) picture of the prediction: predicted pixels where the loss looks."""
        return paste(prediction, corrupted_patches, targets.loss_mask)

    def target_patches(self, targets: SSLTargets, corrupted_patches: Tensor) -> Tensor:
        """(B, h, w, p*p*3) picture of the target, drawn like ``prediction_patches``."""
        return paste(targets.target, corrupted_patches, targets.loss_mask)

    @torch.no_grad()
    def visualize(self, images: Tensor, corrupted: Tensor, prediction: Tensor, targets: SSLTargets,
                  valid: Tensor) -> Tensor:
        """(4n, 3, H, W) images in [0, 1] for TensorBoard, n = min(B, 2).

        Ordered input, corrupted input, prediction, target, n images each, so that a grid of
        n columns has one row per kind. Outside the loss, prediction and target show the
        corrupted input; padding is black.
        """
        n = min(images.shape[0], 2)
        targets = targets[:n]
        corrupted_patches = patchify(corrupted[:n].float(), self.patch_size)
        rows = [
            images[:n].float(),
            corrupted[:n].float(),
            unpatchify(self.prediction_patches(prediction[:n].float(), targets, corrupted_patches), self.patch_size),
            unpatchify(self.target_patches(targets, corrupted_patches), self.patch_size),
        ]
        return denormalize(torch.cat(rows)) * valid[:n].repeat(4, 1, 1)[:, None]


class ContinuousTask(PretextTask):
    """A task that predicts every token's p x p patch pixels and scores them with L1.

    The head is linear, as SimMIM's: a deeper decoder could do the encoder's work for it.
    """

    def __init__(self, hidden_dim: int, patch_size: int, ratio: float = 0.5, tokenizer: Tokenizer | None = None):
        super().__init__(hidden_dim, patch_size, ratio, tokenizer)
        self.head = nn.Linear(hidden_dim, self.patch_dim)

    def loss(self, prediction: Tensor, targets: SSLTargets) -> dict[str, Tensor]:
        """Mean L1 over the real pixels of the tokens in ``loss_mask``."""
        weight = targets.pixel_valid & targets.loss_mask[..., None]
        error = (prediction.float() - targets.target.float()).abs() * weight
        return {"loss_ssl": error.sum() / weight.sum().clamp(min=1)}


def paste(patches: Tensor, onto: Tensor, mask: Tensor) -> Tensor:
    """``patches`` on the (B, h, w) tokens of ``mask``, ``onto`` elsewhere."""
    return torch.where(mask[..., None], patches, onto)


def token_cross_entropy(logits: Tensor, targets: SSLTargets) -> dict[str, Tensor]:
    """Mean cross-entropy of (B, h, w, K) logits over the tokens in ``loss_mask``.

    Tokens outside the mask are ignored rather than indexed out, so there is no host sync and
    an empty mask gives a zero loss that still has a graph.
    """
    labels = targets.target.masked_fill(~targets.loss_mask, -100)
    total = F.cross_entropy(logits.float().flatten(0, 2), labels.flatten(), ignore_index=-100, reduction="sum")
    return {"loss_ssl": total / targets.loss_mask.sum().clamp(min=1)}

