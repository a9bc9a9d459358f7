"""Backbone speed-ups change nothing observable: frozen BatchNorm folded into the convolutions,
channels-last input on CPUs. Same keys, same outputs and gradients within float rounding."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d

from detr_ssl.models.backbone import (Backbone, FoldedFrozenBatchNorm2d, FrozenBNConv2d, build_resnet,
                                      fold_frozen_batchnorm)
from detr_ssl.utils.misc import NestedTensor


def resnet_with_statistics(name: str = "resnet18", seed: int = 0) -> nn.Module:
    """A frozen-BN ResNet whose BatchNorms do something (random init leaves them the identity)."""
    torch.manual_seed(seed)
    resnet = torchvision.models.get_model(name, weights=None, norm_layer=FrozenBatchNorm2d)
    for module in resnet.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.weight.uniform_(0.5, 1.5)
            module.bias.normal_(0, 0.2)
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    return resnet


STAGES = ("layer2", "layer4")


def plain_body(resnet: nn.Module) -> nn.Module:
    """The unfolded reference: the ResNet's stages as torchvision computes them, same trainable layers."""
    for name, parameter in resnet.named_parameters():
        parameter.requires_grad_(any(s in name for s in ("layer2", "layer3", "layer4")))
    return IntermediateLayerGetter(resnet, return_layers={s: str(i) for i, s in enumerate(STAGES)})


def samples(batch: int = 2, size: int = 96) -> NestedTensor:
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    return NestedTensor(images, torch.zeros(batch, size, size, dtype=torch.bool))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_folding_keeps_keys_outputs_and_gradients(name):
    plain = plain_body(resnet_with_statistics(name))
    folded = Backbone(resnet_with_statistics(name), train_backbone=True, return_stages=STAGES, dilation=False)
    assert list(folded.body.state_dict()) == list(plain.state_dict())
    assert sum(isinstance(m, FrozenBNConv2d) for m in folded.modules()) == sum(
        isinstance(m, FrozenBatchNorm2d) for m in plain.modules()) > 0
    inputs = samples()
    expected, found = plain(inputs.tensors), folded(inputs)
    for a, b in zip(expected.values(), found):  # float rounding of a deep random net: relative to its scale
        torch.testing.assert_close(b.tensors, a, rtol=1e-4, atol=1e-5 * a.abs().max().item())
    sum(feature.square().mean() for feature in expected.values()).backward()
    sum(feature.tensors.square().mean() for feature in found).backward()
    grads = {key: p.grad for key, p in plain.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    for key, parameter in folded.body.named_parameters():
        assert parameter.requires_grad == (key in grads)
        if parameter.requires_grad:
            torch.testing.assert_close(parameter.grad, grads[key], rtol=1e-3,
                                       atol=1e-5 * grads[key].abs().max().item())


def test_a_folded_backbone_loads_unfolded_weights_strictly_and_computes_the_same():
    reference = resnet_with_statistics("resnet50", seed=3)
    folded = resnet_with_statistics("resnet50", seed=4)
    fold_frozen_batchnorm(folded)
    folded.load_state_dict(reference.state_dict(), strict=True)  # e.g. an official checkpoint's backbone
    images = samples(1, 64).tensors
    with torch.no_grad():
        expected = reference(images)
        torch.testing.assert_close(folded(images), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_a_copy_folds_with_its_own_batchnorm():
    original = resnet_with_statistics()
    fold_frozen_batchnorm(original)
    duplicate = copy.deepcopy(original)
    assert duplicate.conv1.frozen_bn is duplicate.bn1 and duplicate.bn1 is not original.bn1
    with torch.no_grad():
        duplicate.bn1.running_var.mul_(4)
        images = samples(1, 64).tensors
        assert not torch.allclose(duplicate(images), original(images))


def test_only_frozen_batchnorm_is_folded():
    trainable = build_resnet("resnet18", "none", False, norm="batch")
    fold_frozen_batchnorm(trainable)
    assert not any(isinstance(m, (FrozenBNConv2d, FoldedFrozenBatchNorm2d)) for m in trainable.modules())


def test_channels_last_input_gives_the_same_features():
    model = Backbone(resnet_with_statistics(), train_backbone=True, return_stages=STAGES, dilation=False)
    inputs = samples()
    with torch.no_grad():
        model.channels_last = False
        expected = model(inputs)
        model.channels_last = True
        found = model(inputs)
    assert found[-1].tensors.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(expected, found):
        torch.testing.assert_close(b.tensors, a.tensors, rtol=1e-4, atol=1e-5 * a.tensors.abs().max().item())
        assert torch.equal(a.mask, b.mask)


def test_float64_agrees_with_the_unfolded_arithmetic_to_rounding():
    """Numerical checks against the official code run in float64: folding moves the BatchNorm
    scale into the weights, a change of rounding only (far below their 1e-10 tolerance)."""
    plain = plain_body(resnet_with_statistics()).double()
    folded = Backbone(resnet_with_statistics(), train_backbone=True, return_stages=STAGES, dilation=False).double()
    inputs = samples()
    inputs = NestedTensor(inputs.tensors.double(), inputs.mask)
    for a, b in zip(plain(inputs.tensors).values(), folded(inputs)):
        torch.testing.assert_close(b.tensors, a, rtol=1e-12, atol=1e-12 * a.abs().max().item())
