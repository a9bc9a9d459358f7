"""Patch <-> pixel layouts and token bookkeeping shared by every pretext task.

Each encoder token owns the p x p image patch under it, so a (B, 3, H, W) batch is a
(B, h, w) token grid with h = H / p and w = W / p. Patches are flattened as (p1 p2 c): the
layout of the heads' outputs and of the tokenizer's inputs.
"""
from __future__ import annotations

import torch
from einops import rearrange, reduce, repeat
from torch import Tensor


def _check_divisible(height: int, width: int, patch_size: int) -> None:
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {patch_size}: "
                         "pad the batch to a multiple of the patch size")


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, h, w, p*p*C)."""
    _check_divisible(images.shape[-2], images.shape[-1], patch_size)
    return rearrange(images, "b c (h p1) (w p2) -> b h w (p1 p2 c)", p1=patch_size, p2=patch_size)


def unpatchify(patches: Tensor, patch_size: int) -> Tensor:
    """(B, h, w, p*p*C) -> (B, C, H, W), the inverse of ``patchify``."""
    return rearrange(patches, "b h w (p1 p2 c) -> b c (h p1) (w p2)", p1=patch_size, p2=patch_size)


def token_masks(valid: Tensor, patch_size: int) -> tuple[Tensor, Tensor]:
    """(B, H, W) real-pixel mask -> (token_valid, token_full), both (B, h, w) bool.

    A token is valid when the top-left pixel of its patch is real; padding is bottom/right,
    so that is "its patch shows some of the image". Only *full* tokens (every pixel real)
    may be masked or permuted, so a corrupted patch never mixes image and padding.
    """
    _check_divisible(valid.shape[-2], valid.shape[-1], patch_size)
    token_valid = valid[:, ::patch_size, ::patch_size]
    token_full = reduce(valid, "b (h p1) (w p2) -> b h w", "min", p1=patch_size, p2=patch_size)
    return token_valid, token_full


def pixel_mask(valid: Tensor, patch_size: int, channels: int = 3) -> Tensor:
    """(B, H, W) real-pixel mask -> (B, h, w, p*p*channels), laid out like ``patchify``."""
    return patchify(repeat(valid, "b h w -> b c h w", c=channels), patch_size)


def token_to_pixel_mask(tokens: Tensor, patch_size: int) -> Tensor:
    """(B, h, w) token mask -> (B, 1, H, W) mask over the pixels of those tokens' patches."""
    return repeat(tokens, "b h w -> b 1 (h p1) (w p2)", p1=patch_size, p2=patch_size)


def selection_counts(eligible: Tensor, ratio: float) -> Tensor:
    """(B,) number of tokens to corrupt per image: round(ratio * eligible tokens of the image).

    Rounds half to even, like Python's ``round``; computed in float64 so it agrees with it.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    return (eligible.flatten(1).sum(1, dtype=torch.float64) * ratio).round().long()


def select_tokens(eligible: Tensor, counts: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """(B, h, w) bool: per image, ``counts[b]`` eligible tokens drawn uniformly without replacement.

    Random scores rank the tokens, ineligible ones last; the ``counts[b]`` best-ranked win.
    Scores are drawn on the generator's device, so a seed gives the same draw on any device.
    """
    if (counts > eligible.flatten(1).sum(1)).any():
        raise ValueError("cannot select more tokens than are eligible")
    flat = eligible.flatten(1)
    device = generator.device if generator is not None else flat.device
    scores = torch.rand(flat.shape, generator=generator, device=device).to(flat.device)
    scores = scores.masked_fill(~flat, 2.0)  # after every eligible token's score in [0, 1)
    wins = torch.arange(flat.shape[1], device=flat.device) < counts[:, None].to(flat.device)  # by rank
    return torch.zeros_like(flat).scatter_(1, scores.argsort(1), wins).view_as(eligible)
