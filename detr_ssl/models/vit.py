"""Plain ViT backbones (timm) adapted for detection as ViTDet, with the simple feature pyramid.

The ViT is timm's ``VisionTransformer`` (the maintained implementation; built with
``pretrained=False``, so nothing is downloaded), whose own modules and weights are used as they
are: only the order in which its blocks run changes. That keeps timm's key layout, so MAE and timm
state dicts load into ``backbone.0.body.vit`` strictly. The detection adaptations (Li et al.,
ViTDet, and ``../shared/papers/001_*``):

- no class token; the absolute position embeddings are interpolated (bicubic) to each image's own
  token grid, so a token's embedding does not depend on how much padding its batch adds;
- windowed self-attention (``--vit_window_size``, 14) in every block but 4 evenly spaced global
  ones, the token grid zero-padded to a multiple of the window; attention runs through
  ``F.scaled_dot_product_attention`` with the padding tokens masked out as keys;
- optional relative position biases (``--vit_rel_pos``, zero-initialised, one table shared by
  the windowed blocks and one by the global blocks, as 001), drop path (``--drop_path``, 0.1);
- the simple feature pyramid (:mod:`.pyramid`) from the last stride-16 map, or with
  ``--vit_pyramid global_blocks`` from the global blocks' outputs (001's variant).

Which levels a detector reads: DETR the ``--vit_detr_stride`` level (32 by default, the C5
equivalent); Deformable DETR, for ``--num_feature_levels`` N > 1, the first N of strides 8, 16,
32, 64, all from the pyramid (ViTDet's own stride-64 level, not the detector's extra
convolution). timm is imported only when a ViT is built: ResNet users never need it.
"""
from __future__ import annotations

import argparse
import functools
import logging
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..utils.errors import UserError
from ..utils.misc import NestedTensor
from .backbone import BackboneWeightsError, _file_state_dict

logger = logging.getLogger("detr_ssl")

# our --backbone name -> timm's model name (its 224 px configuration: MAE's pre-training size)
VIT_BACKBONES = {
    "vit_tiny_patch16": "vit_tiny_patch16_224",
    "vit_small_patch16": "vit_small_patch16_224",
    "vit_base_patch16": "vit_base_patch16_224",
    "vit_large_patch16": "vit_large_patch16_224",
}
# flags that shape the model: `--eval --resume` takes them from the checkpoint (config.ARCHITECTURE_FLAGS)
VIT_ARCHITECTURE_FLAGS = ("vit_window_size", "vit_rel_pos", "vit_detr_stride", "vit_pyramid", "pyramid_channels")
PYRAMID_STRIDES = (8, 16, 32, 64)
STAGE_STRIDES = {"layer2": 8, "layer3": 16, "layer4": 32}  # the ResNet stages a detector asks for
NUM_GLOBAL_BLOCKS = 4
GLOBAL_REL_POS_SIZE = 64  # token offsets the global blocks' bias tells apart: ViTDet's 1024 px input
DEFAULT_DROP_PATH = 0.1  # 001's and ViTDet's choice for ViT-B
# in an MAE / timm file but not used by the detector: MAE's decoder, the class token, the final
# norm and classifier (ViTDet has no final norm: the pyramid's LayerNorms follow the last block)
UNUSED_PREFIXES = ("decoder_", "mask_token", "cls_token", "norm.", "head.", "fc_norm.")
VIT_KEY_PREFIX = "backbone.0.body.vit."  # the ViT's keys in a detector (and so in our checkpoints)


def add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    """The ViT backbone's flags (``config.build_parser`` calls this)."""
    g = parser.add_argument_group("ViT backbone (--backbone vit_*)")
    add = g.add_argument
    add("--drop_path", type=float, default=None,
        help=f"stochastic depth of the ViT blocks, rising linearly to this rate in the last block (default "
             f"{DEFAULT_DROP_PATH}, ViTDet's ViT-B; 001 uses 0.3 for ViT-L)")
    add("--vit_window_size", type=int, default=14,
        help="window of the windowed self-attention in tokens (all blocks but 4 evenly spaced global ones)")
    add("--vit_rel_pos", action=argparse.BooleanOptionalAction, default=False,
        help="add relative position biases to the attention (zero-initialised; ~25%% slower, as 001 reports)")
    add("--vit_detr_stride", type=int, default=32, choices=(16, 32),
        help="the pyramid level DETR (and a one-level Deformable DETR) reads")
    add("--vit_pyramid", type=str, default="simple", choices=("simple", "global_blocks"),
        help="'simple': every level from the last block (ViTDet, 000); 'global_blocks': level i from the i-th "
             "of the last global blocks, finest first (001)")
    add("--pyramid_channels", type=int, default=256, help="channels of every simple-pyramid level")


def is_vit(backbone: str) -> bool:
    """Whether ``--backbone`` names a ViT."""
    return backbone in VIT_BACKBONES


def _import_timm(backbone: str):
    """timm, or a clear error naming the extra that installs it."""
    try:
        import timm
    except ImportError as err:
        raise UserError(f"--backbone {backbone} needs timm: pip install -e '.[vit]'") from err
    return timm


def global_block_indices(depth: int) -> tuple[int, ...]:
    """The 4 evenly spaced global blocks, each ending a quarter of the depth (ViT-B: 2, 5, 8, 11)."""
    return tuple((i + 1) * depth // NUM_GLOBAL_BLOCKS - 1 for i in range(NUM_GLOBAL_BLOCKS))


def vit_strides(args: argparse.Namespace, return_stages: tuple[str, ...]) -> tuple[int, ...]:
    """The pyramid levels for the ResNet stages a detector asks for: DETR's single stage is the
    ``--vit_detr_stride`` level; several stages (Deformable DETR) map to strides 8-32, and levels
    beyond them up to stride 64 come from the pyramid rather than the detector's extra convolution."""
    if tuple(return_stages) == ("layer4",):
        return (args.vit_detr_stride,)
    strides = [STAGE_STRIDES[stage] for stage in return_stages]
    return tuple(strides + list(PYRAMID_STRIDES[len(strides):max(len(strides), args.num_feature_levels)]))


class RelativePositionBias(nn.Module):
    """A learned bias per head and relative token offset (BEiT / 001), shared by a group of blocks.
    Offsets beyond ``size - 1`` share the border entry, so grids of any size work and padding,
    which never sits between two valid tokens, changes no valid token's bias."""

    def __init__(self, size: int, num_heads: int):
        super().__init__()
        self.size = size
        self.table = nn.Parameter(torch.zeros(2 * size - 1, 2 * size - 1, num_heads))  # zero: 001's init for MAE

    def forward(self, height: int, width: int) -> Tensor:
        """The (heads, H*W, H*W) bias of a ``height`` x ``width`` token grid."""
        ys, xs = torch.meshgrid(torch.arange(height, device=self.table.device),
                                torch.arange(width, device=self.table.device), indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()
        offset = self.size - 1
        dy = (ys[:, None] - ys[None]).clamp(-offset, offset) + offset
        dx = (xs[:, None] - xs[None]).clamp(-offset, offset) + offset
        return rearrange(self.table[dy, dx], "q k heads -> heads q k")


@functools.lru_cache(maxsize=128)
def resampling_matrices(old: int, longest: int) -> Tensor:
    """(longest + 1, longest, old): entry n maps ``old`` position-table entries along one axis to n
    (rows from n on zero), as timm's ``resample_abs_pos_embed`` (bicubic, antialiased, separable)
    does; its matrix is that interpolation applied to the identity."""
    # width 2, not 1: on a width-1 input antialiased bicubic interpolation is not the identity along it
    basis = torch.eye(old, dtype=torch.float64)[:, None, :, None].expand(old, 1, old, 2)
    matrices = torch.zeros(longest + 1, longest, old, dtype=torch.float64)
    for size in range(1, longest + 1):
        resized = F.interpolate(basis, size=(size, 2), mode="bicubic", antialias=True, align_corners=False)
        matrices[size, :size] = resized[:, 0, :, 0].T
    return matrices


def attend(attn: nn.Module, x: Tensor, key_valid: Tensor, bias: Tensor | None) -> Tensor:
    """timm ``Attention``'s computation on (N, L, C) tokens through its own weights, with the
    invalid keys masked out. A row of padding only (a window outside the image) attends to all its
    keys instead, so no softmax sees only -inf (NaN would reach valid tokens through the next block)."""
    q, k, v = rearrange(attn.qkv(x), "n l (three heads d) -> three n heads l d", three=3, heads=attn.num_heads)
    q, k = attn.q_norm(q), attn.k_norm(k)
    keys = (key_valid | ~key_valid.any(1, keepdim=True))[:, None, None, :]
    mask = keys if bias is None else bias.to(q.dtype)[None].masked_fill(~keys, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = rearrange(out, "n heads l d -> n l (heads d)")
    out = getattr(attn, "norm", nn.Identity())(out)  # timm >= 1.0 has an (identity by default) output norm
    return attn.proj_drop(attn.proj(out))


def run_block(block: nn.Module, x: Tensor, valid: Tensor, window: int | None,
              rel_pos: RelativePositionBias | None) -> Tensor:
    """A timm ``Block`` on a (B, H, W, C) token grid: global attention, or with ``window``
    attention inside non-overlapping windows of the grid zero-padded to a multiple of it."""
    height, width = x.shape[1:3]
    y = block.norm1(x)
    if window is None:
        bias = rel_pos(height, width) if rel_pos is not None else None
        y = attend(block.attn, rearrange(y, "b h w c -> b (h w) c"), rearrange(valid, "b h w -> b (h w)"), bias)
        y = rearrange(y, "b (h w) c -> b h w c", h=height)
    else:
        pad_h, pad_w = -height % window, -width % window
        y, keys = F.pad(y, (0, 0, 0, pad_w, 0, pad_h)), F.pad(valid, (0, pad_w, 0, pad_h), value=False)
        windows = dict(wh=window, ww=window)
        bias = rel_pos(window, window) if rel_pos is not None else None
        y = attend(block.attn, rearrange(y, "b (nh wh) (nw ww) c -> (b nh nw) (wh ww) c", **windows),
                   rearrange(keys, "b (nh wh) (nw ww) -> (b nh nw) (wh ww)", **windows), bias)
        y = rearrange(y, "(b nh nw) (wh ww) c -> b (nh wh) (nw ww) c", b=x.shape[0], nh=(height + pad_h) // window,
                      **windows)[:, :height, :width]
    x = x + block.drop_path1(block.ls1(y))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


class ViTDetBody(nn.Module):
    """timm ViT (``vit``) + simple feature pyramid (``pyramid``): images -> one map per stride."""

    def __init__(self, vit: nn.Module, strides: tuple[int, ...], window_size: int, rel_pos: bool,
                 pyramid_source: str, out_channels: int):
        super().__init__()
        from .pyramid import SimpleFeaturePyramid  # needs timm: imported once timm is known present

        if len(strides) > NUM_GLOBAL_BLOCKS and pyramid_source == "global_blocks":
            raise ValueError(f"--vit_pyramid global_blocks gives at most {NUM_GLOBAL_BLOCKS} levels")
        self.vit = vit
        self.patch_size = vit.patch_embed.patch_size[0]
        self.window_size = window_size
        self.global_blocks = global_block_indices(len(vit.blocks))
        self.pyramid_source = pyramid_source
        self.strides = tuple(strides)
        heads = vit.blocks[0].attn.num_heads
        self.rel_pos_window = RelativePositionBias(window_size, heads) if rel_pos else None
        self.rel_pos_global = RelativePositionBias(GLOBAL_REL_POS_SIZE, heads) if rel_pos else None
        self.pyramid = SimpleFeaturePyramid(vit.embed_dim, out_channels, self.strides)

    def position_embedding(self, valid: Tensor) -> Tensor:
        """(B, H, W, C) absolute position embeddings, timm's table resampled to each image's own
        valid token grid (zero on padding) as timm resamples it, by one batched product with
        per-size resampling matrices: no Python loop over the images' sizes, so it traces (ONNX)."""
        grid_h, grid_w = self.vit.patch_embed.grid_size
        table = self.vit.pos_embed.view(grid_h, grid_w, -1)
        rows = resampling_matrices(grid_h, valid.shape[1]).to(table)[valid[:, :, 0].sum(1)]  # (B, H, grid_h)
        columns = resampling_matrices(grid_w, valid.shape[2]).to(table)[valid[:, 0, :].sum(1)]  # (B, W, grid_w)
        return torch.einsum("byi,ijc,bxj->byxc", rows, table, columns)

    def features(self, images: Tensor, mask: Tensor) -> tuple[list[Tensor], dict[int, Tensor]]:
        """The pyramid levels of (B, 3, H, W) ``images`` with padding ``mask`` (True = padding),
        and the valid-position mask per stride (a position is valid where its top-left pixel is)."""
        pad_h, pad_w = -images.shape[-2] % self.patch_size, -images.shape[-1] % self.patch_size
        images, mask = F.pad(images, (0, pad_w, 0, pad_h)), F.pad(mask, (0, pad_w, 0, pad_h), value=True)
        valid = {s: ~mask[:, ::s, ::s] for s in {*PYRAMID_STRIDES, self.patch_size}}
        tokens = valid[self.patch_size]
        x = self.vit.patch_embed(images)  # (B, H, W, C): timm's NHWC output with dynamic_img_size
        x = self.vit.norm_pre(self.vit.pos_drop(x + self.position_embedding(tokens).to(x.dtype)))
        global_outputs = []
        for index, block in enumerate(self.vit.blocks):
            is_global = index in self.global_blocks
            x = run_block(block, x, tokens, None if is_global else self.window_size,
                          self.rel_pos_global if is_global else self.rel_pos_window)
            if is_global:
                global_outputs.append(rearrange(x, "b h w c -> b c h w"))
        inputs = (global_outputs[NUM_GLOBAL_BLOCKS - len(self.strides):] if self.pyramid_source == "global_blocks"
                  else [global_outputs[-1]] * len(self.strides))
        return self.pyramid(inputs, valid), valid

    def forward(self, images: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        """``{str(stride): map}`` of unpadded (``mask=None``) or padded images: the shape of a
        ResNet body's output, which UP-DETR's crop features read."""
        if mask is None:
            mask = images.new_zeros((images.shape[0], *images.shape[-2:]), dtype=torch.bool)
        maps, _ = self.features(images, mask)
        return {str(s): m for s, m in zip(self.strides, maps)}


class ViTBackbone(nn.Module):
    """``backbone.0`` for a ViT: the body's maps as NestedTensors with their padding masks, and the
    ``num_channels`` / ``strides`` the detectors read. ``train_backbone=False`` (``--lr_backbone 0``)
    freezes all of it, pyramid included, as for ResNets."""

    def __init__(self, body: ViTDetBody, train_backbone: bool):
        super().__init__()
        body.requires_grad_(train_backbone)
        self.body = body
        self.strides = list(body.strides)
        self.num_channels = [body.pyramid.out_channels] * len(self.strides)

    def forward(self, samples: NestedTensor) -> list[NestedTensor]:
        maps, valid = self.body.features(samples.tensors, samples.mask)
        return [NestedTensor(m, ~valid[s]) for s, m in zip(self.strides, maps)]


def fit_position_embedding(pos_embed: Tensor, grid: tuple[int, int]) -> Tensor:
    """A file's (1, [prefix +] h*w, C) position embedding without its class-token entries, resized
    (bicubic) to the model's ``grid``. MAE files hold a square grid behind one class-token entry."""
    from timm.layers import resample_abs_pos_embed

    side = math.isqrt(pos_embed.shape[1])
    prefix = pos_embed.shape[1] - side * side  # class (and register) token entries come first
    if (side, side) != tuple(grid):
        logger.info("backbone weights: position embeddings resized from %dx%d to %dx%d", side, side, *grid)
    resized = resample_abs_pos_embed(pos_embed, list(grid), old_size=[side, side], num_prefix_tokens=prefix)
    return resized[:, prefix:]


def _vit_tensors(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """A file's ViT tensors in timm's layout, and the keys of a detr_ssl checkpoint that are not the
    ViT's (a checkpoint of ``--ssl_method mae`` or of a ViT detector holds its ViT under
    ``backbone.0.body.vit.``; MAE and timm files are in timm's layout already)."""
    if not any(key.startswith(VIT_KEY_PREFIX) for key in state):
        return state, []
    vit = {key[len(VIT_KEY_PREFIX):]: value for key, value in state.items() if key.startswith(VIT_KEY_PREFIX)}
    return vit, [key for key in state if not key.startswith(VIT_KEY_PREFIX)]


def load_vit_weights(vit: nn.Module, path: str, backbone: str) -> list[str]:
    """Load an MAE checkpoint (``{'model': ...}`` in timm's layout), a timm state dict or a
    detr_ssl checkpoint with a ViT (our MAE pre-training's output) into ``vit`` strictly: every
    model tensor must be in the file with its shape (the position embedding resized to fit), every
    file tensor in the model, except those the detector does not use (MAE's decoder, class token,
    final norm, classifier; a checkpoint's other modules), which are ignored and returned."""
    state, outside = _vit_tensors(_file_state_dict(path))
    ignored = sorted([*outside, *(k for k in state if k.startswith(UNUSED_PREFIXES))])
    state = {k: v for k, v in state.items() if k not in ignored}
    own = vit.state_dict()
    if "pos_embed" in state and "pos_embed" in own:
        state["pos_embed"] = fit_position_embedding(state["pos_embed"], vit.patch_embed.grid_size)
    problems = [f"missing {k}" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                 for k, v in state.items() if k in own and v.shape != own[k].shape]
    if problems:
        raise BackboneWeightsError(f"--backbone_weights {path} does not fit {backbone} (an MAE checkpoint or timm "
                                   f"state dict of that model expected): {'; '.join(problems)}")
    vit.load_state_dict(state)
    unused = sorted({k.split(".")[0] for k in ignored})
    logger.info("backbone %s: loaded %d tensors from %s; ignored %d not used for detection (%s)",
                backbone, len(state), path, len(ignored), ", ".join(unused) or "none")
    logger.debug("backbone %s: ignored tensors: %s", backbone, ", ".join(ignored) or "none")
    return ignored


def build_vit(backbone: str, drop_path: float) -> nn.Module:
    """timm's ViT named by ``--backbone`` with random weights (never a download), no class token,
    no classifier, no final norm, and patch embedding and position table for any input size."""
    timm = _import_timm(backbone)
    vit = timm.create_model(VIT_BACKBONES[backbone], pretrained=False, class_token=False, global_pool="",
                            num_classes=0, dynamic_img_size=True, drop_path_rate=drop_path)
    vit.norm = nn.Identity()  # ViTDet: the pyramid's LayerNorms follow the last block
    return vit


def build_vit_backbone(args: argparse.Namespace, return_stages: tuple[str, ...]) -> ViTBackbone:
    """``backbone.0`` for ``--backbone vit_*``, with ``--backbone_weights none`` or an MAE / timm file."""
    if args.backbone_weights == "imagenet":
        raise BackboneWeightsError(
            f"--backbone_weights imagenet: there are no ImageNet weights for {args.backbone} without a download. "
            "Pass an MAE checkpoint (e.g. mae_pretrain_vit_base.pth from github.com/facebookresearch/mae) or a timm "
            "state dict of the same model as --backbone_weights PATH, or --backbone_weights none")
    vit = build_vit(args.backbone, DEFAULT_DROP_PATH if args.drop_path is None else args.drop_path)
    if args.backbone_weights != "none":
        load_vit_weights(vit, args.backbone_weights, args.backbone)
    body = ViTDetBody(vit, vit_strides(args, return_stages), args.vit_window_size, args.vit_rel_pos,
                      args.vit_pyramid, args.pyramid_channels)
    return ViTBackbone(body, train_backbone=args.lr_backbone > 0)
