"""ViTDet's simple feature pyramid: strides 8-64 from a plain ViT's stride-16 map(s).

Li et al. (ViTDet), as used by the MAE detection paper (``../shared/papers/000_*``): each level
resamples the stride-16 map (2x2 transposed convolution for stride 8, identity for 16, 2x2
max-pooling for 32 and twice that for 64, i.e. detectron2's ``scale 2.0 / 1.0 / 0.5`` branches
and one more halving), then the same neck: 1x1 conv + LayerNorm, 3x3 conv + LayerNorm (bias-free
convolutions, LayerNorm over channels, as ViTDet).

Padding never reaches a valid output: before every operation that mixes neighbours (pooling, the
3x3 convolution) padded positions are set to zero and odd sizes are zero-padded, so a valid
position sees the same values however much padding the batch adds.
"""
from __future__ import annotations

import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import Tensor, nn

from .vit import PYRAMID_STRIDES

VIT_STRIDE = 16  # the token stride of the patch16 ViTs


def zero_padding(x: Tensor, valid: Tensor) -> Tensor:
    """(B, C, H, W) features with the positions where ``valid`` (B, H, W) is False set to 0."""
    return x * valid[:, None].to(x.dtype)


class MaskedMaxPool(nn.Module):
    """k x k max-pooling with stride k of features whose padding counts as 0, extended by zeros to
    a multiple of k: the output has ceil(H / k) rows, like a ResNet stage's."""

    def __init__(self, kernel: int):
        super().__init__()
        self.kernel = kernel

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        x = zero_padding(x, valid)
        pad_h, pad_w = -x.shape[-2] % self.kernel, -x.shape[-1] % self.kernel
        return F.max_pool2d(F.pad(x, (0, pad_w, 0, pad_h)), self.kernel)


class PyramidLevel(nn.Module):
    """One level: resample the stride-16 map to ``stride``, then ViTDet's 1x1 + 3x3 neck."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if stride not in PYRAMID_STRIDES:
            raise ValueError(f"pyramid stride must be one of {PYRAMID_STRIDES}, got {stride}")
        self.upsample = (nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
                         if stride < VIT_STRIDE else None)
        self.pool = MaskedMaxPool(stride // VIT_STRIDE) if stride > VIT_STRIDE else None
        resampled = in_channels // 2 if self.upsample is not None else in_channels
        self.lateral = nn.Sequential(nn.Conv2d(resampled, out_channels, kernel_size=1, bias=False),
                                     LayerNorm2d(out_channels))
        self.output = nn.Sequential(nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
                                    LayerNorm2d(out_channels))

    def forward(self, x: Tensor, valid_in: Tensor, valid_out: Tensor) -> Tensor:
        """``x`` (B, C, H, W) at stride 16 with its ``valid_in`` mask; ``valid_out`` at this stride."""
        if self.upsample is not None:  # a 2x2 stride-2 transposed conv: no neighbour mixing
            x = self.upsample(x)
        if self.pool is not None:
            x = self.pool(x, valid_in)
        x = self.lateral(x)
        return self.output(zero_padding(x, valid_out))


class SimpleFeaturePyramid(nn.Module):
    """The requested ``strides`` of the pyramid, each with ``out_channels`` channels. Only those
    levels are built, so every parameter receives a gradient (DDP needs no unused-parameter search)."""

    def __init__(self, in_channels: int, out_channels: int, strides: tuple[int, ...]):
        super().__init__()
        self.strides = tuple(strides)
        self.out_channels = out_channels
        self.levels = nn.ModuleDict({str(s): PyramidLevel(in_channels, out_channels, s) for s in self.strides})

    def forward(self, inputs: list[Tensor], valid: dict[int, Tensor]) -> list[Tensor]:
        """``inputs``: one stride-16 map per level (the same map for ViTDet's pyramid, a global
        block's output per level for 001's variant); ``valid``: the valid-position mask per stride."""
        return [self.levels[str(stride)](x, valid[VIT_STRIDE], valid[stride])
                for stride, x in zip(self.strides, inputs, strict=True)]
