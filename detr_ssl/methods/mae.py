"""MAE (He et al., CVPR 2022; ``../shared/papers/000_*``): pre-train a ViT backbone by masked
image modelling on unlabelled images, then detect with it (ViTDet: ``--backbone_weights``).

Each image is a random resized crop of ``--mae_input_size`` pixels (any image tree of mixed
sizes batches without padding). ``--ssl_ratio`` (75 %) of its 16 x 16 patches, drawn uniformly
per image, are masked; the backbone's timm ViT encodes only the visible ones (global attention
in every block: the visible patches form no grid, and ViTDet adds its windows at fine-tuning)
with its position table; a light decoder (``mae_decoder``: MAE's encoder norm, a projection to
``--mae_decoder_dim``, mask tokens in the masked places, a fixed sine-cosine position table,
``--mae_decoder_depth`` timm blocks, a linear pixel head) predicts every patch, and the loss is
the mean squared error on the masked patches of their pixels normalised per patch (MAE's
``norm_pix_loss``, ``--mae_norm_pix``). The recipe defaults are MAE's: AdamW (0.9, 0.95), weight
decay 0.05 off norms and biases, lr = ``--mae_base_lr`` x effective batch / 256 (backbone
included), 40 warmup epochs, cosine to 0 over 800 epochs, no gradient clipping, no drop path.

Trained from scratch (``--backbone_weights none``) the ViT starts as MAE's (fixed sine-cosine
position table, Xavier-uniform linear layers); from an MAE or timm file (``--backbone_weights``)
pre-training continues on the user's images. The position table stays fixed, as MAE's. The rest
of the detector is built but not trained (frozen): a checkpoint of this run starts a ViT
detector through ``--backbone_weights CKPT`` or ``--pretrain CKPT``, which take the ViT only.
"""
from __future__ import annotations

import argparse
import os
from functools import partial

import torch
from torch import Tensor, nn

from ..data.transforms import build_crop_transforms
from ..models.passes import DetectorPass
from ..models.vit import VIT_KEY_PREFIX, is_vit
from ..ssl.patches import patchify, select_tokens, selection_counts, token_to_pixel_mask, unpatchify
from ..utils.image import denormalize
from ..utils.misc import NestedTensor
from .base import DetectorMethod, Error, Picture, Transform

NORM_PIX_EPS = 1e-6  # MAE's variance floor of the per-patch normalisation
EVAL_MASK_SEED = 0  # validation draws the same masks every time, so validation losses compare across epochs
PICTURE_IMAGES = 4
# MAE's recipe (000, and its pre-training code): the defaults this method gives the shared flags
RECIPE = {"weight_decay": 0.05, "adam_betas": [0.9, 0.95], "lr_scheduler": "cosine", "epochs": 800,
          "clip_max_norm": 0.0, "no_decay_norm_bias": True, "ssl_ratio": 0.75,
          "drop_path": 0.0, "backbone_weights": "none"}  # from scratch unless a file is given to continue from
RECIPE_WARMUP_EPOCHS = 40.0


def sincos_position_table(height: int, width: int, dim: int) -> Tensor:
    """MAE's fixed 2-D sine-cosine position table, (height * width, dim) row-major: the first half
    of the channels encodes the column, the second the row, each as [sin, cos] of the position
    times 10000^(-k / (dim / 4)), k < dim / 4."""
    quarter = dim // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, columns = torch.meshgrid(torch.arange(height, dtype=torch.float64),
                                   torch.arange(width, dtype=torch.float64), indexing="ij")

    def encode(positions: Tensor) -> Tensor:
        angles = positions.flatten()[:, None] * frequencies[None]
        return torch.cat([angles.sin(), angles.cos()], 1)

    return torch.cat([encode(columns), encode(rows)], 1).float()


def _xavier_linear_layers(module: nn.Module) -> None:
    """MAE's initialisation of every linear layer: Xavier-uniform weights, zero biases."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


@torch.no_grad()
def initialise_like_mae(vit: nn.Module) -> None:
    """Start a ViT as MAE does: the sine-cosine position table, the patch projection initialised as
    a linear layer, Xavier-uniform linear layers (timm's LayerNorms already start at 1 and 0)."""
    height, width = vit.patch_embed.grid_size
    vit.pos_embed.copy_(sincos_position_table(height, width, vit.embed_dim)[None])
    weight = vit.patch_embed.proj.weight
    nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
    _xavier_linear_layers(vit.blocks)


def encode_visible(body: nn.Module, images: Tensor, visible: Tensor) -> Tensor:
    """The backbone ViT's tokens of the ``visible`` (B, L) patches of unpadded ``images``: patch
    embedding and the body's own position table (resampled to the grid as at detection) on the
    whole grid, then the blocks on the visible tokens only (the same number in every image): (B, V, C)."""
    vit = body.vit
    tokens = vit.patch_embed(images)  # (B, h, w, C): timm's NHWC output with dynamic_img_size
    table = body.position_embedding(torch.ones(tokens.shape[:3], dtype=torch.bool, device=tokens.device))
    tokens = vit.pos_drop((tokens + table.to(tokens.dtype)).flatten(1, 2))
    x = vit.norm_pre(tokens[visible].view(tokens.shape[0], -1, tokens.shape[-1]))
    for block in vit.blocks:
        x = block(x)
    return x


class MAEDecoder(nn.Module):
    """Visible tokens -> every patch's pixels: MAE's encoder norm (which ViTDet drops at
    fine-tuning, so it lives here) and decoder."""

    def __init__(self, encoder_dim: int, patch_size: int, dim: int = 512, depth: int = 8, heads: int = 16):
        super().__init__()
        from timm.models.vision_transformer import Block

        layer_norm = partial(nn.LayerNorm, eps=1e-6)
        self.dim = dim
        self.encoder_norm = layer_norm(encoder_dim)
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=layer_norm)
                                    for _ in range(depth))
        self.norm = layer_norm(dim)
        self.pred = nn.Linear(dim, patch_size * patch_size * 3)
        _xavier_linear_layers(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, visible: Tensor, masked: Tensor, grid: tuple[int, int]) -> Tensor:
        """(B, V, C) visible tokens and the (B, L) mask (True = masked) of a ``grid`` of L patches
        -> (B, L, p * p * 3) predicted pixels."""
        x = self.embed(self.encoder_norm(visible))
        tokens = self.mask_token.to(x.dtype).expand(*masked.shape, -1).masked_scatter(~masked[..., None], x)
        x = tokens + sincos_position_table(*grid, self.dim).to(x)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))


def normalised_patches(patches: Tensor) -> Tensor:
    """Each patch's pixels minus their mean, over their standard deviation (MAE's norm_pix_loss)."""
    mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
    return (patches - mean) / (var + NORM_PIX_EPS).sqrt()


class MAE(DetectorMethod):
    """Masked autoencoding of the ViT backbone: reconstruct the masked patches from the visible ones."""

    name = "mae"
    module_prefixes = ("mae_decoder.",)
    architecture_flags = ("mae_decoder_dim", "mae_decoder_depth", "mae_decoder_heads", "mae_input_size")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add = parser.add_argument_group("MAE (--ssl_method mae, or --ssl_task mae: a ViT backbone)").add_argument
        add("--mae_input_size", type=int, default=224,
            help="side of the square random resized crops (area 20-100 %%) MAE trains on; a multiple of 16")
        add("--mae_decoder_dim", type=int, default=512, help="width of MAE's decoder")
        add("--mae_decoder_depth", type=int, default=8, help="blocks of MAE's decoder")
        add("--mae_decoder_heads", type=int, default=16, help="attention heads of MAE's decoder")
        add("--mae_norm_pix", action=argparse.BooleanOptionalAction, default=True,
            help="the loss compares pixels normalised per patch (MAE's norm_pix_loss; --no-mae_norm_pix: raw)")
        add("--mae_base_lr", type=float, default=1.5e-4,
            help="without --lr: lr = this x effective batch (--batch_size x --accum_steps x processes) / 256")

    @classmethod
    def validate(cls, args: argparse.Namespace, error: Error) -> None:
        if not is_vit(args.backbone):
            error(f"--ssl_method mae pre-trains a ViT backbone: use --backbone vit_*, not {args.backbone}")
        if args.ssl_task != "none":
            error(f"--ssl_method mae trains the backbone alone: it cannot run next to --ssl_task {args.ssl_task}")
        if args.mae_input_size < 16 or args.mae_input_size % 16:
            error(f"--mae_input_size must be a positive multiple of the patch size 16, got {args.mae_input_size}")
        if args.mae_decoder_depth < 1 or args.mae_decoder_heads < 1:
            error("--mae_decoder_depth and --mae_decoder_heads must be >= 1")
        if args.mae_decoder_dim % 4 or args.mae_decoder_dim % args.mae_decoder_heads:
            error(f"--mae_decoder_dim {args.mae_decoder_dim} must be a multiple of 4 (its sine-cosine table) and of "
                  f"--mae_decoder_heads {args.mae_decoder_heads}")
        if not args.lr_backbone:
            error("--ssl_method mae trains the backbone: --lr_backbone must be > 0 (by default it is --lr)")
        if not 0 < args.ssl_ratio < 1:
            error(f"--ssl_ratio (MAE's masking ratio) must be in (0, 1), got {args.ssl_ratio}")

    @classmethod
    def configure(cls, args: argparse.Namespace, given: set[str]) -> None:
        for flag, value in RECIPE.items():
            if flag not in given:
                setattr(args, flag, value)
        if not {"warmup_epochs", "warmup_iters"} & given:
            args.warmup_epochs = RECIPE_WARMUP_EPOCHS
        if "lr" not in given:
            batch = args.batch_size * args.accum_steps * int(os.environ.get("WORLD_SIZE", 1))
            args.lr = args.mae_base_lr * batch / 256
        if "lr_backbone" not in given:
            args.lr_backbone = args.lr  # the backbone is what MAE trains

    @classmethod
    def transforms(cls, image_set: str, args: argparse.Namespace) -> Transform:
        return build_crop_transforms(image_set, args.mae_input_size)

    @classmethod
    def pretrained_part(cls, state: dict) -> dict:
        """Only the ViT: MAE trains nothing else of the detector."""
        return {key: value for key, value in state.items() if key.startswith(VIT_KEY_PREFIX)}

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.patch_size = 16

    def attach(self, detector: nn.Module) -> None:
        """``mae_decoder``; the ViT starts as MAE's without backbone weights; everything but the ViT
        (less its fixed position table) and the decoder is frozen."""
        vit = detector.backbone[0].body.vit
        self.patch_size = vit.patch_embed.patch_size[0]
        if self.args.backbone_weights == "none":
            initialise_like_mae(vit)
        detector.mae_decoder = MAEDecoder(vit.embed_dim, self.patch_size, self.args.mae_decoder_dim,
                                          self.args.mae_decoder_depth, self.args.mae_decoder_heads)
        detector.requires_grad_(False)
        vit.requires_grad_(True)
        vit.pos_embed.requires_grad_(False)
        detector.mae_decoder.requires_grad_(True)
        super().attach(detector)

    def describe(self) -> str:
        args = self.args
        return (f"mae ({args.ssl_mode}): {args.ssl_ratio:.0%} of the patches of {args.mae_input_size} px crops masked, "
                f"decoder {args.mae_decoder_depth} x {args.mae_decoder_dim}"
                f"{', pixels normalised per patch' if args.mae_norm_pix else ''}")

    def forward(self, detector: nn.Module, samples: NestedTensor, detect: bool) -> DetectorPass:
        images = samples.tensors
        if samples.mask.any():
            raise ValueError("MAE needs a batch of unpadded images of one size: train it on its own crops "
                             "(--ssl_method mae sets them up from --mae_input_size)")
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        eligible = torch.ones(images.shape[0], *grid, dtype=torch.bool, device=images.device)
        generator = None if detector.training else torch.Generator().manual_seed(EVAL_MASK_SEED)
        masked = select_tokens(eligible, selection_counts(eligible, self.args.ssl_ratio), generator)
        flat = masked.flatten(1)
        visible = encode_visible(detector.backbone[0].body, images, ~flat)
        prediction = detector.mae_decoder(visible, flat, grid)
        outputs = {"mae_outputs": {"prediction": prediction, "masked": masked, "images": images}}
        return DetectorPass(outputs=outputs, levels=[], decoded=None, extra=None, features=([], []))

    def target_patches(self, images: Tensor) -> Tensor:
        """(B, h, w, p * p * 3) what the decoder predicts: the patches, normalised with --mae_norm_pix."""
        patches = patchify(images.float(), self.patch_size)
        return normalised_patches(patches) if self.args.mae_norm_pix else patches

    def loss(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        """Mean squared error per masked patch, averaged over the masked patches."""
        mae = outputs.get("mae_outputs")
        if mae is None:
            return {}
        target = self.target_patches(mae["images"]).flatten(1, 2)
        error = (mae["prediction"].float() - target).pow(2).mean(-1)
        masked = mae["masked"].flatten(1).to(error.dtype)
        return {"loss_mae": (error * masked).sum() / masked.sum().clamp(min=1)}

    def weight_dict(self, scale: float = 1.0) -> dict[str, float]:
        return {"loss_mae": scale}

    @torch.no_grad()
    def pictures(self, outputs: dict, targets: list[dict]) -> list[Picture]:
        """Rows: masked input, reconstruction (visible patches as given, masked ones predicted, in
        the patch's own brightness and contrast under --mae_norm_pix), original."""
        mae = outputs.get("mae_outputs")
        if mae is None:
            return []
        n = min(mae["images"].shape[0], PICTURE_IMAGES)
        images, masked = mae["images"][:n].float(), mae["masked"][:n]
        patches = patchify(images, self.patch_size)
        predicted = mae["prediction"][:n].float().view_as(patches)
        if self.args.mae_norm_pix:
            mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
            predicted = predicted * (var + NORM_PIX_EPS).sqrt() + mean
        reconstruction = unpatchify(torch.where(masked[..., None], predicted, patches), self.patch_size)
        masked_input = images.masked_fill(token_to_pixel_mask(masked, self.patch_size), 0.0)
        return [("ssl/mae", denormalize(torch.cat([masked_input, reconstruction, images])).clamp(0, 1), 3)]
