"""ResNet backbone with frozen BatchNorm, multi-scale outputs and offline-friendly weights.

The module tree (``backbone.0.body.*`` for the ResNet, ``backbone.1`` for the position
encoding) matches the official DETR code so that official checkpoints load strictly.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d

from ..utils.errors import UserError
from ..utils.misc import NestedTensor

logger = logging.getLogger("detr_ssl")

STAGES = ("layer1", "layer2", "layer3", "layer4")
STAGE_STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}


class BackboneWeightsError(UserError, RuntimeError):
    """The requested backbone weights cannot be obtained or do not fit."""


def _imagenet_state_dict(name: str) -> dict[str, Tensor]:
    """torchvision's ImageNet weights (IMAGENET1K_V1, as the official DETR), from cache or download."""
    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; hash mismatch a RuntimeError
        raise BackboneWeightsError(
            f"could not get ImageNet weights for {name} ({err}).\n"
            f"Offline? Download {weights.url} on a machine with internet and pass "
            f"--backbone_weights /path/to/{Path(weights.url).name}, or use --backbone_weights none "
            "to start from random weights."
        ) from err


def _file_state_dict(path: str) -> dict[str, Tensor]:
    """A torchvision-style ResNet state dict from a local file (optionally under 'model'/'state_dict')."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise BackboneWeightsError(f"--backbone_weights: file not found: {path}") from err
    except Exception as err:  # unpickling refused or corrupt file
        raise BackboneWeightsError(f"--backbone_weights {path}: cannot be loaded safely ({err})") from err
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise BackboneWeightsError(f"--backbone_weights {path}: expected a state dict, got {type(state).__name__}")
    return state


NORM_LAYERS = {"frozen": FrozenBatchNorm2d, "batch": nn.BatchNorm2d}


class FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """A FrozenBatchNorm2d applied by the convolution before it (:class:`FrozenBNConv2d`): its own
    forward is the identity. Its buffers, and so the state-dict keys, stay where they were."""

    def forward(self, x: Tensor) -> Tensor:
        return x

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """The per-channel affine map x * scale + shift, computed as FrozenBatchNorm2d does."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale


class FrozenBNConv2d(nn.Conv2d):
    """A bias-free convolution followed by a frozen BatchNorm, run as one convolution with the
    weights scaled and the shift as bias: two passes over the activations fewer in the forward,
    one in the backward. The weights stay the trained parameter (the scaling is recomputed every
    call, so gradients and checkpoints are those of the unfolded pair); the BatchNorm module is
    referenced, not owned, so it keeps its place and keys in the module tree."""

    frozen_bn: FoldedFrozenBatchNorm2d

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self.frozen_bn.scale_shift()
        return self._conv_forward(x, self.weight * scale[:, None, None, None], shift)


def fold_frozen_batchnorm(resnet: nn.Module) -> None:
    """Fold every FrozenBatchNorm2d of a torchvision ResNet into the convolution before it, in place
    (stem, each block's convN/bnN pairs and its downsample). The module tree, parameters, buffers
    and state-dict keys are unchanged; outputs equal the unfolded ones within float rounding."""
    pairs = [(resnet, "conv1", "bn1")]
    for stage in STAGES:
        for block in getattr(resnet, stage):
            pairs += [(block, f"conv{i}", f"bn{i}") for i in (1, 2, 3) if hasattr(block, f"conv{i}")]
            if block.downsample is not None:
                pairs.append((block.downsample, "0", "1"))
    for parent, conv_name, bn_name in pairs:
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        if type(bn) is not FrozenBatchNorm2d or type(conv) is not nn.Conv2d or conv.bias is not None:
            continue
        bn.__class__ = FoldedFrozenBatchNorm2d  # same state, new forward
        conv.__class__ = FrozenBNConv2d
        object.__setattr__(conv, "frozen_bn", bn)  # a plain attribute, not a submodule: keys unchanged


def build_resnet(name: str, weights: str, dilation: bool, norm: str = "frozen") -> nn.Module:
    """A torchvision ResNet with the requested weights ('imagenet', 'none', path) and normalisation.

    ``frozen`` (FrozenBatchNorm2d, the official choice) keeps the statistics of pretrained
    weights; from random weights those statistics are meaningless, so ``batch`` trains them.
    """
    if weights == "none" and norm == "frozen":
        logger.warning("random backbone weights with frozen BatchNorm: its statistics will never adapt; "
                       "use --backbone_norm batch to train from scratch")
    resnet = getattr(torchvision.models, name)(
        weights=None, norm_layer=NORM_LAYERS[norm], replace_stride_with_dilation=[False, False, dilation]
    )
    if weights == "none":
        return resnet
    state = _imagenet_state_dict(name) if weights == "imagenet" else _file_state_dict(weights)
    state = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    expected = {k: v.shape for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k])}"
                 for k, v in state.items() if k in expected and v.shape != expected[k]]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} problems)" if len(problems) > 5 else "")
        raise BackboneWeightsError(f"--backbone_weights {weights} does not fit {name}: {shown}")
    resnet.load_state_dict(state, strict=False)
    logger.info("backbone %s: loaded %s weights", name, weights)
    return resnet


class Backbone(nn.Module):
    """ResNet body returning the feature maps of the requested stages, with downsampled masks.

    As the official code, only ``layer2``-``layer4`` train, whatever the weights; with
    ``train_stem`` (trainable BatchNorm, i.e. training from scratch) every layer does.
    ``train_backbone=False`` freezes all.
    """

    def __init__(self, resnet: nn.Module, train_backbone: bool, return_stages: tuple[str, ...], dilation: bool,
                 train_stem: bool = False):
        super().__init__()
        for name, parameter in resnet.named_parameters():
            trainable = train_backbone and (train_stem or any(s in name for s in ("layer2", "layer3", "layer4")))
            parameter.requires_grad_(trainable)
        fold_frozen_batchnorm(resnet)
        self.body = IntermediateLayerGetter(resnet, return_layers={s: str(i) for i, s in enumerate(return_stages)})
        final_channels = resnet.fc.in_features
        self.num_channels = [final_channels // 2 ** (len(STAGES) - 1 - STAGES.index(s)) for s in return_stages]
        self.strides = [STAGE_STRIDES[s] // (2 if dilation and s == "layer4" else 1) for s in return_stages]

    # CPU input goes channels-last (NHWC): oneDNN's float32 / bfloat16 convolutions are faster so
    # (docs/benchmarks.md).
    channels_last = True

    def forward(self, samples: NestedTensor) -> list[NestedTensor]:
        images = samples.tensors
        if self.channels_last and images.device.type == "cpu":
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.body(images)
        out = []
        for feature in features.values():
            mask = F.interpolate(samples.mask[None].float(), size=feature.shape[-2:]).to(torch.bool)[0]
            out.append(NestedTensor(feature, mask))
        return out


class Joiner(nn.Sequential):
    """Backbone (index 0) and position encoding (index 1): the official module layout."""

    def __init__(self, backbone: Backbone, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels
        self.strides = backbone.strides

    def forward(self, samples: NestedTensor, grad: bool = True) -> tuple[list[NestedTensor], list[Tensor]]:
        """Each returned stage's features and position embedding; ``grad=False`` computes the
        features without gradients (nothing behind them trains or stores activations)."""
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            features = self[0](samples)
        positions = [self[1](f).to(f.tensors.dtype) for f in features]
        return features, positions


def build_backbone(args, position_embedding: nn.Module, return_stages: tuple[str, ...] = ("layer4",)) -> Joiner:
    """Build the ResNet named by ``--backbone`` with ``--backbone_weights``, ``--backbone_norm`` and ``--dilation``,
    or a ViT with its simple feature pyramid (:mod:`.vit`; the pyramid levels stand for ``return_stages``)."""
    from .vit import build_vit_backbone, is_vit  # vit imports this module's weight helpers

    if is_vit(args.backbone):
        return Joiner(build_vit_backbone(args, return_stages), position_embedding)
    resnet = build_resnet(args.backbone, args.backbone_weights, args.dilation, args.backbone_norm)
    backbone = Backbone(resnet, train_backbone=args.lr_backbone > 0, return_stages=return_stages,
                        dilation=args.dilation, train_stem=args.backbone_norm == "batch")
    return Joiner(backbone, position_embedding)
