"""Model structure: official state-dict layout, inputs, outputs, backbone weights."""
from __future__ import annotations

import csv
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from detr_ssl.config import parse_args
from detr_ssl.models import build_model
from detr_ssl.models.backbone import BackboneWeightsError, build_resnet
from detr_ssl.utils.misc import nested_tensor_from_tensor_list

REFERENCE = Path(__file__).resolve().parent / "fixtures" / "reference"
TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--nheads", "2",
        "--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "64", "--num_queries", "7"]


def read_manifest(name: str) -> dict[str, tuple[int, ...]]:
    with open(REFERENCE / name) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return {r["key"]: tuple(int(d) for d in r["shape"].split("x")) if r["shape"] else () for r in rows}


def test_detr_r50_state_dict_equals_official_manifest(tmp_path):
    manifest = read_manifest("detr_r50.tsv")
    model, _, _ = build_model(parse_args(["--backbone_weights", "none"]))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == manifest

    # An "official" checkpoint: tensors of the listed shapes, loaded strictly, saved and re-read.
    generator = torch.Generator().manual_seed(0)
    official = {k: torch.randn(shape, generator=generator) for k, shape in manifest.items()}
    model.load_state_dict(official, strict=True)
    torch.save({"model": model.state_dict()}, tmp_path / "ckpt.pth")
    reloaded = torch.load(tmp_path / "ckpt.pth", weights_only=True)["model"]
    assert list(reloaded) == list(model.state_dict())
    assert all(torch.equal(reloaded[k], official[k]) for k in manifest)


def test_options_change_the_layout_as_the_official_code():
    model, _, _ = build_model(parse_args(TINY + ["--pre_norm", "--position_embedding", "learned", "--num_classes", "5"]))
    keys = model.state_dict()
    assert "transformer.encoder.norm.weight" in keys  # pre-norm adds a final encoder norm
    assert keys["backbone.1.row_embed.weight"].shape == (50, 16)
    assert keys["class_embed.weight"].shape == (6, 32)  # num_classes + no-object
    assert keys["input_proj.weight"].shape == (32, 512, 1, 1)  # resnet18's last stage has 512 channels


def trainable_backbone_parts(model) -> set[str]:
    return {n.split(".")[2] for n, p in model.backbone.named_parameters() if p.requires_grad}


def test_pretrained_backbone_trains_layers_2_to_4_and_lr_backbone_0_freezes_all(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    pretrained = TINY + ["--backbone_weights", str(tmp_path / "r18.pth")]
    model, _, _ = build_model(parse_args(pretrained))
    assert trainable_backbone_parts(model) == {"layer2", "layer3", "layer4"}
    frozen, _, _ = build_model(parse_args(pretrained + ["--lr_backbone", "0"]))
    assert not any(p.requires_grad for p in frozen.backbone.parameters())


def test_backbone_from_scratch_trains_every_layer_and_its_batchnorm():
    model, _, _ = build_model(parse_args(TINY + ["--backbone_norm", "batch"]))
    assert trainable_backbone_parts(model) == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}
    assert isinstance(model.backbone[0].body.bn1, torch.nn.BatchNorm2d)


def test_forward_accepts_lists_and_nested_tensors(coco_images):
    torch.manual_seed(0)
    model, _, _ = build_model(parse_args(TINY))
    model.eval()
    images = coco_images[:2]
    with torch.no_grad():
        from_list = model(images)
        from_nested = model(nested_tensor_from_tensor_list(images))
    assert from_list["pred_logits"].shape == (2, 7, 92)
    assert from_list["pred_boxes"].shape == (2, 7, 4)
    assert len(from_list["aux_outputs"]) == 1
    assert torch.equal(from_list["pred_boxes"], from_nested["pred_boxes"])
    assert ((from_list["pred_boxes"] >= 0) & (from_list["pred_boxes"] <= 1)).all()


def test_transformer_ignores_padded_tokens():
    """Whatever the features under the padding mask are, valid tokens and queries get the same output."""
    torch.manual_seed(0)
    model, _, _ = build_model(parse_args(TINY + ["--dropout", "0"]))
    transformer = model.transformer.eval()
    src, pos = torch.randn(1, 32, 4, 6), torch.randn(1, 32, 4, 6)
    mask = torch.zeros(1, 4, 6, dtype=torch.bool)
    mask[:, 3:, :] = True
    mask[:, :, 5:] = True
    other = src.clone()
    other[..., 3:, :] = 100 * torch.randn_like(other[..., 3:, :])
    other[..., :, 5:] = -7.0
    with torch.no_grad():
        hs_a, memory_a = transformer(src, mask, model.query_embed.weight, pos)
        hs_b, memory_b = transformer(other, mask, model.query_embed.weight, pos)
    valid = ~mask.flatten(1)
    assert torch.allclose(memory_a[valid], memory_b[valid], atol=1e-5)
    assert torch.allclose(hs_a, hs_b, atol=1e-5)
    assert not torch.allclose(memory_a[~valid], memory_b[~valid])


def test_backbone_weights_from_a_local_file(tmp_path):
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    resnet = build_resnet("resnet18", str(tmp_path / "r18.pth"), dilation=False)
    assert torch.equal(resnet.conv1.weight, reference.conv1.weight)
    assert torch.equal(resnet.layer1[0].bn1.running_var, reference.layer1[0].bn1.running_var)


def test_backbone_weights_that_do_not_fit_are_named(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(BackboneWeightsError, match="does not fit resnet50"):
        build_resnet("resnet50", str(tmp_path / "r18.pth"), dilation=False)


def test_offline_imagenet_download_gives_a_clear_message(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(BackboneWeightsError, match="--backbone_weights none"):
        build_resnet("resnet18", "imagenet", dilation=False)
