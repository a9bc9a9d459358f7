"""Jigsaw: shuffle a fraction of the patches and recover what belongs where."""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from detr_ssl.ssl.base import ContinuousTask, PretextTask, SSLTargets, token_cross_entropy
from detr_ssl.ssl.mim import MASK_VALUE
from detr_ssl.ssl.patches import patchify, pixel_mask, select_tokens, selection_counts, token_masks, unpatchify
from detr_ssl.ssl.tokenizer import Tokenizer


_KEY_RANGE = 2**62  # random sort keys are integers below this


def derangements(counts: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """(B, max count) int64: row b begins with a uniformly random permutation of range(counts[b])
    that moves every element and continues with the identity (counts 0 or >= 2).

    Batched rejection sampling, the same distribution as drawing per row until a draw has no
    fixed point: random keys ranked per row give uniform permutations (slots past a row's count
    get keys above every draw, in order, so they stay put), and the rows that kept a fixed point
    are drawn again. About 1/e of all permutations move everything, so a row needs e draws on
    average; the batch needs as many rounds as its unluckiest row (a handful), with one host
    sync each (and two to start), not one per image and draw. Keys are integers (a tie, which
    would bias the ranking, has odds ~ n^2 / 2^63; float32 keys tie often) drawn on the
    generator's device, so a seed gives the same draw on any device.
    """
    if (counts == 1).any():
        raise ValueError("one element cannot be moved among itself")
    device = counts.device
    key_device = generator.device if generator is not None else device
    width = int(counts.max()) if counts.numel() else 0
    slots = torch.arange(width, device=device)
    inside = slots < counts[:, None]
    permutation = slots.repeat(len(counts), 1)
    rows = (counts >= 2).nonzero().squeeze(1)
    while len(rows):
        keys = torch.randint(_KEY_RANGE, (len(rows), width), generator=generator, device=key_device)
        keys = torch.where(inside[rows], keys.to(device), slots + _KEY_RANGE)
        permutation[rows] = keys.argsort(1)
        rows = ((permutation == slots) & inside).any(1).nonzero().squeeze(1)
    return permutation


def jigsaw_counts(token_full: Tensor, ratio: float) -> Tensor:
    """(B,) patches to permute per image: round(ratio * full tokens), except that a count of 1
    becomes 2 when the image has two full tokens and 0 otherwise, since a single patch
    cannot move among itself."""
    counts = selection_counts(token_full, ratio)
    available = token_full.flatten(1).sum(1)
    return torch.where(counts == 1, torch.where(available >= 2, 2, 0), counts)


def permutation_sources(token_full: Tensor, ratio: float,
                        generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Draw which full tokens move and where from, for every image at once.

    Returns ``moved`` (B, h, w) bool, ``jigsaw_counts`` uniformly chosen full tokens per image, and
    ``source`` (B, h, w) int64: the flat position in the image's h x w grid whose patch goes to
    each token, a uniformly random derangement among the moved tokens, its own index elsewhere.
    """
    counts = jigsaw_counts(token_full, ratio)
    moved = select_tokens(token_full, counts, generator)
    permutation = derangements(counts, generator)
    flat = moved.flatten(1)
    # each image's moved positions in ascending order, then its unmoved ones (left in place)
    positions = flat.byte().sort(dim=1, descending=True, stable=True).indices[:, :permutation.shape[1]]
    source = torch.arange(flat.shape[1], device=flat.device).repeat(flat.shape[0], 1)
    source.scatter_(1, positions, positions.gather(1, permutation))
    return moved, source.view_as(moved)


def permute_patches(images: Tensor, valid: Tensor, patch_size: int, ratio: float,
                    generator: torch.Generator | None = None) -> tuple[Tensor, SSLTargets, Tensor]:
    """Permute ``jigsaw_counts`` random full patches of each image among themselves, none in place.

    Returns the shuffled images, continuous targets (the original patches; the loss mask is
    the moved tokens) and ``source`` (B, h, w) int64: the flat position in the image's h x w
    grid that the patch now at each token came from (its own index for unmoved tokens).
    """
    token_valid, token_full = token_masks(valid, patch_size)
    moved, source = permutation_sources(token_full, ratio, generator)
    patches = patchify(images, patch_size)
    shuffled = patches.flatten(1, 2).gather(1, source.flatten(1)[..., None].expand(-1, -1, patches.shape[-1]))
    corrupted = unpatchify(shuffled.view_as(patches), patch_size)
    targets = SSLTargets(target=patches, loss_mask=moved, pixel_valid=pixel_mask(valid, patch_size),
                         token_valid=token_valid)
    return corrupted, targets, source


class JigsawContinuous(ContinuousTask):
    """L1 between the prediction at each moved token and the original pixels of that position."""

    name = "jigsaw_continuous"

    @torch.no_grad()
    def corrupt(self, images: Tensor, valid: Tensor,
                generator: torch.Generator | None = None) -> tuple[Tensor, SSLTargets]:
        corrupted, targets, _ = permute_patches(images, valid, self.patch_size, self.ratio, generator)
        return corrupted, targets


class JigsawDiscrete(PretextTask):
    """Cross-entropy on the original position of each moved patch.

    Images in a batch differ in size, so a fixed classifier over positions would give the
    same class different places in different images. Instead each token's query is scored
    against the position embeddings of its own image's positions: the classes are the real
    positions of that image (padding positions get -inf), and the head works at any size.
    """

    name = "jigsaw_discrete"

    def __init__(self, hidden_dim: int, patch_size: int, ratio: float = 0.5, tokenizer: Tokenizer | None = None):
        super().__init__(hidden_dim, patch_size, ratio, tokenizer)
        self.head = nn.Linear(hidden_dim, hidden_dim)

    @torch.no_grad()
    def corrupt(self, images: Tensor, valid: Tensor,
                generator: torch.Generator | None = None) -> tuple[Tensor, SSLTargets]:
        corrupted, targets, source = permute_patches(images, valid, self.patch_size, self.ratio, generator)
        return corrupted, dataclasses.replace(targets, target=source)

    def predict(self, memory: Tensor, pos: Tensor, targets: SSLTargets) -> Tensor:
        """(B, h, w, h*w) logits: query . position embedding / sqrt(C), -inf off the image."""
        queries = self.head(memory)
        logits = torch.einsum("bhwc,bnc->bhwn", queries, pos.flatten(1, 2)) / math.sqrt(queries.shape[-1])
        off_image = ~targets.token_valid.flatten(1)[:, None, None, :]
        return logits.masked_fill(off_image, float("-inf"))

    def loss(self, prediction: Tensor, targets: SSLTargets) -> dict[str, Tensor]:
        return token_cross_entropy(prediction, targets)

    def prediction_patches(self, prediction: Tensor, targets: SSLTargets, corrupted_patches: Tensor) -> Tensor:
        """Each moved patch drawn back at the position the model says it came from."""
        return put_back(corrupted_patches, prediction.argmax(-1), targets.loss_mask)

    def target_patches(self, targets: SSLTargets, corrupted_patches: Tensor) -> Tensor:
        """Each moved patch back at its true position: the original image."""
        return put_back(corrupted_patches, targets.target, targets.loss_mask)


def put_back(patches: Tensor, positions: Tensor, moved: Tensor) -> Tensor:
    """Move the (B, h, w, P) ``patches`` of the ``moved`` tokens to the flat ``positions``.

    Positions that were moved away from and receive nothing show ``MASK_VALUE``; when two
    patches land on one position, either may show.
    """
    flat, moved = patches.flatten(1, 2), moved.flatten(1)
    spare = flat.shape[1]  # an extra slot that the unmoved patches are sent to, then dropped
    emptied = flat.masked_fill(moved[..., None], MASK_VALUE)
    canvas = torch.cat([emptied, flat.new_zeros(flat.shape[0], 1, flat.shape[2])], 1)
    destination = torch.where(moved, positions.flatten(1), spare)
    canvas.scatter_(1, destination[..., None].expand_as(flat), flat)
    return canvas[:, :spare].view_as(patches)
